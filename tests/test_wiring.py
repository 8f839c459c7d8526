"""How the loss terms are wired into training: which attention maps they see, what the PID/SID
threshold compares, TinyBERT's aggregation and schedule, divergence, gradient clipping, teacher
detachment, and number checks of whole terms against hand computations."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_tokenizer
from pydantic import TypeAdapter

from kdpipe.data.tables import Encoded
from kdpipe.errors import ConfigError, ModelError
from kdpipe.losses.objective import LossContext, build_objective, resolve_map
from kdpipe.losses.terms import LOSS_TYPES, LossConfig
from kdpipe.models.loading import KDOutputs
from kdpipe.train.loop import TrainPlan, pick_device, train

CPU = pick_device("cpu")
ADAPTER: TypeAdapter[Any] = TypeAdapter(LossConfig)


def _cfg(name: str, **kw: Any) -> Any:
    return ADAPTER.validate_python({"name": name, **kw})


class _Sched:
    def __init__(self, kind: str, cap_steps: int = 100, threshold: float = 0.0, keep_soft: bool = False) -> None:
        self.kind, self.cap_steps, self.threshold = kind, cap_steps, threshold
        self.classifier_last, self.keep_soft = True, keep_soft


# ----------------------------------------------------------------------------- tiny real models
def _bert(layers: int = 2, hidden_dropout: float = 0.1, seed: int = 0) -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(make_tokenizer()),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=hidden_dropout,
        attention_probs_dropout_prob=0.1,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(config)


def _data(n: int = 8) -> Encoded:
    ids = [[2, 7 + i % 8, 8 + i % 5, 9 + i % 3, 10, 3][: 3 + i % 4] for i in range(n)]  # padding in every batch
    return Encoded(ids=ids, labels=[i % 3 for i in range(n)], pad_id=0)


def _ctx(n_student: int = 2, n_teacher: int = 2, d_s: int = 32, d_t: int = 32) -> LossContext:
    step = n_teacher // n_student
    lm = {0: 0, **{m: m * step for m in range(1, n_student + 1)}}
    return LossContext(layer_map=lm, n_student=n_student, n_teacher=n_teacher, d_student=d_s, d_teacher=d_t)


def _train(student: Any, teacher: Any, losses: list[Any], lr: float = 0.0, epochs: float = 1, **kw: Any) -> Any:
    data = kw.pop("data", _data())
    obj = build_objective(losses, kw.pop("ctx", _ctx()), kw.pop("schedule", None))
    plan = TrainPlan(epochs=epochs, batch_size=len(data), lr=lr, **kw)
    result = train(student, obj, data, plan, CPU, teachers=[teacher])
    return result, obj


# ----------------------------------------------------------------------------- 1. attention dropout
@pytest.mark.parametrize(
    "loss",
    [
        {"name": "attention_kl", "cls_weight": 0.0},
        {"name": "tinybert", "map": "kept", "embedding": 0.0, "hidden": 0.0, "prediction": 0.0},
    ],
)
def test_identical_student_in_train_mode_has_zero_attention_loss(loss: dict[str, Any]) -> None:
    """A copy of the teacher compares equal maps: the student's must not carry dropout in train mode
    (with it, attention KL was ~2 and TinyBERT's attention MSE far from 0)."""
    teacher = _bert(hidden_dropout=0.0).eval()  # no hidden dropout: only attention dropout could differ
    result, _ = _train(copy.deepcopy(teacher), teacher, [_cfg(**loss)])
    assert result.history[0][f"term_{loss['name']}"] < 1e-6


def test_student_attention_rows_sum_to_one_in_train_mode_and_dropout_is_restored() -> None:
    teacher = _bert().eval()
    student = copy.deepcopy(teacher)
    seen: list[tuple[bool, tuple[torch.Tensor, ...]]] = []
    hook = student.register_forward_hook(lambda mod, args, out: seen.append((mod.training, out.attentions)))
    result, _ = _train(student, teacher, [_cfg("attention_kl", cls_weight=0.0)])
    hook.remove()
    training, maps = seen[0]
    assert training and len(maps) == 2
    for a in maps:  # with dropout on them, rows summed to 0.45..1.11
        assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5)
    # hidden dropout stays on (regularisation), so a copy is close to, not exactly, the teacher
    assert result.history[0]["term_attention_kl"] < 1e-3
    # the student keeps its own attention dropout for anything after distillation
    assert all(layer.attention.self.dropout.p == 0.1 for layer in student.bert.encoder.layer)
    assert student.config.attention_probs_dropout_prob == 0.1
    assert "bert.encoder.layer.0.attention.self" in result.attention_dropout_off


