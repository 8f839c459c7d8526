"""Causal language models (teacher.task: causal_lm): a decoder-only LM distilled into one with fewer layers."""
