"""The seed's Bayesian-distillation experiment, reproduced offline (docs/methods.md §4).

The seed trains a ru->en translation transformer (40k pairs), removes one decoder layer and reports BLEU:
teacher 23.70, student with random init U[-0.08, 0.08] 13.35, student initialised at w0 = m_v 17.73.

Here: the Russian-English message pairs of Debian's translation catalogues that ship inside kdpipe
(kdpipe/_data/ru_en, ~16.8k pairs; scripts/build_ru_en_pairs.py), a Marian-sized pre-LN transformer
(mBART architecture, 3 + 3 layers) trained from scratch on the CPU, its SWAG posterior, and students
with the middle decoder layer removed: init random / copy (m_v) / bayes (the conditional mean of the
low-rank posterior) / bayes + the prior term, each with plain CE (the seed's VI approximation) and with
token-level Hinton KD, the same step budget each, over several seeds. Test BLEU is sacreBLEU on 1000
held-out pairs, greedy decoding.

    python benchmarks/bayes_translation.py                       # everything (about an hour on 2 cores)
    python benchmarks/bayes_translation.py --teacher-only        # phase 1: the teacher (cached in --out)

Writes <out>/results.json, and benchmarks/results/bayes-translation.md + bayes-translation.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).parent / "results"
SEED_PAPER = {"teacher": 23.70, "random": 13.35, "copy": 17.73}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/bayes-translation"))
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--layers", type=int, default=3, help="encoder and decoder layers of the teacher")
    p.add_argument("--vocab", type=int, default=6000)
    p.add_argument("--max-length", type=int, default=40)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--student-steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=75, help="student steps between validation BLEU points")
    p.add_argument("--remove", type=int, default=1, help="the decoder layer the students lack")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--swag-steps", type=int, default=120)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--prior-weight", type=float, default=1.0, help="weight of the prior term (bayes+prior)")
    p.add_argument(
        "--inits", nargs="+", default=None, help="student inits to run (default: the four; 'bayes+prior*W' = weight W)"
    )
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--teacher-only", action="store_true")
    return p.parse_args()


class Data:
    """Splits, tokenizer and encodings, built once (the tokenizer is cached in <out>/tokenizer)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from kdpipe.data.pairs import default_pairs_path, encode_pairs, read_pairs, split_pairs, train_tokenizer

        pairs = read_pairs(default_pairs_path())
        self.train, self.val, self.test = split_pairs(pairs, args.test, args.val, seed=0)
        tok_dir = args.out / "tokenizer"
        if (tok_dir / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        else:
            self.tok = train_tokenizer([s for p in self.train for s in p], args.vocab, tok_dir)
        self.enc = encode_pairs(self.tok, self.train, args.max_length)
        self.val_enc = encode_pairs(self.tok, self.val, args.max_length)
        self.args = args

    def batches(self, seed: int) -> Any:
        from kdpipe.data.pairs import pair_batches

        def fn(epoch: int) -> list[dict[str, Any]]:
            return list(pair_batches(self.enc, self.args.batch, shuffle=True, seed=seed * 1000 + epoch, bucket=True))

        return fn

    def valset(self) -> Any:
        from kdpipe.data.pairs import pair_batches
        from kdpipe.tasks.translation.seq2seq import ValSet

        return ValSet(
            batches=list(pair_batches(self.val_enc, 64, shuffle=False)),
            sources=[s for s, _ in self.val],
            references=[t for _, t in self.val],
            tokenizer=self.tok,
            max_new_tokens=self.args.max_length,
        )

    def test_bleu(self, model: Any) -> float:
        from kdpipe.tasks.translation.seq2seq import bleu, translate

        hyps = translate(model, self.tok, [s for s, _ in self.test], max_new_tokens=self.args.max_length)
        return round(bleu(hyps, [t for _, t in self.test]), 2)


def teacher(data: Data, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Train (or load from <out>/teacher) the from-scratch teacher; its history and test BLEU."""
    import torch
    from transformers import MBartForConditionalGeneration

    from kdpipe.tasks.translation.seq2seq import load_seq2seq, save_seq2seq, small_config, train_seq2seq

    where = args.out / "teacher"
    if (where / "teacher.json").is_file():
        model, _ = load_seq2seq(where)
        return model, json.loads((where / "teacher.json").read_text())
    torch.manual_seed(0)
    tok = data.tok
    config = small_config(
        len(tok),
        d_model=args.d_model,
        encoder_layers=args.layers,
        decoder_layers=args.layers,
        ffn_dim=4 * args.d_model,
        heads=4,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model = MBartForConditionalGeneration(config)
    start = time.perf_counter()
    history = train_seq2seq(
        model,
        data.batches(0),
        args.teacher_epochs,
        lr=1e-3,
        warmup_steps=300,
        label_smoothing=0.1,
        val=data.valset(),
        description="teacher (from scratch)",
        seed=0,
    )
    info = {
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.perf_counter() - start, 1),
        "history": history,
        "test_bleu": data.test_bleu(model),
        "copy_source_bleu": _copy_bleu(data),
    }
    save_seq2seq(model, tok, where)
    (where / "teacher.json").write_text(json.dumps(info, indent=2) + "\n")
    return model.eval(), info


def _copy_bleu(data: Data) -> float:
    """The trivial baseline: the Russian source copied as the 'translation' (identifiers and option names
    are shared by both sides, so this is not 0)."""
    from kdpipe.tasks.translation.seq2seq import bleu

    return round(bleu([s for s, _ in data.test], [t for _, t in data.test]), 2)


def main() -> int:
    args = parse()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = Data(args)
    model, t_info = teacher(data, args)
    print(f"teacher: test BLEU {t_info['test_bleu']} (copy-the-source baseline {t_info['copy_source_bleu']})")
    if args.teacher_only:
        return 0
    from bayes_students import run_students  # benchmarks/bayes_students.py

    return run_students(model, data, args, t_info)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    raise SystemExit(main())
