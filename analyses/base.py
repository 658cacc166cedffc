"""The analysis framework: one registry, one result schema, resumable streaming aggregation.

An analysis declares typed options and implements three steps::

    examples(ctx)            -> iterable of Example (stable ids, so a run can resume)
    process(ctx, example)    -> ExampleOutput (per-(layer, head) arrays to average + details)
    finalize(ctx, agg)       -> Finalized (scores [L, H] or [L, H_kv], summary, big arrays)

The runner streams examples with a progress bar, ``--batch-size`` at a time where the analysis
overrides ``process_batch`` (one forward for several examples), folds each output into
``RunningMean`` accumulators in example order, appends the example's details to
``examples.jsonl`` and checkpoints after each batch, so ``--resume`` continues exactly where a
crash stopped.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import math
import platform
import re
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from headscope.errors import ContextTooLong, HeadscopeError, Interrupted, Terminated

from .store import (Run, RunLease, atomic_write_npz, create_run, default_runs_dir, example_digest,
                    new_run_id)


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Option:
    """A typed analysis option; becomes ``--name`` on the CLI and a widget in the app.

    ``min``/``max`` (inclusive), ``choices`` and ``pattern`` (a full-match regex for strings) are
    checked by ``parse`` for both; a value out of range is a one-line error naming the flag, or the
    form's label when the app passes ``label``. ``cli_only`` options get no widget: they would
    reshape the dashboard's shared model or write outside the runs folder.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    pattern: str | None = None
    cli_only: bool = False
    auto: bool = False   # "auto" (and None) is accepted: the run chooses the value (``--batch-size``)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        """The dashboard's wording for this option."""
        return self.name.replace("_", " ")

    def parse(self, value, label: str | None = None):
        """``value`` (a string from the CLI, or a widget value) as ``type``, range-checked."""
        where = label or self.flag
        if value is None or (self.auto and isinstance(value, str) and value.strip().lower() == "auto"):
            return self.default
        if self.type is bool and isinstance(value, str):
            v = value.lower()
            if v not in ("1", "0", "true", "false", "yes", "no"):
                raise HeadscopeError(f"{where}: expected true/false, got {value!r}")
            value = v in ("1", "true", "yes")
        elif self.type in (list, tuple) and isinstance(value, str):
            value = [x for x in (s.strip() for s in value.split(",")) if x]
        else:
            try:
                value = self.type(value)
            except (TypeError, ValueError, OverflowError):
                raise HeadscopeError(f"{where}: expected {self.type.__name__}, got {value!r}") from None
        if self.type is float and not math.isfinite(value):
            raise HeadscopeError(f"{where}: expected a finite number, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise HeadscopeError(f"{where}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        if self.min is not None and value < self.min:
            raise HeadscopeError(f"{where}: must be at least {self.min}, got {value!r}")
        if self.max is not None and value > self.max:
            raise HeadscopeError(f"{where}: must be at most {self.max}, got {value!r}")
        if self.pattern is not None and not re.fullmatch(self.pattern, str(value)):
            raise HeadscopeError(f"{where}: {value!r} is not valid ({self.help})")
        return value


SEED_MAX = 2**31 - 1   # torch and numpy seeds, and the analyses' seed arithmetic, stay in int64

COMMON_OPTIONS = (
    Option("limit", int, None, "use only the first N examples", min=1),
    Option("seed", int, 0, "random seed (data generation and sampling)", min=0, max=SEED_MAX),
    Option("device", str, "cpu", "torch device: cpu, cuda, cuda:N or mps", pattern=r"cpu|cuda(:\d+)?|mps"),
    Option("dtype", str, "float32", "model dtype", ("float32", "bfloat16", "float16")),
    Option("device_map", str, None, "place layers across devices with accelerate: auto, balanced, or a JSON "
                                    "object / .json file of module -> device; the weights load straight onto "
                                    "their devices (docs/SCALE.md)", cli_only=True),
    Option("offload_dir", str, None, "folder for what --device-map puts on 'disk' (those layers' weights are "
                                     "read from the model's safetensors when they run, never held in RAM)",
           cli_only=True),
    Option("batch_size", int, None, "examples per forward where the analysis batches them (induction, sinks); "
                                    "auto (default): as many as fit in half the free memory by the analysis's "
                                    "per-example estimate; ships/gships/circuit read it as rows per sweep / pairs "
                                    "per example (auto = 1 there)", min=1, max=1024, auto=True),
)

# the one BOS policy (ModelInfo.leading_bos) of every analysis that tokenizes text or builds token ids
PREPEND_BOS = Option("prepend_bos", bool, False, "true: add the model's BOS where the tokenizer puts none first; "
                     "false (default): BOS exactly when the tokenizer adds it (README, Analyses)")


# --------------------------------------------------------------------------- streaming stats
class RunningMean:
    """Mean and (population) std of same-shaped arrays, serialisable for resume.

    Welford's update, in Chan et al.'s weighted form: ``mean`` and ``m2`` (sum of squared deviations)
    move by the deviation from the running mean, so the variance keeps its digits when the values
    sit far from zero (``sumsq/n - mean^2`` cancels catastrophically there). ``add(x, weight=w)``
    counts ``x`` w times. Raises on NaN/inf, which would poison every later mean.
    """

    def __init__(self):
        self.n = 0
        self._mean = None
        self.m2 = None

    def add(self, x: np.ndarray, weight: int = 1) -> None:
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise HeadscopeError("a score came out NaN/inf; refusing to fold it into the average")
        if self._mean is None:
            self._mean, self.m2 = np.zeros_like(x), np.zeros_like(x)
        self.n += weight
        delta = x - self._mean
        self._mean = self._mean + delta * (weight / self.n)
        self.m2 = self.m2 + weight * delta * (x - self._mean)

    @property
    def mean(self) -> np.ndarray:
        return self._mean

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(np.clip(self.m2 / max(self.n, 1), 0, None))

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        if self._mean is None:
            return {f"{prefix}.n": np.array(0)}
        return {f"{prefix}.n": np.array(self.n), f"{prefix}.mean": self._mean, f"{prefix}.m2": self.m2}

    def merge(self, other: "RunningMean") -> None:
        """Fold in another accumulator's examples (Chan et al.'s parallel update of mean and m2):
        the same mean and std as one accumulator over all examples, up to float64 rounding,
        whichever process or order produced the parts."""
        if not other.n:
            return
        if self._mean is None:
            self.n, self._mean, self.m2 = other.n, other._mean.copy(), other.m2.copy()
            return
        if self._mean.shape != other._mean.shape:
            raise HeadscopeError(f"cannot merge statistics of shapes {self._mean.shape} and {other._mean.shape}")
        n = self.n + other.n
        delta = other._mean - self._mean
        self._mean = self._mean + delta * (other.n / n)
        self.m2 = self.m2 + other.m2 + delta ** 2 * (self.n * other.n / n)
        self.n = n

    @classmethod
    def from_state(cls, state: dict, prefix: str) -> "RunningMean":
        """Also reads the ``sum`` / ``sumsq`` state of partial runs written before the Welford update."""
        r = cls()
        r.n = int(state.get(f"{prefix}.n", 0))
        if r.n and f"{prefix}.mean" in state:
            r._mean, r.m2 = state[f"{prefix}.mean"].astype(np.float64), state[f"{prefix}.m2"].astype(np.float64)
        elif r.n:
            total, sq = state[f"{prefix}.sum"].astype(np.float64), state[f"{prefix}.sumsq"].astype(np.float64)
            r._mean = total / r.n
            r.m2 = np.clip(sq - total * r._mean, 0, None)
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

    def add_output(self, res: "ExampleOutput") -> None:
        """Fold one processed example's arrays (none for a skipped example)."""
        if not res.skip:
            for k, v in res.arrays.items():
                self.add(k, v)

    def merge(self, other: "Aggregator") -> None:
        for name, stat in other.stats.items():
            self.stats.setdefault(name, RunningMean()).merge(stat)

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


@dataclass
class Work:
    """Model work counted before a run starts, in units the calibration prices.

    ``forwards``: model runs other than decode steps (a batched run, or one per-layer group of a
    head sweep, is one). ``tokens``: tokens through all layers summed over those runs, as full-model
    equivalents (a sweep's copies from layer l on count (L - l) / L each). ``generated``: greedy decode
    steps, an upper bound (a generation may stop early at EOS or a stop string).
    """

    forwards: int = 0
    tokens: float = 0.0
    generated: int = 0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.forwards + other.forwards, self.tokens + other.tokens, self.generated + other.generated)

    def __mul__(self, k: int) -> "Work":
        return Work(self.forwards * k, self.tokens * k, self.generated * k)

    @classmethod
    def forward(cls, batch: int, length: int) -> "Work":
        """One run of ``batch`` rows of ``length`` tokens."""
        return cls(1, float(batch * length), 0)

    @classmethod
    def generation(cls, prompt_len: int, new_tokens: int) -> "Work":
        """``probe.generate``: a prefill of the prompt but its last token, then one step per new token."""
        return cls(int(prompt_len > 1), float(max(prompt_len - 1, 0)), new_tokens)

    @classmethod
    def sweep(cls, n_layers: int, n_heads: int, batch: int, length: int, copies: int) -> "Work":
        """A batched single-head sweep (``probe.sweep_heads``): per group of ``copies`` heads of layer
        l, one run whose layers below l see the input once and the rest ``copies`` times."""
        out = cls()
        for layer in range(n_layers):
            for start in range(0, n_heads, copies):
                k = min(copies, n_heads - start)
                out += cls(1, batch * length * (layer + (n_layers - layer) * k) / n_layers, 0)
        return out