def test_attention_maps_with_dropout_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """An architecture whose attention dropout cannot be found: its noisy maps fail loudly."""
    from contextlib import nullcontext

    import kdpipe.train.loop as train_mod

    monkeypatch.setattr(train_mod, "attention_dropout_off", lambda model: nullcontext([]))
    teacher = _bert().eval()
    with pytest.raises(ModelError, match="attention maps have dropout applied"):
        _train(copy.deepcopy(teacher), teacher, [_cfg("attention_kl")])


# ----------------------------------------------------------------------------- synthetic outputs
def _outputs(
    seed: int,
    layers: int,
    d: int = 8,
    b: int = 4,
    t: int = 5,
    heads: int = 2,
    grad: bool = False,
    labels: list[int] | None = None,
) -> KDOutputs:
    """Random normalised outputs; the mask has padding; attentions are masked softmax rows."""
    g = torch.Generator().manual_seed(seed)
    lengths = [t - i % 3 for i in range(b)]
    mask = torch.tensor([[1] * n + [0] * (t - n) for n in lengths])
    hs = tuple(torch.randn(b, t, d, generator=g) for _ in range(layers + 1))
    att = []
    for _ in range(layers):
        scores = torch.randn(b, heads, t, t, generator=g) * 2
        att.append(torch.softmax(scores.masked_fill(~mask.bool()[:, None, None, :], -math.inf), -1))
    logits = torch.randn(b, 3, generator=g) * 2
    if grad:
        hs = tuple(h.requires_grad_(True) for h in hs)
        att = [a.requires_grad_(True) for a in att]
        logits.requires_grad_(True)
    y = None if labels is None else torch.tensor(labels)
    return KDOutputs(logits, hs, tuple(att), mask, y)


# ----------------------------------------------------------------------------- 2. PID/SID threshold
def test_pid_threshold_compares_the_current_layers_cls_cosine_only() -> None:
    """Layer 1's [CLS] vectors equal the teacher's (cosine loss 0) while its attention KL is large:
    PID moves on at once; the layer-2 stage, whose [CLS] differ, waits."""
    ctx = _ctx(2, 2, 8, 8)
    t = _outputs(1, 2)
    s = _outputs(2, 2)
    s.hidden_states = (s.hidden_states[0], t.hidden_states[1].clone(), s.hidden_states[2])  # type: ignore[index]
    obj = build_objective([_cfg("attention_kl", cls_weight=1.0)], ctx, _Sched("pid", threshold=0.05))
    out = obj(s, t)
    assert out.values["attention_kl"] > 0.1  # the sum of the active terms is far above the threshold
    assert out.layer_loss == pytest.approx(0, abs=1e-6)  # the move-on measure is explicit, per step
    obj.after_step(1, out.layer_loss)
    assert obj.schedule.events == [{"step": 1, "layer": 1, "reason": "threshold", "loss": pytest.approx(0, abs=1e-6)}]
    out = obj(s, t)
    assert out.layer_loss is not None and out.layer_loss > 0.05
    obj.after_step(2, out.layer_loss)
    assert len(obj.schedule.events) == 1  # layer 2's [CLS] cosine loss is high: it stays


def test_sid_threshold_ignores_the_lower_layers_kept_on() -> None:
    """SID keeps layer 1's (large) loss on while it trains layer 2; layer 2's own [CLS] cosine decides."""
    ctx = _ctx(2, 2, 8, 8)
    t = _outputs(1, 2)
    s = _outputs(2, 2)
    s.hidden_states = (s.hidden_states[0], s.hidden_states[1], t.hidden_states[2].clone())  # type: ignore[index]
    obj = build_objective([_cfg("attention_kl")], ctx, _Sched("sid", cap_steps=2, threshold=0.05))
    for step in range(1, 4):
        obj.after_step(step, obj(s, t).layer_loss)
    assert [(e["layer"], e["reason"]) for e in obj.schedule.events] == [(1, "cap"), (2, "threshold")]


