"""Causal-LM students of SmolLM2-135M-Instruct (30 layers) side by side, on one shared teacher stage.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/causal_lm.py --root runs/causal-lm     # after `kdpipe run causal-lm`
    .venv/bin/python benchmarks/causal_lm.py --only L15-kd,L15-fkl --deploy none \\
        --set teacher.causal_lm.train_prompts=8 --set distill.epochs=0.25      # a tiny smoke run

The teacher stage runs once (`kdpipe teacher`, <root>/teacher); the recipe's own variant (L15-kd) is the root's
own student / distill / export / profile stages (so a `kdpipe run causal-lm` into --root is reused, every stage
skipped), and every other variant builds its own student and distils it (`kdpipe student --teacher <root>/teacher
--out <root>/<variant>`, `kdpipe distill`) at the same budget: the recipe's distill.epochs / batch_size / lr
(`--steps-scale` multiplies distill.epochs for all of them alike). Only the overrides in VARIANTS differ. Every
variant's <out>/cache is a link to <root>/cache, so the teacher's top-k logits on the same sequences are computed
once (the cache key covers the teacher's files, the sequences and k). The no-KD baseline (CE only, same steps) is
the distill stage's own (distill.baseline, the recipe's default; off for the loss-comparison variants). Variants
named by `--deploy` are also exported (fp32 / int8-dynamic / int4 ONNX) and profiled (TTFT and decode tokens/s,
batch 1, greedy, the teacher in PyTorch eager beside them: kdpipe.tasks.causal_lm.profile, the recipe's profile).
Each stage is a subprocess of `kdpipe` with HF_HUB_OFFLINE=1, its output streamed to <root>/logs/<variant>.log;
kdpipe skips a stage whose run id matches what is on disk, so running the same command again resumes. Writes the
report (markdown) to --output and the raw numbers beside it (.json), both with the command that produced them,
after every variant (marked partial until the last).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE_VARIANT = "L15-kd"
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")

# The variants: name -> `--set` overrides of the student stage and of the distill stage (both are passed to every
# stage call of the variant, so that its recipe is one and the same throughout). Edit freely; `--only` picks.
VARIANTS: dict[str, dict[str, list[str]]] = {
    # the recipe's own student and terms: its stages are the root's own (a `kdpipe run` of the recipe into --root
    # is reused as it is, every stage skipped)
    RECIPE_VARIANT: {"student": [], "distill": []},
    # 10 of 30 layers, chosen by Block Influence on the teacher's hidden states, with the no-KD baseline
    "L10-kd": {"student": ["student.k=10"], "distill": []},
    # width-pruned (Minitron), all 30 layers kept: FFN 1536 -> 768 and 3 -> 2 KV groups (9 -> 6 query heads) per
    # layer, 85.9M parameters against the 15-layer student's 81.4M; the student overrides can be replaced with
    # --width-set
    "W-kd": {
        "student": ["student.width={ffn: 0.5, heads: 0.34}", "student.k=30"],
        "distill": [],
    },
    "L15-fkl": {
        "student": [],
        "distill": ["distill.lm.forward_kl=1.0", "distill.lm.reverse_kl=0.0", "distill.baseline=false"],
    },
    "L15-rkl": {
        "student": [],
        "distill": ["distill.lm.forward_kl=0.0", "distill.lm.reverse_kl=1.0", "distill.baseline=false"],
    },
    "L15-jsd": {
        "student": [],
        "distill": [
            "distill.lm.forward_kl=0.0",
            "distill.lm.reverse_kl=0.0",
            "distill.lm.jsd=1.0",
            "distill.lm.beta=0.5",
            "distill.baseline=false",
        ],
    },
    # the recipe's terms on the rows' own texts (the held-out perplexity's distribution) instead of SeqKD
    "L15-texts": {"student": [], "distill": ["distill.lm.data=texts", "distill.baseline=false"]},
}
WIDTH_VARIANT = "W-kd"
DEPLOY_SETS = ["export.variants=[int8-dynamic,int4]"]  # export calls of the deployed variants
ONNX_MODELS = {"student": "fp32", "student-int8-dynamic": "int8", "student-int4": "int4"}
TARGETS = {"speedup": 3.0, "smaller": 4.0, "ppl_within": 0.25}


# ---------------------------------------------------------------- running the stages


def kdpipe_cmd() -> list[str]:
    """The `kdpipe` console script beside this interpreter, else `python -m kdpipe.cli` (pyproject: kdpipe.cli:main)."""
    exe = Path(sys.executable).with_name("kdpipe")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "kdpipe.cli"]


def stage(log: Path, *args: str) -> float:
    """One `kdpipe` stage call, its stdout + stderr appended to `log`; its wall seconds. Fails loudly (the log's last
    lines) when the stage fails."""
    cmd = [*kdpipe_cmd(), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"  $ {shlex.join(cmd)}", flush=True)
    with log.open("a", encoding="utf-8") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    wall = time.time() - t0
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        raise StageFailed(f"`kdpipe {args[0]}` failed (exit {code}) after {wall:.0f} s; {log}:\n" + "\n".join(tail))
    return wall


class StageFailed(RuntimeError):
    pass


def manifest(directory: Path) -> dict[str, Any]:
    """A finished stage's manifest.json (not re-hashed: kdpipe verified it when the next stage read it)."""
    return json.loads((directory / "manifest.json").read_text(encoding="utf-8"))


