"""Probe capture on the default model: time and peak memory against plain SDPA and eager maps.

For each prompt length T (SmolLM2-135M, fp32, CPU, batch 1) three modes run side by side:
  (a) sdpa    -- the plain HF forward with SDPA attention, the speed floor;
  (b) capture -- ``probe.forward`` inside ``probe.capture(stats=ALL)``: every attention statistic
                 (lse, top-5, entropy, segment masses, windowed and mean distance, column mass +
                 count) for every head of every layer, streamed by the headscope kernels;
  (c) eager   -- HF eager attention with ``output_attentions=True`` (all [H, T, T] maps), what a
                 map-based tool needs. It is skipped with a printed estimate when the maps alone
                 exceed ``--eager-budget-gb``.
A fourth mode, ``sweep``, times ``probe.sweep_heads`` (uniform ablation of each of the 30 x 9 heads,
one at a time) on a 40-token prompt. It runs with the full logits and with ``logits_to_keep=1``,
next to 270 separate ablated forwards (extrapolated from 10).
All capture modes keep only the last position's logits (``logits_to_keep=1``: the full [T, vocab] logits
would be 3 GB at 16k and are not what is measured). Inputs are seeded random token ids; timing
does not depend on the text. SmolLM2's context is 8192, so longer inputs run with
``allow_beyond_context=True`` (RoPE extrapolation: the time and memory are real, the outputs are
not meaningful).

Each mode runs once, in a fresh subprocess, after a 16-token warm-up forward. Peak memory is the
process RSS sampled every 5 ms (psutil), reported as the peak and as the rise over the RSS after
loading the model.

    .venv/bin/python benchmarks/bench_probe.py                       # 1024, 4096, 16384
    .venv/bin/python benchmarks/bench_probe.py --lengths 1024 --modes sdpa,capture
    .venv/bin/python benchmarks/bench_probe.py --modes sweep
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from rss import RssSampler  # benchmarks/rss.py (scripts run with benchmarks/ on sys.path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODES = ("sdpa", "capture", "eager")
SWEEP_TOKENS = 40


def eager_maps_gb(info, T: int) -> float:
    """Memory of the maps ``output_attentions`` returns: L x H x T x T fp32 (transients come on top)."""
    return info.n_layers * info.n_heads * T * T * 4 / 2**30


def sweep_worker(lm) -> dict:
    """Batched single-head sweep vs one forward per ablated head."""
    import torch

    from headscope.probe import HeadAblation, Probe, kl_div

    probe = Probe(lm)
    ids = torch.randint(0, lm.info.vocab_size, (1, SWEEP_TOKENS), generator=torch.Generator().manual_seed(0))
    metric = kl_div(probe.forward(ids).logits)
    out = {"mode": "sweep", "T": SWEEP_TOKENS}
    for keep in (0, 1):
        t0 = time.perf_counter()
        scores = probe.sweep_heads(ids, metric, kind="uniform", logits_to_keep=keep)
        out[f"batched_s_logits_to_keep_{keep}"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    for h in range(10):
        with probe.intervene([HeadAblation(15, h % 9, "uniform")]):
            probe.forward(ids)
    out["unbatched_s_estimate"] = round((time.perf_counter() - t0) / 10 * scores.numel(), 1)
    return out


def worker(mode: str, T: int) -> dict:
    import psutil
    import torch

    from headscope.kernels import StatsSpec
    from headscope.probe import Probe, load_model

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    lm = load_model("smollm2-135m")
    if mode == "sweep":
        return sweep_worker(lm)
    model = lm.model
    ids = torch.randint(0, lm.info.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    beyond = T > (lm.info.max_context or T)
    if mode == "capture":
        probe = Probe(lm)
        spec = StatsSpec(lse=True, topk=5, entropy=True, segments=((0, 1), (0, 64), (T // 2, T)), window_dist=128,
                         mean_dist=True, col_mass=True)

        def run(x):
            with probe.capture(stats=spec) as cap:
                probe.forward(x, logits_to_keep=1, allow_beyond_context=beyond)
            return cap
    else:
        model.set_attn_implementation(mode)

        def run(x):
            with torch.no_grad():
                return model(x, logits_to_keep=1, output_attentions=mode == "eager")
    run(ids[:, :16])                                                         # warm-up
    base = psutil.Process().memory_info().rss
    with RssSampler() as rss:
        t0 = time.perf_counter()
        out = run(ids)
        dt = time.perf_counter() - t0
    if mode == "capture":
        n_stats = sum(t.numel() for layer in out.stats.values() for t in layer.values())
        extra = {"captured_values": n_stats}
    else:
        extra = {}
    return {"mode": mode, "T": T, "time_s": round(dt, 2), "peak_rss_gb": round(rss.peak / 2**30, 3),
            "peak_over_loaded_gb": round((rss.peak - base) / 2**30, 3), "beyond_context": beyond, **extra}


def run_worker(mode: str, T: int) -> dict:
    """One measurement in a fresh subprocess (clean memory baseline)."""
    out = subprocess.run([sys.executable, __file__, "--worker", mode, str(T)], capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{mode} at {T} failed")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,4096,16384")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--eager-budget-gb", type=float, default=8.0,
                    help="skip eager when its maps alone need more than this")
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return
    modes = args.modes.split(",")
    if "sweep" in modes:
        run_worker("sweep", SWEEP_TOKENS)
        modes.remove("sweep")
    info = None
    if "eager" in modes:
        from headscope.probe import load_model
        info = load_model("smollm2-135m").info
    rows = {}
    for T in [int(x) for x in args.lengths.split(",")] if modes else []:
        for mode in modes:
            if mode == "eager" and eager_maps_gb(info, T) > args.eager_budget_gb:
                need = eager_maps_gb(info, T)
                rows[(mode, T)] = {"mode": mode, "T": T, "skipped": f"skipped: maps need {need:.0f} GB"}
                print(f"eager at T={T}: skipped, the maps alone need {need:.1f} GB "
                      f"(L={info.n_layers} x H={info.n_heads} x T^2 x 4 B) > budget {args.eager_budget_gb} GB", flush=True)
                continue
            rows[(mode, T)] = run_worker(mode, T)
    if not rows:
        return
    print("\n| T | sdpa time | capture time | capture / sdpa | eager time | sdpa peak RSS (+over loaded) "
          "| capture peak RSS (+over loaded) | eager peak RSS (+over loaded) |")
    print("|---|---|---|---|---|---|---|---|")

    def cell(r, key):
        if r is None:
            return "-"
        if "skipped" in r:
            return r["skipped"]
        return f"{r['time_s']} s" if key == "time" else f"{r['peak_rss_gb']} GB (+{r['peak_over_loaded_gb']})"
    for T in sorted({t for _, t in rows}):
        s, c, e = rows.get(("sdpa", T)), rows.get(("capture", T)), rows.get(("eager", T))
        ratio = f"{c['time_s'] / s['time_s']:.2f}x" if s and c else "-"
        print(f"| {T}{' *' if (c or s or {}).get('beyond_context') else ''} | {cell(s, 'time')} | {cell(c, 'time')} | "
              f"{ratio} | {cell(e, 'time')} | {cell(s, 'mem')} | {cell(c, 'mem')} | {cell(e, 'mem')} |")


if __name__ == "__main__":
    main()
