"""The run store: one folder per run, written so that a crash never leaves a corrupt run.

Layout of a run folder::

    run.json          # the contract: analysis, model, config, versions, timings, status, scores
    arrays.npz        # large arrays referenced from run.json["arrays"]
    examples.jsonl    # one line per finished example (id + per-example details)
    checkpoint.npz    # running aggregation state + (digest, id) of finished examples (resume)
    .lock             # the writer's lease (see RunLease); holds the last holder's host/pid/start

Every file is written to a temporary name in the same folder and moved into place with
``os.replace`` (atomic on POSIX), except ``examples.jsonl`` which is appended line by line: on
resume, lines whose ids are not in the checkpoint (a crash between the two writes) are dropped.
All files get the same mode (0666 minus the umask).

One writer per folder: the process that writes a run holds an exclusive ``flock`` on ``.lock``
for its whole life (``RunLease``). The kernel drops the lock when the process dies, so a run whose
``run.json`` says ``running`` while nobody holds the lock is reported as ``interrupted``. Network
filesystems: on Linux NFS clients ``flock`` is emulated with POSIX byte-range locks, which work
across machines only where the server supports locking (NFSv4, or v3 with lockd); on filesystems
without locking (some FUSE/SMB mounts) ``flock`` may succeed for everyone, so two machines could
write one folder. Keep run folders on a local disk, or give each machine its own ``--out``.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import socket
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headscope.errors import HeadscopeError
from headscope.process import pid_alive

SCHEMA = "headscope.run/1"
# "interrupted" is never written: it is a "running" run.json whose writer's lease is gone
STATUSES = ("running", "interrupted", "partial", "complete", "empty", "failed")
LOCK_FILE = ".lock"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def default_runs_dir() -> Path:
    return Path(os.environ.get("HEADSCOPE_RUNS", "runs"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600; appended files get the umask's mode
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
        """The stored status, except ``interrupted`` for a ``running`` run nobody writes any more."""
        status = self.meta.get("status", "unknown")
        if status == "running" and lease_holder(self.path) is None:
            return "interrupted"
        return status

    def scores(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=np.float64) for k, v in self.meta.get("scores", {}).items()}

    def arrays(self) -> dict[str, np.ndarray]:
        """The run's big arrays; a damaged ``arrays.npz`` is a one-line HeadscopeError."""
        name = self.meta.get("arrays")
        if not name or not (self.path / name).exists():
            return {}
        try:
            with np.load(safe_join(self.path, name), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise HeadscopeError(f"{self.path / name} is damaged ({type(e).__name__}: {e})") from None

    def examples(self) -> list[dict]:
        """Per-example records; stops at a torn last line (a crashed run). A file that is not
        UTF-8 JSON lines is a one-line HeadscopeError."""
        p = self.path / "examples.jsonl"
        if not p.exists():
            return []
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise HeadscopeError(f"{p} is unreadable ({type(e).__name__})") from None
        out = []
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # torn last line of a crashed run
            if not isinstance(rec, dict):
                raise HeadscopeError(f"{p} is damaged (a line is a JSON {type(rec).__name__}, not an object)")
            out.append(rec)
        return out

    # -- writing -------------------------------------------------------------------------
    def save_meta(self) -> None:
        atomic_write_json(self.path / "run.json", self.meta)

    def append_example(self, record: dict) -> None:
        with open(self.path / "examples.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def save_checkpoint(self, state: dict[str, np.ndarray], done: list[tuple[str, str]]) -> None:
        """``done``: (example digest, id) of each finished example, in order."""
        arrays = dict(state)
        arrays["__done__"] = np.array(json.dumps(done))
        atomic_write_npz(self.path / "checkpoint.npz", arrays)

    def drop_checkpoint(self) -> None:
        """A complete run needs no resume state (and cannot be resumed): its checkpoint goes."""
        (self.path / "checkpoint.npz").unlink(missing_ok=True)

    def load_checkpoint(self, tidy: bool = True) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
        """Aggregation state and the finished (digest, id) pairs; ``tidy`` drops example lines
        written after the last checkpoint. A damaged checkpoint is a one-line HeadscopeError."""
        p = self.path / "checkpoint.npz"
        if not p.exists():
            return {}, []
        try:
            with np.load(p, allow_pickle=False) as z:
                state = {k: z[k] for k in z.files if k not in ("__done__", "__done_ids__")}
                if "__done__" in z.files:
                    done = [tuple(d) for d in json.loads(str(z["__done__"]))]
                else:  # written before example digests existed
                    done = [(None, i) for i in json.loads(str(z["__done_ids__"]))]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise HeadscopeError(f"{p} is damaged ({type(e).__name__}); the run cannot be resumed") from None
        if tidy:
            ids = {i for _, i in done}
            keep = [r for r in self.examples() if r.get("id") in ids]
            lines = "".join(json.dumps(r, default=_json_default) + "\n" for r in keep)
            atomic_write_bytes(self.path / "examples.jsonl", lines.encode())
        return state, done


_OWN_TEMP = re.compile(r"^\.(run\.json|examples\.jsonl|checkpoint\.npz|arrays\.npz)\..*\.tmp$")


def _foreign_entries(folder: Path) -> list[str]:
    """What in an existing ``--out`` folder without ``run.json`` a run did not write."""
    return sorted(n for n in os.listdir(folder) if n != LOCK_FILE and not _OWN_TEMP.match(n))


def lease_holder(folder: Path) -> dict | None:
    """Who holds ``folder``'s write lease (``{'host', 'pid', 'started'}``), or None when nobody
    does: the lock is free, or (network filesystems that keep stale locks) its holder was a process
    on this host that is gone."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
            except (ValueError, UnicodeDecodeError):
                holder = {}
            holder = holder if isinstance(holder, dict) else {}
            if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                    and not pid_alive(holder["pid"]):
                return None
            return holder
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLease:
    """The exclusive right to write one run folder, held from ``acquire`` to ``release`` (or the
    process's death: the kernel drops a ``flock`` with its last file descriptor).

    ``acquire`` creates ``folder`` when missing, refuses a folder holding files a run did not write
    (it never touches them), and refuses while another process, or another lease in this one,
    holds it, naming the holder. Readers take the lock shared for an instant (``lease_holder``),
    so a writer retries for ``wait_s`` before giving up.
    """

    def __init__(self, folder: Path, fd: int, created: bool):
        self.folder, self._fd, self._created = folder, fd, created

    @classmethod
    def acquire(cls, folder: Path, wait_s: float = 1.0) -> "RunLease":
        folder = Path(folder)
        if folder.exists():
            if not folder.is_dir():
                raise HeadscopeError(f"--out {folder} is a file, not a folder")
            try:
                foreign = [] if (folder / "run.json").exists() else _foreign_entries(folder)
            except FileNotFoundError:   # a releasing writer removed it meanwhile: as if it were missing
                foreign = []
            if foreign:
                raise HeadscopeError(f"--out {folder} is not a headscope run folder (it holds {', '.join(foreign[:3])}); "
                                     f"choose a new or empty --out")
        deadline, created = time.monotonic() + wait_s, False
        while True:
            try:
                try:
                    folder.mkdir(parents=True)   # again, if a releasing writer removed it meanwhile
                    created = True
                except FileExistsError:
                    pass
                fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, FILE_MODE)
            except FileNotFoundError:
                if time.monotonic() < deadline:
                    continue   # removed between our mkdir and open
                raise HeadscopeError(f"cannot write to {folder}: it keeps disappearing; choose another --out") from None
            except OSError as e:
                raise HeadscopeError(f"cannot write to {folder}: {e.strerror or e}; choose another --out") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                h = lease_holder(folder) or {}
                raise HeadscopeError(
                    f"{folder} is being written by process {h.get('pid', '?')} on {h.get('host', '?')} "
                    f"(since {h.get('started', '?')}); wait for it to end or choose another --out") from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP):
                    raise HeadscopeError(f"{folder}: this filesystem has no file locks; use a local --out") from None
                raise
            # locked; but a holder that released meanwhile may have removed the file we opened
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_ino == os.stat(folder / LOCK_FILE).st_ino:
                    break
            os.close(fd)
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": _dt.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        return cls(folder, fd, created)

    def release(self) -> None:
        """Unlock; a folder the run never wrote ``run.json`` into is left as it was found."""
        if self._fd is None:
            return
        if not (self.folder / "run.json").exists():
            with contextlib.suppress(OSError):
                os.unlink(self.folder / LOCK_FILE)
                if self._created:
                    self.folder.rmdir()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def create_run(out: Path, meta: dict, *, resume: bool = False, planned: list[tuple[str, str]] | None = None
               ) -> tuple[Run, bool]:
    """Make (or reopen, with ``resume``) a run folder whose ``RunLease`` the caller holds.
    Returns (run, resumed).

    Refuses to overwrite an existing run unless resuming it; refuses to resume a run of another
    analysis, model or weights, with other options, with a smaller ``--limit``, or whose finished
    examples are no longer the first ones of the data (``planned``: (``example_digest``, id) of
    each example now planned), since mixing them would give a wrong average.
    """
    out = Path(out)
    if (out / "run.json").exists():
        if not resume:
            raise HeadscopeError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        old = load_run(out).meta
        _check_resumable(out, old, meta)
        if old.get("status") == "complete":
            raise HeadscopeError(f"{out} is already complete; nothing to resume")
        if planned is not None:
            done = Run(out, old).load_checkpoint(tidy=False)[1]
            n_old = old.get("inputs", {}).get("n_planned", len(done))
            if len(planned) < n_old:
                raise HeadscopeError(f"cannot resume {out}: it plans {n_old} examples, now only {len(planned)} "
                                     f"(--limit may only grow on resume, and the data must keep its examples)")
            # a checkpoint from before digests existed has None for them: its ids must still match
            if any(i != j or (d is not None and d != e) for (d, i), (e, j) in zip(done, planned)):
                raise HeadscopeError(f"cannot resume {out}: the data changed in the {len(done)} examples "
                                     f"already done (--data must hold the same examples)")
        meta = {**old, "status": "running", "inputs": meta.get("inputs", {}), "timings": old.get("timings", {})}
        run = Run(out, meta)
        run.save_meta()
        return run, True
    if resume:
        raise HeadscopeError(f"--resume given but {out} holds no run")
    try:
        out.mkdir(parents=True, exist_ok=True)   # callers that write a finished run at once take no lease
    except OSError as e:
        raise HeadscopeError(f"cannot write to {out}: {e.strerror or e}; choose another --out") from None
    meta = {"schema": SCHEMA, "id": out.name, **meta, "status": "running"}
    run = Run(out, meta)
    run.save_meta()
    return run, False


def _check_resumable(out: Path, old: dict, meta: dict) -> None:
    if old.get("analysis") != meta.get("analysis"):
        raise HeadscopeError(f"cannot resume {out}: it is a {old.get('analysis')!r} run, not {meta.get('analysis')!r}")
    if old.get("model", {}).get("id") != meta.get("model", {}).get("id"):
        raise HeadscopeError(f"cannot resume {out}: it was run on model {old['model'].get('id')!r} (--model)")
    w_old, w_new = old.get("inputs", {}).get("weights"), meta.get("inputs", {}).get("weights")
    if w_old and w_new and w_old != w_new:
        raise HeadscopeError(f"cannot resume {out}: the weights of model {old['model'].get('id')!r} changed since")
    changed = sorted(k for k in set(old.get("config", {})) | set(meta.get("config", {}))
                     if k not in RESUME_FREE_KEYS and old["config"].get(k) != meta["config"].get(k))
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise HeadscopeError(f"cannot resume {out}: options differ from the stored run ({flags})")


# options that only change how a run executes, not what it computes; the data file's path is
# free too: its content is compared instead (example digests); --limit is checked to only grow
RESUME_FREE_KEYS = {"limit", "batch_size", "device", "device_map", "progress", "data"}


def example_digest(ex_id: str, data) -> str:
    """A content hash of one example as the analysis produced it (id and data)."""
    text = json.dumps({"id": ex_id, "data": data}, sort_keys=True, default=_digest_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _digest_default(o):
    if hasattr(o, "tolist"):   # numpy arrays and scalars, torch tensors
        return o.tolist()
    return repr(o)

def load_run(path: Path) -> Run:
    """The run in ``path``; anything that is not a readable headscope run is a one-line error."""
    path = Path(path)
    f = path / "run.json"
    if not f.exists():
        raise HeadscopeError(f"no run at {path} (missing run.json)")
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HeadscopeError(f"{f} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise HeadscopeError(f"{f} is not UTF-8 text") from None
    except OSError as e:
        raise HeadscopeError(f"cannot read {f}: {e.strerror or e}") from None
    if not isinstance(meta, dict):
        raise HeadscopeError(f"{f} is not a headscope run (a JSON {type(meta).__name__}, not an object)")
    if meta.get("schema") != SCHEMA:
        raise HeadscopeError(f"{f} is not a headscope run (schema {meta.get('schema')!r})")
    if not isinstance(meta.get("analysis"), str):
        raise HeadscopeError(f"{f} is damaged (no analysis name)")
    return Run(path, meta)


@dataclass
class Unreadable:
    """A folder in the runs folder with a ``run.json`` that cannot be read, and why."""

    path: Path
    reason: str

    @property
    def id(self) -> str:
        return self.path.name


def scan_runs(root: Path | None = None) -> tuple[list[Run], list[Unreadable]]:
    """Every run folder directly inside ``root``: readable runs newest first, and the unreadable
    ones with their reason, so one damaged folder never hides the others."""
    root = Path(root) if root is not None else default_runs_dir()
    if not root.is_dir():
        return [], []
    runs, bad = [], []
    for d in sorted(root.iterdir()):
        if (d / "run.json").exists():
            try:
                runs.append(load_run(d))
            except HeadscopeError as e:
                bad.append(Unreadable(d, str(e)))
    runs.sort(key=lambda r: str(r.meta.get("created", "")), reverse=True)
    return runs, bad


def list_runs(root: Path | None = None) -> list[Run]:
    """Readable runs directly inside ``root``, newest first (``scan_runs`` also names the others)."""
    return scan_runs(root)[0]


def resolve_run(ref: str, root: Path | None = None) -> Run:
    """A run by folder path, by id inside ``root``, or by a prefix of exactly one id there; ids are
    confined to ``root``. An ambiguous prefix names its candidates."""
    p = Path(ref)
    if (p / "run.json").exists():
        return load_run(p)
    root = Path(root) if root is not None else default_runs_dir()
    cand = safe_join(root, ref)
    if (cand / "run.json").exists():
        return load_run(cand)
    matches = sorted(d.name for d in root.glob("*") if d.name.startswith(ref) and (d / "run.json").is_file()) \
        if ref and "/" not in ref and root.is_dir() else []
    if len(matches) == 1:
        return load_run(root / matches[0])
    if matches:
        raise HeadscopeError(f"run id prefix {ref!r} matches {len(matches)} runs ({', '.join(matches[:5])}"
                             f"{', ...' if len(matches) > 5 else ''}); give more of the id")
    raise HeadscopeError(f"no run {ref!r} (looked for {p} and {cand})")


def safe_join(root: Path, name: str) -> Path:
    """``root / name`` that cannot escape ``root`` (for paths coming from a UI)."""
    root = Path(root).resolve()
    p = (root / name).resolve()
    if p != root and root not in p.parents:
        raise HeadscopeError(f"path {name!r} is outside the runs folder {root}")
    return p
