"""Data-parallel runs across hosts and a rank that fails with an error (issue 18), on one machine:
two torchrun launches with ``--nnodes 2`` (one per "host", rendezvous over TCP on localhost) stand
for two hosts; the references are single-process runs of the same examples."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from .test_distributed import ENV, _load, _score, assert_same_run, tiny  # noqa: F401  (tiny: fixture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_hosts(args, cwd):
    """The same ``headscope score`` on two 'hosts' of one rank each; returns both processes' results."""
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
         "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "headscope", "score", *map(str, args), "--quiet"],
        cwd=cwd, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)]
    return [(p.wait(timeout=600), p.stderr.read()) for p in procs]


@pytest.mark.slow
def test_two_hosts_equal_one_process(tiny, tmp_path):  # noqa: F811
    args = ["induction", "--model", tiny, "--n-examples", 5, "--seq-len", 6, "--seed", 3]
    _score(args + ["--out", tmp_path / "one"], cwd=tmp_path)
    results = _two_hosts(args + ["--out", tmp_path / "hosts"], cwd=tmp_path)
    assert [rc for rc, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    assert_same_run(tmp_path / "one", tmp_path / "hosts")
    meta, _ = _load(tmp_path / "hosts")
    assert meta["shards"][0]["world_size"] == 2


@pytest.mark.slow
def test_a_rank_failing_with_an_error_stops_every_rank(tiny, tmp_path):  # noqa: F811
    """Example 3 is longer than the model's context: the rank that meets it raises; every rank stops
    (none hangs), exit 2 naming the flag, and the finished examples are a prefix of the one-process run."""
    data = tmp_path / "texts.jsonl"
    texts = [f"text number {i} " * 8 for i in range(6)]
    texts[3] = "x" * 1500                                     # byte tokens: 1500 > the tiny model's 1024
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    args = ["sinks", "--model", tiny, "--data", data, "--T", 0]
    one = _score(args + ["--out", tmp_path / "one"], cwd=tmp_path, check=False)
    assert one.returncode == 2
    two = _score(args + ["--out", tmp_path / "two"], ranks=2, cwd=tmp_path, check=False)
    assert two.returncode != 0 and "lower --T" in two.stderr
    meta, records = _load(tmp_path / "two")
    _, ref = _load(tmp_path / "one")
    assert meta["status"] == "partial" and "lower --T" in meta["error"]
    assert [r["id"] for r in records] == [r["id"] for r in ref][:len(records)] and len(records) <= 3
