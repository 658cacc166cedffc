"""Clean/corrupted prompt pairs for circuit discovery, written for headscope.

Every task yields ``Pair``s: token ids of a clean and a corrupted prompt *of equal length*, the
answer token (what the clean prompt should continue with) and the wrong token (what the
corrupted prompt points to). The metric is logit[answer] - logit[wrong] at the last position.

- ``induction``: random tokens ``r + r[:n-1]`` (answer ``r[n-1]``); corrupted: ``r' + r[:n-1]``
  with a fresh ``r'`` (wrong ``r'[n-1]``), so no earlier copy points to the answer.
- ``ioi``: "When Mary and John went to the store, John gave a drink to" (answer " Mary", wrong
  " John"); corrupted: the first two names replaced by two other names (the ABC baseline).
- ``greater_than``: "The war lasted from the year 17YY to the year 17" (answer the tens digit
  t + 1 of YY, wrong t - 1); corrupted: the start year 1701. Digit tokenizers only (Llama 3 / SmolLM
  / Qwen split numbers into digits); other tokenizers skip the example.
- ``retrieval``: "key: value" pairs, then a queried key (answer its value); corrupted: the queried
  key's value changed in the context (wrong: that value).
- a JSONL file of ``{"clean", "corrupted", "answer", "wrong"}`` texts (``load_pairs``).

A pair whose texts tokenize to different lengths, or whose answer is not one token after the
prompt, is skipped by the generators and is an error in a user file.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from headscope.errors import HeadscopeError

TASKS = ("induction", "ioi", "greater_than", "retrieval")

NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "James", "Anna", "Sarah", "David", "Michael", "Emma", "Kate",
         "Paul", "Mark", "Lisa", "Daniel", "Laura", "Peter", "Jack", "Helen"]
PLACES = ["store", "park", "school", "station", "market", "beach", "office", "garden"]
OBJECTS = ["drink", "book", "ring", "letter", "bag", "ball", "kiss", "gift"]
IOI_TEMPLATES = ["When {A} and {B} went to the {place}, {B} gave a {obj} to",
                 "After {A} and {B} arrived at the {place}, {B} handed a {obj} to",
                 "Then, {A} and {B} were at the {place}. {B} passed a {obj} to"]
KEYS = ["apple", "chair", "river", "lamp", "horse", "cloud", "table", "stone", "bread", "glass"]
NOUNS = ["war", "deal", "trip", "project", "drought", "siege"]


@dataclass
class Pair:
    clean: list[int]
    corrupt: list[int]
    answer: int
    wrong: int
    text: dict  # clean / corrupted / answer / wrong as text, for reports


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def text_pair(tok, clean: str, corrupted: str, answer: str, wrong: str, bos: int | None) -> Pair | str:
    """A ``Pair`` from texts, or the reason it cannot be one (unequal lengths, multi-token answer)."""
    head = [bos] if bos is not None else []
    c, k = _encode(tok, clean), _encode(tok, corrupted)
    if len(c) != len(k):
        return f"clean and corrupted prompts tokenize to {len(c)} and {len(k)} tokens; they must be equal"
    ca, kw = _encode(tok, clean + answer), _encode(tok, corrupted + wrong)
    if ca[:len(c)] != c or len(ca) != len(c) + 1:
        return f"answer {answer!r} is not one token after the clean prompt"
    if kw[:len(k)] != k or len(kw) != len(k) + 1:
        return f"wrong {wrong!r} is not one token after the corrupted prompt"
    return Pair(head + c, head + k, ca[-1], kw[-1],
                {"clean": clean, "corrupted": corrupted, "answer": answer, "wrong": wrong})


def induction_pairs(n_pairs: int, vocab_size: int, seed: int, *, seq_len: int = 10, bos: int | None = None,
                    exclude: set[int] = frozenset(), tok=None) -> list[Pair]:
    """Repeated random tokens; ``seq_len`` = n, the prompt is (BOS) + 2n - 1 tokens."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor(sorted(set(range(vocab_size)) - set(exclude)))
    head = [bos] if bos is not None else []
    out = []
    for _ in range(n_pairs):
        r, r2 = (allowed[torch.randint(len(allowed), (seq_len,), generator=g)].tolist() for _ in range(2))
        clean, corrupt = head + r + r[:-1], head + r2 + r[:-1]
        show = (lambda ids: tok.decode(ids)) if tok else str  # noqa: E731
        text = {"clean": show(clean), "corrupted": show(corrupt), "answer": show(r[-1:]), "wrong": show(r2[-1:])}
        out.append(Pair(clean, corrupt, r[-1], r2[-1], text))
    return out


