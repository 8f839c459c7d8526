"""Measuring deployed models: the timing worker, roofline, budgets, mobile checks, run comparison."""
