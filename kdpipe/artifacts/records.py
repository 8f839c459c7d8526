"""The stage contract: what a stage is given (its config section, the upstream manifest, a RunContext) and
what it hands on (a typed record stored in its manifest, read back as that type).

This module sits in the bottom layer with `artifacts`: stages import it, the runner (`pipeline`) imports the
stages, and nothing here imports a stage, so the import graph has no cycle. Every path in a record is relative
to the stage directory that wrote it (or names a stage of the run's lineage), so a run can be moved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdpipe.artifacts.manifest import FileRecord, Manifest, Metric
from kdpipe.errors import ArtifactError

if TYPE_CHECKING:
    from rich.console import Console

    from kdpipe.config import Recipe, TargetProfile


class Record(BaseModel):
    """A stage's hand-over. Unknown keys are refused on read, so a record written by another schema fails
    loudly instead of being half-read; JSON's string keys become ints where the field says so."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class AssistantInfo(Record):
    kept_layers: list[int] = Field(description="Teacher layers the assistant was built from.")
    of: str = Field(description="What the assistant was distilled from (the original teacher's source).")
    teacher_layers: int = Field(description="Layers of the original teacher.")


class LeakageCount(Record):
    """Texts of a held-out split also found in the train split after case / whitespace normalisation."""

    overlap: int = Field(ge=0, description="Held-out texts whose normalised form is a normalised train text.")
    of: int = Field(ge=0, description="Texts of the held-out split.")

    @property
    def share(self) -> float:
        return self.overlap / self.of if self.of else 0.0

    @property
    def percent(self) -> str:
        """The share as the warnings and reports print it (one rounding for both: 37 of 2,000 is 1.9%)."""
        return percent(self.overlap, self.of)


def percent(n: int, of: int) -> str:
    """n of `of` as a percentage with one decimal, rounded half up from the exact fraction (37 / 2,000 = 1.9%)."""
    from fractions import Fraction

    if not of:
        return "0.0%"
    tenths = Fraction(1000 * n, of)
    return f"{int(tenths + Fraction(1, 2)) / 10:.1f}%"


class PosteriorInfo(Record):
    """The teacher's posterior N(m, S) over its weights (kdpipe.methods.bayes), stored next to its model."""

    file: str = Field(description="The safetensors file, relative to the teacher stage.")
    kind: Literal["diagonal", "swag"]
    rank: int = Field(description="Columns of the low-rank factor (0: diagonal only).")
    params: int = Field(description="Parameters the posterior covers.")
    n_data: int = Field(description="Train examples it was fitted on (the prior term divides by it).")
    seconds: float


class PriorInfo(Record):
    """A student's prior N(mu, Xi): the teacher's posterior conditioned on the removed blocks' xi1 = 0."""

    file: str = Field(description="The safetensors file, relative to the student stage.")
    kind: str
    rank: int
    params: int = Field(description="Student parameters the prior covers.")
    zeroed: int = Field(description="Teacher parameters conditioned to 0 (xi1).")
    shift: float = Field(description="||mu - m_v|| / ||m_v||: how far the conditional mean moved from the copy.")


class ClassificationInfo(Record):
    """A classification teacher (teacher.task: classification): its labels and splits are the record's shared
    fields (label_names, split_sizes), so the info holds only its tag."""

    task: Literal["classification"] = "classification"


class TranslationInfo(Record):
    """A translation teacher's settings downstream stages reuse (decoding length, CE smoothing, the pairs)."""

    task: Literal["translation"] = "translation"
    source_column: str
    target_column: str
    max_new_tokens: int
    label_smoothing: float
    from_scratch: bool


class EmbeddingInfo(Record):
    """A sentence-encoder teacher (teacher.task: embedding): how it pools, where it came from, and the sentence
    files the later stages read (relative to the teacher stage)."""

    task: Literal["embedding"] = "embedding"
    pooling: str = Field(description="mean, cls or max.")
    normalize: bool
    pooling_source: str = Field(description="Where pooling and normalisation came from (modules.json / override).")
    dim: int = Field(description="Width of the sentence embedding.")
    hidden_size: int
    layers: int
    teacher: str = Field(description="The teacher's name (all-MiniLM-L6-v2, all-mpnet-base-v2, a folder's name).")
    teacher_kind: str = Field(description="default, packaged or local.")
    sha256: str | None = Field(None, description="The verified sha256 of its model.safetensors, when checked.")
    model_dir: str = Field(description="The teacher as a sentence-transformers folder.")
    held_out: str = Field(description="JSONL of the held-out sentences ({'text': ...} per line).")
    transfer: str = Field(description="JSONL of the transfer sentences.")


