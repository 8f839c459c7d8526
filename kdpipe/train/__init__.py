"""Training: the explicit loop, the teacher-output cache, resume checkpoints, multi-process setup."""
