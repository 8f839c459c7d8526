"""Distillation methods beyond the loss terms: Bayesian posteriors and init, augmentation, data-free KD."""
