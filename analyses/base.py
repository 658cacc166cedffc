"""The analysis framework: one registry, one result schema, resumable streaming aggregation.

An analysis declares typed options and implements three steps::

    examples(ctx)            -> iterable of Example (stable ids, so a run can resume)
    process(ctx, example)    -> ExampleOutput (per-(layer, head) arrays to average + details)
    finalize(ctx, agg)       -> Finalized (scores [L, H] or [L, H_kv], summary, big arrays)

The runner streams examples with a progress bar, folds each output into ``RunningMean``
accumulators, appends the example's details to ``examples.jsonl`` and checkpoints after each
example, so ``--resume`` continues exactly where a crash stopped.
"""
from __future__ import annotations

import importlib
import platform
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from headscope.errors import HeadscopeError

from .store import Run, create_run, default_runs_dir, new_run_id


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Option:
    """A typed analysis option; becomes ``--name`` on the CLI and a widget in the app."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None

    def parse(self, value):
        if value is None:
            return self.default
        if self.type is bool and isinstance(value, str):
            v = value.lower()
            if v not in ("1", "0", "true", "false", "yes", "no"):
                raise HeadscopeError(f"--{self.name}: expected true/false, got {value!r}")
            value = v in ("1", "true", "yes")
        elif self.type in (list, tuple) and isinstance(value, str):
            value = [x for x in (s.strip() for s in value.split(",")) if x]
        else:
            try:
                value = self.type(value)
            except (TypeError, ValueError):
                raise HeadscopeError(f"--{self.name}: expected {self.type.__name__}, got {value!r}") from None
        if self.choices is not None and value not in self.choices:
            raise HeadscopeError(f"--{self.name}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        return value


COMMON_OPTIONS = (
    Option("limit", int, None, "use only the first N examples"),
    Option("seed", int, 0, "random seed (data generation and sampling)"),
    Option("device", str, "cpu", "torch device, e.g. cpu or cuda"),
    Option("dtype", str, "float32", "model dtype", ("float32", "bfloat16", "float16")),
    Option("batch_size", int, 1, "examples per forward pass where the analysis batches"),
)


# --------------------------------------------------------------------------- streaming stats
class RunningMean:
    """Mean and variance of same-shaped arrays, mergeable and serialisable (baukit-style)."""

    def __init__(self):
        self.n = 0
        self.sum = None
        self.sumsq = None

    def add(self, x: np.ndarray, weight: int = 1) -> None:
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise HeadscopeError("a score came out NaN/inf; refusing to fold it into the average")
        if self.sum is None:
            self.sum, self.sumsq = np.zeros_like(x), np.zeros_like(x)
        self.sum += x * weight
        self.sumsq += x * x * weight
        self.n += weight

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.n, 1)

    @property
    def std(self) -> np.ndarray:
        var = self.sumsq / max(self.n, 1) - self.mean ** 2
        return np.sqrt(np.clip(var, 0, None))

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        if self.sum is None:
            return {f"{prefix}.n": np.array(0)}
        return {f"{prefix}.n": np.array(self.n), f"{prefix}.sum": self.sum, f"{prefix}.sumsq": self.sumsq}

    @classmethod
    def from_state(cls, state: dict, prefix: str) -> "RunningMean":
        r = cls()
        r.n = int(state.get(f"{prefix}.n", 0))
        if r.n:
            r.sum, r.sumsq = state[f"{prefix}.sum"].astype(np.float64), state[f"{prefix}.sumsq"].astype(np.float64)
        return r


class Aggregator:
    """Named RunningMeans; what every analysis folds its per-example arrays into."""

    def __init__(self):
        self.stats: dict[str, RunningMean] = {}

    def add(self, name: str, x, weight: int = 1) -> None:
        self.stats.setdefault(name, RunningMean()).add(x, weight)

    def __getitem__(self, name: str) -> RunningMean:
        return self.stats[name]

    def __contains__(self, name: str) -> bool:
        return name in self.stats

    def state(self) -> dict[str, np.ndarray]:
        out = {}
        for k, v in self.stats.items():
            out.update(v.state(k))
        return out

    @classmethod
    def from_state(cls, state: dict) -> "Aggregator":
        agg = cls()
        for key in state:
            if key.endswith(".n"):
                name = key[:-2]
                agg.stats[name] = RunningMean.from_state(state, name)
        return agg


# --------------------------------------------------------------------------- analysis API
@dataclass
class Example:
    id: str
    data: Any


@dataclass
class ExampleOutput:
    """``arrays`` are averaged over examples (each [L, H] or any fixed shape); ``details`` are
    JSON-serialisable and stored per example; ``skip`` marks an example that must not count
    (e.g. a failed retrieval), with ``details['skip_reason']``."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    skip: bool = False


