"""Retrieval-head scoring of one NIAH instance: headscope vs the reference approach, side by side.

- ``headscope``: ``probe.generate(..., stats=StatsSpec(topk=1))``: prefill of prompt[:-1] through
  the headscope attention, then each decode step streams every head's top-1 key (no attention
  map is materialised), then ``copy_scores``.
- ``reference``: what nightdessert/Retrieval_Head does: HF prefill of prompt[:-1] with a fused
  kernel (SDPA here; flash-attention there), then each decode step in HF eager attention with
  ``output_attentions=True`` (full [L][1, H, 1, T] maps), top-1 per head from the maps.

Both decode the same fixed number of greedy steps (no stop string, so the work is equal) and must
produce the same tokens and top-1 keys. Each mode runs in a fresh subprocess; peak memory is the
process RSS sampled every 5 ms (``psutil``), reported as the peak and as the increase over the
RSS after loading the model. Lengths above the model's 8192-token context run with RoPE
extrapolation (``allow_beyond_context``): the timing and memory are what is measured there, the
answer quality is not.

    .venv/bin/python benchmarks/bench_retrieval.py                  # 4096 and 16384 tokens, 32 steps
    .venv/bin/python benchmarks/bench_retrieval.py --lengths 4096 --steps 16
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


def build(lm, length: int):
    from headscope.analyses.niah import NiahBuilder, load_haystack, load_needles, select_needles
    needle = select_needles(load_needles(), "lisbon")[0]
    b = NiahBuilder(lm.tokenizer, load_haystack("builtin"), max_context=max(length, lm.info.max_context or 0),
                    answer_buffer=64)
    return b.build(needle, length, 0.5)


def run_headscope(lm, inst, steps: int):
    import torch

    from headscope.analyses.retrieval import copy_scores
    from headscope.kernels import StatsSpec
    from headscope.probe import Probe
    probe = Probe(lm)
    t0 = time.perf_counter()
    gen = probe.generate(inst.input_ids, max_new_tokens=steps, stats=StatsSpec(topk=1), allow_beyond_context=True)
    top1 = gen.stacked("topk_idx")[:, :, 0, :, 0]                       # [steps, L, H, 1]
    scores = copy_scores(top1, gen.new_tokens, inst.input_ids, inst.span)
    dt = time.perf_counter() - t0
    return dt, gen.new_tokens, top1[..., 0].to(torch.int64), scores


def run_reference(lm, inst, steps: int):
    import numpy as np
    import torch
    from transformers import DynamicCache

    from headscope.probe.hook import cache_kwarg
    model = lm.model
    t0 = time.perf_counter()
    with torch.no_grad():
        ids = torch.tensor([inst.input_ids])
        model.set_attn_implementation("sdpa")
        past = {cache_kwarg(model): DynamicCache(config=model.config)}  # filled in place by each call
        model(input_ids=ids[:, :-1], use_cache=True, **past)
        model.set_attn_implementation("eager")
        inp, toks, tops = ids[:, -1:], [], []
        for _ in range(steps):
            out = model(input_ids=inp, use_cache=True, output_attentions=True, **past)
            nxt = int(out.logits[0, -1].argmax())
            tops.append(torch.stack([a[0, :, -1].argmax(-1) for a in out.attentions]))   # [L, H]
            toks.append(nxt)
            inp = torch.tensor([[nxt]])
            del out
    top1 = torch.stack(tops)                                              # [steps, L, H]
    s, e = inst.span
    prompt = torch.tensor(inst.input_ids)
    hit = (top1 >= s) & (top1 < e) & (prompt[top1.clamp(max=len(prompt) - 1)] == torch.tensor(toks)[:, None, None])
    scores = (hit.sum(0).double() / (e - s)).numpy()
    dt = time.perf_counter() - t0
    return dt, toks, top1, np.asarray(scores)


def worker(mode: str, length: int, steps: int, out_dir: str) -> dict:
    import torch
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from headscope.probe import load_model
    lm = load_model("smollm2-135m")
    inst = build(lm, length)
    import psutil
    base = psutil.Process().memory_info().rss
    with RssSampler() as rss:
        dt, toks, top1, scores = (run_headscope if mode == "headscope" else run_reference)(lm, inst, steps)
    torch.save({"toks": toks, "top1": top1, "scores": torch.as_tensor(scores)}, f"{out_dir}/{mode}_{length}.pt")
    return {"mode": mode, "length": length, "n_prompt": inst.n_prompt, "steps": len(toks), "time_s": round(dt, 2),
            "peak_rss_gb": round(rss.peak / 2**30, 3), "peak_over_loaded_gb": round((rss.peak - base) / 2**30, 3),
            "text": lm.tokenizer.decode(toks)[:60]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--worker", nargs=3, metavar=("MODE", "LENGTH", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.steps, args.worker[2])))
        return
    import tempfile

    import torch
    tmp = tempfile.mkdtemp(prefix="bench-retrieval-")
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        for mode in ("headscope", "reference"):
            out = subprocess.run([sys.executable, __file__, "--worker", mode, str(length), tmp,
                                  "--steps", str(args.steps)], capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{mode} at {length} failed")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
        a, b = (torch.load(f"{tmp}/{m}_{length}.pt") for m in ("headscope", "reference"))
        same_tok = a["toks"] == b["toks"]
        agree = float((a["top1"] == b["top1"]).float().mean()) if same_tok else float("nan")
        score_diff = float((a["scores"] - b["scores"]).abs().max()) if same_tok else float("nan")
        rows[-1]["check"] = rows[-2]["check"] = {"same_tokens": same_tok, "top1_agreement": round(agree, 5),
                                                 "max_score_diff": score_diff}
    print("\n| length | prompt tokens | steps | headscope time | reference time | headscope peak RSS (over loaded) "
          "| reference peak RSS (over loaded) | same tokens | top-1 agreement |")
    print("|---|---|---|---|---|---|---|---|---|")
    for h, r in zip(rows[::2], rows[1::2]):
        print(f"| {h['length']} | {h['n_prompt']} | {h['steps']} | {h['time_s']} s | {r['time_s']} s | "
              f"{h['peak_rss_gb']} GB (+{h['peak_over_loaded_gb']}) | {r['peak_rss_gb']} GB (+{r['peak_over_loaded_gb']}) | "
              f"{h['check']['same_tokens']} | {h['check']['top1_agreement']} |")


if __name__ == "__main__":
    main()