def test_threshold_that_no_term_can_measure_is_a_config_error() -> None:
    ctx = _ctx(2, 2, 8, 16)  # pkt compares different widths with no projection: no [CLS] cosine
    with pytest.raises(ConfigError, match="threshold"):
        build_objective([_cfg("pkt")], ctx, _Sched("pid", threshold=0.1))
    build_objective([_cfg("pkt")], ctx, _Sched("pid", threshold=0.0))  # cap only: fine
    build_objective([_cfg("tinybert")], ctx, _Sched("pid", threshold=0.1))  # its W projects


# ----------------------------------------------------------------------------- 3. TinyBERT
def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def _tinybert_by_hand(s: KDOutputs, t: KDOutputs, gmap: dict[int, int], w: dict[str, float], temp: float) -> float:
    mask = s.attention_mask
    assert mask is not None and s.hidden_states and t.hidden_states and s.attentions and t.attentions
    real = [(b, i) for b in range(mask.shape[0]) for i in range(mask.shape[1]) if mask[b, i]]

    def hid(m: int, n: int) -> float:
        hs, ht = _np(s.hidden_states[m]), _np(t.hidden_states[n])  # type: ignore[index]
        return float(np.mean([np.mean((hs[b, i] - ht[b, i]) ** 2) for b, i in real]))

    def att(m: int, n: int) -> float:
        a_s, a_t = _np(s.attentions[m - 1]), _np(t.attentions[n - 1])  # type: ignore[index]
        per_head = []
        for h in range(a_s.shape[1]):
            sq = [(a_s[b, h, i, j] - a_t[b, h, i, j]) ** 2 for b, i in real for bb, j in real if bb == b]
            per_head.append(np.mean(sq))
        return float(np.mean(per_head))

    z, v = _np(s.logits) / temp, _np(t.logits) / temp
    p = np.exp(v) / np.exp(v).sum(-1, keepdims=True)
    log_q = z - np.log(np.exp(z).sum(-1, keepdims=True))
    pred = float(np.mean(-(p * log_q).sum(-1)))
    total = w["embedding"] * hid(0, 0) + w["prediction"] * pred
    for m, n in gmap.items():
        total += w["hidden"] * hid(m, n) + w["attention"] * att(m, n)  # SUMMED over layers
    return total


def test_tinybert_term_as_a_whole_matches_hand_computation() -> None:
    w = {"embedding": 0.5, "hidden": 2.0, "attention": 3.0, "prediction": 0.7}
    ctx = _ctx(2, 4, 8, 8)
    obj = build_objective([_cfg("tinybert", map="uniform", temperature=2.0, weight=1.5, **w)], ctx)
    s, t = _outputs(3, 2), _outputs(4, 4)
    out = obj(s, t)
    expected = _tinybert_by_hand(s, t, {1: 2, 2: 4}, w, 2.0)
    assert out.values["tinybert"] == pytest.approx(expected, rel=1e-5)
    assert out.total.item() == pytest.approx(1.5 * expected, rel=1e-5)


def test_tinybert_prediction_sends_no_gradient_to_the_teacher_logits() -> None:
    obj = build_objective([_cfg("tinybert", embedding=0.0, hidden=0.0, attention=0.0)], _ctx(2, 4, 8, 8))
    s, t = _outputs(5, 2, grad=True), _outputs(6, 4, grad=True)
    obj(s, t).total.backward()
    assert s.logits.grad is not None and s.logits.grad.abs().sum() > 0
    assert t.logits.grad is None or not t.logits.grad.any()


