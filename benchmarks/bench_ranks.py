"""Data-parallel and batched scoring: examples per second for {1, N ranks} x {batch sizes}, side by side.

Each row is one ``headscope score`` run of the same examples: 1 process (``python -m
headscope``) or ``torchrun --standalone --nproc-per-node N -m headscope`` (gloo on CPU), with
``--batch-size`` 1 or ``auto`` (examples per forward; the size auto chose, per rank, is read back
from ``run.json`` ``batching``), every process with ``OMP_NUM_THREADS`` threads (1 by default).
Examples/s uses the run loop's time as rank 0 records it (``run.json`` ``timings.run_s``: processing, reductions and writes, not the
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


def score(ranks: int, batch: str, out: Path, args) -> dict:
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    cmd = launcher + ["-m", "headscope", "score", args.analysis, "--model", args.model, "--quiet",
                      "--device", args.device, "--batch-size", batch, "--out", str(out), *args.extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    meta = json.loads((out / "run.json").read_text())
    return {"wall_s": wall, "loop_s": meta["timings"]["run_s"], "n": meta["n_examples"], "scores": meta["scores"],
            "per_forward": meta["batching"][0]["per_forward"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--analysis", default="induction")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-sizes", nargs="+", default=["1", "auto"], help="--batch-size values to compare")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    p.add_argument("--device", default="cpu")
    p.add_argument("extra", nargs="*", default=["--n-examples", "32", "--seq-len", "64"],
                   help="analysis options after --, e.g. -- --n-examples 32 --seq-len 64")
    args = p.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in args.ranks:
            for b in args.batch_sizes:
                rows[r, b] = score(r, b, Path(tmp) / f"r{r}b{b}", args)
    first_key = next(iter(rows))
    first = rows[first_key]
    for key, row in rows.items():
        for k, v in first["scores"].items():
            if not np.allclose(np.asarray(row["scores"][k]), np.asarray(v), rtol=1e-5, atol=1e-6):
                sys.exit(f"{key} (ranks, batch) disagrees with {first_key} on {k}")
    print(f"{args.analysis} on {args.model}, {first['n']} examples ({' '.join(args.extra)}), "
          f"{args.threads} thread(s) per rank, device {args.device}")
    print(f"{'ranks':>5} | {'batch':>5} | {'per fwd':>7} | {'loop s':>8} | {'examples/s':>10} | {'speed-up':>8} | "
          f"{'wall s (with load)':>18}")
    base = first["n"] / first["loop_s"]
    for (r, b), row in rows.items():
        rate = row["n"] / row["loop_s"]
        print(f"{r:>5} | {b:>5} | {row['per_forward']:>7} | {row['loop_s']:>8.2f} | {rate:>10.2f} | "
              f"{rate / base:>7.2f}x | {row['wall_s']:>18.1f}")


if __name__ == "__main__":
    main()
