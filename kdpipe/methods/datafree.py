"""Data-free distillation from statistics (docs/methods.md §5, Lopes et al. 2017).

The teacher stage stores per-class mean and covariance of its logits (`logit_stats.json`). Here we
sample targets b ~ N(mu_c, Sigma_c), reconstruct inputs x0 = argmin_x ||f(x) - b||^2 by optimising
input embeddings (the teacher's word-embedding space, so no text is needed), and the student is
distilled on x0 (both models take `inputs_embeds`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.artifacts.manifest import Manifest
from kdpipe.errors import ArtifactError


@dataclass(frozen=True)
class EmbeddedSet:
    """Synthetic inputs: embeddings (N, T, H) with an all-ones attention mask; labels -1 (teacher argmax)."""

    embeds: Any  # torch.Tensor
    labels: list[int]

    def __len__(self) -> int:
        return int(self.embeds.shape[0])


def _psd(cov: np.ndarray) -> np.ndarray:
    """The nearest symmetric positive-semidefinite matrix: logits of one class are nearly collinear, so
    a stored (rounded) covariance can have tiny negative eigenvalues."""
    sym = (cov + cov.T) / 2
    w, v = np.linalg.eigh(sym)
    return np.asarray((v * np.clip(w, 0, None)) @ v.T)


def load_stats(teacher: Manifest) -> dict[str, Any]:
    """The teacher artifact's per-class logit statistics (`logit_stats.json`, validation split)."""
    if not teacher.has("logit_stats.json"):
        raise ArtifactError(
            f"{teacher.dir}: the teacher artifact has no logit_stats.json (made without a validation split)",
            "re-run `kdpipe teacher --force` with teacher.data.val_size > 0",
        )
    stats: dict[str, Any] = json.loads(teacher.path("logit_stats.json").read_text())
    return stats


def synthesize(
    teacher: Any, stats: dict[str, Any], cfg: Any, seed: int, device: str, console: Any
) -> tuple[EmbeddedSet, dict[str, Any]]:
    import torch

    rng = np.random.RandomState(seed)
    names = list(stats["classes"])
    targets, wanted = [], []
    for c, name in enumerate(names):
        st = stats["classes"][name]
        targets.append(
            rng.multivariate_normal(
                st["mean"], _psd(np.asarray(st["cov"])), size=cfg.samples_per_class, check_valid="ignore"
            )
        )
        wanted += [int(st.get("index", c))] * cfg.samples_per_class
    b = torch.tensor(np.concatenate(targets), dtype=torch.float32, device=device)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    emb = teacher.get_input_embeddings().weight.detach()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if emb.shape[0] > 2000 else 1, emb.shape[0], (len(b), cfg.seq_len), generator=g)
    x = emb[ids.to(device)].clone().requires_grad_(True)  # start from real token embeddings
    mask = torch.ones(x.shape[:2], dtype=torch.long, device=device)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    first = last = float("nan")
    for step in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        loss = ((teacher(inputs_embeds=x, attention_mask=mask).logits.float() - b) ** 2).sum(-1).mean()
        loss.backward()
        opt.step()
        last = float(loss.detach())
        first = last if step == 0 else first
    with torch.no_grad():
        pred = teacher(inputs_embeds=x, attention_mask=mask).logits.argmax(-1).cpu().numpy()
    hit = float((pred == np.asarray(wanted)).mean())
    console.print(
        f"data-free: {len(b)} inputs of {cfg.seq_len} positions reconstructed in {cfg.steps} steps; "
        f"||f(x) - b||^2 {first:.3f} -> {last:.3f}; teacher predicts the sampled class on {hit:.1%}"
    )
    report = {
        "inputs": len(b),
        "seq_len": cfg.seq_len,
        "steps": cfg.steps,
        "match_loss_first": first,
        "match_loss_last": last,
        "sampled_class_hit_rate": hit,
        "stats_split": stats.get("split"),
    }
    return EmbeddedSet(embeds=x.detach().cpu(), labels=[-1] * len(b)), report


def write_logit_stats(logits: np.ndarray, labels: list[int], names: list[str], path: Path) -> None:
    """Per-class mean and covariance of the teacher's logits on the validation split: what data-free
    distillation (docs/methods.md §5, Lopes et al.) samples targets from when no training data is at hand."""

    y = np.asarray(labels)
    classes = {}
    for i, name in enumerate(names):
        rows = logits[y == i].astype(np.float64)
        if len(rows) < 2:
            continue
        classes[name] = {
            "index": i,  # the class's logit index: a class left out (< 2 rows) must not shift the others
            "count": int(len(rows)),
            "mean": rows.mean(0).round(6).tolist(),
            "cov": np.cov(rows, rowvar=False).round(6).tolist(),
        }
    path.write_text(json.dumps({"split": "val", "classes": classes}, indent=2) + "\n")
