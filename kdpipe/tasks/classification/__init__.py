"""The classification task: a HF encoder with a classification head, through every stage."""
