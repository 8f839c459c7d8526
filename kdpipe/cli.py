"""The Typer app: parse options, load config, call the stages, map errors to exit codes. No logic."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.text import Text

from kdpipe import __version__
from kdpipe.artifacts.cache_cli import cache_app
from kdpipe.errors import ConfigError, KdpipeError

if TYPE_CHECKING:
    from kdpipe.api import RunResult

app = typer.Typer(
    name="kdpipe",
    help="Distil a Hugging Face teacher into a smaller student, export it to ONNX and measure it.\n\n"
    "Stages: teacher -> student -> distill -> export -> profile. Each writes <out>/<stage>/ with a "
    "manifest.json that the next stage consumes; `kdpipe run` chains them from a recipe in stages/ "
    "and skips every stage whose config and inputs did not change.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(cache_app, name="cache")
err = Console(stderr=True, highlight=False)
_state = {"debug": os.environ.get("KDPIPE_DEBUG") == "1"}

RECIPE_HELP = "Recipe: a name in stages/ (e.g. 'default') or a YAML path. Stage options override it."
SET_HELP = "Override any recipe field, e.g. --set distill.epochs=3 --set student.layers=[0,5]. Repeatable."
OUT_HELP = "Output root; the stage writes <out>/<stage>/ (default: the recipe's `out`)."
FORCE_HELP = "Re-run even if an identical run is already on disk."
RESUME_HELP = "Continue an interrupted run of this stage from its last checkpoint (<out>/.checkpoints/)."
STRICT_HELP = "Exit 1 when the deployed variant misses a budget of the target profile (for edge CI)."
COMPARE_HELP = "An older run (its root or its profile directory): print what regressed against it."


@contextmanager
def _guard() -> Iterator[None]:
    """One `error:` + `hint:` line pair and exit 1 for user errors; 130 on Ctrl-C."""
    try:
        yield
    except KdpipeError as e:
        if _state["debug"]:
            raise
        for line in e.message.splitlines():
            err.print(Text.assemble(("error:", "bold red"), f" {line}"), soft_wrap=True)
        if e.hint:
            err.print(Text.assemble(("hint:", "bold"), f" {e.hint}"), soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: the stage in progress was discarded (no manifest written)")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as e:  # anything unexpected: one line, traceback only under --debug
        if _state["debug"]:
            raise
        err.print(Text.assemble(("error:", "bold red"), f" unexpected {type(e).__name__}: {e}"), soft_wrap=True)
        err.print("[bold]hint:[/] re-run with `kdpipe --debug ...` for the traceback, and report it")
        raise typer.Exit(1) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kdpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["debug"] = debug or _state["debug"]


def _stage(
    name: str,
    recipe: str,
    sets: list[str],
    out: Path | None,
    upstream: Path | None,
    force: bool,
    temperature: float | None = None,
    resume: bool = False,
) -> Path:
    from kdpipe import api

    done = api.stage(
        name, recipe, sets, out, upstream=upstream, force=force, resume=resume, temperature=temperature, console=err
    ).dir
    from kdpipe.train.distributed import world

    if world().main:  # under torchrun, rank 0 speaks for every process
        typer.echo(f"{name}: {done}")
    return done


def _opt(sets: list[str], key: str, value: object, flag: str, typed: str | None = None, raw: bool = False) -> list[str]:
    """The option `flag` (given as `value`; None: not given) as a `key=value` override in front of the --set ones,
    which win. It remembers the option, so that an error names `--opset 99`, what the user typed, and not a
    `--set export.opset=99` they never wrote. A string is quoted (a path like `data #1.csv` or `on: 2.csv` is a
    string, not YAML) unless `raw` (the --layers list); `typed` is the text shown when it differs from value."""
    from kdpipe.api import override
    from kdpipe.config import Override

    if value is None:
        return sets
    origin = flag if isinstance(value, bool) else f"{flag} {value if typed is None else typed}"
    if isinstance(value, str) and raw:
        return [Override(f"{key}={value}", origin), *sets]
    return [override(key, list(value) if isinstance(value, tuple) else value, origin), *sets]


@app.command()
def run(
    recipe: str = typer.Argument("default", help=RECIPE_HELP),
    sets: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output root (default: the recipe's `out`)."),
    profile: str | None = typer.Option(
        None, "--profile", "-p", help="Target profile name in profiles/ or a YAML path."
    ),
    force: bool = typer.Option(False, "--force", help="Re-run every stage."),
    resume: bool = typer.Option(
        True, "--resume/--no-resume", help="Continue a stage a crash interrupted from its last checkpoint."
    ),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
    compare: Path | None = typer.Option(None, "--compare", help=COMPARE_HELP),
) -> None:
    """Run the whole chain teacher -> student -> distill -> export -> profile from a recipe."""
    with _guard():
        from kdpipe import api

        s = _opt(sets, "profile", profile, "--profile")  # an error names `--profile X`, as typed
        result = api.run(recipe, s, out, force=force, resume=resume, compare=compare, console=err)
        typer.echo(f"report: {result.report}")
        _after_profile(result, strict)


@app.command()
def teacher(
    model: str | None = typer.Option(
        None, "--model", "-m", help="Local HF model directory, or 'default' (the embedded all-MiniLM-L6-v2)."
    ),
    data: str | None = typer.Option(
        None, "--data", "-d", help="CSV/TSV/JSON/JSONL/parquet file, or 'default' (the embedded tweets)."
    ),
    encoding: str | None = typer.Option(
        None,
        help="Text encoding of --data: 'auto' (UTF-8, or a UTF-8/UTF-16 byte-order mark) or a codec "
        "name such as cp1252, latin-1, cp1251.",
    ),
    train: str | None = typer.Option(None, "--train", help="A given train split (file or `datasets` directory)."),
    validation: str | None = typer.Option(
        None, "--validation", help="A given validation split (without --test: the split the test metrics use)."
    ),
    test: str | None = typer.Option(None, "--test", help="A given test split."),
    label_names: str | None = typer.Option(
        None, "--label-names", help="Names of numeric labels, comma-separated: label i is the i-th name."
    ),
    text_column: str | None = typer.Option(None, help="Text column of --data."),
    label_column: str | None = typer.Option(None, help="Label column of --data."),
    epochs: float | None = typer.Option(None, help="Fine-tuning epochs."),
    no_finetune: bool = typer.Option(False, "--no-finetune", help="Evaluate the model as it is (it needs a head)."),
    recipe: str = typer.Option("default", "--recipe", "-r", help=RECIPE_HELP),
    sets: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help=OUT_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
) -> None:
    """Load a teacher, fine-tune a classification head on the train split, record test metrics."""
    with _guard():
        s = _opt(sets, "teacher.model", model, "--model")
        s = _opt(s, "teacher.data.source", data, "--data")
        s = _opt(s, "teacher.data.encoding", encoding, "--encoding")
        for key, value, flag in (
            ("train", train, "--train"),
            ("validation", validation, "--validation"),
            ("test", test, "--test"),
        ):
            s = _opt(s, f"teacher.data.files.{key}", value, flag)
        names = None if label_names is None else [n.strip() for n in label_names.split(",")]
        s = _opt(s, "teacher.data.label_names", names, "--label-names", typed=label_names)
        s = _opt(s, "teacher.data.text_column", text_column, "--text-column")
        s = _opt(s, "teacher.data.label_column", label_column, "--label-column")
        s = _opt(s, "teacher.epochs", epochs, "--epochs")
        s = _opt(s, "teacher.finetune", False if no_finetune else None, "--no-finetune")
        _stage("teacher", recipe, s, out, None, force, resume=resume)


def _layers(value: str) -> str:
    """--layers: a named choice, or comma-separated teacher layer indices (0,2,4)."""
    v = value.strip()
    if v[:1].isalpha():  # every-other, last-k, first-k (a misspelling is named by the recipe check)
        return v
    parts = [p.strip() for p in v.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ConfigError(
            f"--layers {value}: expected comma-separated layer indices >= 0, like 0,2,4",
            "or one of every-other, last-k, first-k",
        )
    return "[" + ",".join(parts) + "]"


@app.command()
def student(
    teacher_dir: Path | None = typer.Option(
        None, "--teacher", "-t", help="Teacher stage directory (default <out>/teacher)."
    ),
    layers: str | None = typer.Option(
        None, help="'every-other', 'last-k', 'first-k', or teacher layer indices like 0,2,4."
    ),
    k: int | None = typer.Option(None, "-k", help="Layer count for last-k / first-k."),
    init: str | None = typer.Option(
        None,
        help="'copy' (the kept layers; alias 'teacher'), 'random' (U[-0.08, 0.08]) or 'bayes' (the conditional mean "
        "of the teacher's posterior; needs teacher.posterior).",
    ),
    pretrained: str | None = typer.Option(None, help="Use this local HF model directory as the student."),
    recipe: str = typer.Option("default", "--recipe", "-r", help=RECIPE_HELP),
    sets: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help=OUT_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Build a smaller student from the teacher's layers (DistilBERT's every-other-layer init by default)."""
    with _guard():
        s = sets
        if layers is not None:
            s = _opt(s, "student.layers", _layers(layers), "--layers", typed=layers, raw=True)
        s = _opt(s, "student.k", k, "-k")
        s = _opt(s, "student.init", init, "--init")
        s = _opt(s, "student.pretrained", pretrained, "--pretrained")
        _stage("student", recipe, s, out, teacher_dir, force)