@dataclass(frozen=True)
class Calibration:
    """Seconds per forward, per token of a forward and per decode step, measured on one model."""

    per_forward: float
    per_token: float
    per_step: float

    def seconds(self, work: Work) -> float:
        return work.forwards * self.per_forward + work.tokens * self.per_token + work.generated * self.per_step


_CALIBRATIONS: dict[tuple, Calibration] = {}


def calibrate(lm, probe, lengths: tuple[int, int] = (16, 128), steps: int = 8) -> Calibration:
    """Time forwards of two ``lengths`` (median of three each) and a short greedy generation on the
    loaded model, once per model, device and dtype for the process. A line through two points:
    attention's quadratic part is ignored, so long inputs (retrieval at 4k+) are underestimated;
    a machine busier during the measurement than during the run (or the reverse) skews every
    estimate; generations that stop early at EOS cost less than their budget."""
    import torch
    key = (lm.name, str(probe.device), str(getattr(lm.model, "dtype", "")))
    if key in _CALIBRATIONS:
        return _CALIBRATIONS[key]
    gen = torch.Generator().manual_seed(0)
    ids = {n: torch.randint(0, lm.info.vocab_size, (1, n), generator=gen) for n in lengths}
    probe.forward(ids[lengths[0]], logits_to_keep=1)            # warm-up: first-call allocations
    took = {}
    for n in lengths:   # the median of three: one slow outlier on a shared machine does not set the price
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            probe.forward(ids[n], logits_to_keep=1)
            times.append(time.perf_counter() - t0)
        took[n] = sorted(times)[1]
    lo, hi = lengths
    per_token = max((took[hi] - took[lo]) / (hi - lo), 0.0)
    per_forward = max(took[lo] - lo * per_token, 0.0)
    t0 = time.perf_counter()
    out = probe.generate(ids[lo][:, :2], max_new_tokens=steps)
    elapsed = time.perf_counter() - t0 - (per_forward + per_token)  # less the 1-token prefill
    per_step = max(elapsed / max(len(out.new_tokens), 1), per_forward)   # a step reads every weight, as a forward
    _CALIBRATIONS[key] = Calibration(per_forward, per_token, per_step)
    return _CALIBRATIONS[key]


