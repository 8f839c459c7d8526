"""Translation (seq2seq), teacher.task: translation: one module per stage, task.py its Task."""