@app.command()
def distill(
    student_dir: Path | None = typer.Option(None, "--student", help="Student stage directory (default <out>/student)."),
    epochs: float | None = typer.Option(None, help="Training epochs."),
    temperature: float | None = typer.Option(
        None, "-T", "--temperature", help="Temperature of every loss term that has one (hinton, tinybert, ...)."
    ),
    device: str | None = typer.Option(None, help="'auto', 'cpu' or 'cuda'."),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="Skip the no-KD (hard labels only) baseline."),
    recipe: str = typer.Option("default", "--recipe", "-r", help=RECIPE_HELP),
    sets: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help=OUT_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
    nproc: int | None = typer.Option(
        None,
        "--nproc",
        help="Train on N processes of this machine (relaunches itself under torchrun: DDP, gloo on CPU, NCCL on "
        "GPU). Or launch `torchrun --nproc_per_node N -m kdpipe.cli distill ...` yourself.",
    ),
) -> None:
    """Distil the teacher into the student (Hinton KD by default; CUDA + bf16 when available)."""
    with _guard():
        if nproc is not None:
            import sys

            from kdpipe.train.distributed import launch

            raise typer.Exit(launch(nproc, sys.argv[1:]))
        s = _opt(sets, "distill.epochs", epochs, "--epochs")
        s = _opt(s, "distill.device", device, "--device")
        s = _opt(s, "distill.baseline", False if no_baseline else None, "--no-baseline")
        _stage("distill", recipe, s, out, student_dir, force, temperature=temperature, resume=resume)