def metrics(directory: Path) -> dict[str, Any]:
    return {k: (m or {}).get("value") for k, m in manifest(directory).get("metrics", {}).items()}


def sets_of(flags: list[str]) -> list[str]:
    return [x for s in flags for x in ("--set", s)]


def run_variant(
    name: str, over: dict[str, list[str]], args: argparse.Namespace, common: list[str], deploy: bool
) -> dict[str, Any]:
    out = args.root if name == RECIPE_VARIANT else args.root / name
    log = args.root / "logs" / f"{name}.log"
    if out != args.root and not (out / "cache").exists():  # one teacher-output cache for every variant (its key
        out.mkdir(parents=True, exist_ok=True)  # covers the teacher's files, the sequences and k)
        (args.root / "cache").mkdir(parents=True, exist_ok=True)
        (out / "cache").symlink_to(args.root / "cache", target_is_directory=True)
    sets = [*common, *over["student"], *over["distill"]]
    rec = ["--recipe", str(args.recipe)]
    res: dict[str, Any] = {"name": name, "overrides": over, "dir": str(out), "log": str(log), "wall_s": {}}
    print(f"[{name}] student + distill", flush=True)
    res["wall_s"]["student"] = stage(
        log, "student", *rec, "--teacher", str(args.root / "teacher"), "--out", str(out), *sets_of(sets)
    )
    res["student"] = metrics(out / "student")
    res["wall_s"]["distill"] = stage(
        log, "distill", *rec, "--student", str(out / "student"), "--out", str(out), *sets_of(sets)
    )
    res["distill"] = metrics(out / "distill")
    if deploy:
        ex_sets = sets_of([*sets, *DEPLOY_SETS])
        print(f"[{name}] export + profile", flush=True)
        res["wall_s"]["export"] = stage(
            log, "export", *rec, "--distill", str(out / "distill"), "--out", str(out), *ex_sets
        )
        res["export"] = metrics(out / "export")
        prof = ["--profile", str(args.profile_path)]
        res["wall_s"]["profile"] = stage(
            log, "profile", *rec, *prof, "--export", str(out / "export"), "--out", str(out), *ex_sets
        )
        res["profile"] = metrics(out / "profile")
        res["latency"] = json.loads((out / "profile" / "latency.json").read_text(encoding="utf-8"))
        report = out / "profile" / "report.json"
        res["report_json"] = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else None
        res["sizes"] = sizes(out / "export", args.root / "teacher")
        for m in ONNX_MODELS:  # the export stage's own count (kdpipe onnx_bytes) where it recorded one
            res["sizes"][m] = res["export"].get(f"{m}_onnx_bytes") or res["sizes"][m]
    return res


