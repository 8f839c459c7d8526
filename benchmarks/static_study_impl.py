"""Cross-check of benchmarks/static_study.py through kdpipe's own implementation (kdpipe.tasks.embedding.static):
the least-squares map alone (0 epochs) and finetune_static at the recipe's epochs, on the 1,000 transfer tweets.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/static_study_impl.py   (after static_study.py: reuses its cache)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("STATIC_STUDY_CACHE", "/tmp/kdpipe-static-study"))


def main() -> None:
    from kdpipe.config import load_recipe
    from kdpipe.tasks.embedding import data
    from kdpipe.tasks.embedding.encoder import encode, load_encoder
    from kdpipe.tasks.embedding.quality import lee_score, load_lee, recall_at_k
    from kdpipe.tasks.embedding.static import distill_static, finetune_static, load_static
    from kdpipe.tasks.embedding.teachers import minilm_dir

    lee = load_lee()
    recipe, _ = load_recipe(str(ROOT / "stages" / "embedding-static.yaml"))
    assert recipe.teacher.embedding is not None
    split = data.split(data.read_corpus(recipe.teacher), recipe.teacher.embedding, recipe.seed)
    encoder, tok = load_encoder(minilm_dir())
    t_lee = lee_score(lambda t: encode(encoder, tok, t), lee).spearman
    held_t = encode(encoder, tok, split.held_out)
    targets = encode(encoder, tok, split.transfer)
    student = distill_static(minilm_dir(), CACHE / "default", pca_dims=256)
    base = load_static(student.path)

    def score(name: str, model: object) -> None:
        def embed(t: Any) -> np.ndarray:
            return np.asarray(model.encode(list(t), use_multiprocessing=False), dtype=np.float32)  # type: ignore[attr-defined]

        rho = lee_score(embed, lee).spearman
        r10 = recall_at_k(embed(split.held_out), held_t, 10)
        print(f"| {name} | {rho:.4f} | {100 * rho / t_lee:.1f}% | {r10:.3f} |", flush=True)

    print(f"teacher {t_lee:.4f}")
    score("kdpipe distill_static default (PCA 256, Zipf SIF 1e-4)", base)
    for epochs in (0, 5, 20):
        t0 = time.perf_counter()
        model, info = finetune_static(base, split.transfer, targets, epochs=epochs, seed=recipe.seed)
        score(f"kdpipe finetune_static, {epochs} epochs on the 1k transfer tweets (kept epoch {info.best_epoch}, "
              f"val cos {info.val_cosine_before:.3f} -> {info.val_cosine_after:.3f}, {time.perf_counter() - t0:.0f} s)",
              model)  # fmt: skip


if __name__ == "__main__":
    main()
