"""The PNG plots of the distill and profile stages (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(history: list[dict[str, float]], baseline: list[dict[str, float]] | None, path: Path) -> None:
    """Training loss per step of the KD student and (when trained) the no-KD baseline."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for hist, label in ((history, "KD student (recipe loss)"), (baseline, "no-KD student (hard CE)")):
        if hist:
            ax.plot([r["step"] for r in hist], [r["loss"] for r in hist], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Distillation: training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(results: dict[str, Any], path: Path) -> None:
    """p50 bars (whisker to p90) per model and engine, one group per timed shape."""
    plt = _plt()
    ort_res = results["onnxruntime"]
    shapes = list(next(iter(ort_res.values()))["shapes"])
    series = [(f"{m} ORT", ort_res[m]["shapes"]) for m in ort_res]
    series += [(f"{m} torch", r["shapes"]) for m, r in results.get("torch_eager", {}).items()]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(series)
    for i, (label, data) in enumerate(series):
        xs = [j + i * width for j in range(len(shapes))]
        p50 = [data[s]["p50_ms"] for s in shapes]
        err = [[0] * len(shapes), [data[s]["p90_ms"] - data[s]["p50_ms"] for s in shapes]]
        ax.bar(xs, p50, width, yerr=err, capsize=3, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], [f"batch x seq {s}" for s in shapes])
    ax.set_ylabel("latency p50 (ms), whisker to p90")
    ax.set_title(f"Latency on profile '{results['profile']['name']}'")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cka(matrix: np.ndarray, path: Path) -> None:
    """Teacher layer x student layer linear CKA heat map (docs/methods.md §3.3)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * matrix.shape[1], 1.0 + 0.5 * matrix.shape[0]))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            color = "white" if matrix[i, j] < 0.6 else "black"
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("student hidden state (0 = embeddings)")
    ax.set_ylabel("teacher hidden state")
    ax.set_title("linear CKA, teacher x student")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
