"""Dataset readers shared by the analyses. Every failure is a one-line HeadscopeError.

Accepted text datasets:
- ``.jsonl``: one JSON object per line with a ``text`` field (optional ``id``); chat records may
  instead carry ``prompt`` and ``response`` (or ``messages``), see ``load_records``;
- ``.txt``: texts separated by blank lines;
- a folder: every ``*.txt`` inside is one text.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from headscope.errors import HeadscopeError


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