class CausalLMInfo(Record):
    """A causal-LM teacher (teacher.task: causal_lm): where it came from, its shape, and the files the later
    stages read (relative to the teacher stage). JSONL rows: train / held-out prompts {"prompt": raw, "input": the
    model's input text (chat template applied, or the raw prompt), "chat": bool}; held-out texts {"text": ...};
    generations {"index": prompt row, "kind": greedy | sampled, "input", "response", "response_ids"}."""

    task: Literal["causal_lm"] = "causal_lm"
    teacher: str = Field(description="The teacher's name (SmolLM2-135M-Instruct, a folder's name).")
    teacher_kind: str = Field(description="default (materialized from the GGUF) or local.")
    model_type: str
    layers: int
    hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    model_dir: str = Field(description="The teacher as a Hugging Face causal-LM folder (safetensors + tokenizer).")
    train_prompts: str = Field(description="JSONL of the train prompts.")
    held_out_texts: str = Field(description="JSONL of the held-out texts (perplexity; never trained on).")
    held_out_prompts: str = Field(description="JSONL of the held-out prompts (generation comparisons).")
    generations: str = Field(description="JSONL of the teacher's generations for the train prompts (SeqKD).")
    held_out_generations: str = Field(description="JSONL of the teacher's greedy generations for the held-out prompts.")
    max_new_tokens: int = Field(description="New tokens per generation (greedy; the same for every comparison).")
    sampled: int = Field(description="Sampled generations per train prompt besides the greedy one.")
    max_length: int = Field(description="Tokens per held-out text after truncation.")
    chat_template: bool = Field(description="Whether prompts went through the tokenizer's chat template.")
    data: str = Field(description="What the prompts and texts are (the file, or the embedded corpora and templates).")


# The task's own part of a teacher record, told apart by its `task` tag (a discriminated union: a record of one
# task never reads as another's). Adding a task adds its info class here and to this union (CONTRIBUTING.md).
TaskInfo = Annotated[ClassificationInfo | TranslationInfo | EmbeddingInfo | CausalLMInfo, Field(discriminator="task")]
InfoT = TypeVar("InfoT", ClassificationInfo, TranslationInfo, EmbeddingInfo, CausalLMInfo)


class TeacherRecord(Record):
    """What the teacher stage (or a teaching assistant standing in for it) hands on: the fields every task has,
    and `info`, the task's own (TaskInfo)."""

    label_names: list[str]
    max_length: int
    split_sizes: dict[str, int]
    data_source: str
    data_sha256: str
    data_rows: dict[str, int] | None = None
    data_splits: dict[str, str] = Field(
        default_factory=dict, description="train / val / test -> where it came from (a given file, or drawn)."
    )
    leakage: dict[str, LeakageCount] = Field(
        default_factory=dict, description="val / test -> its texts also in train (kdpipe.data.splits)."
    )
    model_source: str
    finetuned: bool
    trained_params: Literal["head", "all"]
    warnings: list[str] = Field(default_factory=list)
    assistant: AssistantInfo | None = Field(None, description="Set when this teacher-kind artifact is an assistant.")
    posterior: PosteriorInfo | None = Field(None, description="Set when teacher.posterior asked for one.")
    info: TaskInfo = Field(default_factory=ClassificationInfo, description="The task's own fields, tagged by task.")

    @model_validator(mode="before")
    @classmethod
    def _classification_before_info(cls, data: Any) -> Any:
        """A classification teacher written before `info` existed (task: classification, translation and embedding
        None) reads as it is, so an existing default teacher is reused, not retrained; any other record of that
        shape (an old translation or embedding teacher) is refused by the schema, asking for --force."""
        if not isinstance(data, dict) or "info" in data:
            return data
        old = {k: data.get(k) for k in ("task", "translation", "embedding")}
        if old["task"] in (None, "classification") and old["translation"] is None and old["embedding"] is None:
            data = {k: v for k, v in data.items() if k not in old}
            data["info"] = {"task": "classification"}
        return data

    @property
    def task(self) -> str:
        return self.info.task

    def info_as(self, kind: type[InfoT]) -> InfoT:
        """The task info, as the task that reads it expects; an ArtifactError when the teacher is another task's."""
        if not isinstance(self.info, kind):
            want = kind.model_fields["task"].default
            raise ArtifactError(
                f"the teacher is a {self.info.task} teacher, not a {want} one",
                f"build the student from a teacher.task: {want} run (or re-run the teacher with --force)",
            )
        return self.info


