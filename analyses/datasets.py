"""Dataset readers and text encoding shared by the analyses. Every failure is a one-line HeadscopeError.

Accepted text datasets:
- ``.jsonl``: one JSON object per line with a ``text`` field (optional ``id``); chat records may
  instead carry ``prompt`` and ``response`` (or ``messages``), see ``load_records``;
- ``.txt``: texts separated by blank lines;
- a folder: every ``*.txt`` inside is one text.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path

from headscope.errors import HeadscopeError

from .base import Example


def _stable_id(i: int, text: str) -> str:
    return f"{i:05d}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def load_records(path: str | Path, *, required: tuple[str, ...] = ()) -> list[dict]:
    """Records from JSONL (each a dict), each with an ``id`` (given or derived from content)."""
    path = Path(path)
    if not path.exists():
        raise HeadscopeError(f"data file not found: {path}")
    out = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise HeadscopeError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8 (--data)") from None
    except OSError as e:
        raise HeadscopeError(f"cannot read {path}: {e.strerror or e} (--data)") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise HeadscopeError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise HeadscopeError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in required if k not in rec]
        if missing:
            raise HeadscopeError(f"{path}:{n}: missing field(s) {', '.join(missing)}")
        rec.setdefault("id", _stable_id(len(out), json.dumps(rec, sort_keys=True)))
        rec["id"] = str(rec["id"])
        out.append(rec)
    if not out:
        raise HeadscopeError(f"{path}: dataset is empty")
    ids = [r["id"] for r in out]
    if len(set(ids)) != len(ids):
        raise HeadscopeError(f"{path}: duplicate ids in dataset")
    return out


def load_texts(path: str | Path) -> list[dict]:
    """``[{'id', 'text'}, ...]`` from a .jsonl, .txt or folder of .txt files."""
    path = Path(path)
    if not path.exists():
        raise HeadscopeError(f"data file not found: {path}")
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise HeadscopeError(f"{path}: folder has no .txt files")
        texts = [(f.stem, f.read_text(encoding="utf-8", errors="replace")) for f in files]
        out = [{"id": i, "text": t} for i, t in texts if t.strip()]
    elif path.suffix == ".jsonl":
        out = load_records(path, required=("text",))
        for r in out:
            if not isinstance(r["text"], str) or not r["text"].strip():
                raise HeadscopeError(f"{path}: record {r['id']} has an empty or non-string 'text'")
    elif path.suffix in (".txt", ".md", ""):
        raw = path.read_text(encoding="utf-8", errors="replace")
        paras = [p.strip() for p in raw.replace("\r\n", "\n").split("\n\n") if p.strip()]
        out = [{"id": _stable_id(i, p), "text": p} for i, p in enumerate(paras)]
    else:
        raise HeadscopeError(f"{path}: unsupported data format {path.suffix!r} (use .jsonl or .txt)")
    if not out:
        raise HeadscopeError(f"{path}: dataset is empty")
    return out


# --------------------------------------------------------------------------- text and chat records as model inputs
def shipped_data(name: str) -> Path:
    """A data file shipped in ``headscope.data`` (package data), e.g. ``natural_texts.jsonl``."""
    path = Path(str(importlib.resources.files("headscope.data") / name))
    if not path.is_file():
        raise HeadscopeError(f"shipped data file {name} is missing from headscope.data (broken install?)")
    return path


def load_span_records(path: str | Path) -> list[dict]:
    """Records with either ``text`` or ``prompt`` + ``response`` (optional ``system``), each with an id.

    .jsonl: one object per line; .txt / folder: plain texts (see ``datasets.load_texts``).
    """
    path = Path(path)
    if path.suffix != ".jsonl":
        return load_texts(path)
    recs = load_records(path)
    for r in recs:
        if "prompt" in r or "response" in r:
            for k in ("prompt", "response"):
                if not isinstance(r.get(k), str) or not r[k].strip():
                    raise HeadscopeError(f"{path}: record {r['id']} needs a non-empty string {k!r}")
        elif not isinstance(r.get("text"), str) or not r["text"].strip():
            raise HeadscopeError(f"{path}: record {r['id']} needs a non-empty 'text' (or 'prompt' and 'response')")
    return recs


@dataclass
class Encoded:
    """Token ids of one record and the scored span ``[start, end)`` (end = len(ids) always)."""

    ids: list[int]
    start: int
    rendered_prompt: str | None  # chat records: the prompt exactly as fed (template applied)
    kind: str                    # "text" | "chat"

    @property
    def end(self) -> int:
        return len(self.ids)


def encode_record(rec: dict, tok, *, chat_template: bool = True, prepend_bos: bool = False,
                  bos_id: int | None = None, max_tokens: int | None = None) -> Encoded:
    """Tokenize a text or chat record.

    Plain text: the tokenizer's own convention (``add_special_tokens=True``), plus BOS in front with
    ``prepend_bos`` when the tokenizer did not add one; the span is the text after a leading BOS.
    Chat: the prompt is rendered with the chat template (user turn, optional system turn, generation
    prompt) when the tokenizer has one and ``chat_template`` is on, else used as is; prompt and
    response are tokenized separately and concatenated, so the span boundary is exact. The
    template's end-of-turn tokens after the response are not appended: with causal attention they
    cannot change any row of the span. ``max_tokens`` truncates (the span may then shrink or vanish).
    """
    def add_bos(ids: list[int]) -> list[int]:
        if prepend_bos and bos_id is not None and (not ids or ids[0] != bos_id):
            return [bos_id] + ids
        return ids

    if "prompt" in rec:
        use_tpl = chat_template and bool(getattr(tok, "chat_template", None))
        if use_tpl:
            msgs = ([{"role": "system", "content": rec["system"]}] if rec.get("system") else [])
            msgs.append({"role": "user", "content": rec["prompt"]})
            prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            p_ids = add_bos(tok(prompt, add_special_tokens=False).input_ids)
        else:
            prompt = (rec["system"] + "\n" if rec.get("system") else "") + rec["prompt"]
            p_ids = add_bos(tok(prompt).input_ids)
        r_ids = tok(rec["response"], add_special_tokens=False).input_ids
        ids, start, out = p_ids + r_ids, len(p_ids), Encoded([], 0, prompt, "chat")
    else:
        ids = add_bos(tok(rec["text"]).input_ids)
        start = 1 if (bos_id is not None and ids and ids[0] == bos_id) else 0
        out = Encoded([], 0, None, "text")
    if max_tokens:
        ids = ids[:max_tokens]
    out.ids, out.start = list(map(int, ids)), min(start, len(ids))
    return out


def data_examples(ctx, default_file: str) -> list[Example]:
    """Examples from ``--data`` or the shipped default file; ``Example.data`` is the record."""
    path = ctx.data_path or shipped_data(default_file)
    return [Example(id=r["id"], data=r) for r in load_span_records(path)]
