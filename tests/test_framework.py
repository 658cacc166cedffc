"""The analysis framework and run store: aggregation, resume after a crash, atomic files, errors."""
from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest

from headscope.analyses import base
from headscope.analyses.base import (Aggregator, Analysis, Example, ExampleOutput, Finalized, Option,
                                     RunningMean, ScoreMeta, register, run_analysis)
from headscope.analyses.datasets import load_records, load_texts
from headscope.analyses.store import list_runs, load_run, resolve_run, safe_join
from headscope.errors import HeadscopeError


@dataclass
class _Info:
    name: str = "fake"
    n_layers: int = 2
    n_heads: int = 3
    n_kv_heads: int = 1


FAKE_LM = SimpleNamespace(name="fake", info=_Info())


class Boom(Exception):
    pass


CRASH_AT = {"index": -1}  # set by a test to simulate a crash mid-run


@register
class _Toy(Analysis):
    """Per example i: a [2, 3] array filled from a seeded RNG; optionally crashes at one index."""

    name = "_toy"
    options = (Option("n", int, 6, "examples"),)

    def examples(self, ctx):
        return [Example(id=f"e{i}", data=i) for i in range(ctx.options["n"])]

    def process(self, ctx, ex):
        if ex.data == CRASH_AT["index"]:
            raise Boom("simulated crash")
        x = np.random.default_rng(1000 + ex.data).normal(size=(2, 3))
        return ExampleOutput(arrays={"s": x}, details={"first": float(x[0, 0])}, skip=ex.data == 4)

    def finalize(self, ctx, agg, records):
        return Finalized(scores={"s": agg["s"].mean}, score_meta={"s": ScoreMeta("toy")},
                         arrays={"std": agg["s"].std})


def _expected(n, skip=(4,)):
    xs = [np.random.default_rng(1000 + i).normal(size=(2, 3)) for i in range(n) if i not in skip]
    return np.mean(xs, axis=0), np.std(xs, axis=0)


def test_running_mean_matches_numpy_and_roundtrips():
    rng = np.random.default_rng()
    xs = rng.normal(size=(17, 4, 5))
    rm = RunningMean()
    for x in xs[:9]:
        rm.add(x)
    rm2 = RunningMean.from_state(rm.state("a"), "a")
    for x in xs[9:]:
        rm2.add(x)
    np.testing.assert_allclose(rm2.mean, xs.mean(0), rtol=1e-12)
    np.testing.assert_allclose(rm2.std, xs.std(0), rtol=1e-9, atol=1e-12)
    with pytest.raises(HeadscopeError):
        rm2.add(np.full((4, 5), np.nan))


