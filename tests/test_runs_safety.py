"""Issue 16: runs that cannot be silently wrong. One test (or group) per numbered case of the issue.

The CLI is exercised through ``main`` in-process, and through real subprocesses where processes
matter (the lease, signals, kill -9). The toy analyses are deterministic functions of their
examples, so every expected score is recomputed here independently with numpy.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from headscope.analyses import base
from headscope.analyses.base import (Analysis, Example, ExampleOutput, Finalized, ScoreMeta, register,
                                     run_analysis)
from headscope.analyses.datasets import load_texts
from headscope.analyses.store import FILE_MODE, RunLease, lease_holder, load_run, scan_runs
from headscope.cli import main
from headscope.errors import HeadscopeError

from .test_framework import FAKE_LM, _expected  # registers the _toy analysis

REPO = Path(__file__).resolve().parents[1]


def _value(text: str) -> np.ndarray:
    """The _texts toy's per-example array: a [2, 3] draw seeded by the text's sha256."""
    seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).normal(size=(2, 3))


@register
class _Texts(Analysis):
    """Reads --data texts; a text 'BAD' is bad data found mid-run; sleeps HEADSCOPE_TOY_SLEEP s each."""

    name = "_texts"
    needs_data = True

    def examples(self, ctx):
        return [Example(id=r["id"], data=r["text"]) for r in load_texts(ctx.data_path)]

    def process(self, ctx, ex):
        time.sleep(float(os.environ.get("HEADSCOPE_TOY_SLEEP", "0")))
        if ex.data == "BAD":
            raise HeadscopeError(f"example {ex.id}: text 'BAD' cannot be scored")
        return ExampleOutput(arrays={"s": _value(ex.data)}, details={"text": ex.data})

    def finalize(self, ctx, agg, records):
        return Finalized(scores={"s": agg["s"].mean}, score_meta={"s": ScoreMeta("toy")})


def _write_texts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _lines(run_dir: Path) -> list[str]:
    return [json.loads(line)["id"] for line in (run_dir / "examples.jsonl").read_text().splitlines()]


@pytest.fixture
def fake_model(monkeypatch):
    """``headscope score`` without a real model: load_model/Probe give the toy stand-ins."""
    import headscope.probe
    monkeypatch.setattr(headscope.probe, "load_model", lambda *a, **k: FAKE_LM)
    monkeypatch.setattr(headscope.probe, "Probe", lambda lm: object())


def _cli(argv: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    """``headscope ARGV`` in a subprocess with the toy analyses registered and no real model."""
    code = ("import sys, headscope.probe, tests.test_runs_safety as t\n"
            "headscope.probe.load_model = lambda *a, **k: t.FAKE_LM\n"
            "headscope.probe.Probe = lambda lm: object()\n"
            "from headscope.cli import main\nsys.exit(main(sys.argv[1:]))")
    return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kw)


def _wait_for(cond, timeout: float = 60.0) -> None:
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def _n_done(run_dir: Path) -> int:
    p = run_dir / "examples.jsonl"
    return len(p.read_text().splitlines()) if p.exists() else 0


# ============================================================================ 1. the run-folder lease
def test_1_second_writer_refused_and_kill9_shows_interrupted(tmp_path, fake_model, capsys):
    """A live writer (a subprocess) holds the folder: a second `score --resume` and a second fresh
    `score` (subprocesses too) are refused naming its pid; after kill -9 the run is `interrupted`
    (not `running`) for `runs`, and --resume completes it with every example exactly once and the
    uninterrupted scores."""
    texts = [f"text number {i}" for i in range(150)]
    data = _write_texts(tmp_path / "d.jsonl", texts)
    out = tmp_path / "runs" / "x"
    a = _cli(["score", "_texts", "--data", str(data), "--out", str(out), "--quiet"],
             env={"HEADSCOPE_TOY_SLEEP": "0.3"})   # 45 s in all; killed long before
    try:
        _wait_for(lambda: _n_done(out) >= 1)
        second = [_cli(["score", "_texts", "--data", str(data), "--out", str(out), "--quiet", *extra])
                  for extra in (["--resume"], [])]
        for b in second:
            _, err = b.communicate(timeout=120)
            assert b.returncode == 2, err
            assert f"being written by process {a.pid}" in err and err.count("\n") == 1
        assert a.poll() is None, "the first writer ended before the second ones were refused"
        assert lease_holder(out)["pid"] == a.pid
        assert load_run(out).status == "running"
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=30)
    finally:
        if a.poll() is None:
            a.kill()
    assert lease_holder(out) is None
    assert main(["--runs-dir", str(out.parent), "runs", "--json"]) == 0
    assert [row["status"] for row in json.loads(capsys.readouterr().out)] == ["interrupted"]
    assert main(["score", "_texts", "--data", str(data), "--out", str(out), "--quiet", "--resume"]) == 0
    run = load_run(out)
    assert run.status == "complete" and run.meta["n_examples"] == len(texts)
    assert _lines(out) == [r["id"] for r in load_texts(data)]
    np.testing.assert_allclose(run.scores()["s"], np.mean([_value(t) for t in texts], axis=0), rtol=1e-12)


def test_1_dashboard_rows_show_interrupted_not_running(tmp_path):
    """views.run_rows (the Runs table) shows a dead writer's run as interrupted, a live one running."""
    from headscope.app import views
    out = tmp_path / "r"
    run_analysis("_toy", lm=FAKE_LM, probe=object(), out=out, progress=False)
    meta = json.loads((out / "run.json").read_text())
    meta["status"] = "running"            # as a kill -9 mid-run leaves it
    (out / "run.json").write_text(json.dumps(meta))
    assert [r["status"] for r in views.run_rows(scan_runs(tmp_path)[0])] == ["interrupted"]
    with RunLease.acquire(out):           # a live writer (another lease) makes it running again
        assert [r["status"] for r in views.run_rows(scan_runs(tmp_path)[0])] == ["running"]


