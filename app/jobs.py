"""Shared models and background runs for the dashboard, independent of Streamlit.

- ``ModelPool`` loads each (model, device, dtype) once per app process, in a background thread,
  and hands out one ``Probe`` per model. The probe's own re-entrant lock serialises its forwards
  and ``capture``/``intervene`` blocks across threads; it is taken per block/call, not per run, so
  the Inspect page can still use the model between the examples of a long background run.
- ``JobManager`` runs analyses in threads and tracks them on disk: the run folder's ``run.json``
  status (written by ``run_analysis``) and a small ``<runs>/.jobs/<run id>.json`` with progress and
  the owning process id. A page refresh (a new Streamlit session) therefore finds the job again;
  a job whose owning process is gone is reported as interrupted, and can be resumed.

Everything is written under the runs folder, with paths built by ``store.safe_join``.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from headscope.analyses.store import atomic_write_json, new_run_id, safe_join
from headscope.errors import HeadscopeError
from headscope.process import pid_alive

JOBS_DIR = ".jobs"


# --------------------------------------------------------------------------- shared probe
@dataclass
class Loaded:
    lm: Any
    probe: Any  # headscope.probe.Probe, thread-safe per block/call (``Probe.lock``)


def default_loader(name: str, device: str = "cpu", dtype: str = "float32"):
    """``(lm, probe)`` for ``name``; torch and the probe are imported only when a model is needed."""
    import torch

    from headscope.probe import Probe, load_model
    lm = load_model(name, device=device, dtype=getattr(torch, dtype))
    return lm, Probe(lm)


class ModelPool:
    """Each (model, device, dtype) loaded once, in the background; errors kept as one-line strings."""

    def __init__(self, loader: Callable[..., tuple] = default_loader):
        self._loader = loader
        self._lock = threading.Lock()
        self._models: dict[tuple, Loaded] = {}
        self._errors: dict[tuple, str] = {}
        self._loading: dict[tuple, threading.Event] = {}

    @staticmethod
    def key(name: str, device: str = "cpu", dtype: str = "float32") -> tuple:
        return (str(name), str(device), str(dtype))

    def status(self, name: str, device: str = "cpu", dtype: str = "float32") -> str:
        """``ready`` | ``loading`` | ``absent`` | ``error: <message>``."""
        k = self.key(name, device, dtype)
        with self._lock:
            if k in self._models:
                return "ready"
            if k in self._loading:
                return "loading"
            if k in self._errors:
                return "error: " + self._errors[k]
        return "absent"

    def start(self, name: str, device: str = "cpu", dtype: str = "float32") -> threading.Event:
        """Begin loading in a daemon thread (no-op if loaded or loading); returns the done event.

        A model that failed to load is retried: the error may have been fixed (package installed).
        """
        k = self.key(name, device, dtype)
        with self._lock:
            if k in self._models:
                ev = threading.Event()
                ev.set()
                return ev
            if k in self._loading:
                return self._loading[k]
            self._errors.pop(k, None)
            ev = self._loading[k] = threading.Event()
        threading.Thread(target=self._load, args=(k, ev), name=f"load-{name}", daemon=True).start()
        return ev

    def _load(self, k: tuple, ev: threading.Event) -> None:
        try:
            lm, probe = self._loader(*k)
            loaded = Loaded(lm, probe)
            with self._lock:
                self._models[k] = loaded
        except HeadscopeError as e:
            with self._lock:
                self._errors[k] = str(e)
        except Exception as e:  # noqa: BLE001 - shown as one line in the UI, never a traceback
            with self._lock:
                self._errors[k] = f"{type(e).__name__}: {e}"
        finally:
            with self._lock:
                self._loading.pop(k, None)
            ev.set()

    def get(self, name: str, device: str = "cpu", dtype: str = "float32", timeout: float | None = None) -> Loaded:
        """The loaded model, loading it first if needed; HeadscopeError if loading failed or timed out."""
        ev = self.start(name, device, dtype)
        if not ev.wait(timeout):
            raise HeadscopeError(f"model {name} is still loading; try again in a moment")
        k = self.key(name, device, dtype)
        with self._lock:
            if k in self._models:
                return self._models[k]
            raise HeadscopeError(f"could not load model {name}: {self._errors.get(k, 'unknown error')}")


# --------------------------------------------------------------------------- jobs
@dataclass
class Job:
    """One background analysis run; mirrored to ``<runs>/.jobs/<run_id>.json``."""

    run_id: str
    analysis: str
    model: str
    options: dict
    data: str | None = None
    resume: bool = False
    state: str = "queued"   # queued | loading model | running | complete | partial | failed
    done: int = 0
    total: int | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    pid: int = field(default_factory=os.getpid)
    log: list[str] = field(default_factory=list)
    running_since: float | None = None   # model loaded, first example started
    counted_from: int | None = None      # examples done before this job's first one

    @property
    def eta_s(self) -> float | None:
        """Seconds left at this job's rate so far; None before its first example is done."""
        if self.running_since is None or self.counted_from is None or not self.total:
            return None
        rate = (time.time() - self.running_since) / max(self.done - self.counted_from, 1)
        return rate * (self.total - self.done)

    @property
    def active(self) -> bool:
        return self.state in ("queued", "loading model", "running")

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


