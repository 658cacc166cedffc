"""The run store: one folder per run, written so that a crash never leaves a corrupt run.

Layout of a run folder::

    run.json          # the contract: analysis, model, config, versions, timings, status, scores
    arrays.npz        # large arrays referenced from run.json["arrays"]
    examples.jsonl    # one line per finished example (id + per-example details)
    checkpoint.npz    # running aggregation state + ids of finished examples (resume)

Every file is written to a temporary name in the same folder and moved into place with
``os.replace`` (atomic on POSIX), except ``examples.jsonl`` which is appended line by line: on
resume, lines whose ids are not in the checkpoint (a crash between the two writes) are dropped.
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headscope.errors import HeadscopeError

SCHEMA = "headscope.run/1"
STATUSES = ("running", "partial", "complete", "failed")


def default_runs_dir() -> Path:
    return Path(os.environ.get("HEADSCOPE_RUNS", "runs"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, default=_json_default) + "\n").encode())


def atomic_write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def new_run_id(analysis: str, model: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).name or model)[:40]
    return f"{analysis}-{slug}-{stamp}"


@dataclass
class Run:
    """A run folder on disk. ``meta`` is the parsed ``run.json``."""

    path: Path
    meta: dict

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def analysis(self) -> str:
        return self.meta["analysis"]

    @property
    def status(self) -> str:
        return self.meta.get("status", "unknown")

    def scores(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=np.float64) for k, v in self.meta.get("scores", {}).items()}

    def arrays(self) -> dict[str, np.ndarray]:
        name = self.meta.get("arrays")
        if not name or not (self.path / name).exists():
            return {}
        with np.load(self.path / name, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def examples(self) -> list[dict]:
        p = self.path / "examples.jsonl"
        if not p.exists():
            return []
        out = []
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # torn last line of a crashed run
        return out

    # -- writing -------------------------------------------------------------------------
    def save_meta(self) -> None:
        atomic_write_json(self.path / "run.json", self.meta)

    def append_example(self, record: dict) -> None:
        with open(self.path / "examples.jsonl", "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def save_checkpoint(self, state: dict[str, np.ndarray], done_ids: list[str]) -> None:
        arrays = dict(state)
        arrays["__done_ids__"] = np.array(json.dumps(done_ids))
        atomic_write_npz(self.path / "checkpoint.npz", arrays)

    def load_checkpoint(self) -> tuple[dict[str, np.ndarray], list[str]]:
        p = self.path / "checkpoint.npz"
        if not p.exists():
            return {}, []
        with np.load(p, allow_pickle=False) as z:
            state = {k: z[k] for k in z.files if k != "__done_ids__"}
            done = json.loads(str(z["__done_ids__"]))
        # drop example lines written after the last checkpoint
        keep = [r for r in self.examples() if r.get("id") in set(done)]
        lines = "".join(json.dumps(r, default=_json_default) + "\n" for r in keep)
        atomic_write_bytes(self.path / "examples.jsonl", lines.encode())
        return state, done


def create_run(out: Path, meta: dict, *, resume: bool = False) -> tuple[Run, bool]:
    """Make (or reopen, with ``resume``) a run folder. Returns (run, resumed).

    Refuses to overwrite an existing run unless resuming it; refuses to resume a run of another
    analysis or model, or with a different config, since mixing them would give a wrong average.
    """
    out = Path(out)
    existing = out / "run.json"
    if existing.exists():
        if not resume:
            raise HeadscopeError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        old = load_run(out).meta
        for key in ("analysis",):
            if old.get(key) != meta.get(key):
                raise HeadscopeError(f"cannot resume {out}: it is a {old.get(key)!r} run, not {meta.get(key)!r}")
        if old.get("model", {}).get("id") != meta.get("model", {}).get("id"):
            raise HeadscopeError(f"cannot resume {out}: it was run on model {old['model'].get('id')!r}")
        changed = sorted(k for k in set(old.get("config", {})) | set(meta.get("config", {}))
                         if k not in RESUME_FREE_KEYS and old["config"].get(k) != meta["config"].get(k))
        if changed:
            raise HeadscopeError(f"cannot resume {out}: options differ from the stored run ({', '.join(changed)})")
        if old.get("status") == "complete":
            raise HeadscopeError(f"{out} is already complete; nothing to resume")
        meta = {**old, "status": "running", "timings": old.get("timings", {})}
        run = Run(out, meta)
        run.save_meta()
        return run, True
    if resume:
        raise HeadscopeError(f"--resume given but {out} holds no run")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise HeadscopeError(f"cannot write to {out}: {e.strerror or e}") from None
    meta = {"schema": SCHEMA, "id": out.name, **meta, "status": "running"}
    run = Run(out, meta)
    run.save_meta()
    return run, False


# options that only change how a run executes, not what it computes
RESUME_FREE_KEYS = {"limit", "batch_size", "device", "progress"}


def load_run(path: Path) -> Run:
    path = Path(path)
    f = path / "run.json"
    if not f.exists():
        raise HeadscopeError(f"no run at {path} (missing run.json)")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise HeadscopeError(f"{f} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if meta.get("schema") != SCHEMA:
        raise HeadscopeError(f"{f} is not a headscope run (schema {meta.get('schema')!r})")
    return Run(path, meta)


def list_runs(root: Path | None = None) -> list[Run]:
    """Runs directly inside ``root``, newest first; unreadable folders are skipped."""
    root = Path(root) if root is not None else default_runs_dir()
    if not root.is_dir():
        return []
    runs = []
    for d in root.iterdir():
        if (d / "run.json").exists():
            try:
                runs.append(load_run(d))
            except HeadscopeError:
                continue
    return sorted(runs, key=lambda r: r.meta.get("created", ""), reverse=True)


def resolve_run(ref: str, root: Path | None = None) -> Run:
    """A run by folder path or by id inside ``root``; confined to ``root`` for ids."""
    p = Path(ref)
    if (p / "run.json").exists():
        return load_run(p)
    root = Path(root) if root is not None else default_runs_dir()
    cand = safe_join(root, ref)
    if (cand / "run.json").exists():
        return load_run(cand)
    raise HeadscopeError(f"no run {ref!r} (looked for {p} and {cand})")


def safe_join(root: Path, name: str) -> Path:
    """``root / name`` that cannot escape ``root`` (for paths coming from a UI)."""
    root = Path(root).resolve()
    p = (root / name).resolve()
    if p != root and root not in p.parents:
        raise HeadscopeError(f"path {name!r} is outside the runs folder {root}")
    return p