@pytest.mark.parametrize("second_resumes", [False, True])
def test_1_stress_two_writers_never_mix(tmp_path, monkeypatch, second_resumes):
    """Two writers started together into one folder, 20 times: exactly one run results, holding each
    example once, with the scores of one uninterrupted run; the other writer gets a one-line error."""
    from .test_framework import _Toy
    process = _Toy.process

    def slow(self, ctx, ex):
        time.sleep(0.002)
        return process(self, ctx, ex)

    monkeypatch.setattr(_Toy, "process", slow)
    mean, _ = _expected(6)
    for i in range(20):
        out = tmp_path / f"r{i}"
        barrier, results = threading.Barrier(2), [None, None]

        def writer(k: int) -> None:
            barrier.wait()
            try:
                run_analysis("_toy", lm=FAKE_LM, probe=object(), out=out, progress=False,
                             resume=second_resumes and k == 1)
                results[k] = "ok"
            except HeadscopeError as e:
                results[k] = str(e)

        threads = [threading.Thread(target=writer, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results.count("ok") >= 1, results
        for r in results:
            assert r == "ok" or any(s in r for s in ("being written by", "already holds a run", "holds no run",
                                                     "already complete")), r
        run = load_run(out)
        assert run.status == "complete"
        assert _lines(out) == [f"e{j}" for j in range(6)]
        assert run.meta["n_examples"] == 6
        np.testing.assert_allclose(run.scores()["s"], mean, rtol=1e-12)


# ============================================================================ 2. --out never touches foreign files
def test_2_out_refuses_a_folder_that_is_not_a_run(tmp_path, fake_model, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "examples.jsonl").write_text('{"a": 1}\n{"a": 2}\n{"a": 3}\n')
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    for extra in ([], ["--resume"]):
        assert main(["score", "_toy", "--out", str(mine), "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--out" in err
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before   # nothing added, nothing changed
    # an empty folder, or a new one, is fine
    (tmp_path / "empty").mkdir()
    assert main(["score", "_toy", "--out", str(tmp_path / "empty"), "--quiet"]) == 0
    assert main(["score", "_toy", "--out", str(tmp_path / "new" / "deep"), "--quiet"]) == 0


# ============================================================================ 3. resume identity
def _crash_after(monkeypatch, n: int):
    """Make _Texts raise KeyboardInterrupt (as Ctrl-C) before example n."""
    process, seen = _Texts.process, []

    def stop(self, ctx, ex):
        if len(seen) == n:
            raise KeyboardInterrupt
        seen.append(ex.id)
        return process(self, ctx, ex)

    monkeypatch.setattr(_Texts, "process", stop)
    return lambda: monkeypatch.setattr(_Texts, "process", process)


def test_3_resume_refuses_changed_data_and_shrinking_limit(tmp_path, monkeypatch, fake_model, capsys):
    texts = [f"sentence {i}" for i in range(10)]
    data = _write_texts(tmp_path / "d.jsonl", texts)
    out = tmp_path / "r"
    restore = _crash_after(monkeypatch, 3)
    assert main(["score", "_texts", "--data", str(data), "--out", str(out), "--limit", "6", "--quiet"]) == 130
    restore()
    capsys.readouterr()
    # the same path, other content in the 3 finished examples: refused
    _write_texts(data, ["edited"] + texts[1:])
    assert main(["score", "_texts", "--data", str(data), "--out", str(out), "--limit", "6", "--quiet",
                 "--resume"]) == 2
    assert "data changed" in capsys.readouterr().err
    # a smaller --limit: refused
    _write_texts(data, texts)
    assert main(["score", "_texts", "--data", str(data), "--out", str(out), "--limit", "4", "--quiet",
                 "--resume"]) == 2
    assert "--limit may only grow" in capsys.readouterr().err
    # the data moved (same content), --limit grown: resumes, every example once
    moved = data.rename(tmp_path / "moved.jsonl")
    assert main(["score", "_texts", "--data", str(moved), "--out", str(out), "--limit", "8", "--quiet",
                 "--resume"]) == 0
    run = load_run(out)
    assert _lines(out) == [r["id"] for r in load_texts(moved)][:8] and run.meta["n_examples"] == 8
    np.testing.assert_allclose(run.scores()["s"], np.mean([_value(t) for t in texts[:8]], axis=0), rtol=1e-12)


def test_3_resume_refuses_changed_weights(tmp_path):
    @dataclass
    class Info:
        path: str
        name: str = "m"
        n_layers: int = 2
        n_heads: int = 3
        n_kv_heads: int = 1

    mdir = tmp_path / "model"
    mdir.mkdir()
    (mdir / "model.safetensors").write_bytes(b"weights")
    lm = SimpleNamespace(name="m", info=Info(path=str(mdir)))
    out = tmp_path / "r"
    from .test_framework import CRASH_AT, Boom
    CRASH_AT["index"] = 2
    try:
        with pytest.raises(Boom):
            run_analysis("_toy", lm=lm, probe=object(), out=out, progress=False)
    finally:
        CRASH_AT["index"] = -1
    (mdir / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(HeadscopeError, match="weights of model 'm' changed"):
        run_analysis("_toy", lm=lm, probe=object(), out=out, progress=False, resume=True)


# ============================================================================ 4. option ranges, before the model loads
@pytest.mark.parametrize("argv, flag", [
    (["_toy", "--limit", "-1"], "--limit"),
    (["_toy", "--limit", "0"], "--limit"),
    (["_toy", "--batch-size", "0"], "--batch-size"),
    (["_toy", "--batch-size", "-3"], "--batch-size"),
    (["_toy", "--batch-size", "99999999"], "--batch-size"),
    (["_toy", "--seed", "99999999999999999999999"], "--seed"),
    (["_toy", "--seed", "-1"], "--seed"),
    (["_toy", "--device", "meta"], "--device"),
    (["induction", "--seq-len", "0"], "--seq-len"),
    (["induction", "--n-examples", "0"], "--n-examples"),
])
def test_4_out_of_range_options_are_user_errors(argv, flag, tmp_path, monkeypatch, capsys):
    import headscope.probe

    def no_load(*a, **k):
        raise AssertionError("the model must not load for a bad option")

    monkeypatch.setattr(headscope.probe, "load_model", no_load)
    assert main(["score", *argv, "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"headscope: error: {flag}: ") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_4_seq_len_beyond_context_refused_before_allocating(tmp_path, capsys):
    """The tiny model's context is 1024: --seq-len 99999999 is refused by the context check with the
    CLI's flag (not a Python argument), at once, and nothing is written."""
    from .test_app import make_tiny_model_dir
    model = make_tiny_model_dir(tmp_path / "tiny")
    t0 = time.time()
    assert main(["score", "induction", "--model", str(model), "--seq-len", "99999999",
                 "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert time.time() - t0 < 60
    err = capsys.readouterr().err
    assert "--seq-len" in err and "context of 1024" in err and "allow_beyond_context" not in err
    assert not (tmp_path / "r").exists()


def test_4_form_errors_use_gui_labels():
    with pytest.raises(HeadscopeError, match="^batch size: must be at least 1"):
        base.get_analysis("induction").parse_options({"batch_size": 0}, gui=True)
    with pytest.raises(HeadscopeError, match="^--batch-size: must be at least 1"):
        base.get_analysis("induction").parse_options({"batch_size": "0"})


# ============================================================================ 5. one bad run hides nothing
def test_5_unreadable_runs_are_rows_with_reasons(tmp_path, capsys):
    run_analysis("_toy", lm=FAKE_LM, probe=object(), out=tmp_path / "good", progress=False)
    for name, raw in (("latin1", "{\"schema\": \"caf\xe9\"}".encode("latin-1")), ("list", b"[1, 2]"),
                      ("null", b"null")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_bytes(raw)
    assert main(["--runs-dir", str(tmp_path), "runs"]) == 0
    out = capsys.readouterr().out
    assert "good" in out and "complete" in out
    for name, why in (("latin1", "not UTF-8"), ("list", "JSON list"), ("null", "JSON NoneType")):
        row = next(line for line in out.splitlines() if line.startswith(name))
        assert "unreadable" in row and why in row
    assert main(["--runs-dir", str(tmp_path), "runs", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted((r["id"], r["status"]) for r in rows) == [("good", "complete"), ("latin1", "unreadable"),
                                                             ("list", "unreadable"), ("null", "unreadable")]


def test_5_dashboard_pages_survive_damaged_runs(tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from .test_app import make_runs, page
    root = tmp_path / "runs"
    root.mkdir()
    make_runs(root)
    (root / "nul").mkdir()
    (root / "nul" / "run.json").write_text("null")
    (root / "ind-a" / "arrays.npz").write_bytes(b"not a zip file")
    (root / "ind-a" / "examples.jsonl").write_bytes(b"\xff\xfe broken\n")
    monkeypatch.setenv("HEADSCOPE_RUNS", str(root))
    monkeypatch.setenv("HEADSCOPE_MODEL", "synth-model")
    at = page("runs_page").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("cannot be read" in w.value for w in at.warning)
    heads = page("heads_page")
    heads.query_params["run"] = "ind-a"
    heads.run()
    assert not heads.exception, [e.value for e in heads.exception]
    assert any("damaged" in e.value or "unreadable" in e.value for e in heads.error)


# ============================================================================ 6. user mistakes are user errors
def test_6_bad_data_and_model_files_exit_2(tmp_path, fake_model, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    assert main(["score", "_texts", "--data", str(bad), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8" in err and "--data" in err and err.count("\n") == 1


def test_6_broken_model_folders_exit_2(tmp_path, capsys):
    from .test_app import make_tiny_model_dir
    model = make_tiny_model_dir(tmp_path / "tiny")
    cfg = model / "config.json"
    good = cfg.read_text()
    cfg.write_text(good[:-20])
    assert main(["score", "induction", "--model", str(model), "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert "config.json is not valid JSON" in capsys.readouterr().err
    cfg.write_text(good)
    st = next(model.glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[:100])
    assert main(["score", "induction", "--model", str(model), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "damaged safetensors" in capsys.readouterr().err


def test_6_active_range_on_two_layers():
    """Hand-worked: the biggest rise is into the last layer, so the range runs to the end."""
    import torch

    from headscope.analyses.sinks import active_range
    assert active_range(torch.tensor([1.0, 5.0])) == (1, 2)
    assert active_range(torch.tensor([1.0, 5.0, 6.0, 2.0])) == (1, 3)   # rise at 1, largest drop into 3
    assert active_range(torch.tensor([3.0])) == (0, 1)


def test_6_sinks_runs_on_a_two_layer_model(tmp_path, capsys):
    from .test_app import make_tiny_model_dir
    model = make_tiny_model_dir(tmp_path / "tiny")
    assert main(["score", "sinks", "--model", str(model), "--input", "random", "--n-examples", "2", "--T", "16",
                 "--out", str(tmp_path / "r"), "--quiet"]) == 0, capsys.readouterr().err
    assert load_run(tmp_path / "r").status == "complete"


def test_6_bad_data_mid_run_is_resumable_once_fixed(tmp_path, fake_model, capsys):
    texts = ["alpha", "beta", "BAD", "delta"]
    data = _write_texts(tmp_path / "d.jsonl", texts)
    out = tmp_path / "r"
    assert main(["score", "_texts", "--data", str(data), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot be scored" in err and "--resume" in err and err.count("\n") == 1
    assert load_run(out).status == "partial"
    texts[2] = "gamma"
    _write_texts(data, texts)
    assert main(["score", "_texts", "--data", str(data), "--out", str(out), "--quiet", "--resume"]) == 0
    run = load_run(out)
    assert run.status == "complete" and _lines(out) == [r["id"] for r in load_texts(data)]
    np.testing.assert_allclose(run.scores()["s"], np.mean([_value(t) for t in texts], axis=0), rtol=1e-12)


def test_6_internal_error_exit_1_with_saved_traceback(tmp_path, monkeypatch, fake_model, capsys):
    from .test_framework import CRASH_AT
    monkeypatch.setitem(CRASH_AT, "index", 1)
    assert main(["score", "_toy", "--out", str(tmp_path / "r"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error" in err
    saved = Path(err.split("traceback saved to ")[1].rstrip(")\n"))
    text = saved.read_text()
    saved.unlink()
    assert "Traceback" in text and "simulated crash" in text


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_6_signals_exit_130_and_143_and_leave_partial(tmp_path, sig, code):
    out = tmp_path / "r"
    data = _write_texts(tmp_path / "d.jsonl", [f"t{i}" for i in range(30)])
    p = _cli(["score", "_texts", "--data", str(data), "--out", str(out), "--quiet"],
             env={"HEADSCOPE_TOY_SLEEP": "0.2"})
    _wait_for(lambda: _n_done(out) >= 1)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert "--resume" in err
    assert load_run(out).status == "partial"


def test_6_disk_full_in_the_final_write_leaves_resumable_partial(tmp_path, monkeypatch, fake_model, capsys):
    import errno

    def full(path, arrays):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(base, "atomic_write_npz", full)
    out = tmp_path / "r"
    assert main(["score", "_toy", "--out", str(out), "--quiet"]) == 2
    assert "disk full" in capsys.readouterr().err
    assert load_run(out).status == "partial"
    monkeypatch.undo()
    import headscope.probe
    monkeypatch.setattr(headscope.probe, "load_model", lambda *a, **k: FAKE_LM)
    monkeypatch.setattr(headscope.probe, "Probe", lambda lm: object())
    assert main(["score", "_toy", "--out", str(out), "--quiet", "--resume"]) == 0
    run = load_run(out)
    assert run.status == "complete"
    np.testing.assert_allclose(run.scores()["s"], _expected(6)[0], rtol=1e-12)


# ============================================================================ 7. the dashboard reads only its folders
def test_7_new_run_form_confines_paths(tmp_path):
    from headscope.app import jobs
    root = tmp_path / "runs"
    root.mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_text("the prompt must never come from here\n")
    other_runs = tmp_path / "elsewhere"
    run_analysis("_toy", lm=FAKE_LM, probe=object(), out=other_runs / "src", progress=False)
    jm = jobs.JobManager(root, jobs.ModelPool())
    cases = [("retrieval", {"haystack": str(outside)}, None, "haystack"),
             ("retrieval_mask", {"source": str(other_runs / "src")}, None, "source"),
             ("ships", {"harmless": str(outside)}, None, "harmless"),
             ("sinks", {}, str(outside), "data file")]
    for analysis, opts, data, label in cases:
        with pytest.raises(HeadscopeError, match=f"^{label}: .* is outside the runs folder"):
            jm.submit(analysis, "some-model", opts, data)
    assert not list(root.iterdir())   # nothing started, nothing written
    # inside the runs folder (uploads) or the shipped data: accepted by the check
    up = root / "uploads" / "t.jsonl"
    up.parent.mkdir()
    up.write_text('{"text": "hi"}\n')
    cls = base.get_analysis("sinks")
    jobs.confine_inputs(root, cls, cls.parse_options({}), str(up))
    shipped = jobs.shipped_data_dir() / "natural_texts.jsonl"
    jobs.confine_inputs(root, cls, cls.parse_options({}), str(shipped))


# ============================================================================ 8. smaller
def test_8_report_refuses_to_overwrite_without_force(tmp_path, capsys):
    run_analysis("_toy", lm=FAKE_LM, probe=object(), out=tmp_path / "a", progress=False)
    target = tmp_path / "report.json"
    target.write_text("mine")
    assert main(["--runs-dir", str(tmp_path), "report", "a", "--format", "json", "--out", str(target)]) == 2
    assert "--force" in capsys.readouterr().err and target.read_text() == "mine"
    assert main(["--runs-dir", str(tmp_path), "report", "a", "--format", "json", "--out", str(target),
                 "--force"]) == 0
    assert json.loads(target.read_text())


def test_8_run_files_share_one_mode(tmp_path):
    out = tmp_path / "r"
    run_analysis("_toy", lm=FAKE_LM, probe=object(), out=out, progress=False)
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert {"run.json", "examples.jsonl", "checkpoint.npz", "arrays.npz"} <= set(modes)
    assert set(modes.values()) == {0o666 & ~umask} == {FILE_MODE}


def test_8_offline_mode_holds_after_huggingface_hub_was_imported():
    code = ("import huggingface_hub.constants as c\n"
            "assert not c.is_offline_mode()\n"
            "from headscope.probe.models import _offline_unless_opted_in\n"
            "_offline_unless_opted_in()\n"
            "import huggingface_hub\nprint(huggingface_hub.constants.is_offline_mode())")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HEADSCOPE_ALLOW_HUB")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
