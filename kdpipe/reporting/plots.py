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


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x, higher y): the accuracy / cost front."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return front


def _pareto_panel(ax: Any, pts: list[tuple[str, float, float]], xlabel: str, colors: dict[str, Any]) -> None:
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    xy = [(x, y) for _, x, y in pts]
    front = set(pareto_front(xy))
    for i, (label, x, y) in enumerate(sorted(pts, key=lambda p: p[1])):
        on = (x, y) in {xy[j] for j in front}
        ax.scatter([x], [y], s=70 if on else 35, marker="o" if on else "x", color=colors[label], zorder=3)
        dy = (6, -12)[i % 2]  # alternate above / below, so neighbours' labels do not overlap
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(3, dy), fontsize=7, color=colors[label])
    line = sorted(xy[i] for i in front)
    ax.plot([p[0] for p in line], [p[1] for p in line], "--", color="gray", alpha=0.6, zorder=2, label="Pareto front")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")


def plot_pareto(data: dict[str, Any], path: Path) -> None:
    """Test accuracy against p50 latency (first shape) and against size on disk, every model of report.json."""
    plt = _plt()
    shape = data["shapes"][0] if data["shapes"] else None
    lat = [
        (n, m["latency"][shape]["p50_ms"], 100 * m["accuracy"])
        for n, m in data["models"].items()
        if shape in m["latency"] and m["accuracy"] is not None
    ]
    size = [
        (n, m["bytes"] / 2**20, 100 * m["accuracy"])
        for n, m in data["models"].items()
        if m["bytes"] and m["accuracy"] is not None
    ]
    names = sorted(data["models"])
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    if lat:
        _pareto_panel(axes[0], lat, f"p50 latency at {shape} (ms, log scale)", colors)
    if size:
        _pareto_panel(axes[1], size, "model size on disk (MiB, log scale)", colors)
    axes[0].set_ylabel("test accuracy (%)")
    fig.suptitle(f"Accuracy vs cost, profile '{data['profile']['name']}'", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
