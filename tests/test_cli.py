"""The CLI as a user meets it: help texts, one-line errors with non-zero exit, run listing."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from headscope.cli import main

from .test_framework import FAKE_LM  # registers the _toy analysis


def test_entry_point_help():
    exe = shutil.which("headscope") or str(__import__("pathlib").Path(sys.executable).with_name("headscope"))
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for cmd in ("models", "score", "runs", "report", "app"):
        assert cmd in out.stdout


def test_score_help_lists_analyses_and_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["score", "--help"])
    assert e.value.code == 0
    assert "induction" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["score", "induction", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--out", "--resume", "--limit", "--seed", "--device", "--dtype",
                 "--batch-size", "--seq-len", "--scale"):
        assert flag in text
    assert "--data" not in text   # induction makes its own inputs (see the refusal test below)
    with pytest.raises(SystemExit):
        main(["score", "sinks", "--help"])
    assert "--data" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [
    (["runs", "show", "does-not-exist"], "no run 'does-not-exist'"),
    (["score", "_toy", "--data", "/nonexistent/file.jsonl"], "data file not found"),
    (["score", "_toy", "--n", "many"], "expected int"),
    (["report", "no-such-run"], "no run"),
])
def test_errors_are_one_line(argv, msg, capsys, tmp_path):
    code = main(["--runs-dir", str(tmp_path)] + argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert msg in err and "\n" not in err and "Traceback" not in err


def test_unknown_analysis_is_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["score", "nope"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_runs_list_and_show(tmp_path, capsys):
    from headscope.analyses.base import run_analysis
    run_analysis("_toy", lm=FAKE_LM, probe=object(), out=tmp_path / "toy-run", progress=False)
    assert main(["--runs-dir", str(tmp_path), "runs"]) == 0
    assert "toy-run" in capsys.readouterr().out
    assert main(["--runs-dir", str(tmp_path), "runs", "show", "toy-run", "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["status"] == "complete" and meta["analysis"] == "_toy"
    assert main(["--runs-dir", str(tmp_path), "runs", "show", "toy-run"]) == 0
    assert "top L" in capsys.readouterr().out
    assert main(["--runs-dir", str(tmp_path / "empty"), "runs"]) == 0
    assert "no runs" in capsys.readouterr().out


def test_sigterm_marks_run_partial_and_resume_completes(tmp_path, monkeypatch, capsys):
    """A real SIGTERM mid-run (to this process, in the main thread): the run is left 'partial'
    with the finished examples, not 'running', and --resume completes it."""
    import os
    import signal

    import headscope.probe
    from headscope.analyses.store import load_run

    from .test_framework import _Toy

    monkeypatch.setattr(headscope.probe, "load_model", lambda *a, **k: FAKE_LM)
    monkeypatch.setattr(headscope.probe, "Probe", lambda lm: object())
    process = _Toy.process

    def killed_at_3(self, ctx, ex):
        if ex.data == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return process(self, ctx, ex)

    monkeypatch.setattr(_Toy, "process", killed_at_3)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    assert main(["score", "_toy", "--out", str(out), "--quiet"]) == 143   # 128 + SIGTERM
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before           # the CLI's handler is removed again
    assert load_run(out).status == "partial"
    assert len((out / "examples.jsonl").read_text().splitlines()) == 3
    monkeypatch.setattr(_Toy, "process", process)
    assert main(["score", "_toy", "--out", str(out), "--quiet", "--resume"]) == 0
    assert load_run(out).status == "complete"


def test_app_opens_the_browser_only_once_the_server_listens(monkeypatch):
    """`headscope app` runs Streamlit headless (no first-run e-mail prompt) and opens the browser
    itself, after the port accepts connections."""
    import socket
    import threading
    import webbrowser

    from headscope import cli

    opened = []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url))
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    t = threading.Thread(target=cli._open_when_up, args=("127.0.0.1", port, 30.0))
    t.start()
    t.join(1.5)
    assert opened == []                     # nothing listens yet
    srv.listen()
    t.join(10)
    srv.close()
    assert opened == [f"http://127.0.0.1:{port}"]


def test_score_run_prints_no_library_warnings_or_load_bars(tmp_path):
    """A scoring run shows its own progress and results only: with every Deprecation/FutureWarning
    an error (as ``python -W error::...`` makes them), it completes, and stderr holds no
    transformers load bars or warnings."""
    from .helpers import make_tiny_model_dir
    model = make_tiny_model_dir(tmp_path / "tiny")
    cmd = [sys.executable, "-W", "error::FutureWarning", "-W", "error::DeprecationWarning", "-m", "headscope",
           "--runs-dir", str(tmp_path / "runs"), "score", "induction", "--model", str(model),
           "--n-examples", "2", "--seq-len", "8", "--out", str(tmp_path / "runs" / "ind")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "run complete" in out.stdout
    for noise in ("Warning", "Loading weights", "it/s]", "deprecated"):
        assert noise not in out.stderr, out.stderr[-3000:]


def test_induction_refuses_data_instead_of_ignoring_it(tmp_path, capsys):
    """induction makes its own random sequences: --data is not offered, and the API refuses it."""
    from headscope.analyses.base import run_analysis
    from headscope.errors import HeadscopeError
    bad = tmp_path / "x.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(SystemExit) as e:
        main(["score", "induction", "--data", str(bad)])
    assert e.value.code == 2 and "unrecognized arguments: --data" in capsys.readouterr().err
    with pytest.raises(HeadscopeError, match="induction reads no data"):
        run_analysis("induction", data=str(bad), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_runs_show_prefix_settings_and_plain_numbers(tmp_path, capsys):
    """A finished run drops its checkpoint; `runs show` takes a unique id prefix, prints the
    settings and numbers without float noise; an ambiguous prefix names the candidates."""
    from headscope.analyses.base import run_analysis
    for rid in ("toy-alpha-1", "toy-beta-1"):
        run_analysis("_toy", lm=FAKE_LM, probe=object(), out=tmp_path / rid, progress=False, options={"n": 3})
        assert (tmp_path / rid / "run.json").exists() and not (tmp_path / rid / "checkpoint.npz").exists()
    meta = json.loads((tmp_path / "toy-alpha-1" / "run.json").read_text())
    meta["summary"] = {"accuracy": 0.7700000107288361, "rate": 67.25925925925927}
    (tmp_path / "toy-alpha-1" / "run.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["--runs-dir", str(tmp_path), "runs", "show", "toy-al"]) == 0
    out = capsys.readouterr().out
    assert "toy-alpha-1" in out and "settings:" in out and "n=3" in out
    assert "accuracy: 0.77\n" in out and "rate: 67.26\n" in out and "0.7700000" not in out
    assert main(["--runs-dir", str(tmp_path), "runs", "show", "toy-"]) == 2
    err = capsys.readouterr().err
    assert "matches 2 runs" in err and "toy-alpha-1" in err and "toy-beta-1" in err


def test_a_run_whose_examples_were_all_skipped_says_so(tmp_path, capsys):
    from headscope.analyses.base import register, run_analysis
    from headscope.analyses.store import load_run
    from headscope.errors import HeadscopeError

    from .test_framework import _Toy

    @register
    class _SkipAll(_Toy):
        name = "_toy_skip_all"

        def process(self, ctx, ex):
            return super().process(ctx, ex).__class__(arrays={}, details={"skip_reason": "too short"}, skip=True)

    with pytest.raises(HeadscopeError, match=r"all 3 examples were skipped \(too short\)"):
        run_analysis("_toy_skip_all", lm=FAKE_LM, probe=object(), out=tmp_path / "r", progress=False,
                     options={"n": 3})
    run = load_run(tmp_path / "r")
    assert run.status == "empty" and "all 3 examples were skipped" in run.meta["error"]


def test_too_long_input_names_the_length_flag(tmp_path):
    """An input past the context ends in a one-line error naming the analysis's length option (not a
    Python argument the CLI does not have); the run is left partial, resumable once fixed."""
    from headscope.analyses.base import run_analysis
    from headscope.errors import HeadscopeError
    from headscope.probe import Probe

    from .helpers import make_tiny_lm, write_jsonl
    lm = make_tiny_lm(seed=0)
    data = tmp_path / "long.jsonl"
    write_jsonl(data, [{"text": "a b c d e f g h " * (lm.info.max_context // 4)}])
    with pytest.raises(HeadscopeError) as e:
        run_analysis("sinks", lm=lm, probe=Probe(lm), data=str(data), out=tmp_path / "r", progress=False,
                     options={"T": 0})
    msg = str(e.value)
    assert f"exceed the model's context of {lm.info.max_context}: lower --T" in msg and "allow_beyond" not in msg


def test_circuit_command_is_the_circuit_analysis(capsys):
    from headscope.cli import _circuit_alias
    assert _circuit_alias(["circuit", "ioi", "--model", "m"]) == ["score", "circuit", "--task", "ioi", "--model", "m"]
    assert _circuit_alias(["--runs-dir", "r", "circuit", "induction"]) == ["--runs-dir", "r", "score", "circuit",
                                                                          "--task", "induction"]
    assert _circuit_alias(["runs", "circuit"]) == ["runs", "circuit"]
    with pytest.raises(SystemExit) as e:
        main(["circuit", "--help"])
    assert e.value.code == 0 and "--task" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "circuit" in capsys.readouterr().out