@app.command()
def export(
    distill_dir: Path | None = typer.Option(None, "--distill", help="Distill stage directory (default <out>/distill)."),
    opset: int | None = typer.Option(None, help="ONNX opset."),
    atol: float | None = typer.Option(None, help="Parity tolerance: max abs diff of logits."),
    recipe: str = typer.Option("default", "--recipe", "-r", help=RECIPE_HELP),
    sets: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help=OUT_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Export student and teacher to ONNX (dynamic batch/sequence) and check parity on real inputs."""
    with _guard():
        s = _opt(sets, "export.opset", opset, "--opset")
        s = _opt(s, "export.atol", atol, "--atol")
        _stage("export", recipe, s, out, distill_dir, force)


@app.command()
def profile(
    export_dir: Path | None = typer.Option(None, "--export", help="Export stage directory (default <out>/export)."),
    target: str | None = typer.Option(None, "--profile", "-p", help="Target profile name in profiles/ or a YAML path."),
    recipe: str = typer.Option("default", "--recipe", "-r", help=RECIPE_HELP),
    sets: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help=OUT_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
    compare: Path | None = typer.Option(None, "--compare", help=COMPARE_HELP),
) -> None:
    """Time every student variant and the teacher (each in its own processes), check the profile's budgets,
    write latency.json, report.json (the figures) and report.md with a Pareto chart."""
    with _guard():
        from kdpipe import api

        s = _opt(sets, "profile", target, "--profile")
        result = api.profile_run(recipe, s, out, compare=compare, upstream=export_dir, force=force, console=err)
        typer.echo(f"profile: {result['profile'].dir}")
        typer.echo(f"report: {result.report}")
        _after_profile(result, strict)


def _after_profile(result: RunResult, strict: bool) -> None:
    """--compare prints regressions against an older run; --strict fails on a missed budget (edge CI). The
    report is written either way, so CI keeps it."""
    from kdpipe.api import check_budgets

    for line in result.regressions:
        typer.echo(line)
    for b in result.misses:
        value = "missing" if b.value is None else f"{b.value:.4g}"
        err.print(Text.assemble(("budget missed:", "bold red"), f" {b.budget}: {value} vs {b.limit:g} {b.unit}"))
    if strict:
        check_budgets(result.profile, result["profile"].dir)


@app.command()
def search(
    recipe: str = typer.Argument("default", help=RECIPE_HELP + " Its `search:` section is the space."),
    target: str | None = typer.Option(None, "--profile", "-p", help="Target profile whose budgets to meet."),
    trials: int | None = typer.Option(None, "--trials", min=1, help="Candidates trained at most (search.trials)."),
    hours: float | None = typer.Option(None, "--hours", help="Start no new candidate after this many hours."),
    workers: int = typer.Option(1, "--workers", help="Processes training candidates of one study at once."),
    storage: str | None = typer.Option(
        None, "--storage", help="Optuna RDB URL (default: sqlite in <out>/search/study.db); resumable."
    ),
    sets: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output root (default: the recipe's `out`)."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when no candidate meets every budget."),
) -> None:
    """Find the most accurate student that meets the profile's budgets: each architecture timed untrained
    first (over budget: never trained), then an Optuna study with successive halving on the distillation budget.
    Writes <out>/search/report.md (+ .json, pareto.png) and links <out>/best; a killed search resumes."""
    with _guard():
        from kdpipe.api import out_root
        from kdpipe.config import load_recipe
        from kdpipe.data.splits import check_source
        from kdpipe.search.study import Options, run_search

        s = _opt(sets, "profile", target, "--profile")
        cfg, path = load_recipe(recipe, s)
        check_source(cfg.teacher.data, finetune=cfg.teacher.finetune)
        root = out_root(out, cfg.out)
        err.print(f"search {path} (profile {cfg.profile}) -> {root / 'search'}")
        opts = Options(trials=trials, hours=hours, workers=workers, storage=storage, strict=strict)
        data = run_search(recipe, list(s), root, opts, err)
        typer.echo(f"report: {root / 'search' / 'report.md'}")
        if data["best"]:
            typer.echo(f"best: {root / 'best'} ({data['best']})")
        else:
            err.print(f"[bold red]no candidate meets every budget[/]; closest: {data['closest']}")


@app.command()
def validate(files: list[Path] = typer.Argument(..., help="Recipe or profile YAML files to check.")) -> None:
    """Check recipes and profiles without running anything."""
    from kdpipe.pipeline.validate import validate_file
    from kdpipe.yamlio import check_file

    failed = 0
    for f in files:
        try:
            with _guard():
                check_file(f)  # the true reason: no such file, a directory, a symlink loop, permissions
                kind = validate_file(f)
                typer.echo(f"ok: {f} ({kind})")
                if kind == "profile":
                    _provider_note(f)
        except typer.Exit as e:
            if e.exit_code != 1:
                raise
            failed += 1
    if failed:
        err.print(f"{failed} of {len(files)} file(s) failed validation")
        raise typer.Exit(1)


def _provider_note(path: Path) -> None:
    """A valid profile whose providers this machine lacks: say so (kdpipe profile fails here without allow_fallback)."""
    import onnxruntime as ort

    from kdpipe.config import load_profile

    prof = load_profile(path)
    missing = [p for p in prof.execution_providers if p not in ort.get_available_providers()]
    if missing:
        then = "times on the others (allow_fallback)" if prof.allow_fallback else "fails here (no allow_fallback)"
        err.print(f"note: {path}: {', '.join(missing)} not available on this machine; kdpipe profile {then}")


def _terminated(signum: int, frame: object) -> None:
    # `docker stop` / CI cancellation send SIGTERM: unwind like Ctrl-C so the stage in progress is discarded
    raise KeyboardInterrupt


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminated)
    app(prog_name="kdpipe")


if __name__ == "__main__":
    main()
