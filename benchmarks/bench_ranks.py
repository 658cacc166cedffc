"""Data-parallel scoring: examples per second with 1 and with N ranks, side by side.

Each column is one ``headscope score`` run of the same examples: 1 process (``python -m
headscope``), then ``torchrun --standalone --nproc-per-node N -m headscope`` (gloo on CPU), every
process with ``OMP_NUM_THREADS`` threads (1 by default). Examples/s uses the run loop's time as
rank 0 records it (``run.json`` ``timings.run_s``: processing, reductions and writes, not the
model load), and wall time covers the whole command (interpreter start and model load included:
each rank loads its own copy of the model). The runs must agree (scores within fp32 tolerance),
else the benchmark stops. On a GPU machine pass ``--device cuda``: each rank then takes
``cuda:LOCAL_RANK`` and the reduction runs on NCCL.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def score(ranks: int, out: Path, args) -> dict:
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    cmd = launcher + ["-m", "headscope", "score", args.analysis, "--model", args.model, "--quiet",
                      "--device", args.device, "--out", str(out), *args.extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    meta = json.loads((out / "run.json").read_text())
    return {"wall_s": wall, "loop_s": meta["timings"]["run_s"], "n": meta["n_examples"], "scores": meta["scores"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--analysis", default="induction")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    p.add_argument("--device", default="cpu")
    p.add_argument("extra", nargs="*", default=["--n-examples", "32", "--seq-len", "64"],
                   help="analysis options after --, e.g. -- --n-examples 32 --seq-len 64")
    args = p.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in args.ranks:
            rows[r] = score(r, Path(tmp) / f"r{r}", args)
    first = rows[args.ranks[0]]
    for r, row in rows.items():
        for k, v in first["scores"].items():
            if not np.allclose(np.asarray(row["scores"][k]), np.asarray(v), rtol=1e-5, atol=1e-6):
                sys.exit(f"{r} ranks disagree with {args.ranks[0]} on {k}")
    print(f"{args.analysis} on {args.model}, {first['n']} examples ({' '.join(args.extra)}), "
          f"{args.threads} thread(s) per rank, device {args.device}")
    print(f"{'ranks':>5} | {'loop s':>8} | {'examples/s':>10} | {'speed-up':>8} | {'wall s (with load)':>18}")
    base = first["n"] / first["loop_s"]
    for r, row in rows.items():
        rate = row["n"] / row["loop_s"]
        print(f"{r:>5} | {row['loop_s']:>8.2f} | {rate:>10.2f} | {rate / base:>7.2f}x | {row['wall_s']:>18.1f}")


if __name__ == "__main__":
    main()
