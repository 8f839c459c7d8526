"""kdpipe: teacher -> student -> distill -> export -> profile, one honest pipeline."""

__version__ = "0.1.0"
