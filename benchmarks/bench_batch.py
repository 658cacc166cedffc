"""Examples per forward (``--batch-size``): speed and peak memory per batch size, and the
per-example memory estimate auto divides free memory by, side by side, in one process.

For each analysis and batch size b: ``process_batch`` on b fresh examples (after one warm-up
batch), examples/s and the peak RSS above the RSS on entry (``rss.RssSampler``; glibc's free
lists are trimmed before each measurement so a batch does not reuse the previous one's pages
unseen), next to b x ``example_memory`` (what ``auto`` plans with). Run with 1 thread
(``OMP_NUM_THREADS=1``) on a quiet machine; the ratio column is examples/s over b = 1.
"""
from __future__ import annotations

import argparse
import ctypes
import time

from rss import RssSampler  # benchmarks/rss.py (scripts run with benchmarks/ on sys.path)

CASES = {
    "induction": {"seq_len": "64"},
    "sinks": {"input": "random", "T": "64"},
}


def trim() -> None:
    """Hand freed heap pages back to the OS, so the next peak is measured from a clean base."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--analyses", nargs="+", default=sorted(CASES))
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = p.parse_args()
    import torch

    from headscope.analyses.base import _prepared, get_analysis
    from headscope.probe import Probe, load_model
    torch.set_grad_enabled(False)
    lm = load_model(args.model)
    probe = Probe(lm)
    print(f"{args.model}, {torch.get_num_threads()} thread(s)")
    print(f"{'analysis':>9} | {'batch':>5} | {'s/batch':>8} | {'examples/s':>10} | {'ratio':>6} | "
          f"{'peak extra MB':>13} | {'estimate MB':>11} | {'est/peak':>8}")
    for name in args.analyses:
        cls = get_analysis(name)
        n = 1 + sum(args.sizes)
        opts = cls.parse_options({**CASES[name], "n_examples": str(n), "batch_size": "1"})
        analysis, ctx, examples, _ = _prepared(cls, opts, lm, probe, None, log=lambda m: None)
        analysis.process_batch(ctx, examples[:1])                  # warm-up: first-call allocations
        start, base_rate = 1, None
        for b in args.sizes:
            batch = examples[start:start + b]
            start += b
            estimate = sum(analysis.example_memory(ctx, ex) for ex in batch)
            trim()
            with RssSampler() as rss:
                t0 = time.perf_counter()
                outs = analysis.process_batch(ctx, batch)
                took = time.perf_counter() - t0
            del outs
            rate = b / took
            base_rate = base_rate or rate
            print(f"{name:>9} | {b:>5} | {took:>8.2f} | {rate:>10.2f} | {rate / base_rate:>5.2f}x | "
                  f"{rss.extra / 2**20:>13.0f} | {estimate / 2**20:>11.0f} | {estimate / max(rss.extra, 1):>8.2f}")


if __name__ == "__main__":
    main()