@dataclass
class ScoreMeta:
    description: str
    index: str = "query_head"   # or "kv_head"
    higher_is: str = "more"     # what a high value means, in words
    threshold: float | None = None


@dataclass
class Finalized:
    scores: dict[str, np.ndarray]
    score_meta: dict[str, ScoreMeta]
    summary: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class RunContext:
    """What an analysis sees: the loaded model, its probe, options, and helpers."""

    lm: Any          # headscope.probe.models.LoadedModel
    probe: Any       # headscope.probe.Probe
    options: dict
    data_path: Path | None
    log: Callable[[str], None] = print

    @property
    def info(self):
        return self.lm.info

    @property
    def seed(self) -> int:
        return self.options["seed"]


class Analysis:
    """Subclass, set the class attributes, implement the three steps, decorate with @register."""

    name: str = ""
    description: str = ""
    options: tuple[Option, ...] = ()
    needs_data: bool = False
    data_help: str = ""

    def examples(self, ctx: RunContext) -> Iterable[Example]:
        raise NotImplementedError

    def process(self, ctx: RunContext, ex: Example) -> ExampleOutput:
        raise NotImplementedError

    def finalize(self, ctx: RunContext, agg: Aggregator, records: list[dict]) -> Finalized:
        raise NotImplementedError

    @classmethod
    def all_options(cls) -> tuple[Option, ...]:
        return COMMON_OPTIONS + tuple(cls.options)

    @classmethod
    def parse_options(cls, raw: dict) -> dict:
        known = {o.name: o for o in cls.all_options()}
        unknown = set(raw) - set(known)
        if unknown:
            raise HeadscopeError(f"{cls.name}: unknown option(s) {', '.join(sorted(unknown))}")
        return {name: o.parse(raw.get(name)) for name, o in known.items()}


_REGISTRY: dict[str, type[Analysis]] = {}
# modules that register analyses when imported; grown by each analysis module
ANALYSIS_MODULES = ["induction", "sinks", "fai", "retrieval", "safety", "vhd", "circuit"]