class VocabInfo(Record):
    """A student whose vocabulary was pruned: `map` (an .npy of the teacher's vocabulary size) gives each
    teacher token id its student id ([UNK] for a pruned one), so both models can read one batch."""

    kept: int
    old_size: int
    coverage: float = Field(description="Share of the test split's tokens (teacher tokenizer) that were kept.")
    map: str


class WidthInfo(Record):
    heads_removed: dict[int, list[int]]
    ffn_kept: int = Field(description="FFN neurons kept in every layer.")
    ffn_total: int
    params_before: int
    params_after: int


class LMWidthRecord(Record):
    """What student.width pruned from a causal LM (kdpipe.compress.lmwidth; the same count in every layer)."""

    ffn_before: int
    ffn_after: int
    kv_groups_before: int
    kv_groups_after: int
    heads_before: int
    heads_after: int
    params_before: int
    params_after: int
    scored_tokens: int


class LayerSelection(Record):
    """How student.layers: importance / block chose the kept layers (kdpipe.compress.layerscore)."""

    criterion: str
    scores: list[float] = Field(
        description="'importance': each teacher layer's Block Influence; 'block': the angular distance of the "
        "dropped block starting at each layer."
    )
    tokens: int = Field(description="Real train tokens the scores were measured on.")


class StudentRecord(Record):
    kept_layers: list[int]
    layer_map: dict[int, int] = Field(description="Student hidden-state index -> teacher hidden-state index.")
    init: str
    width: WidthInfo | None = None
    vocab: VocabInfo | None = None
    arch: str = Field(
        "teacher", description="'teacher' (the teacher's architecture), 'bilstm' or 'static' (embedding)."
    )
    stacks: dict[str, list[int]] | None = Field(None, description="Teacher layers kept per stack (encoder/decoder).")
    prior: PriorInfo | None = Field(None, description="Set for init: bayes.")
    selection: LayerSelection | None = Field(None, description="Set for student.layers: importance / block.")
    lm_width: LMWidthRecord | None = Field(None, description="Set for a causal LM with student.width.")


class DistillRecord(Record):
    device: str
    precision: str
    history: list[dict[str, float]]
    baseline_history: list[dict[str, float]] | None = None
    losses: list[dict[str, Any]]
    schedule_kind: str
    schedule_events: list[dict[str, Any]]
    train_examples: int
    data_free: dict[str, Any] | None = None
    warnings: list[str] = Field(default_factory=list)
    attention_dropout_off: list[str] = Field(default_factory=list)
    cka_diagonal: list[float] | None = None
    # the teacher-output cache: {status: hit | miss | bypassed, reason, key, dir (relative to this stage),
    # examples, bytes, bytes_per_example, contents, build_seconds, tail_mass}
    teacher_cache: dict[str, Any] | None = None
    resumed_from: int | None = None  # the KD run continued from this step's checkpoint
    processes: int = 1  # torchrun processes (DDP)
    accumulate: int = 1  # micro-batches per optimiser step
    teacher_memory: dict[str, int] | None = None  # teacher_shard: the teacher's weight bytes in all / per process
    attention: str = "eager"  # the attention implementation the models trained with (sdpa on the GPU path)


class ModelSource(Record):
    """Where the PyTorch model of an ONNX file lives: a stage of the lineage and a directory inside it."""

    stage: str
    dir: str


class Parity(Record):
    """The exported graph against its PyTorch model on real inputs. `kind` says what was compared: 'logits'
    (max |diff| of the logits; agreement = same argmax class), 'cosine' (max 1 - cosine of the embeddings;
    agreement = 1 when every example is within the bound, else 0) or 'generations' (max |diff| of the first
    step's logits; agreement = share of identical greedy generations)."""

    kind: Literal["logits", "cosine", "generations"]
    max_abs_diff: float
    atol: float
    agreement: float
    examples: int
    shapes: list[list[int]]
    nonfinite_outputs: int
    refused: str | None = Field(None, description="onnxruntime's error when it refused a batch (e.g. a static axis).")
    ok: bool