def test_running_mean_keeps_the_variance_far_from_zero_and_weights():
    """Scores near 1e8 with unit spread: sumsq/n - mean^2 loses every digit of the variance there;
    the Welford update must match numpy's two-pass std. weight=w equals adding the array w times.
    A state in the old sum/sumsq form (partial runs from before) still resumes."""
    rng = np.random.default_rng()
    xs = 1e8 + rng.normal(size=(50, 3))
    w = rng.integers(1, 4, size=50)
    rm = RunningMean()
    for x, k in zip(xs, w):
        rm.add(x, weight=int(k))
    rep = np.repeat(xs, w, axis=0)
    np.testing.assert_allclose(rm.mean, rep.mean(0), rtol=1e-14)
    np.testing.assert_allclose(rm.std, rep.std(0), rtol=1e-6)
    old = {"a.n": np.array(len(xs[:5])), "a.sum": (xs[:5] - 1e8).sum(0), "a.sumsq": ((xs[:5] - 1e8) ** 2).sum(0)}
    resumed = RunningMean.from_state(old, "a")
    for x in xs[5:] - 1e8:
        resumed.add(x)
    np.testing.assert_allclose(resumed.mean, (xs - 1e8).mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(resumed.std, (xs - 1e8).std(0), rtol=1e-9)


def test_aggregator_state_roundtrip():
    agg = Aggregator()
    agg.add("a.b", np.ones((2, 2)))
    agg.add("c", np.arange(3.0))
    agg2 = Aggregator.from_state(agg.state())
    assert set(agg2.stats) == {"a.b", "c"}
    np.testing.assert_array_equal(agg2["c"].mean, np.arange(3.0))


def test_run_complete_schema(tmp_path):
    run = run_analysis("_toy", lm=FAKE_LM, probe=object(), out=tmp_path / "r", progress=False)
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["status"] == "complete"
    assert meta["analysis"] == "_toy"
    assert meta["model"]["n_layers"] == 2 and meta["model"]["n_kv_heads"] == 1
    assert meta["config"]["n"] == 6 and meta["config"]["seed"] == 0
    assert {"python", "numpy"} <= set(meta["versions"])
    assert "run_s" in meta["timings"]
    mean, std = _expected(6)
    np.testing.assert_allclose(np.array(meta["scores"]["s"]), mean, rtol=1e-12)
    np.testing.assert_allclose(run.arrays()["std"], std, rtol=1e-9)
    assert meta["n_examples"] == 6 and meta["n_used"] == 5
    assert [r["id"] for r in run.examples()] == [f"e{i}" for i in range(6)]


def test_crash_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    out = tmp_path / "r"
    monkeypatch.setitem(CRASH_AT, "index", 3)
    with pytest.raises(Boom):
        run_analysis("_toy", lm=FAKE_LM, probe=object(), out=out, progress=False)
    meta = load_run(out).meta
    assert meta["status"] == "failed" and "Boom" in meta["error"]
    # a torn line after the last checkpoint must be dropped on resume
    with open(out / "examples.jsonl", "a") as f:
        f.write('{"id": "e3", "first": 1')
    with pytest.raises(HeadscopeError, match="options differ"):
        run_analysis("_toy", lm=FAKE_LM, probe=object(), out=out, options={"n": 7}, resume=True, progress=False)
    monkeypatch.setitem(CRASH_AT, "index", -1)
    seen = []
    run = run_analysis("_toy", lm=FAKE_LM, probe=object(), out=out, resume=True, progress=False,
                       on_progress=lambda done, total: seen.append(done))
    assert seen == [4, 5, 6]  # only e3..e5 were processed again
    assert run.meta["status"] == "complete"
    np.testing.assert_allclose(run.scores()["s"], _expected(6)[0], rtol=1e-12)
    assert [r["id"] for r in run.examples()] == [f"e{i}" for i in range(6)]


def test_refuses_overwrite_and_bad_resume(tmp_path):
    out = tmp_path / "r"
    run_analysis("_toy", lm=FAKE_LM, probe=object(), out=out, progress=False)
    with pytest.raises(HeadscopeError, match="already holds a run"):
        run_analysis("_toy", lm=FAKE_LM, probe=object(), out=out, progress=False)
    with pytest.raises(HeadscopeError, match="already complete"):
        run_analysis("_toy", lm=FAKE_LM, probe=object(), out=out, resume=True, progress=False)
    with pytest.raises(HeadscopeError, match="holds no run"):
        run_analysis("_toy", lm=FAKE_LM, probe=object(), out=tmp_path / "none", resume=True, progress=False)


def test_option_errors():
    with pytest.raises(HeadscopeError, match="unknown analysis"):
        base.get_analysis("nope")
    with pytest.raises(HeadscopeError, match="expected int"):
        _Toy.parse_options({"n": "many"})
    with pytest.raises(HeadscopeError, match="unknown option"):
        _Toy.parse_options({"bogus": 1})
    with pytest.raises(HeadscopeError, match="not one of"):
        _Toy.parse_options({"dtype": "int8"})
    assert Option("xs", list, [], "").parse("1, 2,") == ["1", "2"]


def test_list_resolve_and_confinement(tmp_path):
    run_analysis("_toy", lm=FAKE_LM, probe=object(), out=tmp_path / "a", progress=False)
    assert [r.id for r in list_runs(tmp_path)] == ["a"]
    assert resolve_run("a", tmp_path).id == "a"
    with pytest.raises(HeadscopeError, match="outside the runs folder"):
        safe_join(tmp_path, "../../etc")
    with pytest.raises(HeadscopeError):
        resolve_run("missing", tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text("{not json")
    assert [r.id for r in list_runs(tmp_path)] == ["a"]  # unreadable runs are skipped
    with pytest.raises(HeadscopeError, match="not valid JSON"):
        load_run(tmp_path / "bad")


def test_dataset_readers(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "hello"}\n\n{"text": "world", "id": 7}\n')
    recs = load_texts(j)
    assert [r["text"] for r in recs] == ["hello", "world"] and recs[1]["id"] == "7"
    t = tmp_path / "d.txt"
    t.write_text("para one\nstill one\n\n\npara two\n")
    assert [r["text"] for r in load_texts(t)] == ["para one\nstill one", "para two"]
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(HeadscopeError, match="empty"):
        load_texts(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(HeadscopeError, match="bad.jsonl:2: not valid JSON"):
        load_texts(tmp_path / "bad.jsonl")
    (tmp_path / "nofield.jsonl").write_text('{"txt": "a"}\n')
    with pytest.raises(HeadscopeError, match="missing field"):
        load_records(tmp_path / "nofield.jsonl", required=("text",))
    with pytest.raises(HeadscopeError, match="not found"):
        load_texts(tmp_path / "nope.jsonl")
