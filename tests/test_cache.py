"""The teacher-output cache (kdpipe.train.cache): every teacher term reads the same losses from it as from the live
teacher; a tampered, truncated or interrupted cache is never opened; top-k keeps its stated error bound."""

from __future__ import annotations

import io
import json
import random
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_model_dir
from pydantic import TypeAdapter
from torch import Tensor, nn

from kdpipe.config import CacheConfig
from kdpipe.data.tables import Encoded, batches
from kdpipe.errors import ModelError
from kdpipe.losses.logits import soft_kl
from kdpipe.losses.objective import LossContext, Objective, Term, build_objective
from kdpipe.losses.schedule import Schedule
from kdpipe.losses.terms import LossConfig
from kdpipe.models.loading import KDOutputs, forward_kd, load_classifier
from kdpipe.train.cache import (
    CacheMissError,
    CacheSpec,
    TeacherCache,
    build_cache,
    cache_key,
    cache_problem,
    data_sha256,
    estimate_bytes,
    open_cache,
    plan,
    reconstruct_logits,
    teacher_reads,
    topk_compress,
)
from kdpipe.train.loop import Device

CPU = Device("cpu", None)
CTX = LossContext(layer_map={0: 0, 1: 2, 2: 4}, n_student=2, n_teacher=4, d_student=32, d_teacher=32)
# every recipe term that reads the teacher, and the teacher (hidden_states, attentions) indices it reads
# with a 4-layer teacher and a 2-layer student kept from teacher layers 2 and 4
TERMS: dict[str, tuple[dict[str, Any], tuple[tuple[int, ...], tuple[int, ...]]]] = {
    "hinton": ({"temperature": 2.0, "alpha": 0.5}, ((), ())),
    "logit_mse": ({"alpha": 0.5}, ((), ())),
    "reverse_kl": ({"temperature": 2.0}, ((), ())),
    "jsd": ({"temperature": 2.0}, ((), ())),
    "ofa": ({}, ((), ())),
    "pkd": ({}, ((2,), ())),
    "hidden_cosine": ({}, ((0, 2, 4), ())),
    "tinybert": ({"project": "always"}, ((0, 2, 4), (1, 3))),
    # attention only: the layer terms read no hidden state, but its PID/SID progress measure does
    "tinybert:attention": ({"embedding": 0.0, "hidden": 0.0, "project": "always"}, ((2, 4), (1, 3))),
    "attention_kl": ({}, ((2, 4), (1, 3))),
    "hint": ({}, ((2,), ())),
    "crd": ({"dim": 8}, ((4,), ())),
    "pkt": ({"symmetric": True}, ((4,), ())),
    "vid": ({}, ((2, 4), ())),
}
FEATURE_TERMS = [name for name, (_, reads) in TERMS.items() if reads != ((), ())]
# fp32 storage: the same numbers up to the float noise of another padding width
FP32 = {"rtol": 1e-5, "atol": 1e-6}
# fp16 storage rounds each feature to 11 significant bits (relative error <= 2^-11 ~ 4.9e-4)
FP16 = {"rtol": 5e-3, "atol": 1e-4}


def _objective(name: str) -> Objective:
    cfg = TypeAdapter(LossConfig).validate_python({"name": name.split(":")[0], **TERMS[name][0]})
    return build_objective([cfg], CTX)


