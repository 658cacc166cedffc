"""Issue 19, cost before launch: each analysis's ``estimate`` against the model work it really does.

The reference is counted on the model itself, independently of the analyses: a wrapper on
``Probe.run`` (every model call comes through it) counts non-decode runs and decode steps, and
forward pre-hooks on the HF decoder blocks' MLPs count the tokens each block sees (a sweep's copies
included), so tokens are full-model equivalents = block tokens / n_layers.
"""
from __future__ import annotations

import json

import pytest

from headscope.analyses import base
from headscope.analyses.base import Calibration, Work, format_seconds, run_analysis
from headscope.probe import Probe, load_model

from .helpers import make_tiny_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(str(make_tiny_model_dir(tmp_path_factory.mktemp("est") / "tiny-llama")))


class Counter:
    """Counts what ``probe`` runs: non-decode runs, decode steps, block tokens outside decoding."""

    def __init__(self, lm, probe):
        self.forwards = self.generated = self.block_tokens = 0
        self.decoding = False
        self.blocks = list(lm.model.model.layers)
        run = probe.run

        def counted(ids, *args, **kwargs):
            self.decoding = kwargs.get("phase") == "decode"
            if self.decoding:
                self.generated += 1
            else:
                self.forwards += 1
            return run(ids, *args, **kwargs)

        probe.run = counted
        for b in self.blocks:   # the MLP's input: after any hook that repeats a block's rows
            b.mlp.register_forward_pre_hook(self._seen)

    def _seen(self, module, args):
        h = args[0]                                             # [B, T, d]
        if not self.decoding:
            self.block_tokens += h.shape[0] * h.shape[1]

    @property
    def tokens(self) -> float:
        return self.block_tokens / len(self.blocks)


@pytest.mark.parametrize("name,options,generates", [
    ("induction", {"n_examples": 3, "seq_len": 7}, False),
    ("sinks", {"input": "random", "n_examples": 3, "T": 12}, False),
    ("sinks", {"input": "data", "T": 24}, False),   # the first text is shorter than T: skipped, no forward
    ("massive", {}, False),
    ("fai", {}, False),
    ("ships", {"limit": 2, "direction_n": 5, "gen_tokens": 4}, True),
    ("ships", {"limit": 2, "direction_n": 3, "gen_tokens": 0, "random_control": False, "batch_size": 3}, False),
    ("ships", {"limit": 1, "refusal_metrics": False}, False),
    ("gships", {"n_queries": 5, "batch_size": 2}, False),
    ("sahara", {"n_queries": 3, "steps": 2, "n_random": 1, "direction_n": 3, "gen_tokens": 3}, True),
    ("retrieval", {"lengths": "400", "depths": "0,1", "needles": "lisbon", "max_new_tokens": 3,
                   "rouge_threshold": -1.0}, True),
    ("retrieval", {"lengths": "380", "depths": "0.5", "needles": "lisbon", "teacher_forced": True}, False),
    ("chd", {"limit": 2, "max_new_tokens": 3, "vhr": False}, True),
])
def test_estimate_matches_counted_work(tiny, tmp_path, name, options, generates):
    data = None
    if name in ("fai", "massive") or options.get("input") == "data":
        data = tmp_path / "texts.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                                ("a first text, short", "a second and somewhat longer text of words")))
    base._CALIBRATIONS.clear()
    probe = Probe(tiny)
    calib = base.calibrate(tiny, probe)           # calibrated first, so its own forwards are not counted
    counter = Counter(tiny, probe)
    got = []
    run_analysis(name, lm=tiny, probe=probe, out=tmp_path / "run", progress=False, options=options, data=data,
                 on_estimate=lambda work, s: got.append((work, s)))
    (work, seconds), = got
    assert seconds == pytest.approx(calib.seconds(work))
    assert work.forwards == counter.forwards
    if name == "sahara":   # later steps sweep all heads but the group's, which are unknown beforehand
        assert counter.tokens < work.tokens < 1.05 * counter.tokens
    elif name == "chd" and counter.generated < work.generated:   # a generation stopped early: shorter forwards
        assert counter.tokens < work.tokens
    else:
        assert work.tokens == pytest.approx(counter.tokens)
    # greedy generation may stop at EOS or a stop string: the estimate is the budget, an upper bound
    assert counter.generated <= work.generated
    assert (counter.generated > 0) == generates and (work.generated > 0) == generates


def test_work_sweep_hand_count():
    # L=2, H=4, one prompt of 5 tokens, 3 copies: layer 0 groups (3, 1), layer 1 groups (3, 1)
    w = Work.sweep(n_layers=2, n_heads=4, batch=1, length=5, copies=3)
    assert w.forwards == 4
    # full-model equivalents: layer 0 -> 5 * (0 + 2k) / 2, layer 1 -> 5 * (1 + k) / 2
    assert w.tokens == pytest.approx(5 * (6 + 2) / 2 + 5 * (4 + 2) / 2)


def test_calibration_prices_work_linearly_and_is_cached(tiny):
    base._CALIBRATIONS.clear()
    probe = Probe(tiny)
    c = base.calibrate(tiny, probe)
    assert c.per_forward >= 0 and c.per_token >= 0 and c.per_step > 0
    assert base.calibrate(tiny, probe) is c
    hand = Calibration(per_forward=0.5, per_token=0.01, per_step=0.1)
    assert hand.seconds(Work(forwards=2, tokens=300, generated=10)) == pytest.approx(1 + 3 + 1)


@pytest.mark.parametrize("s,text", [(12.4, "12 s"), (89, "89 s"), (150, "2.5 min"), (7200, "2.0 h")])
def test_format_seconds(s, text):
    assert format_seconds(s) == text


def test_job_eta_from_its_first_example():
    import time

    from headscope.app.jobs import Job
    job = Job(run_id="r", analysis="induction", model="m", options={}, done=5, total=9)
    assert job.eta_s is None                      # nothing done by this job yet
    job.running_since, job.counted_from = time.time() - 12.0, 2   # resumed at 2: 3 examples in 12 s
    assert job.eta_s == pytest.approx(4 * 4.0, rel=0.05)


def test_cli_prints_estimate_before_the_run(tiny, tmp_path, capsys):
    from headscope.cli import main
    rc = main(["score", "induction", "--model", tiny.info.path, "--out", str(tmp_path / "r"), "--quiet",
               "--n-examples", "2", "--seq-len", "5"])
    assert rc == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    # 2 sequences of 2 x 5 tokens (no BOS) in one batched forward (--batch-size auto), + the example pattern's
    assert first.startswith("estimated time ~") and "on this machine (2 forwards, 30 tokens" in first
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "complete"


def test_analysis_without_model_calls_runs_without_estimate(tmp_path):
    from .test_framework import FAKE_LM   # registers _toy, whose examples call no model
    heard, logged = [], []
    run = run_analysis("_toy", lm=FAKE_LM, probe=object(), out=tmp_path / "r", progress=False,
                       on_estimate=lambda *a: heard.append(a), log=logged.append)
    assert run.status == "complete" and heard == []
    assert logged == ["no cost estimate: _toy ran no model call for e0"]