@pytest.mark.parametrize("keep_soft", [False, True])
def test_pid_runs_tinybert_prediction_with_the_logit_terms(keep_soft: bool) -> None:
    """Layer phase: only the current layer's L_layer (plus L_pred with keep_soft); then L_pred."""
    from kdpipe.losses import features as feat

    ctx = _ctx(2, 4, 8, 8)
    obj = build_objective([_cfg("tinybert", map="uniform")], ctx, _Sched("pid", cap_steps=1, keep_soft=keep_soft))
    assert obj.schedule.order == [0, 1, 2]
    s, t = _outputs(7, 2), _outputs(8, 4)
    m_ = s.attention_mask
    hs, ht, as_, at = s.hidden_states, t.hidden_states, s.attentions, t.attentions
    p = torch.softmax(t.logits, -1)
    pred = -(p * torch.log_softmax(s.logits, -1)).sum(-1).mean().item()
    layer = [
        feat.hidden_mse(hs, ht, {0: 0}, m_).item(),
        feat.hidden_mse(hs, ht, {1: 2}, m_).item() + feat.attention_mse(as_, at, {0: 1}, m_).item(),
        feat.hidden_mse(hs, ht, {2: 4}, m_).item() + feat.attention_mse(as_, at, {1: 3}, m_).item(),
    ]
    for step, expected in enumerate(layer, start=1):
        out = obj(s, t)
        assert out.values["tinybert"] == pytest.approx(expected + (pred if keep_soft else 0.0), rel=1e-5)
        obj.after_step(step, out.layer_loss)
    out = obj(s, t)  # pid after the layer phase: the classifier terms only
    assert out.values == {"tinybert": pytest.approx(pred, rel=1e-5)}


# ----------------------------------------------------------------------------- 4. divergence


# ----------------------------------------------------------------------------- 5. gradient clipping


# ----------------------------------------------------------------------------- 6. teacher detached
DETACH_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "hinton": ("hinton", {}),
    "hinton-ensemble-arith": ("hinton", {}),
    "hinton-ensemble-geo": ("hinton", {"ensemble": "geometric"}),
    "ce-unlabeled": ("ce", {}),
    "logit_mse": ("logit_mse", {}),
    "logit_mse-alpha": ("logit_mse", {"alpha": 0.5}),
    "reverse_kl": ("reverse_kl", {}),
    "jsd": ("jsd", {}),
    "ofa": ("ofa", {}),
    "pkd": ("pkd", {}),
    "hidden_cosine": ("hidden_cosine", {}),
    "tinybert": ("tinybert", {"project": "always", "map": "uniform"}),
    "tinybert-auto": ("tinybert", {}),
    "attention_kl": ("attention_kl", {}),
    "hint": ("hint", {}),
    "crd": ("crd", {"dim": 4}),
    "crd-cls": ("crd", {"dim": 4, "feature": "cls"}),
    "pkt": ("pkt", {}),
    "pkt-symmetric": ("pkt", {"symmetric": True, "feature": "cls"}),
    "vid": ("vid", {}),
}


def test_detach_cases_cover_every_registered_term() -> None:
    # 'prior' never reads the teacher (needs_teacher False; its value is the student's weights' penalty)
    assert {name for name, _ in DETACH_CASES.values()} == set(LOSS_TYPES) - {"prior"}


@pytest.mark.parametrize("case", sorted(DETACH_CASES))
@pytest.mark.parametrize("schedule", [None, "sid"])
def test_no_term_sends_gradient_into_the_teacher(case: str, schedule: str | None) -> None:
    """The teacher's tensors require grad here (in training they come from no_grad, which hides a
    missing detach): after backward none of them may have a non-zero gradient."""
    name, kw = DETACH_CASES[case]
    labels = None if case == "ce-unlabeled" else [0, 1, 2, 0]
    s, t = _outputs(10, 2, grad=True, labels=labels), _outputs(11, 4, grad=True, labels=labels)
    if labels is None:  # unlabeled data: the training loop labels it with the teacher's argmax
        s.labels = t.labels = t.logits.argmax(-1)
    if "ensemble" in case:
        g = torch.Generator().manual_seed(12)
        t.ensemble_logits = (torch.randn(4, 3, generator=g).requires_grad_(True),)
    layered = schedule is not None and not LOSS_TYPES[name].on_logits
    sched = _Sched("sid", cap_steps=1, threshold=0.01, keep_soft=True) if layered else None
    obj = build_objective([_cfg(name, **kw)], _ctx(2, 4, 8, 8), sched)
    for step in range(4):  # under SID: every stage, then the classifier
        out = obj(s, t)
        assert out.values, f"{case}: no term ran at step {step}"
        out.total.backward()
        obj.after_step(step + 1, out.layer_loss)
        if sched is None:
            break
    student_grads = [x.grad for x in (s.logits, *s.hidden_states, *s.attentions) if x.grad is not None]  # type: ignore[misc]
    assert any(g.abs().sum() > 0 for g in student_grads)  # not vacuous: the student does learn
    teacher = [t.logits, *t.hidden_states, *t.attentions, *t.ensemble_logits]  # type: ignore[misc]
    leaked = [i for i, x in enumerate(teacher) if x.grad is not None and x.grad.abs().sum() > 0]
    assert not leaked, f"{case}: gradient reached teacher tensors {leaked}"