def format_seconds(s: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h``: an estimate's own precision."""
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def describe_estimate(work: "Work", seconds: float) -> str:
    """The sentence the CLI prints and the dashboard shows before a long run."""
    return (f"estimated time ~{format_seconds(seconds)} on this machine ({work.forwards} forwards, "
            f"{work.tokens:,.0f} tokens, up to {work.generated} generated tokens)")


class _FirstCall(BaseException):
    """Raised by ``_FirstCallProbe`` at the first model call; a BaseException so that an
    analysis's own ``except Exception`` cannot swallow it."""

    def __init__(self, ids):
        self.ids = ids


class _FirstCallProbe:
    """Probe stand-in for ``Analysis.inputs``: raises ``_FirstCall`` with the input of the first
    model call (``run`` covers helpers written on the primitive, e.g. ``sweep_heads_states``)."""

    _CALLS = ("run", "forward", "generate", "sweep_heads", "patch_sweep")

    def __init__(self, probe):
        self.probe = probe

    def __getattr__(self, name):
        if name in self._CALLS:
            def call(input_ids, *a, **kw):
                raise _FirstCall(input_ids)
            return call
        return getattr(self.probe, name)


class Analysis:
    """Subclass, set the class attributes, implement the three steps, decorate with @register."""

    name: str = ""
    description: str = ""
    options: tuple[Option, ...] = ()
    needs_data: bool = False
    takes_data: bool = True     # False: the analysis makes its own inputs; --data is refused, not ignored
    length_flag: str = ""       # the option that bounds input length, named when an input exceeds the context
    data_help: str = ""
    # why examples cannot be split across processes (one depends on those before it); "" if they can
    sequential: str = ""
    # why its forward needs more than the token ids of ``inputs`` (image features...), so a stored
    # example pattern would show another computation; "" if the ids alone reproduce it
    no_pattern: str = ""
    headline_score: str = ""    # the score whose top head a run's example pattern shows ("": the first per-head one)

    def examples(self, ctx: RunContext) -> Iterable[Example]:
        raise NotImplementedError

    def process(self, ctx: RunContext, ex: Example) -> ExampleOutput:
        raise NotImplementedError

    def finalize(self, ctx: RunContext, agg: Aggregator, records: list[dict]) -> Finalized:
        raise NotImplementedError

    def process_batch(self, ctx: RunContext, examples: list[Example]) -> list[ExampleOutput]:
        """The outputs of ``examples`` in order, as ``process`` gives them one by one (the default).

        Override where several examples can share one forward (equal lengths, or padding every
        statistic ignores); the run loop then hands over ``--batch-size`` examples at a time. An
        override must return exactly one output per example, equal to ``process``'s up to float
        rounding: the runner folds and records them as if processed singly."""
        return [self.process(ctx, ex) for ex in examples]

    @classmethod
    def batches_examples(cls) -> bool:
        """True if the analysis overrides ``process_batch`` (``--batch-size`` examples per forward)."""
        return cls.process_batch is not Analysis.process_batch

    def example_memory(self, ctx: RunContext, ex: Example) -> int:
        """Bytes one example adds to a batched forward: the forward's activations for its tokens
        plus every position's logits (``forward_memory``). Override to add what ``process``
        captures (patterns, activations); the auto ``--batch-size`` divides free memory by the
        largest of these. Default: tokens of ``inputs(ctx, ex)``."""
        ids = self.inputs(ctx, ex)                                   # [T] or [B, T]
        n_tokens = int(np.prod(np.shape(ids)))
        return forward_memory(ctx, n_tokens, logits=n_tokens)

    def inputs(self, ctx: RunContext, ex: Example):
        """The token ids this analysis feeds the model first for ``ex`` ([T] or [B, T]).

        The app's half of the analysis -> app contract (with ``process`` for per-example arrays):
        the dashboard opens an example of a stored run with these ids and never recomputes a
        score itself. Default: run ``process`` on a probe that stops at the first model call (no
        forward pass). Override when that first call is not the input worth showing. Raises
        ``HeadscopeError`` if ``process`` makes no model call.
        """
        try:
            self.process(replace(ctx, probe=_FirstCallProbe(ctx.probe)), ex)
        except _FirstCall as got:
            return got.ids
        raise HeadscopeError(f"{self.name} ran no model call for {ex.id}")

    def example_work(self, ctx: RunContext, ex: Example) -> Work:
        """The model work of ``process(ctx, ex)``. Default: one forward of ``inputs(ctx, ex)``
        (right for analyses that run each example once); override where ``process`` does more."""
        ids = self.inputs(ctx, ex)                                   # [T] or [B, T]
        return Work.forward(*((1,) + tuple(np.shape(ids)))[-2:])

    def estimate(self, ctx: RunContext, examples: list[Example]) -> Work:
        """The whole run's model work, before any forward: the examples' work plus any one-time
        work (override to add it). Costs tokenizing and ``inputs`` per example, no model call.
        With ``process_batch``, the examples of one batch with the same work (one length) share
        their forwards, as ``induction`` and ``sinks`` batch them."""
        per = ctx.options["batch_size"] if self.batches_examples() else 1
        total = Work()
        for i in range(0, len(examples), per):
            works = [self.example_work(ctx, ex) for ex in examples[i:i + per]]
            shared = {(w.forwards, w.tokens) for w in works}
            total += Work(sum(f for f, _ in shared), sum(w.tokens for w in works), sum(w.generated for w in works))
        return total

    def user_error(self, e: HeadscopeError) -> HeadscopeError:
        """``e`` in the CLI's words: an input longer than the model's context names this analysis's
        length option (``length_flag``). The run loop and every torchrun rank say it the same way."""
        if isinstance(e, ContextTooLong) and self.length_flag:
            return HeadscopeError(f"{e.n_tokens} tokens exceed the model's context of {e.max_context}: "
                                  f"lower {self.length_flag}")
        return e

    @property
    def pattern_skipped(self) -> str:
        """Why a run of this analysis stores no example pattern ("" if it does). Sequential analyses
        do not: their ``inputs`` replays ``process``, whose state depends on the examples before."""
        if self.no_pattern or not self.sequential:
            return self.no_pattern
        return f"its examples depend on earlier ones ({self.sequential})"

    def pattern_work(self, ctx: RunContext, examples: list[Example]) -> Work:
        """The forward of ``example_pattern``: on the first example that makes a model call (a
        skipped one makes none), which is the first used one unless an example fails mid-run."""
        for ex in [] if self.pattern_skipped else examples:
            try:
                return Work.forward(1, _first_row(self.inputs(ctx, ex)).shape[0])
            except HeadscopeError:
                continue
        return Work()

    @classmethod
    def all_options(cls) -> tuple[Option, ...]:
        return COMMON_OPTIONS + tuple(cls.options)

    @classmethod
    def parse_options(cls, raw: dict, gui: bool = False) -> dict:
        """Every option parsed and range-checked; errors name the CLI flag, or with ``gui`` the
        form's label. Runs before any model is loaded."""
        known = {o.name: o for o in cls.all_options()}
        unknown = set(raw) - set(known)
        if unknown:
            raise HeadscopeError(f"{cls.name}: unknown option(s) {', '.join(sorted(unknown))}")
        return {name: o.parse(raw.get(name), o.label if gui else None) for name, o in known.items()}

    def check(self, opts: dict, info) -> None:
        """Refuse options the loaded model cannot take (``info``: its ModelInfo), before
        ``examples`` allocates anything. Override for memory-heavy options."""


PATTERN_ROWS = 64   # query rows of a run's stored example pattern: the example's last ones


def _first_row(ids):
    """[T] int64 tensor: the first row of ``Analysis.inputs``' ids ([T] or [B, T])."""
    import torch
    ids = torch.as_tensor(ids)
    return ids[0] if ids.ndim == 2 else ids


def example_pattern(analysis: "Analysis", ctx: RunContext, examples: list[Example], records: list[dict],
                    fin: "Finalized") -> tuple[dict, np.ndarray | None]:
    """(what it shows, ``[R, T]`` attention rows) of the run's headline head on its first used example.

    Reports show it next to the scores, so a reader sees what the top head does on a real input
    without a model. Headline: the first per-query-head score of ``fin`` (or
    ``Analysis.headline_score``), its top head by the one ranking rule (``heads.ranked_heads``,
    NaN last). Rows: the last ``PATTERN_ROWS`` queries of the example's ``inputs`` (the ids the
    dashboard opens for it) over all its keys, captured for that layer only (memory R x T x H
    floats, whatever T is). One extra forward, counted by ``pattern_work``. Nothing is stored, with
    the reason, when the analysis says so (``pattern_skipped``), has no per-query-head score or no
    used example, or when the forward fails (HeadscopeError or out of memory): a view never fails a
    finished run.
    """
    import torch

    from headscope.heads import head_label, ranked_heads
    from headscope.kernels import StatsSpec
    if analysis.pattern_skipped:
        return {"skipped": analysis.pattern_skipped}, None
    per_head = [k for k, v in fin.scores.items() if np.ndim(v) == 2
                and getattr(fin.score_meta.get(k), "index", "query_head") == "query_head"]
    name = analysis.headline_score if analysis.headline_score in per_head else next(iter(per_head), None)
    used = next((r["id"] for r in records if not r.get("skip")), None)
    ex = next((e for e in examples if e.id == used), None)
    if name is None or ex is None:
        return {"skipped": "no per-query-head score" if name is None else "no used example"}, None
    ranked = ranked_heads(fin.scores[name], 1, finite=True)
    if not ranked:
        return {"skipped": f"{name} has no finite value"}, None
    (layer, head), = ranked
    try:
        ids = _first_row(analysis.inputs(ctx, ex)).long()                            # [T]
        T = ids.shape[0]
        a = max(0, T - PATTERN_ROWS)
        with ctx.probe.capture(stats=StatsSpec(pattern_rows=(a, T)), layers=[layer]) as cap:
            ctx.probe.forward(ids[None], logits_to_keep=1)
        rows = cap.stats[layer]["pattern"][0, head].float().cpu().numpy()        # [T - a, T]
    except (HeadscopeError, torch.OutOfMemoryError, MemoryError) as e:
        return {"skipped": f"{type(e).__name__}: {e}"}, None
    tok = ctx.lm.tokenizer
    return {"example": ex.id, "score": name, "head": head_label(layer, head), "layer": layer, "head_index": head,
            "value": float(fin.scores[name][layer, head]), "rows": [a, T],
            "tokens": [tok.decode([int(i)]) for i in ids] if T <= 2048 else None}, rows


MEMORY_FRACTION = 0.5   # of the free memory a run may plan to use (the rest: other processes, allocator slack)
# On CPU a batch past about a thousand tokens only adds memory traffic: benchmarks/bench_batch.py
# (smollm2, 1 thread) peaks at 4-8 induction sequences of 129 tokens and 8-16 sinks inputs of 64.
CPU_TOKENS_PER_FORWARD = 1024


def available_memory(device="cpu") -> int | None:
    """Bytes free now on ``device``: ``torch.cuda.mem_get_info`` on CUDA, Linux ``MemAvailable``
    for the CPU; None where it cannot be read (mps, another OS)."""
    dev = str(device)
    if dev.startswith("cuda"):
        import torch
        return int(torch.cuda.mem_get_info(torch.device(dev))[0])
    if dev != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def forward_memory(ctx: RunContext, n_tokens: int, logits: int) -> int:
    """Bytes a forward holds per example beyond the weights, for ``n_tokens`` tokens and
    ``logits`` positions of logits: a layer's transient tensors (residual, norms, q/k/v/o and
    their rotated copies, hooks' copies: ~24 x d_model; the MLP's gate/up/activation/product:
    4 x its width) in the model dtype, and float32 logits twice (the model's output and the
    capture's or caller's copy). Sized from peak RSS on smollm2 (``benchmarks/bench_batch.py``).
    The attention scores are not per example: the chunked kernels bound their buffer (~32 MB)
    whatever the batch. Long-vocab models are dominated by logits unless the analysis keeps only
    the last position's."""
    info = ctx.info
    width = getattr(getattr(ctx.lm.model, "config", None), "intermediate_size", None) or 4 * info.d_model
    elem = getattr(getattr(ctx.lm.model, "dtype", None), "itemsize", 4)
    return n_tokens * (24 * info.d_model + 4 * width) * elem + 2 * logits * info.vocab_size * 4


def batch_plan(analysis: "Analysis", ctx: RunContext, examples: list[Example], requested: int | None) -> dict:
    """``--batch-size`` (``requested``; None = auto) resolved for this run: ``{"batch_size",
    "requested", "per_forward", ...}`` (run.json's ``batching`` entry; ``per_forward``: examples
    the run loop hands ``process_batch`` at once). An integer is kept. ``auto`` is 1 for an
    analysis that processes one example per forward (ships/gships/circuit read the option as
    their own rows / pairs, 1 as before), else ``MEMORY_FRACTION`` of ``available_memory`` divided by the largest
    ``example_memory`` of ``examples``, within 1..1024, ``evened`` over the examples; 1
    where free memory cannot be read. On the CPU also at most ``CPU_TOKENS_PER_FORWARD`` tokens
    per forward (by ``example_work``), where larger batches are slower. The estimate is rough
    (``forward_memory``, within 0.8-1.2x of measured peaks): an allocator's fragmentation or
    another process's growth can still exhaust memory; pass an integer then. An integer whose
    estimate exceeds the fraction is kept (the user may know better) with a warning in the log."""
    batches = analysis.batches_examples()
    if requested is not None or not batches:
        size = requested or 1
        if batches and size > 1:
            avail = available_memory(ctx.probe.device)
            need = size * max(analysis.example_memory(ctx, ex) for ex in examples)
            if avail is not None and need > avail * MEMORY_FRACTION:
                ctx.log(f"warning: --batch-size {size} needs about {need / 2**30:.1f} GiB, more than half the "
                        f"{avail / 2**30:.1f} GiB free; if the run runs out of memory, lower it or use auto")
        return {"batch_size": size, "requested": requested or "auto", "per_forward": size if batches else 1}
    avail = available_memory(ctx.probe.device)
    need = max(analysis.example_memory(ctx, ex) for ex in examples)
    size = 1 if avail is None else int(min(max(avail * MEMORY_FRACTION // max(need, 1), 1), 1024, len(examples)))
    plan = {"requested": "auto", "example_bytes": int(need), "available_bytes": avail, "fraction": MEMORY_FRACTION}
    if str(ctx.probe.device) == "cpu":
        tokens = max(analysis.example_work(ctx, ex).tokens for ex in examples)
        size = min(size, max(int(CPU_TOKENS_PER_FORWARD // max(tokens, 1)), 1))
        plan["cpu_tokens_per_forward"] = CPU_TOKENS_PER_FORWARD
    size = evened(len(examples), size)
    return {"batch_size": size, "per_forward": size, **plan}


def evened(n: int, size: int, ways: int = 1) -> int:
    """The smallest batch size that processes ``n`` examples in as many rounds of ``ways``
    batches of ``size`` as ``size`` itself needs: 24 by 7 (7, 7, 7, 3) become 6 (6, 6, 6, 6), so
    no rank waits through a round on a short last batch."""
    rounds = -(-n // (ways * size))
    return max(-(-n // (ways * rounds)), 1)


def check_memory(n_bytes: int, flag: str) -> None:
    """Refuse a run whose per-example buffer alone exceeds ``MEMORY_FRACTION`` of the memory
    available now (``available_memory`` of the CPU; unchecked where it cannot be read)."""
    avail = available_memory("cpu")
    if avail is None:
        return
    if n_bytes > avail * MEMORY_FRACTION:
        raise HeadscopeError(f"{flag}: needs about {n_bytes / 2**30:.1f} GiB per example, more than half the "
                             f"{avail / 2**30:.1f} GiB available; choose a smaller {flag}")


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
                 on_progress: Callable[[int, int | None], None] | None = None, ranks=None,
                 on_estimate: Callable[[Work, float], None] | None = None) -> Run | None:
    """Run analysis ``name`` on ``model`` and write a run folder; returns the Run.

    ``ranks`` (a ``distributed.Ranks``, as ``distributed.init_from_env`` makes under torchrun)
    shards the examples across processes; every rank calls this with the same arguments, only
    rank 0 takes the lease, writes the folder and returns the Run, the others return None.

    ``lm``/``probe`` may be passed to reuse an already loaded model (the app does). Options are
    range-checked before the model loads, and the run folder's lease (``store.RunLease``) is taken
    before it too, so a second writer is refused at once; the lease is held until this returns.
    Errors in user input raise HeadscopeError before ``run.json`` is written. Bad data met mid-run,
    a full disk or Ctrl-C/SIGTERM (raised as ``Interrupted``, a HeadscopeError) leave a ``partial``
    run that ``resume=True`` continues once fixed; any other crash leaves ``failed`` with its traceback.
    ``on_estimate(work, seconds)``, when given, hears the run's estimated work and time on this
    machine (``calibrate``: a few short forwards, once per model) before the first example.
    """
    cls, opts = validate_request(name, data, options)
    if ranks is not None and opts["device_map"]:
        raise HeadscopeError("--device-map places one model copy across devices; under torchrun each rank "
                             "takes one device (--device cuda): use one or the other")
    if ranks is not None and cls.sequential:
        raise HeadscopeError(f"{name} cannot be split across processes ({cls.sequential}); run it without torchrun")
    writer = ranks is None or ranks.rank == 0   # only rank 0 touches the folder
    if writer:
        out = Path(out) if out else default_runs_dir() / new_run_id(name, lm.name if lm is not None else str(model))
    with RunLease.acquire(out) if writer else contextlib.nullcontext():
        if writer and resume and not (out / "run.json").exists():   # the cheap refusals before the model loads
            raise HeadscopeError(f"--resume given but {out} holds no run")
        if writer and not resume and (out / "run.json").exists():
            raise HeadscopeError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        placement = None
        if lm is None:
            import torch

            from headscope.probe import load_model
            from headscope.probe.placement import placement_of
            device = ranks.device(opts["device"]) if ranks is not None else opts["device"]
            lm = load_model(model, device=device, dtype=getattr(torch, opts["dtype"]), device_map=opts["device_map"],
                            offload_dir=opts["offload_dir"])
            placement = placement_of(lm.model) if opts["device_map"] else None
        elif opts["device_map"]:   # a model loaded already (the dashboard's): dispatch it
            from headscope.probe.placement import place
            placement = place(lm.model, opts["device_map"], offload_dir=opts["offload_dir"])
        if probe is None:
            from headscope.probe import Probe
            probe = Probe(lm)
        analysis, ctx, examples, plan = _prepared(cls, opts, lm, probe, data, log)
        if ranks is not None:   # every rank takes the same number per round: the smallest any chose
            plan = ranks.agree(plan, len(examples))
            ctx.options["batch_size"] = plan["batch_size"]
        if on_estimate is not None and writer:
            try:   # an analysis whose examples make no model call (a toy, a stand-in) has no estimate
                estimated = _estimated(analysis, ctx, examples, lm, probe)
            except HeadscopeError as e:
                log(f"no cost estimate: {e}")
            else:
                on_estimate(*estimated)
        planned = [(example_digest(ex.id, ex.data), ex.id) for ex in examples]
        import datetime as _dt
        meta = {
            "analysis": name,
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "model": _model_meta(lm),
            "config": {**ctx.options, "data": str(data) if data else None},   # batch_size as resolved
            "inputs": {"data_sha256": _data_sha256(Path(data)) if data else None,
                       "weights": _weights_identity(lm), "n_planned": len(examples)},
            "versions": versions(),
            "placement": placement,
        }
        if not writer:
            ranks.follow(analysis, ctx, examples, planned, per=plan["per_forward"])
            return None
        run, resumed = create_run(out, meta, resume=resume, planned=planned)
        return _execute(run, resumed, analysis, ctx, examples, planned, plan=plan, progress=progress, log=log,
                        on_progress=on_progress, ranks=ranks)


def validate_request(name: str, data, options: dict | None, gui: bool = False) -> tuple[type[Analysis], dict]:
    """The analysis class and its parsed options, with ``data`` checked against what it takes.

    ``gui``: errors name the dashboard form's fields ("data file", option labels) instead of the
    CLI's flags; the CLI, the API and the New run page share this one check."""
    cls = get_analysis(name)
    opts = cls.parse_options(options or {}, gui=gui)
    field = "a data file" if gui else "--data"
    if cls.needs_data and not data:
        raise HeadscopeError(f"{name} needs {field} ({cls.data_help or 'a dataset file'})")
    if not cls.takes_data and data:
        raise HeadscopeError(f"{name} reads no data ({cls.data_help}); drop {field}")
    if data and not Path(data).exists():
        raise HeadscopeError(f"data file not found: {data}" + ("" if gui else " (--data)"))
    return cls, opts


def _prepared(cls: type[Analysis], opts: dict, lm, probe, data, log
              ) -> tuple[Analysis, RunContext, list[Example], dict]:
    """The analysis, its context, its (limited) examples and its ``batch_plan``: everything before
    the first forward. ``ctx.options["batch_size"]`` is the resolved size; an analysis that does
    not batch examples sees 1 for auto already in ``examples`` (circuit sizes its examples by it)."""
    analysis = cls()
    analysis.check(opts, lm.info)
    batches = cls.batches_examples()
    options = {**opts, "batch_size": opts["batch_size"] or (None if batches else 1)}
    ctx = RunContext(lm=lm, probe=probe, options=options, data_path=Path(data) if data else None, log=log)
    examples = list(analysis.examples(ctx))  # validates the data before any write
    if opts["limit"] is not None:
        examples = examples[: opts["limit"]]
    if not examples:
        raise HeadscopeError(f"{cls.name}: no examples to process (empty dataset?)")
    plan = batch_plan(analysis, ctx, examples, requested=opts["batch_size"])
    ctx.options["batch_size"] = plan["batch_size"]
    return analysis, ctx, examples, plan


def estimate_run(name: str, lm, probe, *, data: str | Path | None = None,
                 options: dict | None = None) -> tuple[Work, float]:
    """(work, seconds on this machine) of ``run_analysis(name, ...)`` with these arguments, without
    running it or writing anything: what the dashboard shows before it launches a run. Raises the
    HeadscopeError the run itself would raise for bad options or data."""
    cls, opts = validate_request(name, data, options)
    analysis, ctx, examples, _ = _prepared(cls, opts, lm, probe, data, log=lambda msg: None)
    return _estimated(analysis, ctx, examples, lm, probe)


def _estimated(analysis: Analysis, ctx: RunContext, examples: list[Example], lm, probe) -> tuple[Work, float]:
    """(work, seconds on this machine) of a prepared run: its examples and the stored example pattern."""
    work = analysis.estimate(ctx, examples) + analysis.pattern_work(ctx, examples)
    return work, calibrate(lm, probe).seconds(work)


def _execute(run: Run, resumed: bool, analysis: Analysis, ctx: RunContext, examples: list[Example],
             planned: list[tuple[str, str]], *, plan: dict, progress: bool, log, on_progress, ranks=None) -> Run:
    """The run loop: ``process_batch`` on ``plan["per_forward"]`` examples at a time, fold and
    append in example order, checkpoint per batch (with ``ranks``: per round of one batch per
    rank, ``Ranks.lead``); then finalize and publish. The finished examples stay a prefix of the
    list whatever the batch size, so a resume may use another one."""
    state, done = run.load_checkpoint() if resumed else ({}, [])
    agg = Aggregator.from_state(state)
    timings = run.meta.setdefault("timings", {})
    t0 = time.time()
    todo = list(zip(examples, planned))[len(done):]   # create_run checked done == planned[:len(done)]
    hint = f"--resume --out {run.path}"
    if resumed:
        log(f"resuming {run.path}: {len(done)} done, {len(todo)} to go")
    run.meta.setdefault("batching", []).append({"start": len(done), **plan})   # per segment (start, resumes)
    if ranks is not None or "shards" in run.meta:   # which process did which examples, per segment
        run.meta.setdefault("shards", []).append(
            {"start": len(done), **(ranks.describe() if ranks is not None else {"world_size": 1})})
    run.save_meta()
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(examples), initial=len(done), desc=analysis.name, unit="ex", disable=not progress)
        per = plan["per_forward"]
        if ranks is not None:
            agg = ranks.lead(analysis, ctx, todo, agg, done, run, per=per, bar=bar, on_progress=on_progress)
        else:
            for i in range(0, len(todo), per):
                chunk = todo[i:i + per]
                outs = processed(analysis, ctx, [ex for ex, _ in chunk])
                for res in outs:
                    agg.add_output(res)
                commit_round(run, agg, chunk, [example_record(ex, res) for (ex, _), res in zip(chunk, outs)], done,
                             bar=bar, on_progress=on_progress, total=len(examples))
        bar.close()
        records = run.examples()
        if records and all(r.get("skip") for r in records):
            reasons = sorted({str(r.get("skip_reason") or "no reason recorded") for r in records})
            raise AllSkipped(f"all {len(records)} examples were skipped ({'; '.join(reasons[:3])}): nothing to score; "
                             "fix the data or options and start a new run (resuming would skip them again)")
        fin = analysis.finalize(ctx, agg, records)
        run.meta["example_pattern"], pattern = example_pattern(analysis, ctx, examples, records, fin)
        arrays = {**fin.arrays, **({} if pattern is None else {"example_pattern": pattern})}
        run.meta["scores"] = {k: np.asarray(v, dtype=np.float64).tolist() for k, v in fin.scores.items()}
        run.meta["score_meta"] = {k: asdict(v) for k, v in fin.score_meta.items()}
        run.meta["summary"] = fin.summary
        run.meta["n_examples"] = len(done)
        run.meta["n_used"] = sum(1 for r in records if not r.get("skip"))
        if arrays:
            atomic_write_npz(run.path / "arrays.npz", {k: np.asarray(v) for k, v in arrays.items()})
            run.meta["arrays"] = "arrays.npz"
            run.meta["array_shapes"] = {k: list(np.shape(v)) for k, v in arrays.items()}
        _mark(run, "complete", timings, t0)
        run.drop_checkpoint()
    except AllSkipped as e:
        _mark(run, "empty", timings, t0, error=str(e))
        raise HeadscopeError(str(e)) from None
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM as the CLI raises it
        _mark(run, "partial", timings, t0, error="interrupted")
        raise Interrupted(f"interrupted; {len(done)} of {len(examples)} examples saved. Continue with {hint}",
                          exit_code=143 if isinstance(e, Terminated) else 130) from None
    except HeadscopeError as e:
        e = analysis.user_error(e)
        _mark(run, "partial", timings, t0, error=str(e))
        raise HeadscopeError(f"{e}; the {len(done)} finished examples are kept: fix this, then continue "
                             f"with {hint}") from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            _mark(run, "failed", timings, t0, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
            raise
        with contextlib.suppress(OSError):   # may fail too; the released lease then shows it interrupted
            _mark(run, "partial", timings, t0, error="disk full")
        raise HeadscopeError(f"disk full while writing {run.path}; free space, then continue with {hint}") from None
    except Exception as e:
        _mark(run, "failed", timings, t0, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc())
        raise
    return run


def processed(analysis: Analysis, ctx: RunContext, examples: list[Example]) -> list[ExampleOutput]:
    """``analysis.process_batch`` with its one-output-per-example contract checked."""
    outs = analysis.process_batch(ctx, examples)
    if len(outs) != len(examples):
        raise RuntimeError(f"{analysis.name}.process_batch returned {len(outs)} outputs for {len(examples)} examples")
    return outs


def commit_round(run: Run, agg: Aggregator, chunk: list, records: list[dict], done: list, *, bar, on_progress,
                 total: int) -> None:
    """Append a round's records in order, checkpoint ``agg`` with them, advance the progress
    (the single-process loop and the distributed lead share it)."""
    for (_, key), rec in zip(chunk, records):
        run.append_example(rec)
        done.append(key)
    run.save_checkpoint(agg.state(), done)
    bar.update(len(chunk))
    if on_progress:
        on_progress(len(done), total)


def example_record(ex: Example, res: ExampleOutput) -> dict:
    """The line ``examples.jsonl`` stores for one processed example."""
    return {"id": ex.id, "skip": res.skip, **res.details}


class AllSkipped(Exception):
    """Every example of a run was skipped: there is nothing to finalize (status ``empty``)."""


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


def _data_sha256(path: Path) -> str:
    """sha256 of the data as read: a file's bytes, or a folder's files (names and bytes) in order."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _weights_identity(lm) -> str | None:
    """Cheap identity of the weights on disk: a registry cache's marker (it names the source
    file's sha256), else each ``*.safetensors`` file's name, size and mtime plus ``config.json``.
    None for a model with no folder (tests' stand-ins, hub objects)."""
    where = getattr(lm.info, "path", None)
    if not where or not Path(where).is_dir():
        return None
    folder = Path(where)
    from headscope.probe.models import CACHE_MARKER
    h = hashlib.sha256()
    if (folder / CACHE_MARKER).is_file():
        h.update((folder / CACHE_MARKER).read_bytes())
    else:
        for f in sorted(folder.glob("*.safetensors")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        if (folder / "config.json").is_file():
            h.update((folder / "config.json").read_bytes())
    return h.hexdigest()[:16]