def register(cls: type[Analysis]) -> type[Analysis]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for mod in ANALYSIS_MODULES:
        try:
            importlib.import_module(f"headscope.analyses.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"headscope.analyses.{mod}":
                raise


def list_analyses() -> dict[str, type[Analysis]]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_analysis(name: str) -> type[Analysis]:
    analyses = list_analyses()
    if name not in analyses:
        raise HeadscopeError(f"unknown analysis {name!r}; available: {', '.join(analyses)}")
    return analyses[name]


# --------------------------------------------------------------------------- runner
def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("headscope", "torch", "transformers", "transformer_lens", "triton", "numpy"):
        try:
            out[pkg] = importlib.import_module(pkg).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not recorded
            continue
    return out


def run_analysis(name: str, model="smollm2-135m", *, data: str | Path | None = None,
                 options: dict | None = None, out: str | Path | None = None, resume: bool = False,
                 lm=None, probe=None, progress: bool = True, log: Callable[[str], None] = print,
                 on_progress: Callable[[int, int | None], None] | None = None) -> Run:
    """Run analysis ``name`` on ``model`` and write a run folder; returns the Run.

    ``lm``/``probe`` may be passed to reuse an already loaded model (the app does). Errors in
    user input raise HeadscopeError before anything is written; a crash mid-run leaves a
    ``partial`` run that ``resume=True`` continues.
    """
    cls = get_analysis(name)
    opts = cls.parse_options(options or {})
    if cls.needs_data and data is None:
        raise HeadscopeError(f"{name} needs --data ({cls.data_help or 'a dataset file'})")
    if data is not None and not Path(data).exists():
        raise HeadscopeError(f"data file not found: {data}")
    if lm is None:
        import torch

        from headscope.probe import Probe, load_model
        lm = load_model(model, device=opts["device"], dtype=getattr(torch, opts["dtype"]))
    if probe is None:
        from headscope.probe import Probe
        probe = Probe(lm)
    analysis = cls()
    ctx = RunContext(lm=lm, probe=probe, options=opts, data_path=Path(data) if data else None, log=log)
    examples = list(analysis.examples(ctx))  # validates the data before any write
    if opts["limit"] is not None:
        examples = examples[: opts["limit"]]
    if not examples:
        raise HeadscopeError(f"{name}: no examples to process (empty dataset?)")

    out = Path(out) if out else default_runs_dir() / new_run_id(name, lm.name)
    import datetime as _dt
    meta = {
        "analysis": name,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "model": _model_meta(lm),
        "config": {**opts, "data": str(data) if data else None},
        "versions": versions(),
    }
    run, resumed = create_run(out, meta, resume=resume)
    state, done = run.load_checkpoint() if resumed else ({}, [])
    agg = Aggregator.from_state(state)
    done_set = set(done)
    timings = run.meta.setdefault("timings", {})
    t0 = time.time()
    todo = [ex for ex in examples if ex.id not in done_set]
    if resumed:
        log(f"resuming {run.path}: {len(done_set)} done, {len(todo)} to go")
    try:
        from tqdm.auto import tqdm
        bar = tqdm(todo, desc=name, unit="ex", disable=not progress)
        for i, ex in enumerate(bar):
            res = analysis.process(ctx, ex)
            if not res.skip:
                for k, v in res.arrays.items():
                    agg.add(k, v)
            run.append_example({"id": ex.id, "skip": res.skip, **res.details})
            done.append(ex.id)
            run.save_checkpoint(agg.state(), done)
            if on_progress:
                on_progress(len(done), len(examples))
        fin = analysis.finalize(ctx, agg, run.examples())
    except KeyboardInterrupt:
        _mark(run, "partial", timings, t0, error="interrupted")
        raise HeadscopeError(f"interrupted; {len(done)} of {len(examples)} examples saved. "
                             f"Continue with --resume --out {run.path}") from None
    except HeadscopeError as e:
        _mark(run, "partial", timings, t0, error=str(e))
        raise
    except Exception as e:
        _mark(run, "failed", timings, t0, error=f"{type(e).__name__}: {e}",
              trace=traceback.format_exc())
        raise
    run.meta["scores"] = {k: np.asarray(v, dtype=np.float64).tolist() for k, v in fin.scores.items()}
    run.meta["score_meta"] = {k: asdict(v) for k, v in fin.score_meta.items()}
    run.meta["summary"] = fin.summary
    run.meta["n_examples"] = len(done)
    run.meta["n_used"] = sum(1 for r in run.examples() if not r.get("skip"))
    if fin.arrays:
        from .store import atomic_write_npz
        atomic_write_npz(run.path / "arrays.npz", {k: np.asarray(v) for k, v in fin.arrays.items()})
        run.meta["arrays"] = "arrays.npz"
        run.meta["array_shapes"] = {k: list(np.shape(v)) for k, v in fin.arrays.items()}
    _mark(run, "complete", timings, t0)
    return run


def _mark(run: Run, status: str, timings: dict, t0: float, error: str | None = None, trace: str | None = None):
    timings["run_s"] = round(timings.get("run_s", 0.0) + time.time() - t0, 3)
    run.meta["status"] = status
    run.meta["error"] = error
    if trace:
        run.meta["traceback"] = trace
    run.save_meta()


def _model_meta(lm) -> dict:
    info = asdict(lm.info) if hasattr(lm.info, "__dataclass_fields__") else dict(lm.info)
    info.setdefault("id", lm.name)
    return info
