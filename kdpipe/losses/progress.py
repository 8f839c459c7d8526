"""The PID/SID move-on measure (docs/methods.md §2.4): one layer's [CLS] cosine loss.

A layer term's `progress` is `cls_loss` on one (student layer, teacher layer) pair, through the
term's own projections when the two widths differ; the Objective evaluates it under no_grad.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from kdpipe.losses.objective import LossContext, ProgressFn
    from kdpipe.models.loading import KDOutputs


def cls_loss(
    s: KDOutputs, t: KDOutputs, m: int, n: int, proj_s: nn.Module | None = None, proj_t: nn.Module | None = None
) -> Tensor:
    """() 1 - cos(proj_s(h_s[m][:, 0]), proj_t(h_t[n][:, 0])), mean over the batch: the [CLS] (B, H)
    cosine loss of student hidden-state index m against teacher index n; the teacher is detached."""
    assert s.hidden_states is not None and t.hidden_states is not None
    a, b = s.hidden_states[m][:, 0].float(), t.hidden_states[n][:, 0].detach().float()
    if proj_s is not None:
        a = proj_s(a)
    if proj_t is not None:
        b = proj_t(b)
    return (1 - F.cosine_similarity(a, b, dim=-1)).mean()


def plain_progress(ctx: LossContext) -> ProgressFn | None:
    """The [CLS] cosine without a projection: only when the two widths are equal (None otherwise)."""
    if ctx.d_student != ctx.d_teacher:
        return None
    return lambda s, t, m, n: cls_loss(s, t, m, n)