# ----------------------------------------------------------------------------- 7. number checks
def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def test_attention_kl_term_with_cls_weight_hand_computed() -> None:
    a_s = torch.tensor([[[[0.7, 0.3], [0.5, 0.5]]]])
    a_t = torch.tensor([[[[0.2, 0.8], [0.1, 0.9]]]])
    kl = (_kl([0.2, 0.8], [0.7, 0.3]) + _kl([0.1, 0.9], [0.5, 0.5])) / 2
    h_s = torch.tensor([[[1.0, 0.0], [9.0, 9.0]]])  # [CLS] (1, 0); position 1 is ignored
    h_t = torch.tensor([[[1.0, 1.0], [-3.0, 2.0]]])  # [CLS] (1, 1): cos = 1 / sqrt(2)
    cos_loss = 1 - 1 / math.sqrt(2)
    z = torch.zeros(1, 3)
    ctx = LossContext(layer_map={0: 0, 1: 1, 2: 2}, n_student=2, n_teacher=2, d_student=2, d_teacher=2)
    one = LossContext(layer_map={0: 0, 1: 1}, n_student=1, n_teacher=1, d_student=2, d_teacher=2)
    obj = build_objective([_cfg("attention_kl", cls_weight=0.5, weight=2.0, map=[1])], one)
    s = KDOutputs(z, (h_s, h_s), (a_s,), None, None)
    t = KDOutputs(z, (h_t, h_t), (a_t,), None, None)
    out = obj(s, t)
    assert out.values["attention_kl"] == pytest.approx(kl + 0.5 * cos_loss, rel=1e-5)
    assert out.total.item() == pytest.approx(2.0 * (kl + 0.5 * cos_loss), rel=1e-5)
    # two layers, the second one perfect: both parts are means over the layers, so both halve
    obj2 = build_objective([_cfg("attention_kl", cls_weight=0.5, map="kept")], ctx)
    s2 = KDOutputs(z, (h_s, h_s, h_t), (a_s, a_t), None, None)
    t2 = KDOutputs(z, (h_t, h_t, h_t), (a_t, a_t), None, None)
    assert obj2(s2, t2).values["attention_kl"] == pytest.approx((kl + 0.5 * cos_loss) / 2, rel=1e-5)