class Gate(Record):
    """A variant checked against the fp32 PyTorch student on the task's own metric (`metric`), as the task's
    Quality says: higher is better, a fraction."""

    metric: str = Field(
        description="What value, reference and budget measure: 'accuracy' (classification), 'bleu/100' "
        "(translation's sacreBLEU of greedy generations / 100), 'lee_spearman' (embedding)."
    )
    examples: int
    value: float = Field(description="The variant's metric on the evaluation examples.")
    reference: float = Field(description="The fp32 PyTorch student's metric on the same examples.")
    budget: float = Field(description="The value it had to reach: accuracy_budget x reference.")
    agreement: float = Field(
        description="Share of examples where it agrees with the PyTorch student (same class / identical "
        "generation / cosine within the parity bound)."
    )
    max_abs_diff: float
    atol: float | None = Field(description="The logit tolerance it had to meet (None: quantised, no bound).")
    nonfinite_outputs: int
    ok: bool


class ExportedModel(Record):
    onnx: str
    spec: dict[str, Any]
    parity: Parity
    source: ModelSource
    variant: str = "fp32"
    of: str | None = Field(None, description="The model this is a variant of (its name in `models`).")
    gate: Gate | None = None
    transforms: dict[str, Any] = Field(default_factory=dict, description="Fusions / quantised operators applied.")


class ExportRecord(Record):
    models: dict[str, ExportedModel]


class BudgetCheck(Record):
    """One budget of the target profile against the deployed variant; `ok` is False for a NaN value."""

    budget: str
    limit: float
    value: float | None
    unit: str
    ok: bool


class MobileInfo(Record):
    """The deployed variant in onnxruntime's ORT format, and what the mobile usability checker said."""

    ort: str
    required_operators: str
    bytes: int
    contrib_ops: list[str]
    findings: list[str]


class ProfileRecord(Record):
    report: str
    profile: str
    mobile: MobileInfo | None = None
    deploy: str = Field("student", description="The model (name in the export record) the budgets apply to.")
    budgets: list[BudgetCheck] = Field(default_factory=list)

    @property
    def misses(self) -> list[BudgetCheck]:
        return [b for b in self.budgets if not b.ok]


R = TypeVar("R", bound=Record)


def record(manifest: Manifest, kind: type[R]) -> R:
    """The manifest's hand-over record, validated as `kind`."""
    try:
        return kind.model_validate(manifest.record)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ArtifactError(
            f"{manifest.dir}: the {manifest.stage} manifest's record does not fit {kind.__name__} "
            f"({where}: {first['msg']})",
            f"re-run `kdpipe {manifest.stage} --force` with this kdpipe version",
        ) from None


@dataclass
class StageOutput:
    """What a stage function returns; the runner writes it into the manifest."""

    record: Record
    metrics: dict[str, Metric] = field(default_factory=dict)


@dataclass(frozen=True)
class RunContext:
    """Resolved once per command: the recipe's seed, where progress goes, and the target profile."""

    seed: int
    console: Console
    profile: TargetProfile
    resume: bool = False  # continue an interrupted stage from its checkpoints
    checkpoints: Path | None = None  # set by the runner per stage: where its training runs checkpoint
    cache_root: Path | None = None  # <out>/cache: artifacts shared between the stages of an output root

    def checkpoint(self, name: str) -> Path | None:
        """The checkpoint file of the stage's training run `name` (None: the runner set no directory)."""
        return None if self.checkpoints is None else self.checkpoints / f"{name}.pt"


C = TypeVar("C")


@dataclass(frozen=True)
class StageSpec(Generic[C]):
    """One row of the runner's STAGES table; each stage module declares its own.

    section: the recipe section the stage sees (its whole config);
    identity: the dict the run id hashes (its config, plus the seed when the stage is seeded);
    inputs: the content records of every file the stage reads besides the upstream's outputs;
    run: `run_<stage>(cfg, upstream, out, ctx) -> StageOutput`."""

    name: str
    upstream: str | None
    section: Callable[[Recipe, RunContext], C]
    run: Callable[[C, Manifest | None, Path, RunContext], StageOutput]
    summary: str
    identity: Callable[[C, RunContext], dict[str, Any]]
    inputs: Callable[[C, Manifest | None], list[FileRecord]] = field(default=lambda cfg, up: upstream_inputs(up))
    kind: str | None = None  # the artifact kind its manifest records (default: its name)


def seeded(cfg: BaseModel, ctx: RunContext) -> dict[str, Any]:
    """The identity of a stage whose result depends on the seed."""
    return {"seed": ctx.seed, **cfg.model_dump(mode="json")}


def unseeded(cfg: BaseModel, ctx: RunContext) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def upstream_inputs(upstream: Manifest | None) -> list[FileRecord]:
    """A downstream stage's inputs: the upstream's recorded (and just verified) outputs."""
    if upstream is None:
        return []
    return [FileRecord(f"{upstream.stage}/{r.path}", r.sha256, r.bytes) for r in upstream.outputs]
