"""The teacher x student layer CKA of a distilled classifier (docs/methods.md §3.3): cka.json, cka.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.config import DistillConfig
from kdpipe.data.tables import Encoded, batches, encode, read_split, subset
from kdpipe.losses.masks import mean_pool
from kdpipe.models.loading import forward_kd
from kdpipe.reporting.analysis import cka_document, cka_matrix
from kdpipe.reporting.plots import plot_cka
from kdpipe.tasks.classification.pair import Pair
from kdpipe.train.loop import Device


def write_cka(cfg: DistillConfig, pair: Pair, model: Any, device: Device, work: Path) -> list[float] | None:
    """The teacher x student layer CKA on test examples (cka.json, cka.png); its diagonal along the layer map."""
    if not cfg.cka_samples or not getattr(model, "supports_feature_losses", True):  # a BiLSTM has no layers
        return None
    test_part = subset(pair.splits["test"], cfg.cka_samples)
    if pair.student_ids is not None:  # both read the teacher's ids; the student through its map
        texts = read_split(pair.teacher_manifest.path("data/test.jsonl"))
        test_part = subset(encode(pair.teacher_tokenizer, texts, pair.teacher_record.max_length), cfg.cka_samples)
    matrix = _layer_cka(pair.teachers[0], model.to(device.torch_device), test_part, device, pair.student_ids)
    (work / "cka.json").write_text(json.dumps(cka_document(matrix, len(test_part)), indent=2) + "\n")
    plot_cka(matrix, work / "cka.png")
    return [float(round(matrix[t][s], 5)) for s, t in sorted(pair.loss_ctx.layer_map.items())]


def _layer_cka(teacher: Any, student: Any, data: Encoded, device: Device, student_ids: Any = None) -> np.ndarray:
    """docs/methods.md §3.3: linear CKA of every teacher layer x every student layer, on mean-pooled hidden
    states over real tokens; (teacher hidden states, student hidden states), 0 = embeddings."""
    import torch

    feats: dict[str, list[list[torch.Tensor]]] = {"teacher": [], "student": []}
    with torch.no_grad():
        for batch in batches(data, 64, shuffle=False):
            batch = {k: v.to(device.torch_device) for k, v in batch.items() if k != "labels"}
            for key, model in (("teacher", teacher), ("student", student)):
                mapped = key == "student" and student_ids is not None
                b = {**batch, "input_ids": student_ids.to(device.torch_device)[batch["input_ids"]]} if mapped else batch
                dev = next(model.parameters()).device  # a cached or host-kept teacher may be off the device
                out = forward_kd(model.eval(), {k: v.to(dev) for k, v in b.items()}, hidden=True)
                assert out.hidden_states is not None
                mask = batch["attention_mask"].to(dev)
                feats[key].append([mean_pool(h.float(), mask).cpu() for h in out.hidden_states])
    per_layer = {k: [torch.cat([b[i] for b in v]) for i in range(len(v[0]))] for k, v in feats.items()}
    return cka_matrix(per_layer["teacher"], per_layer["student"])
