"""The causal-LM task's model helpers: loading, prompt formatting, batched greedy / sampled generation, padded
training batches (labels -100 on prompt and padding), held-out perplexity, next-token agreement and Rouge-L."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdpipe.errors import ModelError

if TYPE_CHECKING:
    from torch import Tensor

IGNORE = -100


@dataclass(frozen=True)
class Seq:
    """Token ids of one training / scoring sequence; the tokens from `start` on are targets (labels)."""

    ids: list[int]
    start: int


def load(folder: Path) -> tuple[Any, Any]:
    """(model float32 eval mode, tokenizer with a pad token) of a local causal-LM directory; ModelError otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"{folder}: not a loadable causal-LM directory ({first})", "give a save_pretrained folder"
        ) from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(f"{folder}: the tokenizer has neither a pad nor an eos token", "set one and re-save it")
        tok.pad_token = tok.eos_token
    return model, tok


def has_template(tok: Any) -> bool:
    return bool(getattr(tok, "chat_template", None))


def model_input(tok: Any, prompt: str, chat: bool, use_template: bool) -> tuple[str, bool]:
    """(the text the model reads, whether the chat template made it): chat prompts through the template when asked
    and the tokenizer has one; anything else as it is."""
    if chat and use_template and has_template(tok):
        messages = [{"role": "user", "content": prompt}]
        return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)), True
    return prompt, False


def prompt_ids(tok: Any, text: str, templated: bool) -> list[int]:
    """A model input's ids: a templated text carries its special tokens, a plain one gets the tokenizer's own."""
    return list(tok(text, add_special_tokens=not templated)["input_ids"])


def _left_padded(rows: Sequence[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def _trimmed(new: list[int], eos: int | None) -> list[int]:
    """Generated ids up to and including the first eos (what follows is padding)."""
    if eos is not None and eos in new:
        return new[: new.index(eos) + 1]
    return new


def generate(
    model: Any, tok: Any, prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int,
    sample: bool = False, temperature: float = 1.0, seed: int = 0,
) -> list[list[int]]:  # fmt: skip
    """The new token ids for each prompt (left-padded batches; greedy, or sampled at `temperature`), trimmed
    after the first eos."""
    import torch

    pad, eos = int(tok.pad_token_id), tok.eos_token_id
    out: list[list[int]] = []
    torch.manual_seed(seed)
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            ids, mask = _left_padded(prompts[i : i + batch_size], pad)
            extra = {"do_sample": True, "temperature": temperature, "top_k": 0} if sample else {"do_sample": False}
            gen = model.generate(
                input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=max_new_tokens,
                num_beams=1, pad_token_id=pad, eos_token_id=eos, **extra,
            )  # fmt: skip
            out += [_trimmed(row[ids.shape[1] :].tolist(), eos) for row in gen]
    return out


def batch(seqs: Sequence[Seq], pad: int) -> dict[str, Tensor]:
    """Right-padded input_ids / attention_mask and labels (-100 on padding and on the tokens before `start`)."""
    import torch

    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s.ids)
        ids[i, :n] = torch.tensor(s.ids, dtype=torch.long)
        mask[i, :n] = 1
        labels[i, s.start : n] = ids[i, s.start : n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def text_seqs(tok: Any, texts: Sequence[str], max_length: int) -> list[Seq]:
    """Plain texts as scoring sequences (every token after the first is a target); one-token texts are dropped."""
    seqs = [Seq(list(tok(t, truncation=True, max_length=max_length)["input_ids"]), 0) for t in texts]
    return [s for s in seqs if len(s.ids) >= 2]


def _batches(seqs: Sequence[Seq], size: int, pad: int) -> Iterator[dict[str, Tensor]]:
    for i in range(0, len(seqs), size):
        yield batch(seqs[i : i + size], pad)


def logits(model: Any, b: dict[str, Tensor]) -> Tensor:
    return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def perplexity(model: Any, seqs: Sequence[Seq], pad: int, batch_size: int) -> float:
    """exp(total next-token NLL / counted tokens) over the sequences (token-weighted)."""
    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    with torch.inference_mode():
        for b in _batches(seqs, batch_size, pad):
            z = logits(model, b)[:, :-1].float()
            y = b["labels"][:, 1:]
            nll += float(
                F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=IGNORE, reduction="sum")
            )
            count += int((y != IGNORE).sum())
    if count == 0:
        raise ModelError("no held-out token to score (every held-out text is a single token)", "give longer texts")
    return math.exp(nll / count) if nll / count < 700 else float("inf")


def agreement(student: Any, teacher: Any, seqs: Sequence[Seq], pad: int, batch_size: int) -> float:
    """Share of counted next-token positions where the student's top-1 token is the teacher's."""
    import torch

    same, count = 0, 0
    with torch.inference_mode():
        for b in _batches(seqs, batch_size, pad):
            keep = b["labels"][:, 1:] != IGNORE
            s = logits(student, b)[:, :-1].argmax(-1)
            t = logits(teacher, b)[:, :-1].argmax(-1)
            same += int((s == t)[keep].sum())
            count += int(keep.sum())
    return same / count if count else float("nan")


def rouge_l(candidate: str, reference: str) -> float:
    """Rouge-L F1 of two texts on whitespace tokens (longest common subsequence); 1.0 for two empty texts."""
    a, b = candidate.split(), reference.split()
    if not a or not b:
        return 1.0 if not a and not b else 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def params(model: Any) -> int:
    return sum(int(p.numel()) for p in model.parameters())


def tied(model: Any) -> bool:
    """Whether the LM head shares the input embedding's weight."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is emb.weight
