"""Capture kernels: time and peak extra memory of attention statistics, side by side.

For each sequence length T (batch 1, H heads, head dim D, causal, fp32 on CPU) it measures:
  (a) naive   -- the full [B, H, T, T] probability matrix, statistics computed from it (what a
                 TransformerLens-style hook does); skipped with a 'needs N GB' message when it
                 cannot fit in the memory budget;
  (b) chunked -- ``attend_chunked(..., output=False)``: every row and column statistic;
  (b+) chunked + output -- the same plus the attention output (what the probe runs inside a
                 model: the ``p @ v`` GEMM costs as much as ``q @ k^T``);
  (c) floor   -- bare ``q @ k^T`` + softmax over the same query chunks and key slices, nothing else:
                 what any exact method has to pay at least.
(a), (b) and (c) compute no output; ratios are CPU-time ratios of the columns named.
Each cell runs in a fresh subprocess so its memory baseline is clean. Peak extra memory is the
maximum resident set size, sampled every 1 ms by a background thread (psutil, benchmarks/rss.py), minus
the RSS just before the call (inputs excluded), on the first run; the time is the best of that run
and ``--repeat - 1`` more runs without the sampler (which competes for the GIL). tracemalloc
cannot see torch's allocations and torch has no CPU allocator statistics, hence the sampler;
spikes shorter than 1 ms can be missed.

With CUDA it also compares, at T=32768, H=32, D=128, bf16: the Triton kernels (output + every
statistic) against torch's scaled_dot_product_attention (output only).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time

import torch
from rss import RssSampler  # benchmarks/rss.py (scripts run with benchmarks/ on sys.path)


def stats_spec(T: int, topk: int):
    from headscope.kernels import StatsSpec
    return StatsSpec(lse=True, topk=topk, entropy=True, segments=((0, 4), (4, T // 2)),
                     window_dist=128, mean_dist=True, col_mass=True)


# ----------------------------------------------------------------------------- the three paths

def naive(q, k, v, spec):
    """Full-matrix statistics, written the obvious way (no output, like the chunked column)."""
    T = q.shape[2]
    logits = q @ k.transpose(-1, -2)                                  # [B, H, T, T]
    logits.mul_(1.0 / math.sqrt(q.shape[-1]))
    logits.masked_fill_(torch.ones(T, T, dtype=torch.bool).triu_(1), float("-inf"))
    p = torch.softmax(logits, -1)
    res = {"lse": torch.logsumexp(logits, -1)}
    del logits
    res["topk"] = p.topk(spec.topk, -1)
    res["entropy"] = -torch.special.xlogy(p, p).sum(-1)
    res["segments"] = [p[..., a:b].sum(-1) for a, b in spec.segments]
    dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp_min(0).float()
    res["mean_dist"] = (p * dist).sum(-1)
    res["win_dist"] = (p * dist.clamp_max(spec.window_dist)).sum(-1)
    res["col_mass"] = p.sum(-2)
    return res


def chunked(q, k, v, spec, block_q=None, output=False):
    from headscope.kernels.chunked import attend_chunked
    return attend_chunked(q, k, v, spec, block_q=block_q, output=output)


def floor(q, k, v, spec, block_q=None):
    """Bare QK^T + softmax over exactly the query blocks and key slices the chunked path uses."""
    from headscope.kernels.chunked import _auto_block
    B, H, T, D = q.shape
    C = block_q or _auto_block(B, H, T, T, None)
    s_buf = torch.empty(B * H * C * T)
    p_buf = torch.empty_like(s_buf)
    scale = 1.0 / math.sqrt(D)
    for i0 in range(0, T, C):
        i1 = min(T, i0 + C)
        n = B * H * (i1 - i0) * i1
        s = s_buf[:n].view(B, H, i1 - i0, i1)
        torch.matmul(q[:, :, i0:i1] * scale, k[:, :, :i1].transpose(-1, -2), out=s)
        torch.softmax(s, -1, out=p_buf[:n].view_as(s))


PATHS = {"naive": naive, "chunked": chunked, "chunked_out": functools.partial(chunked, output=True), "floor": floor}


def naive_bytes(B: int, H: int, T: int) -> int:
    """logits + probabilities + one temporary of the same size, fp32."""
    return 3 * B * H * T * T * 4


# ----------------------------------------------------------------------------- measurement

def worker(args) -> None:
    """One (path, T) measurement in this process; prints a JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    fn = PATHS[args.worker]
    T, H, D = args.T[0], args.H, args.D
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, T, D, generator=g) for _ in range(3))
    spec = stats_spec(T, args.topk)
    kw = {} if args.worker == "naive" else {"block_q": args.block_q}
    small = [x[:, :, :256].contiguous() for x in (q, k, v)]
    fn(*small, stats_spec(256, args.topk), **kw)                      # warm up MKL, thread pools
    with RssSampler(every=1e-3) as mem:                                # memory run
        w0, c0 = time.perf_counter(), time.process_time()
        fn(q, k, v, spec, **kw)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    for _ in range(args.repeat - 1 if wall < 60 else 0):              # timed runs, no sampler
        w0, c0 = time.perf_counter(), time.process_time()
        fn(q, k, v, spec, **kw)
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_bytes": mem.extra}))