def test_vid_term_averages_its_layers_hand_computed() -> None:
    ctx = LossContext(layer_map={0: 0, 1: 1, 2: 2}, n_student=2, n_teacher=2, d_student=2, d_teacher=2)
    obj = build_objective([_cfg("vid", init_var=5.0)], ctx)
    biases = {"1": [1.0, 0.0], "2": [0.0, -2.0]}
    with torch.no_grad():
        for key, head in obj.terms[0].learned.items():
            head.mu.weight.zero_()
            head.mu.bias.copy_(torch.tensor(biases[key]))
    mask = torch.tensor([[1, 0]])  # only token 0 counts
    h_t = (torch.zeros(1, 2, 2), torch.tensor([[[3.0, 1.0], [50.0, 50.0]]]), torch.tensor([[[0.0, 2.0], [9.0, 9.0]]]))
    h_s = tuple(torch.randn(1, 2, 2) for _ in range(3))
    z = torch.zeros(1, 3)

    def nll(t: list[float], mu: list[float]) -> float:
        return sum(0.5 * math.log(5.0) + (a - b) ** 2 / 10.0 for a, b in zip(t, mu, strict=True)) / 2

    expected = (nll([3.0, 1.0], biases["1"]) + nll([0.0, 2.0], biases["2"])) / 2  # mean over layers
    out = obj(KDOutputs(z, h_s, None, mask, None), KDOutputs(z, h_t, None, mask, None))
    assert out.values["vid"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("mode", ["arithmetic", "geometric"])
def test_hinton_term_with_an_ensemble_of_teachers_hand_computed(mode: str) -> None:
    T, a = 2.0, 0.25
    z, y = [1.0, 2.0, 0.5], 1
    members = [[2.0, 0.0, 1.0], [0.0, 1.0, 3.0], [1.0, 1.0, -1.0]]

    def sm(x: list[float], t: float = 1.0) -> list[float]:
        e = [math.exp(v / t) for v in x]
        return [v / sum(e) for v in e]

    ps = [sm(v, T) for v in members]
    if mode == "arithmetic":
        p = [sum(col) / 3 for col in zip(*ps, strict=True)]
    else:
        g = [math.prod(col) ** (1 / 3) for col in zip(*ps, strict=True)]
        p = [x / sum(g) for x in g]
    expected = (1 - a) * -math.log(sm(z)[y]) + a * T * T * _kl(p, sm(z, T))
    obj = build_objective([_cfg("hinton", temperature=T, alpha=a, ensemble=mode)], LossContext(layer_map={}))
    s = KDOutputs(torch.tensor([z]), None, None, None, torch.tensor([y]))
    t = KDOutputs(torch.tensor([members[0]]), None, None, None, torch.tensor([y]))
    t.ensemble_logits = (torch.tensor([members[1]]), torch.tensor([members[2]]))
    assert obj(s, t).values["hinton"] == pytest.approx(expected, rel=1e-5)


def test_uniform_layer_map_rounding() -> None:
    def uniform(m: int, n: int) -> dict[int, int]:
        return resolve_map("uniform", LossContext(layer_map={}, n_student=m, n_teacher=n), "map")

    assert uniform(6, 12) == {1: 2, 2: 4, 3: 6, 4: 8, 5: 10, 6: 12}
    assert uniform(4, 12) == {1: 3, 2: 6, 3: 9, 4: 12}
    # 6 -> 4: m N / M = 1.5, 3, 4.5, 6; Python's round() sends the ties to even: 2 and 4
    assert uniform(4, 6) == {1: 2, 2: 3, 3: 4, 4: 6}
    assert uniform(3, 12) == {1: 4, 2: 8, 3: 12}
    assert uniform(2, 2) == {1: 1, 2: 2}


@pytest.mark.parametrize("case", sorted(DETACH_CASES))
def test_progress_measures_send_no_gradient_into_the_teacher(case: str) -> None:
    """The [CLS] cosine a schedule's threshold reads runs under no_grad in the Objective; on its own it
    must not reach the teacher either."""
    name, kw = DETACH_CASES[case]
    obj = build_objective([_cfg(name, **kw)], _ctx(2, 4, 8, 8))
    term = obj.terms[0]
    assert term.on_logits == LOSS_TYPES[name].on_logits and term.soft == LOSS_TYPES[name].soft
    if term.progress is None:
        assert term.on_logits
        return
    s, t = _outputs(13, 2, grad=True), _outputs(14, 4, grad=True)
    for m, n in term.layer_map.items():
        term.progress(s, t, m, n).backward()
    assert any(h.grad is not None and h.grad.abs().sum() > 0 for h in s.hidden_states)  # type: ignore[union-attr]
    assert all(h.grad is None or not h.grad.any() for h in t.hidden_states)  # type: ignore[union-attr]


def test_ensemble_targets_are_detached() -> None:
    from kdpipe.losses.logits import ensemble_probs, hinton_from_probs

    members = [torch.randn(4, 3).requires_grad_(True) for _ in range(2)]
    for mode in ("arithmetic", "geometric"):
        assert not ensemble_probs(members, 2.0, mode).requires_grad  # type: ignore[arg-type]
    p = torch.softmax(torch.randn(4, 3), -1).requires_grad_(True)
    z = torch.randn(4, 3).requires_grad_(True)
    hinton_from_probs(z, p, torch.tensor([0, 1, 2, 0]), 2.0, 0.5).backward()
    assert p.grad is None and z.grad is not None


@pytest.mark.parametrize("loss", [{"name": "pkd"}, {"name": "attention_kl"}])
def test_raw_hidden_comparisons_across_widths_fail_at_build_time(loss: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="equal width"):
        build_objective([_cfg(**loss)], _ctx(2, 2, 8, 16))
    build_objective([_cfg("attention_kl", cls_weight=0.0)], _ctx(2, 2, 8, 16))  # maps only: fine
