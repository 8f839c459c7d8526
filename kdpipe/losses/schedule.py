"""The PID / SID layer schedules (docs/methods.md §2.4), torch-free.

A Schedule decides, step by step, which student layers the layer terms train and whether the terms
on the logits run; it knows terms only through their flags (`Term.on_logits`, `Term.soft`), never
by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Schedule:
    """PID / SID (docs/methods.md §2.4): one matched student layer at a time, bottom-up; move on after
    `cap_steps` or once the CURRENT layer's [CLS] cosine loss (not the sum of the active terms) is
    below `threshold`, whichever first. After the last layer, the logit terms (and the logit parts of
    layer terms, e.g. TinyBERT's prediction term) take over (classifier last); SID keeps every
    layer's loss on. kind='all' (the default) runs every term on every step."""

    kind: str = "all"
    order: list[int] = field(default_factory=list)  # student layers, bottom-up
    cap_steps: int = 100
    threshold: float = 0.0
    classifier_last: bool = True
    keep_soft: bool = False
    stage: int = 0
    steps_in_stage: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)  # {step, layer, reason, loss} per move-on

    @property
    def layer_phase(self) -> bool:
        return self.kind != "all" and self.stage < len(self.order)

    def active_layers(self) -> set[int] | None:
        """The student layers the layer terms train now; None: every layer (kind 'all')."""
        if self.kind == "all":
            return None
        if self.stage >= len(self.order):
            return set(self.order) if self.kind == "sid" else set()
        return {self.order[self.stage]} if self.kind == "pid" else set(self.order[: self.stage + 1])

    @property
    def current_layer(self) -> int | None:
        return self.order[self.stage] if self.layer_phase else None

    def logit_term_on(self, *, soft: bool) -> bool:
        """Whether a term on the logits runs now; `soft` (its `Term.soft`): a soft-label loss, which
        keep_soft keeps on during the layer phase."""
        if not self.layer_phase or not self.classifier_last:
            return True
        return self.keep_soft and soft

    def advance(self, step: int, layer_loss: float | None) -> None:
        """layer_loss: the current layer's [CLS] cosine loss on this step's batch (None: unknown)."""
        if not self.layer_phase:
            return
        self.steps_in_stage += 1
        below = layer_loss is not None and self.threshold > 0 and layer_loss < self.threshold
        if self.steps_in_stage >= self.cap_steps or below:
            self.events.append(
                {
                    "step": step,
                    "layer": self.order[self.stage],
                    "reason": "threshold" if below else "cap",
                    "loss": layer_loss,
                }
            )
            self.stage += 1
            self.steps_in_stage = 0
