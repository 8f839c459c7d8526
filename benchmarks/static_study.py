"""What raises the static (model2vec) student's Lee Spearman retention, offline: a measurement study.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/static_study.py [--out benchmarks/results/static-study.md]

Teacher: the embedded all-MiniLM-L6-v2 (kdpipe.tasks.embedding.teachers.minilm_dir). Every setting is scored with
kdpipe.tasks.embedding.quality.lee_score (Spearman of document cosines vs the Lee human scores, 50 documents,
1,225 pairs) and timed encoding the 50 Lee documents (best of 5, single process).

model2vec's expensive step (every vocabulary token through the teacher) runs once through model2vec's own
distill_from_model with pca_dims=None, sif_coefficient=None, float32; PCA / SIF / quantisation are then applied with
model2vec's own apply_pca / compute_weights / quantize_embeddings in the order distill_from_model applies them
(weights computed, PCA, rows times weights, quantise), so each row equals model2vec.distill(...) with that setting.
The custom-vocabulary rows call distill_from_model again with `vocabulary=`.

Corpus: the recipe stages/embedding-static.yaml's sentences (the embedded tweets), split as the teacher stage does
(seeded: 500 held out; the transfer set is the next 1,000, or every non-held-out tweet for the 'all' rows).
Fine-tune rows: the static table trained on the teacher's (normalised) embeddings of transfer tweets with
1 - cosine (EmbeddingBag mean, as StaticModel.encode; Adam), optionally through a learned linear map to the
teacher's 384-d space that is folded into the table afterwards (mean is linear: mean(E) W + b = mean(E W + b)),
stopped on a 10% validation split of the transfer tweets, never on Lee.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("STATIC_STUDY_CACHE", "/tmp/kdpipe-static-study"))


def _cpu_flags() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown"
    return " ".join(sorted(set(re.findall(r"avx2|avx512f|avx512_vnni|amx_int8", out)))) or "none"


def _time_ms(fn: Any, runs: int = 5) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "static-study.md")
    ap.add_argument("--skip-vocab", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from model2vec import StaticModel
    from model2vec.distill.distillation import distill_from_model
    from model2vec.distill.inference import apply_pca, compute_weights
    from model2vec.quantization import DType, quantize_embeddings
    from transformers import AutoModel, AutoTokenizer

    from kdpipe.config import load_recipe
    from kdpipe.tasks.embedding import data
    from kdpipe.tasks.embedding.encoder import encode, load_encoder
    from kdpipe.tasks.embedding.quality import lee_score, load_lee, recall_at_k
    from kdpipe.tasks.embedding.teachers import minilm_dir

    CACHE.mkdir(parents=True, exist_ok=True)
    lee = load_lee()
    docs = list(lee.documents)
    rows: list[tuple[str, float, float, float, str]] = []

    # ---- teacher
    teacher_dir = minilm_dir()
    encoder, tok = load_encoder(teacher_dir)
    t_score = lee_score(lambda t: encode(encoder, tok, t), lee, "teacher").spearman
    t_ms = _time_ms(lambda: encode(encoder, tok, docs), runs=2)
    print(f"teacher Lee Spearman {t_score:.4f}, {t_ms:.0f} ms / 50 docs", flush=True)

    recipe, _ = load_recipe(str(ROOT / "stages" / "embedding-static.yaml"))
    corpus = data.read_corpus(recipe.teacher)
    assert recipe.teacher.embedding is not None
    split = data.split(corpus, recipe.teacher.embedding, recipe.seed)
    held = set(split.held_out)
    rest = [t for t in corpus if t not in held]
    transfer_1k = split.transfer
    print(f"corpus {len(corpus)} tweets; transfer {len(transfer_1k)}; all non-held-out {len(rest)}", flush=True)

    held_t = encode(encoder, tok, split.held_out)

    def add(name: str, model: Any, note: str = "") -> float:
        def embed(t: Any) -> np.ndarray:
            return np.asarray(model.encode(list(t), use_multiprocessing=False), dtype=np.float32)

        rho = lee_score(embed, lee, name).spearman
        recall = recall_at_k(embed(split.held_out), held_t, 10)
        ms = _time_ms(lambda: model.encode(docs, use_multiprocessing=False))
        rows.append((name, rho, recall, ms, note))
        print(f"{name:55s} {rho:.4f} {100 * rho / t_score:5.1f}% r@10 {recall:.3f} {ms:6.1f} ms {note}", flush=True)
        return rho

    # ---- raw token vectors, once (model2vec's own forward pass)
    hf_model = AutoModel.from_pretrained(str(teacher_dir))
    hf_tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    base = distill_from_model(hf_model, hf_tok, pca_dims=None, sif_coefficient=None, quantize_to="float32",
                              device="cpu")  # fmt: skip
    t0 = time.perf_counter()
    raw = np.asarray(base.embedding, dtype=np.float32)
    print(f"raw token vectors {raw.shape} ({time.perf_counter() - t0:.1f} s)", flush=True)
    tokenizer = base.tokenizer

    def variant(pca: Any, sif: float | None, dtype: str = "float16", weights: np.ndarray | None = None,
                src: np.ndarray = raw, tk: Any = tokenizer, normalize: bool = True) -> StaticModel:  # fmt: skip
        w = compute_weights(len(src), sif) if weights is None else weights
        e = apply_pca(src.copy(), pca) * w[:, None]
        e = quantize_embeddings(e, DType(dtype))
        return StaticModel(vectors=e, tokenizer=tk, normalize=normalize)

    # ---- PCA and SIF (model2vec's options)
    add("model2vec default: PCA 256, SIF 1e-4, float16", variant(256, 1e-4), "current kdpipe default")
    for pca in (64, 128, "auto", None):
        add(f"PCA {pca}, SIF 1e-4", variant(pca, 1e-4), "auto: 384-d PCA (centred, no cut)" if pca == "auto" else "")
    for sif in (1e-2, 1e-3, 1e-5, 3e-6, 1e-6, None):
        add(f"PCA 256, SIF {sif}", variant(256, sif), "None: no Zipf/SIF weighting" if sif is None else "")
    add("PCA None, SIF None", variant(None, None), "the raw token vectors")
    add("PCA 256, SIF 1e-4, normalize=False", variant(256, 1e-4, normalize=False), "cosine is scale-free")
    add("PCA 256, SIF 1e-4, float32", variant(256, 1e-4, "float32"))
    add("PCA 256, SIF 1e-4, int8", variant(256, 1e-4, "int8"))

    # ---- SIF over real token frequencies in the tweets (instead of Zipf over token ids)
    def proba_of(texts: list[str]) -> np.ndarray:
        counts = np.zeros(len(raw), dtype=np.float64)
        for seq in base.tokenize(texts, max_length=512):
            np.add.at(counts, list(seq), 1)
        return (counts + 1) / (counts.sum() + len(counts))  # add-one: an unseen token weighs ~1

    proba = proba_of(rest)
    for a in (1e-3, 3e-4, 1e-4, 3e-5, 1e-5):
        add(f"PCA 256, SIF {a} over token counts (all {len(rest)} tweets)", variant(256, None, weights=a / (a + proba)))
    proba_1k = proba_of(transfer_1k)
    for a in (1e-3, 3e-4, 1e-4, 3e-5, 1e-5):
        add(f"PCA 256, SIF {a} over token counts (1k transfer)", variant(256, None, weights=a / (a + proba_1k)))
    for pca in (128, None):
        add(f"PCA {pca}, SIF 1e-4 over token counts (all tweets)", variant(pca, None, weights=1e-4 / (1e-4 + proba)))
    # ... and over the in-domain Lee background corpus (gensim's lee_background.cor: 300 other documents from the
    # same news source; not the pipeline's data, shown only to size the domain effect)
    from kdpipe.tasks.embedding.quality import gensim_test_data

    background = [ln.strip() for ln in (gensim_test_data() / "lee_background.cor").read_text(encoding="latin-1")
                  .splitlines() if ln.strip()]  # fmt: skip
    bcounts = np.zeros(len(raw), dtype=np.float64)
    for seq in base.tokenize(background, max_length=512):
        np.add.at(bcounts, list(seq), 1)
    bproba = (bcounts + 1) / (bcounts.sum() + len(bcounts))
    add("PCA 256, SIF 1e-3 over lee_background counts", variant(256, None, weights=1e-3 / (1e-3 + bproba)),
        "in-domain (not pipeline data)")  # fmt: skip

    # ---- custom vocabulary: the tweets' frequent whole words as tokens
    if not args.skip_vocab:
        words = Counter(w for t in rest for w in re.findall(r"[a-z][a-z']+", t.lower()))
        known = set(hf_tok.get_vocab())
        for min_count, cap in ((20, 5000),):
            vocab = [w for w, c in words.most_common() if c >= min_count and w not in known][:cap]
            t0 = time.perf_counter()
            m = distill_from_model(hf_model, hf_tok, vocabulary=vocab, pca_dims=256, sif_coefficient=1e-4,
                                   quantize_to="float16", device="cpu")  # fmt: skip
            add(f"vocabulary: +{len(vocab)} tweet words (count >= {min_count}), PCA 256, SIF 1e-4", m,
                f"{len(m.tokens)} tokens, distil {time.perf_counter() - t0:.0f} s")  # fmt: skip

    # ---- short fine-tune of the table on the teacher's embeddings of transfer tweets
    if not args.skip_train:
        target_file = CACHE / "teacher_rest.npy"
        if target_file.is_file():
            targets_all = np.load(target_file)
        else:
            t0 = time.perf_counter()
            targets_all = encode(encoder, tok, rest, batch_size=128)
            np.save(target_file, targets_all)
            print(f"teacher on {len(rest)} tweets: {time.perf_counter() - t0:.0f} s", flush=True)
        index = {t: i for i, t in enumerate(rest)}
        for label, texts in (("1k transfer", transfer_1k), ("all 36.7k", rest)):
            tgt = targets_all[[index[t] for t in texts]]
            inits = (("PCA 256 SIF 1e-4", 256, compute_weights(len(raw), 1e-4), True),
                     ("PCA None SIF 1e-4", None, compute_weights(len(raw), 1e-4), False),
                     ("PCA 256 SIF 1e-4 over counts", 256, 1e-4 / (1e-4 + proba), True))  # fmt: skip
            for init, pca, w, mapped in inits:
                start = apply_pca(raw.copy(), pca) * w[:, None]
                t0 = time.perf_counter()
                table, info = finetune(start, lambda t: base.tokenize(t, max_length=512), texts, tgt, mapped=mapped)
                secs = time.perf_counter() - t0
                m = StaticModel(vectors=table.astype(np.float16), tokenizer=tokenizer, normalize=True)
                add(f"fine-tune ({label}), init {init}{' + linear map -> 384' if mapped else ', in 384-d'}", m,
                    f"{info}, {secs:.0f} s")  # fmt: skip

    write(args.out, t_score, t_ms, rows, len(corpus), len(transfer_1k), len(rest))


def finetune(
    start: np.ndarray,
    tokenizer: Any,
    texts: list[str],
    targets: np.ndarray,
    *,
    mapped: bool,
    epochs: int = 20,
    lr: float = 3e-3,
    batch: int = 256,
    seed: int = 0,
) -> tuple[np.ndarray, str]:
    """Train the token table (and a linear map to the teacher's width when `mapped`) with 1 - cosine to the
    teacher's embeddings; keep the epoch with the best validation cosine (10% of `texts`). Returns the folded
    (V, 384) float32 table."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    seqs = [list(r) for r in tokenizer(texts)]
    keep = [i for i, s in enumerate(seqs) if s]
    rng = np.random.default_rng(seed)
    keep = list(rng.permutation(keep))
    n_val = max(1, len(keep) // 10)
    val, train = keep[:n_val], keep[n_val:]
    tgt = torch.tensor(targets / np.linalg.norm(targets, axis=1, keepdims=True), dtype=torch.float32)
    bag = nn.EmbeddingBag.from_pretrained(torch.tensor(start, dtype=torch.float32), freeze=False, mode="mean")
    width = targets.shape[1]
    proj = nn.Linear(start.shape[1], width) if mapped else None
    if proj is not None:  # least-squares init of the map on the training sentences
        with torch.no_grad():
            x = _bag(bag, seqs, train)
            xb = torch.cat([x, torch.ones(len(x), 1)], 1)
            sol = torch.linalg.lstsq(xb, tgt[train]).solution
            proj.weight.copy_(sol[:-1].T)
            proj.bias.copy_(sol[-1])
    params = list(bag.parameters()) + (list(proj.parameters()) if proj is not None else [])
    opt = torch.optim.Adam(params, lr=lr)

    def forward(idx: list[int]) -> torch.Tensor:
        out = _bag(bag, seqs, idx)
        return proj(out) if proj is not None else out

    def val_cos() -> float:
        with torch.no_grad():
            return float(nn.functional.cosine_similarity(forward(val), tgt[val]).mean())

    best, best_state, best_epoch = val_cos(), None, 0
    first = best
    for epoch in range(1, epochs + 1):
        order = rng.permutation(train)
        for s in range(0, len(order), batch):
            idx = list(order[s : s + batch])
            loss = (1 - nn.functional.cosine_similarity(forward(idx), tgt[idx])).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        score = val_cos()
        if score > best:
            best, best_epoch = score, epoch
            best_state = (bag.weight.detach().clone(), None if proj is None else
                          (proj.weight.detach().clone(), proj.bias.detach().clone()))  # fmt: skip
    if best_state is not None:
        with torch.no_grad():
            bag.weight.copy_(best_state[0])
            if proj is not None and best_state[1] is not None:
                proj.weight.copy_(best_state[1][0])
                proj.bias.copy_(best_state[1][1])
    with torch.no_grad():
        table = (bag.weight if proj is None else proj(bag.weight)).detach()
    return table.numpy().astype(np.float32), f"val cos {first:.3f} -> {best:.3f} @ epoch {best_epoch}"


def _bag(bag: Any, seqs: list[list[int]], idx: list[int]) -> Any:
    import torch

    flat = torch.tensor([t for i in idx for t in seqs[i]], dtype=torch.long)
    offsets = torch.tensor(np.cumsum([0] + [len(seqs[i]) for i in idx[:-1]]), dtype=torch.long)
    return bag(flat, offsets)


def write(out: Path, t_score: float, t_ms: float, rows: list[tuple[str, float, float, float, str]], n_corpus: int,
          n_transfer: int, n_rest: int) -> None:  # fmt: skip
    import model2vec

    lines = [
        "# Static (model2vec) student: what raises Lee Spearman retention, offline",
        "",
        "Produced by `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/static_study.py` "
        f"(model2vec {model2vec.__version__}, Python {platform.python_version()}, 2 shared CPU cores; "
        f"CPU flags: {_cpu_flags()}).",
        "",
        f"Teacher all-MiniLM-L6-v2 (embedded): Lee Spearman **{t_score:.4f}**, {t_ms:.0f} ms to encode the 50 Lee "
        f"documents (PyTorch, CPU). Corpus: {n_corpus} embedded tweets; transfer split {n_transfer}; all "
        f"non-held-out tweets {n_rest}.",
        "",
        "Lee is 50 documents / 1,225 pairs (pairs share documents, so they are far from independent): differences "
        "of a point or two of retention are noise; only several points are a signal.",
        "",
        "recall@10 = the teacher's 10 nearest neighbours found among the student's on the 500 held-out tweets (the "
        "pipeline's second metric; not Lee, so a setting chosen on it is not tuned on the test set).",
        "",
        "| setting | Lee Spearman | retention vs teacher | recall@10 (held-out tweets) | encode 50 docs (ms) | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, rho, recall, ms, note in rows:
        lines.append(f"| {name} | {rho:.4f} | {100 * rho / t_score:.1f}% | {recall:.3f} | {ms:.1f} | {note} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