def dir_bytes(d: Path, suffixes: tuple[str, ...]) -> int | None:
    if not d.is_dir():
        return None
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and f.suffix in suffixes) or None


def sizes(export: Path, teacher: Path) -> dict[str, int | None]:
    """Bytes on disk: each ONNX folder's graph + external data, and the teacher's safetensors."""
    out = {m: dir_bytes(export / m, (".onnx", ".data", ".onnx_data")) for m in ONNX_MODELS}
    out["teacher"] = dir_bytes(teacher / "model", (".safetensors",))
    return out


# ---------------------------------------------------------------- the parent


def cpu() -> dict[str, Any]:
    """/proc/cpuinfo's model name and which of FLAGS it lists."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"model": name, "flags": [f for f in FLAGS if f in flags], "cores": os.cpu_count()}


def write_profile(args: argparse.Namespace, recipe: Any) -> Path:
    """--profile as given, else the recipe's profile with int4 among the timed variants (a copy under --root)."""
    from kdpipe.config import load_profile, resolve

    if args.profile:
        return Path(resolve("profiles", args.profile))
    if "int4" in load_profile(recipe.profile).variants:
        return Path(resolve("profiles", recipe.profile))
    prof = load_profile(recipe.profile).model_dump(mode="json", exclude_unset=True)
    prof["variants"] = list(dict.fromkeys([*prof.get("variants", ["fp32"]), "int8-dynamic", "int4"]))
    prof["name"] = f"{prof['name']}+int4"
    path = args.root / "profile.json"  # JSON is YAML
    args.root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(prof, indent=2) + "\n")
    return path


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from kdpipe.config import load_recipe

    recipe, path = load_recipe(str(args.recipe), args.sets)
    args.recipe = path
    common = list(args.sets)
    if args.steps_scale != 1.0:
        common.append(f"distill.epochs={recipe.distill.epochs * args.steps_scale!r}")
    names = list(VARIANTS) if args.only in (None, "all") else [n.strip() for n in args.only.split(",") if n.strip()]
    deploy = [] if args.deploy in ("", "none") else [n.strip() for n in args.deploy.split(",") if n.strip()]
    unknown = [n for n in [*names, *deploy] if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    names += [n for n in deploy if n not in names]
    variants = {n: dict(VARIANTS[n]) for n in names}
    if args.width_set and WIDTH_VARIANT in variants:
        variants[WIDTH_VARIANT]["student"] = list(args.width_set)
    args.profile_path = write_profile(args, recipe) if deploy else None

    log = args.root / "logs" / "teacher.log"
    print(f"teacher -> {args.root / 'teacher'}", flush=True)
    t_wall = stage(log, "teacher", "--recipe", str(args.recipe), "--out", str(args.root), *sets_of(common))
    t_man = manifest(args.root / "teacher")
    done: dict[str, Any] = {}
    failed: dict[str, str] = {}
    import torch

    res = {
        "command": args.command,
        "recipe": str(args.recipe),
        "root": str(args.root),
        "sets": common,
        "steps_scale": args.steps_scale,
        "budget": {
            "epochs": recipe.distill.epochs * args.steps_scale,
            "batch_size": recipe.distill.batch_size,
            "lr": recipe.distill.lr,
            "threads": recipe.distill.threads,
        },  # fmt: skip
        "cpu": cpu(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "python": platform.python_version(),
        "profile": str(args.profile_path) if args.profile_path else None,
        "teacher": {
            "dir": str(args.root / "teacher"),
            "wall_s": t_wall,
            "metrics": {k: (m or {}).get("value") for k, m in t_man.get("metrics", {}).items()},
            "split_sizes": t_man.get("record", {}).get("split_sizes", {}),
            "max_new_tokens": recipe.teacher.causal_lm.max_new_tokens,
        },  # fmt: skip
        "variants": done,
        "failed": failed,
        "deploy": deploy,
    }
    for n in names:
        try:
            done[n] = run_variant(n, variants[n], args, common, n in deploy)
        except StageFailed as e:
            if not args.keep_going:
                raise SystemExit(str(e)) from None
            print(f"[{n}] FAILED (--keep-going):\n{e}", flush=True)
            failed[n] = str(e)
        save(args, res, partial=n != names[-1])  # a report after every variant: a stopped run keeps what it measured
    ungated_int4(res)
    return res


def save(args: argparse.Namespace, res: dict[str, Any], partial: bool = False) -> list[str]:
    """The report (markdown, --output) and the raw numbers (.json beside it), as far as measured."""
    lines = report(res)
    if partial:
        lines = ["> Partial: the benchmark was still running when this was written.", "", *lines]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args.output.with_suffix(".json").write_text(json.dumps(res, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return lines


# ---------------------------------------------------------------- the report


def _f(x: Any, spec: str) -> str:
    return "n/a" if not isinstance(x, int | float) or not math.isfinite(x) else format(x, spec)


def _ratio(a: Any, b: Any) -> float | None:
    ok = all(isinstance(x, int | float) and math.isfinite(x) for x in (a, b)) and b
    return a / b if ok else None


def deploy_rows(name: str, v: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The deploy table of one variant (and its figures for the targets)."""
    lat, sz = v["latency"], v["sizes"]
    eager = lat.get("torch_eager", {})
    teacher = eager.get("teacher", {}).get("shapes", {})
    keys = sorted({k for e in ("onnxruntime", "torch_eager") for r in lat.get(e, {}).values() for k in r["shapes"]},
                  key=lambda k: int(k.split("x")[1]))  # fmt: skip
    head = "| model | engine | size MB | vs teacher size |"
    rule = "|---|---|---:|---:|"
    for k in keys:
        L = k.split("x")[1]
        head += f" decode tok/s @{L} | vs teacher @{L} | TTFT ms @{L} | vs teacher @{L} |"
        rule += "---:|---:|---:|---:|"
    rows, figs = [head, rule], {"speedup": {}, "smaller": {}}
    t_bytes = sz.get("teacher")
    models = [(n, "torch eager", r) for n, r in eager.items()] + [
        (n, "onnxruntime", r) for n, r in lat.get("onnxruntime", {}).items()
    ]
    for n, engine, r in models:
        b = sz.get(n) if engine == "onnxruntime" else (t_bytes if n == "teacher" else r.get("model_bytes"))
        label = f"{n} ({ONNX_MODELS[n]})" if n in ONNX_MODELS and engine == "onnxruntime" else n
        smaller = _ratio(t_bytes, b)
        row = f"| {label} | {engine} | {_f(b / 1e6 if b else None, '.1f')} | {_f(smaller, '.2f')}x |"
        if engine == "onnxruntime":
            figs["smaller"][label] = {"bytes": b, "teacher_bytes": t_bytes, "ratio": smaller}
        for k in keys:
            s = r["shapes"].get(k, {})
            up = _ratio(s.get("decode_tokens_per_s"), teacher.get(k, {}).get("decode_tokens_per_s"))
            faster = _ratio(teacher.get(k, {}).get("ttft_ms"), s.get("ttft_ms"))
            row += (f" {_f(s.get('decode_tokens_per_s'), '.1f')} | {_f(up, '.2f')}x | {_f(s.get('ttft_ms'), '.1f')} "
                    f"| {_f(faster, '.2f')}x |")  # fmt: skip
            if n != "teacher":
                figs["speedup"].setdefault(k, {})[f"{label} {engine}"] = up
        rows.append(row)
    ungated = v.get("int4_ungated_bytes")
    if ungated and not sz.get("student-int4"):
        r = _ratio(t_bytes, ungated)
        rows.append(f"| student (int4, ungated: missed its gate, size only) | onnxruntime | {_f(ungated / 1e6, '.1f')} "
                    f"| {_f(r, '.2f')}x |" + " |" * (4 * len(keys)))  # fmt: skip
        figs["smaller"]["student (int4, ungated)"] = {"bytes": ungated, "teacher_bytes": t_bytes, "ratio": r}
    return rows, figs


def ungated_int4(res: dict[str, Any]) -> None:
    """For each deployed variant whose int4 export missed its gate (and was removed), the int4 graph made the same
    way from its fp32 export (kdpipe.tasks.causal_lm.export.make_lm_variant) into <out>/int4-ungated, for its size on
    disk only: weights' bytes do not depend on how well they were trained, and the speed of a removed graph is not
    reported."""
    from kdpipe.tasks.causal_lm.export import make_lm_variant

    for n in res["deploy"]:
        v = res["variants"].get(n)
        if v is None or "export" not in v or v.get("sizes", {}).get("student-int4"):
            continue
        fp32 = Path(v["dir"]) / "export" / "student"
        v["int4_ungated_bytes"] = make_lm_variant(fp32, Path(v["dir"]) / "int4-ungated", "int4")["bytes"]


def report(res: dict[str, Any]) -> list[str]:
    c, t = res["cpu"], res["teacher"]
    t_ppl = t["metrics"].get("perplexity")
    sizes_ = t["split_sizes"]
    lines = [
        "# Causal-LM students of SmolLM2-135M-Instruct, side by side",
        "",
        f"Command: `{res['command']}`",
        "",
        f"CPU: {c['model']} ({c['cores']} cores); flags present: {', '.join(c['flags']) or 'none'} (of "
        f"{', '.join(FLAGS)}; /proc/cpuinfo). Python {res['python']}, torch {res['torch']} (default threads "
        f"{res['torch_threads_default']}; distill.threads {res['budget']['threads']}). Recipe `{res['recipe']}`, "
        f"overrides on every stage: {', '.join(f'`{s}`' for s in res['sets']) or 'none'}.",
        "",
        f"Subsets: {sizes_.get('train_prompts')} train prompts ({sizes_.get('generations')} SeqKD generations of "
        f"{t['max_new_tokens']} new tokens), {sizes_.get('held_out_texts')} held-out texts (perplexity, top-1 "
        f"agreement), {sizes_.get('held_out_prompts')} held-out prompts (Rouge-L of greedy answers vs the teacher's). "
        f"Teacher: {t['metrics'].get('layers')} layers, {t['metrics'].get('params')} params, held-out perplexity "
        f"{_f(t_ppl, '.3f')}. Budget of every variant: {res['budget']['epochs']:g} epochs at batch "
        f"{res['budget']['batch_size']}, lr {res['budget']['lr']:g} (steps scale {res['steps_scale']:g}); the no-KD "
        "baseline is CE only at the same steps, from the same initial student.",
        "",
        "## Quality (held-out)",
        "",
        "| variant | layers / params | compression | ppl | ppl / teacher ppl | no-KD ppl | KD better than no-KD | "
        "top-1 agreement | Rouge-L | no-KD agreement / Rouge-L | train s |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---|---:|",
    ]
    kd_vs_base: dict[str, Any] = {}
    within: dict[str, Any] = {}
    for n, v in res["variants"].items():
        s, d = v["student"], v["distill"]
        ppl, base = d.get("perplexity"), d.get("baseline_perplexity")
        rel = _ratio(ppl, d.get("teacher_perplexity") or t_ppl)
        within[n] = rel
        better = "n/a" if base is None or ppl is None else ("yes" if ppl < base else "no")
        if base is not None:
            kd_vs_base[n] = {"kd": ppl, "no_kd": base, "better": ppl is not None and ppl < base}
        b_other = ("-" if base is None else f"{_f(d.get('baseline_top1_agreement'), '.4f')} / "
                   f"{_f(d.get('baseline_rouge_l'), '.4f')}")  # fmt: skip
        lines.append(
            f"| {n} | {s.get('layers')} / {_f((s.get('params') or 0) / 1e6, '.1f')}M | "
            f"{_f(s.get('compression'), '.2f')}x | {_f(ppl, '.5g')} | {_f(rel, '.3g')}x | {_f(base, '.5g')} | "
            f"{better} | {_f(d.get('top1_agreement'), '.4f')} | {_f(d.get('rouge_l'), '.4f')} | {b_other} | "
            f"{_f(d.get('train_seconds'), '.1f')} |"
        )
    for n, why in res["failed"].items():
        lines.append(f"| {n} | FAILED: {why.splitlines()[0]} | | | | | | | | | |")
    lines += ["", "train s: the KD run's training seconds (distill manifest); the baseline's are not included.", ""]
    speed: dict[str, Any] = {}
    smaller: dict[str, Any] = {}
    for n in res["deploy"]:
        v = res["variants"].get(n)
        if v is None or "latency" not in v:
            continue
        rows, figs = deploy_rows(n, v)
        speed[n], smaller[n] = figs["speedup"], figs["smaller"]
        lat = v["latency"]
        lines += [
            f"## Deploy: {n}",
            "",
            f"Profile `{lat['profile'].get('name')}` ({lat['profile'].get('intra_op_threads')} threads, "
            f"{lat['profile'].get('rounds')} rounds, each model in its own processes): greedy, batch 1, "
            f"{lat.get('max_new_tokens')} new tokens, medians as the profile reports them (TTFT = prompt pass + "
            "first token; decode tokens/s = (new tokens - 1) / median decode time). Size: ONNX graph + external "
            "data on disk vs the teacher's safetensors; speed ratios vs the teacher in PyTorch eager. Export gates:"
            f" {export_gates(v['export'])}.",
            "",
            *rows,
            "",
        ]
    lines += targets(res, t_ppl, speed, smaller, within, kd_vs_base)
    return lines


def export_gates(m: dict[str, Any]) -> str:
    parts = [f"fp32 max |diff| {_f(m.get('student_max_abs_diff'), '.2e')}, same generations "
             f"{_f(m.get('student_same_generations'), '.2f')}"]  # fmt: skip
    for v in ("int8-dynamic", "int4"):
        p, a = m.get(f"student-{v}_perplexity"), m.get(f"student-{v}_agreement")
        if p is not None or a is not None:
            kept = "kept" if m.get(f"student-{v}_onnx_bytes") else "REMOVED (missed its gate)"
            parts.append(f"{v} ppl {_f(p, '.3f')}, agreement {_f(a, '.2f')}, {kept}")
    return "; ".join(parts)


def targets(
    res: dict[str, Any], t_ppl: Any, speed: dict[str, Any], smaller: dict[str, Any], within: dict[str, Any],
    kd_vs_base: dict[str, Any],
) -> list[str]:  # fmt: skip
    out = ["## Targets", ""]
    # (a) decode speed: per model, its worst prompt length; the best model by that
    per_model: dict[str, list[tuple[float, str]]] = {}
    for n, per in speed.items():
        for k, ms in per.items():
            for m, r in ms.items():
                if r is not None:
                    per_model.setdefault(f"{n}: {m}", []).append((r, k.split("x")[1]))
    if per_model:
        where, worst = max(((m, min(rs)) for m, rs in per_model.items()), key=lambda x: x[1][0])
        r = worst[0]
        ok = r >= TARGETS["speedup"]
        at = ", ".join(f"{x:.2f}x @{L}" for x, L in sorted(per_model[where], key=lambda y: int(y[1])))
        out.append(
            f"- (a) a student >= {TARGETS['speedup']:g}x the teacher's PyTorch-eager decode tokens/s at every timed "
            f"prompt length: best **{r:.2f}x** at its slowest length ({where}; {at}): {'met' if ok else 'NOT met'}"
        )
    else:
        out.append("- (a) decode speed >= 3x the teacher's eager: not measured (no deployed variant profiled)")
    # (b) size
    int4 = [(f["ratio"], n) for n, ms in smaller.items() for m, f in ms.items() if "int4" in m and f["ratio"]]
    if int4:
        r, n = max(int4)
        gated = all("ungated" not in m for ms in smaller.values() for m in ms if "int4" in m)
        out.append(f"- (b) >= {TARGETS['smaller']:g}x smaller on disk (int4) than the teacher's safetensors: "
                   f"**{r:.2f}x** ({n}): {'met' if r >= TARGETS['smaller'] else 'NOT met'}"
                   + ("" if gated else "; in size only: that int4 graph missed its perplexity / agreement gate, "
                      "so it is not a deployable student"))  # fmt: skip
    else:
        measured = [n for n in smaller]
        why = "no int4 export passed its gate" if measured else "no deployed variant exported"
        out.append(f"- (b) >= {TARGETS['smaller']:g}x smaller on disk (int4): not measured ({why})")
    # (c) perplexity
    rels = [(r, n) for n, r in within.items() if r is not None]
    if rels:
        r, n = min(rels)
        ok = r <= 1 + TARGETS["ppl_within"]
        out.append(
            f"- (c) held-out perplexity within {100 * TARGETS['ppl_within']:g}% of the teacher's ({_f(t_ppl, '.3f')}):"
            f" best **{r:.3g}x** the teacher's ({n}): {'met' if ok else 'NOT met'}"
        )
    else:
        out.append("- (c) held-out perplexity within 25% of the teacher's: not measured")
    # (d) KD vs no-KD
    if kd_vs_base:
        each = ", ".join(f"{n} {_f(x['kd'], '.5g')} vs {_f(x['no_kd'], '.5g')}" for n, x in kd_vs_base.items())
        ok = all(x["better"] for x in kd_vs_base.values())
        out.append(f"- (d) KD beats no-KD perplexity at the same budget (KD vs no-KD): {each}: "
                   f"**{'met' if ok else 'NOT met'}**" + ("" if ok else " (not on every variant)"))  # fmt: skip
    else:
        out.append("- (d) KD beats no-KD perplexity: not measured (no variant with distill.baseline)")
    res["targets"] = out[2:]
    return [*out, ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "stages/causal-lm.yaml"), help="the causal-LM recipe")
    ap.add_argument("--root", type=Path, default=Path("/tmp/kdpipe-bench-causal-lm"), help="work root of the stages")
    ap.add_argument("--only", default=None, help=f"comma-separated variants (default all: {','.join(VARIANTS)})")
    ap.add_argument("--deploy", default=f"{RECIPE_VARIANT},L10-kd",
                    help="variants to export + profile, comma separated, or 'none'")  # fmt: skip
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for every stage call (repeatable)")  # fmt: skip
    ap.add_argument("--width-set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"replace {WIDTH_VARIANT}'s student overrides (repeatable)")  # fmt: skip
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply distill.epochs of every variant")
    ap.add_argument(
        "--profile", default=None, help="target profile of the deployed variants (default: the recipe's, + int4)"
    )
    ap.add_argument("--keep-going", action="store_true", help="record a failed variant and go on with the others")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the report from the .json beside --output (no stage runs)")  # fmt: skip
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/causal-lm.md")
    args = ap.parse_args()
    if args.steps_scale <= 0:
        ap.error("--steps-scale must be > 0")
    env = "HF_HUB_OFFLINE=1 " if os.environ.get("HF_HUB_OFFLINE") else ""
    exe = os.path.relpath(sys.executable) if Path(sys.executable).is_relative_to(Path.cwd()) else "python"
    args.command = env + shlex.join([exe, *sys.argv])
    if shutil.which(kdpipe_cmd()[0]) is None and not Path(kdpipe_cmd()[0]).is_file():
        raise SystemExit(f"no kdpipe executable: {kdpipe_cmd()[0]}")
    if args.report_only:  # the last run's numbers (the .json beside --output), the ungated int4 sizes added
        res = json.loads(args.output.with_suffix(".json").read_text(encoding="utf-8"))
        ungated_int4(res)
    else:
        res = measure(args)
    print("\n".join(save(args, res)))


if __name__ == "__main__":
    main()