def measure(path: str, T: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, "--T", str(T), "--H", str(args.H), "--D", str(args.D),
           "--topk", str(args.topk), "--repeat", str(args.repeat)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.block_q:
        cmd += ["--block-q", str(args.block_q)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def fmt_mem(b: float) -> str:
    return f"{b / 2**30:.2f} GB" if b >= 2**30 else f"{b / 2**20:.0f} MB"


def cpu_report(args) -> None:
    threads = args.threads or torch.get_num_threads()
    print(f"CPU, fp32, B=1, H={args.H}, D={args.D}, causal, torch threads={threads}; statistics: lse, "
          f"top-{args.topk}, entropy, 2 segments, window/mean distance, column mass")
    print("cells: wall time / process CPU time (best of --repeat runs), peak extra memory (max RSS sampled\n"
          "every 1 ms minus RSS before the call, fresh process per cell); ratios from CPU time, which\n"
          f"other jobs on a shared box distort far less than wall time (load average now {os.getloadavg()[0]:.1f})\n")
    cols = ("naive", "chunked, all statistics", "chunked + output", "floor: QK^T + softmax")
    ratios = ("naive/chunked", "chunked/floor", "(+output)/floor", "chunked/naive mem")
    head = " | ".join([f"{'T':>6}"] + [f"{c:>24}" for c in cols] + [f"{r:>17}" for r in ratios])
    print(head)
    print("-" * len(head))
    for T in args.T:
        need = naive_bytes(1, args.H, T)
        if args.skip_naive:
            n = {"skip": "skipped"}
        elif need > args.budget_gb * 2**30 or need > 0.9 * mem_available():
            n = {"skip": f"needs {need / 2**30:.0f} GB"}
        else:
            n = measure("naive", T, args)
        c, co, f = (measure(p, T, args) for p in ("chunked", "chunked_out", "floor"))

        def show(x):
            if "skip" in x or "error" in x:
                return x.get("skip") or "error: " + x["error"][:17]
            return f"{x['wall_s']:.2f} / {x['cpu_s']:.2f} s, {fmt_mem(x['peak_bytes'])}"

        def ratio(a, b, key):
            if any(w in x for x in (a, b) for w in ("skip", "error")):
                return "-"
            return f"{a[key] / max(b[key], 1):.3g}x" if key == "peak_bytes" else f"{a[key] / b[key]:.2f}x"

        cells = [f"{show(x):>24}" for x in (n, c, co, f)]
        rs = [ratio(n, c, "cpu_s"), ratio(c, f, "cpu_s"), ratio(co, f, "cpu_s"), ratio(c, n, "peak_bytes")]
        print(" | ".join([f"{T:>6}"] + cells + [f"{r:>17}" for r in rs]), flush=True)


def cuda_report(args) -> None:
    """Triton kernels (output + all statistics) vs torch SDPA (output only) on one GPU."""
    import torch.nn.functional as F
    from headscope.kernels.triton_attn import attend_triton
    T, H, D = 32768, 32, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    spec = stats_spec(T, args.topk)
    runs = {"sdpa (output only)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "triton (output + stats)": lambda: attend_triton(q, k, v, spec),
            "triton (stats only)": lambda: attend_triton(q, k, v, spec, output=False),
            "triton (output + lse)": lambda: attend_triton(q, k, v, type(spec)(lse=True))}
    print(f"\nCUDA {torch.cuda.get_device_name()}, bf16, B=1, H={H}, D={D}, T={T}, causal")
    res = {}
    for name, fn in runs.items():
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = []
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        res[name] = (sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() - base)
    ref = res["sdpa (output only)"][0]
    for name, (t, m) in res.items():
        print(f"  {name:<26} {t * 1e3:8.1f} ms  peak extra {fmt_mem(m):>9}  {t / ref:5.2f}x sdpa")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 32768], help="sequence lengths")
    ap.add_argument("--H", type=int, default=12, help="heads")
    ap.add_argument("--D", type=int, default=64, help="head dim")
    ap.add_argument("--topk", type=int, default=5, help="k of the top-k statistic")
    ap.add_argument("--block-q", dest="block_q", type=int, default=None,
                    help="query block of the chunked path and the floor (default: its automatic size)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs (1 for runs over a minute)")
    ap.add_argument("--budget-gb", type=float, default=24.0, help="memory the naive path may use")
    ap.add_argument("--skip-naive", action="store_true", help="do not run the naive path")
    ap.add_argument("--no-cuda", action="store_true", help="skip the GPU comparison")
    ap.add_argument("--worker", choices=sorted(PATHS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return
    cpu_report(args)
    if torch.cuda.is_available() and not args.no_cuda:
        cuda_report(args)


if __name__ == "__main__":
    main()
