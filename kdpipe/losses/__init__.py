"""Distillation losses. Import the module you need; this package imports nothing.

- terms: the recipe catalogue (pydantic, torch-free); each config class builds its own Term.
- objective: LossContext, Term, StepLoss, Objective, build_objective, resolve_map (torch).
- schedule: the PID / SID layer Schedule (torch-free).
- logits, features, relational: the formulas of docs/methods.md §1, §2 and §3 (torch).
- masks: masked means over real tokens; inputs: what a term reads from KDOutputs; progress: the
  [CLS] cosine loss the PID/SID threshold compares.
"""
