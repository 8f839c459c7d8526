"""Deprecated: the recipe catalogue moved to kdpipe.losses.terms; import from there."""

from kdpipe.losses.terms import *  # noqa: F403
from kdpipe.losses.terms import LOSS_TYPES, LossConfig, _Loss  # noqa: F401

LOGIT_TERMS = frozenset(n for n, c in LOSS_TYPES.items() if c.on_logits)
SOFT_TERMS = frozenset(n for n, c in LOSS_TYPES.items() if c.soft)