def shipped_data_dir() -> Path | None:
    """The data folder installed with headscope (``headscope.data``), if present."""
    try:
        from importlib import resources
        return Path(str(resources.files("headscope.data")))
    except (ModuleNotFoundError, OSError):
        return None


def confine_inputs(root: Path, cls, opts: dict, data: str | None) -> None:
    """The one check that keeps the dashboard's reads inside the runs folder and the shipped data
    (as the README promises): the data file, and any text option whose value names an existing file
    or folder (a haystack, a source run, a harmless prompt file). Words that name nothing on disk
    (``builtin``, ``shipped``, a run id) pass; the analysis resolves those itself."""
    roots = [Path(root).resolve()] + [d.resolve() for d in (shipped_data_dir(),) if d is not None]
    values = [("data file", data)] + [(o.label, opts[o.name]) for o in cls.all_options()
                                      if o.type is str and o.choices is None and opts.get(o.name)]
    for label, value in values:
        if not value or not Path(value).expanduser().exists():
            continue
        p = Path(value).expanduser().resolve()
        if not any(p == r or r in p.parents for r in roots):
            raise HeadscopeError(f"{label}: {value} is outside the runs folder and the shipped data; "
                                 f"upload the file instead")


class JobManager:
    """Starts analyses in threads and answers "what is running" from memory and from disk."""

    def __init__(self, runs_root: Path, pool: ModelPool):
        self.root = Path(runs_root)
        self.pool = pool
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}

    # -- paths ---------------------------------------------------------------------------------
    def _job_file(self, run_id: str) -> Path:
        return safe_join(self.root, f"{JOBS_DIR}/{run_id}.json")

    def _save(self, job: Job) -> None:
        d = asdict(job)
        d["log"] = d["log"][-20:]
        try:
            atomic_write_json(self._job_file(job.run_id), d)
        except OSError:
            pass  # progress on disk is best effort; run.json stays the source of truth

    def _reserve(self, analysis: str, model: str) -> tuple[str, Path]:
        """A fresh run folder name (ids have 1 s resolution, so suffix on collision)."""
        base = new_run_id(analysis, model)
        for i in range(1, 100):
            rid = base if i == 1 else f"{base}-{i}"
            path = safe_join(self.root, rid)
            try:
                path.mkdir(parents=True, exist_ok=False)
                return rid, path
            except FileExistsError:
                continue
            except OSError as e:
                raise HeadscopeError(f"cannot create a run folder in {self.root}: {e.strerror or e}") from None
        raise HeadscopeError(f"could not find a free run id for {base}")

    # -- submit ----------------------------------------------------------------------------------
    def submit(self, analysis: str, model: str, options: dict | None = None, data: str | None = None,
               resume_run: str | None = None) -> Job:
        """Validate, then start ``analysis`` in a thread; returns the Job (its run id is final).

        Bad options or a missing data file raise HeadscopeError here, before anything runs.
        ``resume_run`` continues that partial run with its stored options.
        """
        opts = self._validated(analysis, options, data)
        (self.root / JOBS_DIR).mkdir(parents=True, exist_ok=True)
        if resume_run:
            rid, path = resume_run, safe_join(self.root, resume_run)
            with self._lock:
                if rid in self._jobs and self._jobs[rid].active:
                    raise HeadscopeError(f"{rid} is already running")
        else:
            rid, path = self._reserve(analysis, model)
        job = Job(run_id=rid, analysis=analysis, model=model, options=opts, data=data, resume=bool(resume_run))
        with self._lock:
            self._jobs[rid] = job
        self._save(job)
        threading.Thread(target=self._work, args=(job, path), name=f"job-{rid}", daemon=True).start()
        return job

    def _validated(self, analysis: str, options: dict | None, data: str | None) -> dict:
        """The form's options parsed (errors name the form's labels), data and paths checked."""
        from headscope.analyses.base import validate_request
        raw = {k: v for k, v in (options or {}).items() if v is not None}
        cls, opts = validate_request(analysis, data, raw, gui=True)
        confine_inputs(self.root, cls, opts, data)
        return opts

    def estimate(self, analysis: str, model: str, options: dict | None = None, data: str | None = None):
        """(Work, seconds on this machine) of a run ``submit`` would start, before starting it.

        Loads the model through the pool (the run then reuses it) and times a few short forwards
        once per model (``base.calibrate``); runs no example."""
        from headscope.analyses.base import estimate_run
        opts = self._validated(analysis, options, data)
        loaded = self.pool.get(model, opts["device"], opts["dtype"])
        return estimate_run(analysis, loaded.lm, loaded.probe, data=data, options=opts)

    def _work(self, job: Job, path: Path) -> None:
        from headscope.analyses.base import run_analysis

        def on_progress(done: int, total: int | None) -> None:
            if job.counted_from is None:   # this job's first example (a resumed run starts past 0)
                job.counted_from = done - 1
            job.done, job.total = done, total
            self._save(job)

        def log(msg: str) -> None:
            job.log.append(str(msg))

        final = "failed"
        try:
            job.state = "loading model"
            self._save(job)
            loaded = self.pool.get(job.model, job.options.get("device", "cpu"), job.options.get("dtype", "float32"))
            job.state, job.running_since = "running", time.time()
            self._save(job)
            run = run_analysis(job.analysis, job.model, data=job.data, options=job.options, out=path,
                               resume=job.resume, lm=loaded.lm, probe=loaded.probe, progress=False,
                               log=log, on_progress=on_progress)
            final = run.status
            job.done = run.meta.get("n_examples", job.done)
            job.total = job.total or job.done
        except HeadscopeError as e:
            final, job.error = self._disk_state(path, "failed"), str(e)
        except Exception as e:  # noqa: BLE001 - the run.json keeps the traceback; the UI shows one line
            job.error = f"{type(e).__name__}: {e}"
            job.log.append(traceback.format_exc(limit=3))
        finally:
            job.finished = time.time()
            # disk first: whoever sees the job finished in memory finds it finished on disk too
            self._save(replace(job, state=final))
            job.state = final
            with contextlib.suppress(OSError):
                path.rmdir()  # only succeeds for a folder the run never wrote into

    @staticmethod
    def _disk_state(path: Path, default: str) -> str:
        try:
            return json.loads((path / "run.json").read_text()).get("status", default)
        except (OSError, ValueError):
            return default

    # -- queries ---------------------------------------------------------------------------------
    def get(self, run_id: str) -> Job | None:
        """The job for ``run_id``: from memory, else from its job file (possibly of a dead process)."""
        with self._lock:
            if run_id in self._jobs:
                return self._jobs[run_id]
        try:
            d = json.loads(self._job_file(run_id).read_text())
            return Job(**{k: v for k, v in d.items() if k in Job.__dataclass_fields__})
        except (OSError, ValueError, TypeError, HeadscopeError):
            return None

    def orphaned(self, job: Job) -> bool:
        """True for a job file whose thread belonged to an app process that is gone (or restarted)."""
        with self._lock:
            mine = job.run_id in self._jobs
        return job.active and not mine and (job.pid != os.getpid() or not pid_alive(job.pid))

    def recent(self, limit: int = 20) -> list[Job]:
        """Jobs known from disk and memory, newest first."""
        d = self.root / JOBS_DIR
        ids = {p.stem for p in d.glob("*.json")} if d.is_dir() else set()
        with self._lock:
            ids |= set(self._jobs)
        jobs = [j for j in (self.get(i) for i in ids) if j is not None]
        return sorted(jobs, key=lambda j: j.started, reverse=True)[:limit]

    def wait(self, run_id: str, timeout: float = 60.0) -> Job | None:
        """Block until the job is no longer active (tests and scripts; the UI polls instead)."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            j = self.get(run_id)
            if j is None or not j.active:
                return j
            time.sleep(0.05)
        return self.get(run_id)


# --------------------------------------------------------------------------- small tasks
@dataclass
class Task:
    """A background computation that is not a run (e.g. recomputing a run's per-example scores)."""

    state: str = "running"   # running | done | failed
    done: int = 0
    total: int | None = None
    result: Any = None
    error: str | None = None

    @property
    def active(self) -> bool:
        return self.state == "running"

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


class Tasks:
    """Keyed background tasks of one app process; a key has at most one task running."""

    def __init__(self):
        self._lock = threading.Lock()
        self._tasks: dict[str, Task] = {}

    def get(self, key: str) -> Task | None:
        with self._lock:
            return self._tasks.get(key)

    def start(self, key: str, fn: Callable[[Callable[[int, int], None]], Any]) -> Task:
        """Run ``fn(progress)`` in a daemon thread unless ``key`` is already running."""
        with self._lock:
            t = self._tasks.get(key)
            if t is not None and t.active:
                return t
            t = self._tasks[key] = Task()

        def progress(done: int, total: int) -> None:
            t.done, t.total = done, total

        def work() -> None:
            try:
                t.result = fn(progress)
                t.state = "done"
            except HeadscopeError as e:
                t.error, t.state = str(e), "failed"
            except Exception as e:  # noqa: BLE001 - shown as one line in the UI
                t.error, t.state = f"{type(e).__name__}: {e}", "failed"

        threading.Thread(target=work, name=f"task-{key}", daemon=True).start()
        return t