def _transfer(n: int = 30, seed: int = 0, labels: bool = True) -> Encoded:
    """Token ids of the conftest vocabulary ([CLS]=2 ... [SEP]=3), 3 to 14 tokens: padding in every batch."""
    rng = random.Random(seed)
    ids = [[2, *(rng.randrange(5, 31) for _ in range(rng.randint(1, 12))), 3] for _ in range(n)]
    return Encoded(ids=ids, labels=[i % 3 for i in range(n)] if labels else None, pad_id=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny models run as fast on one thread, and a busy second core cannot stall them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    base = tmp_path_factory.mktemp("cache_models")
    teacher = load_classifier(make_model_dir(base / "t", layers=4)).eval()
    student = load_classifier(make_model_dir(base / "s", layers=2, seed=1)).eval()
    return teacher, student


def _with_labels(out: KDOutputs, labels: Tensor | None) -> KDOutputs:
    out.labels = labels
    return out


def _term_values(term: Term, s: KDOutputs, t: KDOutputs) -> list[Tensor]:
    """Everything a term computes from the teacher: its value on all layers, its logit part, its progress."""
    values = [term(s, t, None)]
    if term.logit_fn is not None:
        values.append(term.logit_fn(s, t))
    if term.progress is not None:
        values += [term.progress(s, t, m, n) for m, n in term.layer_map.items()]
    return values


def _reads_and_cache(
    tmp_path: Path, models: tuple[Any, Any], objective: Objective, data: Encoded, features_dtype: str = "fp32"
) -> TeacherCache:
    """What the objective reads (teacher_reads on one real batch), cached for `data`."""
    teacher, student = models
    batch = next(batches(data, 8, shuffle=True, seed=99, with_index=True))
    with torch.no_grad():
        s = _with_labels(forward_kd(student, batch, True, True), batch["labels"])
        t = forward_kd(teacher, batch, True, True)
    hidden, attentions = teacher_reads(objective, s, t)
    spec = plan(CacheConfig(features_dtype=features_dtype), 3, hidden, attentions, CPU.precision)
    key = cache_key("tiny-teacher", data_sha256(data), spec)
    return build_cache(tmp_path / "cache", key, teacher, data, spec, CPU)


def _compare(objective: Objective, cache: TeacherCache, models: tuple[Any, Any], data: Encoded, tol: dict) -> int:
    """Every term's values from the live teacher and from the cache, on shuffled batches; the widths seen."""
    teacher, student = models
    widths = set()
    for seed in (0, 1, 2):
        for batch in batches(data, 7, shuffle=True, seed=seed, with_index=True):
            widths.add(batch["attention_mask"].shape[1])
            y = batch["labels"]
            with torch.no_grad():
                s = _with_labels(forward_kd(student, batch, True, True), y)
                live = _with_labels(forward_kd(teacher, batch, True, True), y)
                cached = cache.outputs(batch["index"], batch["attention_mask"], y, "cpu")
                for term in objective.terms:
                    assert isinstance(term, Term)
                    want, got = _term_values(term, s, live), _term_values(term, s, cached)
                    for w, g in zip(want, got, strict=True):
                        assert torch.allclose(g, w, **tol), (term.name, float(g), float(w))
                assert torch.allclose(objective(s, cached).total, objective(s, live).total, **tol)
    return len(widths)


# ----------------------------------------------------------------------------- 1. live == cached
@pytest.mark.parametrize("name", sorted(TERMS))
def test_every_teacher_term_gives_the_same_loss_from_the_cache(name: str, models: Any, tmp_path: Path) -> None:
    """teacher_reads decides what is cached, and a term reading an uncached index raises (see the next test):
    equal values therefore also prove teacher_reads found every index the term reads."""
    objective, data = _objective(name), _transfer()
    cache = _reads_and_cache(tmp_path, models, objective, data)
    assert (cache.spec.hidden, cache.spec.attentions) == TERMS[name][1]
    assert _compare(objective, cache, models, data, FP32) >= 3  # several padding widths


def test_fp16_features_match_within_their_stated_tolerance(models: Any, tmp_path: Path) -> None:
    cfgs = [TypeAdapter(LossConfig).validate_python({"name": n.split(":")[0], **TERMS[n][0]}) for n in FEATURE_TERMS]
    objective, data = build_objective(cfgs, CTX), _transfer(seed=3)
    cache = _reads_and_cache(tmp_path, models, objective, data, features_dtype="fp16")
    assert cache.spec.features_dtype == "fp16" and cache.arrays["hidden.npy"].dtype == np.float16
    assert _compare(objective, cache, models, data, FP16) >= 2


def test_reading_an_index_the_cache_does_not_hold_raises(models: Any, tmp_path: Path) -> None:
    teacher, student = models
    data = _transfer(8)
    spec = CacheSpec(top_k=None, hidden=(0, 2), attentions=(), features_dtype="fp32", precision="fp32")
    cache = build_cache(tmp_path, cache_key("t", data_sha256(data), spec), teacher, data, spec, CPU)
    batch = next(batches(data, 8, shuffle=False, with_index=True))
    t = cache.outputs(batch["index"], batch["attention_mask"], None, "cpu")
    assert t.hidden_states is not None and len(t.hidden_states) == 5 and t.attentions is None
    s = forward_kd(student, batch, True, False)
    with pytest.raises(CacheMissError, match=r"hidden_states\[4\] is not in the teacher-output cache"):
        _objective("hidden_cosine").terms[0](s, t)
    with pytest.raises(CacheMissError, match=r"hidden_states\[4\]"):
        t.hidden_states[-1]
    with pytest.raises(CacheMissError):
        list(t.hidden_states)
    assert t.hidden_states[2].shape == (8, batch["attention_mask"].shape[1], 32)


def test_teacher_reads_records_indices_slices_and_iteration() -> None:
    g = torch.Generator().manual_seed(0)
    hs = tuple(torch.randn(2, 3, 4, generator=g) for _ in range(5))
    s = KDOutputs(torch.randn(2, 3, generator=g), hs, None, torch.ones(2, 3), torch.tensor([0, 1]))

    def reads(fn: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
        term = Term("probe", 1.0, lambda s, t, lm: fn(t.hidden_states), layer_map={1: 1})
        return teacher_reads(Objective([term], Schedule()), s, s)

    assert reads(lambda h: h[-2].sum()) == ((3,), ())
    assert reads(lambda h: sum(x.sum() for x in h[1:4:2])) == ((1, 3), ())
    assert reads(lambda h: sum(x.sum() for x in h)) == ((0, 1, 2, 3, 4), ())


# ----------------------------------------------------------------------------- 2. planted failures
def test_a_tampered_truncated_or_incomplete_cache_is_never_opened(models: Any, tmp_path: Path) -> None:
    teacher = models[0]
    data = _transfer(12)
    spec = CacheSpec(top_k=None, hidden=(0, 2), attentions=(1,), features_dtype="fp32", precision="fp32")
    key = cache_key("t", data_sha256(data), spec)
    build_cache(tmp_path / "good", key, teacher, data, spec, CPU)
    assert open_cache(tmp_path / "good", key) is not None  # the control

    def broken(name: str, how: Any) -> Path:
        root = tmp_path / name
        shutil.copytree(tmp_path / "good", root)
        how(root / key[:16])
        return root

    def flip_last_byte(d: Path) -> None:  # same size, still a valid .npy: only the sha256 sees it
        path = d / "logits.npy"
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0x01
        path.write_bytes(bytes(raw))
        assert np.load(path).shape == (12, 3)

    def truncate(d: Path) -> None:
        path = d / "hidden.npy"
        path.write_bytes(path.read_bytes()[:-64])

    def other_key(d: Path) -> None:
        meta = json.loads((d / "cache.json").read_text())
        (d / "cache.json").write_text(json.dumps({**meta, "key": "0" * 64}))

    cases = {
        "perturbed": (flip_last_byte, "sha256 differs"),
        "truncated": (truncate, "sha256 differs"),
        "missing": (lambda d: (d / "attentions.npy").unlink(), "missing"),
        "no_meta": (lambda d: (d / "cache.json").unlink(), "interrupted build"),
        "other_key": (other_key, "another key"),
    }
    for name, (how, why) in cases.items():
        root = broken(name, how)
        assert open_cache(root, key) is None, name
        assert why in (cache_problem(root, key) or ""), name
    assert open_cache(tmp_path / "nowhere", key) is None


def test_a_killed_build_leaves_nothing_that_opens(models: Any, tmp_path: Path) -> None:
    class Killed(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model, self.calls = model, 0

        def forward(self, **kw: Any) -> Any:
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt
            return self.model(**kw)

    data = _transfer(20)
    spec = CacheSpec(top_k=None, hidden=(4,), attentions=(), features_dtype="fp32", precision="fp32")
    key = cache_key("t", data_sha256(data), spec)
    with pytest.raises(KeyboardInterrupt):
        build_cache(tmp_path, key, Killed(models[0]).eval(), data, spec, CPU, batch_size=8)
    assert list(tmp_path.iterdir()) == []  # no final directory, no temporary one left
    assert open_cache(tmp_path, key) is None
    assert build_cache(tmp_path, key, models[0], data, spec, CPU).n == 20  # the rebuild
    assert open_cache(tmp_path, key) is not None


# ----------------------------------------------------------------------------- 3. top-k and NaN
class LinearTeacher(nn.Module):
    """Mean token embedding -> C logits: a many-class teacher in microseconds."""

    def __init__(self, classes: int, scale: float, vocab: int = 31, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.head, self.scale = nn.Embedding(vocab, 16), nn.Linear(16, classes), scale

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **_: Any) -> Any:
        m = attention_mask[..., None].float()
        h = (self.emb(input_ids) * m).sum(1) / m.sum(1)
        return SimpleNamespace(logits=self.scale * self.head(h))


def _tail_mass(logits: Tensor, top: Tensor, temperature: float = 1.0) -> Tensor:
    p = torch.softmax(logits.double() / temperature, -1)
    return 1 - p.gather(-1, top).sum(-1)


def test_topk_keeps_the_tail_mass_and_its_stated_error_bound(tmp_path: Path) -> None:
    C, k = 200, 8
    teacher, data = LinearTeacher(C, scale=6.0), _transfer(40, seed=5, labels=False)
    spec = plan(CacheConfig(top_k=k), C, (), (), "fp32")
    cache = build_cache(tmp_path, cache_key("lin", data_sha256(data), spec), teacher, data, spec, CPU)
    assert cache.spec.top_k == k and cache.arrays["topk_values.npy"].shape == (40, k)
    batch = next(batches(data, 40, shuffle=True, seed=1, with_index=True))
    with torch.no_grad():
        v = teacher(batch["input_ids"], batch["attention_mask"]).logits
    v_hat = cache.outputs(batch["index"], batch["attention_mask"], None, "cpu").logits
    assert v_hat.shape == (40, C) and v_hat.dtype == torch.float32
    assert torch.equal(v_hat.argmax(-1), v.argmax(-1))  # the labels unlabeled rows get are unchanged
    top = v.topk(k, -1).indices
    p, p_hat = torch.softmax(v.double(), -1), torch.softmax(v_hat.double(), -1)
    r, r_hat = _tail_mass(v, top), _tail_mass(v_hat, top)
    assert 0.05 < float(r.mean()) < 0.9  # a tail that matters: the bound is tested, not assumed
    assert torch.allclose(r_hat, r, atol=1e-6)  # T = 1: the same tail mass ...
    assert torch.allclose(p_hat.gather(-1, top), p.gather(-1, top), atol=1e-6)  # ... and the same top-k
    assert cache.tail_mass is not None
    assert cache.tail_mass == pytest.approx((float(r.mean()), float(r.max())), abs=1e-5)
    l1 = (p_hat - p).abs().sum(-1)
    assert bool((l1 <= 2 * r + 1e-6).all()) and bool((l1 > 0).all())
    assert float((l1 / (2 * r)).max()) > 0.3  # not vacuous on a real tail

    z = torch.randn(40, C, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    for temperature in (1.0, 2.0):

        def grad(target: Tensor, t: float = temperature) -> Tensor:
            zz = z.clone().requires_grad_(True)
            (soft_kl(target, zz, t) * len(zz)).backward()  # soft_kl is a mean over rows: per-row gradients
            assert zz.grad is not None
            return zz.grad.double()

        diff = (grad(v_hat) - grad(v)).abs().sum(-1)
        r_t, r_hat_t = _tail_mass(v, top, temperature), _tail_mass(v_hat, top, temperature)
        bound = 2 * torch.maximum(r_t, r_hat_t) / temperature  # = 2 r / T at T = 1
        assert bool((diff <= bound + 1e-5).all()) and bool((diff > 0).all()), temperature
        assert float((diff / bound).max()) > 0.2, temperature


def test_topk_bound_is_tight_when_the_tail_sits_on_one_class() -> None:
    C, k = 200, 8
    v = torch.full((1, C), -30.0)
    v[0, :k], v[0, k] = 10.0, 8.0
    dense = reconstruct_logits(*topk_compress(v, k), C)
    p, p_hat = torch.softmax(v.double(), -1), torch.softmax(dense.double(), -1)
    r = float(1 - p[0, :k].sum())
    l1 = float((p_hat - p).abs().sum())
    assert l1 <= 2 * r and l1 / (2 * r) == pytest.approx(1 - 1 / (C - k), rel=1e-4)


def test_a_nan_teacher_never_makes_a_valid_cache(models: Any, tmp_path: Path) -> None:
    teacher = load_classifier(make_model_dir(tmp_path / "nan", layers=1))
    with torch.no_grad():
        teacher.classifier.weight.fill_(float("nan"))
    data = _transfer(10)
    spec = CacheSpec(top_k=None, hidden=(), attentions=(), features_dtype="fp32", precision="fp32")
    key = cache_key("nan", data_sha256(data), spec)
    with pytest.raises(ModelError, match="non-finite") as err:
        build_cache(tmp_path / "cache", key, teacher, data, spec, CPU)
    assert "nothing was written" in err.value.message and err.value.hint
    assert open_cache(tmp_path / "cache", key) is None
    assert not (tmp_path / "cache" / key[:16]).exists()
    # one poisoned token is enough, and the message names an example that has it
    lin = LinearTeacher(5, 1.0)
    with torch.no_grad():
        lin.emb.weight[30] = float("inf")
    poisoned = Encoded(ids=[[2, 5, 3], [2, 6, 3], [2, 30, 3]], labels=None, pad_id=0)
    with pytest.raises(ModelError, match="on 1 transfer examples \\(e.g. example 2\\)"):
        build_cache(tmp_path / "cache", key, lin, poisoned, spec, CPU)


# ----------------------------------------------------------------------------- 4. keys
def test_the_key_follows_the_data_the_spec_and_the_teacher() -> None:
    data = _transfer(10)
    spec = CacheSpec(top_k=None, hidden=(0,), attentions=(), features_dtype="fp32", precision="fp32")
    base = cache_key("t", data_sha256(data), spec)
    assert base == cache_key("t", data_sha256(data), spec) and len(base) == 64
    same = Encoded(ids=[list(x) for x in data.ids], labels=None, pad_id=7)  # labels / pad id do not matter
    assert data_sha256(same) == data_sha256(data)
    changed = Encoded(ids=[list(x) for x in data.ids], labels=data.labels, pad_id=0)
    changed.ids[4][1] += 1
    assert data_sha256(changed) != data_sha256(data)
    # the same ids split differently are other examples
    split = Encoded(ids=[data.ids[0] + data.ids[1], *data.ids[2:]], labels=None, pad_id=0)
    assert data_sha256(split) != data_sha256(data)
    others = {
        cache_key("t2", data_sha256(data), spec),
        cache_key("t", data_sha256(changed), spec),
        *(
            cache_key("t", data_sha256(data), CacheSpec(**{**spec.as_dict(), **change}))  # type: ignore[arg-type]
            for change in (
                {"top_k": 2},
                {"hidden": (0, 1)},
                {"attentions": (0,)},
                {"features_dtype": "fp16"},
                {"precision": "bf16"},
            )
        ),
    }
    assert base not in others and len(others) == 7


def test_plan_picks_full_logits_or_top_k() -> None:
    assert plan(CacheConfig(), 3, (2, 0, 2), (1,), "fp32") == CacheSpec(None, (0, 2), (1,), "fp32", "fp32")
    assert plan(CacheConfig(), 1024, (), (), "bf16").top_k is None
    assert plan(CacheConfig(), 1025, (), (), "bf16").top_k == 64
    assert plan(CacheConfig(top_k=8), 200, (), (), "fp32").top_k == 8
    assert plan(CacheConfig(top_k=8), 8, (), (), "fp32").top_k is None  # k >= C: the full logits are smaller


# ----------------------------------------------------------------------------- 5. reading
def test_reading_is_memory_mapped_and_slices_by_index(models: Any, tmp_path: Path) -> None:
    teacher = models[0]
    data = _transfer(25, seed=7)
    spec = CacheSpec(top_k=None, hidden=(1, 4), attentions=(0, 3), features_dtype="fp32", precision="fp32")
    console_out = io.StringIO()
    from rich.console import Console

    console = Console(file=console_out, width=100)
    key = cache_key("t", data_sha256(data), spec)
    build_cache(tmp_path, key, teacher, data, spec, CPU, console=console, batch_size=4)
    assert "teacher cache" in console_out.getvalue()
    cache = open_cache(tmp_path, key)
    assert cache is not None and cache.n == 25
    assert all(isinstance(a, np.memmap) for a in cache.arrays.values())
    assert cache.bytes == sum(p.stat().st_size for p in cache.dir.glob("*.npy"))
    assert cache.bytes == estimate_bytes(data, spec, teacher.config)
    assert cache.bytes_per_example == pytest.approx(cache.bytes / 25)
    index = torch.tensor([17, 3, 24, 0, 11, 5])
    batch = next(batches(Encoded([data.ids[i] for i in index.tolist()], None, 0), 6, shuffle=False))
    with torch.no_grad():
        live = forward_kd(teacher, batch, True, True)
    got = cache.outputs(index, batch["attention_mask"], None, "cpu")
    assert torch.allclose(got.logits, live.logits, **FP32)
    assert torch.allclose(got.logits, torch.from_numpy(np.asarray(cache.arrays["logits.npy"][index.numpy()])))
    real = batch["attention_mask"].bool()
    assert got.hidden_states is not None and live.hidden_states is not None
    assert got.attentions is not None and live.attentions is not None
    for j in (1, 4):
        assert got.hidden_states[j].dtype == torch.float32
        assert torch.allclose(got.hidden_states[j][real], live.hidden_states[j][real], **FP32)
        assert bool((got.hidden_states[j][~real] == 0).all())
    for j in (0, 3):
        cells = real[:, None, :, None] & real[:, None, None, :]
        assert got.attentions[j].shape == live.attentions[j].shape
        a, b = got.attentions[j], live.attentions[j]
        assert torch.allclose(a.masked_select(cells), b.masked_select(cells), **FP32)
    with pytest.raises(CacheMissError, match=r"attentions\[1\]"):
        got.attentions[1]
    wrong = torch.roll(index, 1)  # other examples' lengths under this mask
    assert [len(data.ids[i]) for i in wrong.tolist()] != [len(data.ids[i]) for i in index.tolist()]
    with pytest.raises(Exception, match="does not match the cached lengths"):
        cache.outputs(wrong, batch["attention_mask"], None, "cpu")


def test_estimate_matches_fp16_and_topk_layouts(models: Any) -> None:
    data = _transfer(9)
    cfg = SimpleNamespace(num_labels=3, hidden_size=32, num_attention_heads=2)
    full = CacheSpec(None, (0, 2), (1,), "fp32", "fp32")
    half = CacheSpec(None, (0, 2), (1,), "fp16", "fp32")
    tokens = sum(len(x) for x in data.ids)
    squares = sum(len(x) ** 2 for x in data.ids)
    payload = 9 * 4 + 9 * 3 * 4 + tokens * 2 * 32 * 4 + squares * 2 * 4
    assert 0 < estimate_bytes(data, full, cfg) - payload <= 4 * 128  # + one header per file
    assert estimate_bytes(data, full, cfg) - estimate_bytes(data, half, cfg) == (tokens * 64 + squares * 2) * 2
    topk = CacheSpec(2, (), (), "fp32", "fp32")
    assert 0 < estimate_bytes(data, topk, cfg) - (9 * 4 + 9 * 2 * 8 + 9 * 4) <= 4 * 128


def test_a_bf16_teacher_pass_is_cached_as_float32_of_its_outputs(models: Any, tmp_path: Path) -> None:
    """precision is part of the key; a bf16 pass stores its bf16 outputs as float32 (an exact widening)."""
    teacher = models[0]
    bf16 = Device("cpu", torch.bfloat16)
    data = _transfer(12, seed=2)
    spec = CacheSpec(None, (4,), (), "fp32", bf16.precision)
    assert cache_key("t", data_sha256(data), spec) != cache_key("t", data_sha256(data), replace(spec, precision="fp32"))
    cache = build_cache(tmp_path, cache_key("t", data_sha256(data), spec), teacher, data, spec, bf16)
    for batch in batches(data, 5, shuffle=True, seed=0, with_index=True):
        with torch.no_grad(), bf16.autocast():
            live = forward_kd(teacher, batch, True, False)
        got = cache.outputs(batch["index"], batch["attention_mask"], None, "cpu")
        assert got.logits.dtype == torch.float32 and live.logits.dtype == torch.bfloat16
        # bf16 keeps 8 significant bits: another padding width may move a value by a few of its ulps
        assert torch.allclose(got.logits, live.logits.float(), rtol=2e-2, atol=1e-3)
        assert got.hidden_states is not None and live.hidden_states is not None
        real = batch["attention_mask"].bool()
        assert torch.allclose(got.hidden_states[4][real], live.hidden_states[4].float()[real], rtol=2e-2, atol=1e-2)