def _texts(task: str, rng: random.Random) -> tuple[str, str, str, str]:
    """(clean, corrupted, answer, wrong) texts of one example of a text task."""
    if task == "ioi":
        a, b, c, d = rng.sample(NAMES, 4)
        tpl, place, obj = rng.choice(IOI_TEMPLATES), rng.choice(PLACES), rng.choice(OBJECTS)
        clean = tpl.format(A=a, B=b, place=place, obj=obj)
        corrupted = tpl.replace("{A} and {B}", "{C} and {D}").format(C=c, D=d, B=b, place=place, obj=obj)
        return clean, corrupted, " " + a, " " + b
    if task == "greater_than":
        t, u = rng.randint(2, 7), rng.randint(0, 9)
        noun = rng.choice(NOUNS)
        tpl = "The {noun} lasted from the year 17{yy} to the year 17"
        return (tpl.format(noun=noun, yy=f"{t}{u}"), tpl.format(noun=noun, yy="01"), str(t + 1), str(t - 1))
    if task == "retrieval":
        keys = rng.sample(KEYS, 5)
        vals = [rng.randint(0, 9) for _ in keys]
        q = rng.randrange(len(keys))
        other = rng.choice([v for v in range(10) if v != vals[q]])
        ctx = lambda vs: ", ".join(f"{k}: {v}" for k, v in zip(keys, vs))  # noqa: E731
        corrupted_vals = vals[:q] + [other] + vals[q + 1:]
        return (f"{ctx(vals)}. {keys[q]}: ", f"{ctx(corrupted_vals)}. {keys[q]}: ", str(vals[q]), str(other))
    raise HeadscopeError(f"unknown circuit task {task!r}; tasks: {', '.join(TASKS)} or a .jsonl file")


def text_task_pairs(task: str, tok, n_pairs: int, seed: int, bos: int | None) -> list[Pair]:
    """``n_pairs`` pairs of a text task; examples the tokenizer cannot express are redrawn (up to 20x)."""
    rng = random.Random(seed)
    out, tries, last_reason = [], 0, ""
    while len(out) < n_pairs and tries < 20 * n_pairs:
        tries += 1
        p = text_pair(tok, *_texts(task, rng), bos)
        if isinstance(p, Pair):
            out.append(p)
        else:
            last_reason = p
    if len(out) < n_pairs:
        raise HeadscopeError(f"task {task!r}: this tokenizer gave only {len(out)} of {n_pairs} usable pairs "
                             f"({last_reason})")
    return out


def load_pairs(path: str | Path, tok, bos: int | None) -> list[Pair]:
    """Pairs from a JSONL of ``{"clean", "corrupted", "answer", "wrong"}``; a bad line raises naming it."""
    from headscope.analyses.datasets import load_records
    out = []
    for n, rec in enumerate(load_records(path, required=("clean", "corrupted", "answer", "wrong")), 1):
        p = text_pair(tok, rec["clean"], rec["corrupted"], rec["answer"], rec["wrong"], bos)
        if not isinstance(p, Pair):
            raise HeadscopeError(f"{path}: record {n}: {p}")
        out.append(p)
    return out


def batches_of(pairs: list[Pair], batch_size: int):
    """``Batch``es of up to ``batch_size`` pairs, right-padded (padding never reaches a real token)."""
    from headscope.probe.graph import Batch
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        T = max(len(p.clean) for p in chunk)
        pad = lambda ids: ids + [ids[-1]] * (T - len(ids))  # noqa: E731 - causal: pads only follow
        out.append(Batch(clean=torch.tensor([pad(p.clean) for p in chunk]),
                         corrupt=torch.tensor([pad(p.corrupt) for p in chunk]),
                         last=torch.tensor([len(p.clean) - 1 for p in chunk]),
                         answer=torch.tensor([p.answer for p in chunk]),
                         wrong=torch.tensor([p.wrong for p in chunk])))
    return out
