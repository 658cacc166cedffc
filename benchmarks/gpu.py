"""Issue 15 on one GPU, in one run: correctness on fresh inputs, then every timing of the issue's table.

Sized for < 6 min on one H100/H200 (most of it compiling and autotuning). Run from outside the
repository root with the project installed, so that the installed package is what is measured:

    pip install --no-deps --no-build-isolation -e . && cd /tmp && OUT=/tmp/out python <repo>/benchmarks/gpu.py

Sections (each one prints its table as soon as it is done; a failing section is reported and the
run goes on, so one bad kernel does not cost the rest of the device time):

0. preflight (seconds): torch's flash op takes the arguments used and matches the reference on
   a windowed chunk of a prefill; the run stops here otherwise.
1. correctness: ``attend(backend="triton")`` (flash output + LSE, statistics from the known
   LSE; the fused forward where it delegates) against the float64 reference
   (``attend_reference`` on the GPU) on fresh random inputs (the seed is printed): GQA 32/8, a
   chunk of a prefill (flash's bottom-right causal alignment), sliding window, non-causal,
   padding, soft-capping at head_dim 256, fp32 head_dim 256, split-K decoding, output and
   probability edits; bf16, fp16, fp32; bitwise repeatability of three calls.
2. kernels: bf16, B=1, 32 query / 8 KV heads, D=128, causal, T = 4k / 16k / 32k;
   ``triton.testing.do_bench`` medians, ratios to SDPA (flash) output only. "stats pass only" is
   the issue's "statistics only" row: the Triton pass given the LSE (``output=False`` still needs
   flash for the LSE, so it would time the same as "out + all stats").
3. per-statistic cost at 32k on top of flash output + LSE.
4. decoding: one query over 32k cached keys, output + top-5 + entropy vs SDPA.
5. cold start: the first call of a kernel variant in a fresh process, twice with one Triton cache
   directory (the second must reuse the autotune results on disk).
6. model: random-init Llama with 4 layers of Llama-3-8B's shape, bf16, logits of the last
   position: HF SDPA / ``probe.capture`` with every statistic / HF eager with
   ``output_attentions=True`` (8k only), time and peak extra CUDA memory.
7. circuit (issue 17, last so that it cannot cost the rest): ``CircuitGraph`` on CUDA, float32,
   a random-init Llama of SmolLM2-135M's shape: the graph's logits vs HF's and EAP-IG scores vs
   the same computation on the CPU (64 tokens), then time, peak CUDA memory and
   ``attribution_bytes`` of one EAP-IG step (1 point) at 4k and 16k tokens.

With ``OUT`` set, the log goes to ``$OUT/gpu.log`` and the numbers to ``$OUT/gpu.json``.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import triton
from triton.testing import do_bench

from headscope.kernels import HeadEdits, StatsSpec, attend
from headscope.kernels.reference import attend_reference
from headscope.kernels.triton_stats import _flash_out_lse, stats_from_lse

OUT = os.environ.get("OUT")
RESULTS: dict = {}
_LOG = open(os.path.join(OUT, "gpu.log"), "w") if OUT else None
DEV = "cuda"
BF16 = torch.bfloat16
H, HKV, D = 32, 8, 128
CASE_T = 1024                        # correctness cases (float64 reference: [32, T, T] doubles)
KERNEL_T = (4096, 16384, 32768)      # the kernel table; the last one is the per-statistic length
DECODE_T = 32768
MODEL_T = (8192, 32768)              # eager runs at the first length only
CIRCUIT_T = (4096, 16384)            # one EAP-IG step of a SmolLM2-shaped float32 model
MODEL_CFG = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 num_hidden_layers=4, vocab_size=128256, max_position_embeddings=32768, rope_theta=500000.0)


def log(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    if _LOG:
        _LOG.write(line + "\n")
        _LOG.flush()


def section(fn):
    """Run one section; report its failure and carry on."""
    def run():
        log(f"\n== {fn.__name__} ==")
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:  # noqa: BLE001 - the run must go on to the next section
            log(traceback.format_exc())
            RESULTS.setdefault("failed_sections", []).append(fn.__name__)
        log(f"({fn.__name__}: {time.perf_counter() - t0:.0f} s)")
    return run


def all_stats(T: int) -> StatsSpec:
    """The issue's 'every statistic': lse, top-5, entropy, 2 segments, window and mean distance, column mass."""
    return StatsSpec(lse=True, topk=5, entropy=True, segments=((0, 4), (T // 2, T)), window_dist=128,
                     mean_dist=True, col_mass=True)


RETRIEVAL = StatsSpec(lse=True, topk=1, entropy=True, col_mass=True)


def qkv(B, Hq, Hk, Tq, Tk, d, dtype, g, scale=1.0):
    """q/k/v as a model produces them: [B, T, H, D] projections viewed as [B, H, T, D]."""
    q = (torch.randn(B, Tq, Hq, d, generator=g, device=DEV) * scale).to(dtype).transpose(1, 2)
    k = (torch.randn(B, Tk, Hk, d, generator=g, device=DEV) * scale).to(dtype).transpose(1, 2)
    v = torch.randn(B, Tk, Hk, d, generator=g, device=DEV).to(dtype).transpose(1, 2)
    return q, k, v


def max_err(got, ref) -> float:
    """max |got - ref| / (1 + |ref|) over finite entries; inf if the -inf patterns differ."""
    got, ref = got.double(), ref.double()
    if not torch.equal(torch.isinf(got), torch.isinf(ref)):
        return math.inf
    fin = torch.isfinite(ref)
    return float(((got - ref).abs() / (1 + ref.abs()))[fin].max()) if fin.any() else 0.0


def preflight() -> None:
    """Seconds, not minutes: torch's flash op takes these arguments and matches the reference
    (chunk of a prefill + window: alignment), else stop before spending device time."""
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = qkv(1, 4, 2, 64, 256, 64, BF16, g)
    out, lse = _flash_out_lse(q, k, v, scale=0.125, causal=True, window=100)
    ref = attend_reference(q, k, v, StatsSpec(lse=True), scale=0.125, window=100)
    err = max_err(lse, ref.stats["lse"]), float((out.double() - ref.out.double()).abs().max())
    log(f"preflight: flash lse err {err[0]:.1e}, out err {err[1]:.1e}")
    if not (err[0] <= 2e-5 and err[1] <= 2e-2):
        raise SystemExit("preflight failed: torch's flash output/LSE do not match the contract; fix _flash_out_lse")


@section
def correctness():
    seed = int(time.time()) % 100000
    log(f"seed {seed} (fresh inputs each run); tolerance 2e-5 on statistics (rel. to 1 + |ref|), "
        "2e-2 on bf16/fp16 out; topk_idx: the reference's probability at the returned keys")
    g = torch.Generator(device=DEV).manual_seed(seed)
    edits_out = HeadEdits(replace_mask=torch.arange(H) % 5 == 1, replace_value=torch.randn(H, D),
                          out_scale=torch.rand(H) * 2)
    edits_prob = HeadEdits(uniform=torch.arange(H) % 7 == 0, key_pos=torch.tensor([0, 3, CASE_T * 2 // 3]),
                           key_scale=torch.rand(H))
    n, h = CASE_T, CASE_T // 2
    pad = torch.ones(1, n, dtype=torch.bool, device=DEV)
    pad[0, torch.randperm(n, generator=g, device=DEV)[:n // 5]] = False
    cases = [  # name, (Hq, Hk, Tq, Tk, d, dtype), attention kwargs, edits, spec
        ("gqa bf16", (H, HKV, n, n, D, BF16), {}, None, all_stats(n)),
        ("gqa fp16 + output edits", (H, HKV, n, n, D, torch.float16), {}, edits_out, all_stats(n)),
        ("chunk Tq=T/4 (alignment)", (H, HKV, n // 4, n, D, BF16), {}, None, all_stats(n)),
        ("window T/4", (H, HKV, n, n, D, BF16), {"window": n // 4}, None, all_stats(n)),
        ("non-causal, band", (H, HKV, h, h, D, BF16), {"causal": False}, None,
         StatsSpec(lse=True, topk=3, entropy=True, col_mass=True, col_band=(0, 64))),
        ("padding kv_valid", (H, HKV, n, n, D, BF16), {"kv_valid": pad}, None, all_stats(n)),
        ("softcap D256", (8, 2, h, h, 256, BF16), {"softcap": 30.0}, None, all_stats(h)),
        ("fp32 D256 all", (8, 2, h, h, 256, torch.float32), {}, None, all_stats(h)),
        ("prob edits", (H, HKV, n, n, D, BF16), {}, edits_prob, all_stats(n)),
        ("decode Tq1 Tk=4T", (H, HKV, 1, 4 * n, D, BF16), {}, None, StatsSpec(lse=True, topk=5, entropy=True)),
        ("decode Tq4 Tk=8T top1", (H, HKV, 4, 8 * n, D, BF16), {}, None, RETRIEVAL),
        ("top-k 20 (beyond list)", (8, 2, h // 2, h // 2, 64, BF16), {}, None, StatsSpec(topk=20)),
    ]
    rows, ok_all = [], True
    for name, (hq, hk, tq, tk, d, dt), kw, edits, spec in cases:
        q, k, v = qkv(1, hq, hk, tq, tk, d, dt, g)
        ref = attend_reference(q, k, v, spec, edits, **kw)
        if spec.topk:  # the chosen keys must carry the reported probabilities (ties make indices ambiguous)
            p_ref = attend_reference(q, k, v, StatsSpec(pattern_rows=(0, tq)), edits, **kw).stats["pattern"]
        # backend "triton" delegates to triton-fused for prob edits, softcap, padding, fp32
        got = attend(q, k, v, spec, edits, backend="triton", **kw)
        errs = {key: max_err(got.stats[key], ref.stats[key]) for key in ref.stats if key != "topk_idx"}
        if spec.topk:
            errs["topk_idx"] = max_err(p_ref.gather(-1, got.stats["topk_idx"]), ref.stats["topk_prob"])
        out_err = float((got.out.double() - ref.out.double()).abs().max())
        tol_out = 2e-5 if dt == torch.float32 else 2e-2
        worst = max(errs, key=errs.get)
        ok = errs[worst] <= 2e-5 and out_err <= tol_out and set(got.stats) == set(ref.stats)
        ok_all &= ok
        rows.append({"case": name, "ok": ok, "worst": worst, "err": errs[worst], "out_err": out_err})
        log(f"{'ok  ' if ok else 'FAIL'} {name:28s} worst {worst:13s} {errs[worst]:.1e}  out {out_err:.1e}")
    q, k, v = qkv(1, H, HKV, n, n, D, BF16, g)     # column sums without atomics: bitwise repeatable
    runs = [attend(q, k, v, StatsSpec(col_mass=True, entropy=True), backend="triton").stats for _ in range(3)]
    same = all(torch.equal(r[key], runs[0][key]) for r in runs[1:] for key in runs[0])
    ok_all &= same
    log(f"{'ok  ' if same else 'FAIL'} three identical calls give bitwise-identical col_mass and entropy")
    RESULTS["correctness"] = {"seed": seed, "all_ok": ok_all, "rows": rows, "deterministic": same}


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True)


@section
def kernels():
    g = torch.Generator(device=DEV).manual_seed(1)
    table = {}
    for T in KERNEL_T:
        q, k, v = qkv(1, H, HKV, T, T, D, BF16, g)
        base = bench(lambda: sdpa(q, k, v))
        lse = _flash_out_lse(q, k, v, scale=D ** -0.5, causal=True, window=None)[1]
        masks = dict(scale=D ** -0.5, causal=True, window=None, softcap=None, kv_valid=None)
        row = {"sdpa_ms": base,
               "flash out+lse": bench(lambda: _flash_out_lse(q, k, v, scale=D ** -0.5, causal=True, window=None)),
               "stats pass only, all": bench(lambda: stats_from_lse(q, k, lse, all_stats(T), **masks)),
               "out + all stats": bench(lambda: attend(q, k, v, all_stats(T), backend="triton")),
               "out + top1/entropy/col": bench(lambda: attend(q, k, v, RETRIEVAL, backend="triton"))}
        table[T] = row
        log(f"T={T}: SDPA {base:.3f} ms; "
            + "; ".join(f"{n} {ms / base:.2f}x" for n, ms in row.items() if n != "sdpa_ms"))
    RESULTS["kernels"] = table
    names = [n for n in table[KERNEL_T[0]] if n != "sdpa_ms"]
    log(f"\n| bf16, B=1, {H}/{HKV} heads, D={D}, causal | " + " | ".join(f"T={T}" for T in table) + " |")
    log("|---|" + "---|" * len(table))
    log("| SDPA flash, output only | " + " | ".join(f"{table[T]['sdpa_ms']:.3f} ms" for T in table) + " |")
    for n in names:
        log(f"| {n} | " + " | ".join(f"{table[T][n] / table[T]['sdpa_ms']:.2f}x" for T in table) + " |")


@section
def per_statistic():
    T = KERNEL_T[-1]
    g = torch.Generator(device=DEV).manual_seed(2)
    q, k, v = qkv(1, H, HKV, T, T, D, BF16, g)
    base = bench(lambda: attend(q, k, v, StatsSpec(lse=True), backend="triton"))
    single = {"top-1": StatsSpec(topk=1), "top-5": StatsSpec(topk=5), "entropy": StatsSpec(entropy=True),
              "2 segments": StatsSpec(segments=((0, 4), (T // 2, T))), "window distance": StatsSpec(window_dist=128),
              "mean distance": StatsSpec(mean_dist=True), "column mass": StatsSpec(col_mass=True)}
    row = {"out + lse (ms)": base}
    for name, spec in single.items():
        row[name] = bench(lambda: attend(q, k, v, spec, backend="triton")) - base
    RESULTS["per_statistic_ms"] = {"T": T, **row}
    log(f"T={T}, ms on top of output + lse ({base:.2f} ms): " + ", ".join(f"{n} +{ms:.2f}" for n, ms in row.items()
                                                                      if n != "out + lse (ms)"))


@section
def decoding():
    g = torch.Generator(device=DEV).manual_seed(3)
    q, k, v = qkv(1, H, HKV, 1, DECODE_T, D, BF16, g)
    spec = StatsSpec(topk=5, entropy=True)
    base = bench(lambda: sdpa(q, k, v))
    new = bench(lambda: attend(q, k, v, spec, backend="triton"))
    fused = bench(lambda: attend(q, k, v, spec, backend="triton-fused"))
    kv_bytes = 2 * k.numel() * k.element_size()
    RESULTS["decoding"] = {"Tk": DECODE_T, "sdpa_ms": base, "triton_ms": new, "triton_fused_ms": fused}
    log(f"decode {DECODE_T} keys: SDPA {base:.3f} ms ({kv_bytes / base / 1e9:.2f} TB/s); out + top-5 + entropy: "
        f"triton {new:.3f} ms ({new / base:.2f}x), triton-fused {fused:.3f} ms ({fused / base:.2f}x)")


_COLD = """
import time, torch
t0 = time.perf_counter()
from headscope.kernels import StatsSpec, attend
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(1, 32, 4096, 128, device="cuda", generator=g, dtype=torch.bfloat16)
k = torch.randn(1, 8, 4096, 128, device="cuda", generator=g, dtype=torch.bfloat16)
spec = StatsSpec(lse=True, topk=5, entropy=True, segments=((0, 4), (2048, 4096)), window_dist=128,
                 mean_dist=True, col_mass=True)
t1 = time.perf_counter()
attend(q, k, k, spec, backend="triton")
torch.cuda.synchronize()
print(f"{time.perf_counter() - t1:.2f}")
"""


@section
def cold_start():
    env = dict(os.environ, TRITON_CACHE_DIR=tempfile.mkdtemp(prefix="triton-cache-"))
    times = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", _COLD], env=env, capture_output=True, text=True, timeout=240)
        if res.returncode:
            raise RuntimeError(res.stderr[-2000:])
        times.append(float(res.stdout.split()[-1]))
    RESULTS["cold_start_s"] = times
    log(f"first call of the all-statistics variant at 4k: fresh cache {times[0]:.1f} s, "
        f"second process {times[1]:.1f} s")


@section
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from headscope.probe import Probe

    cfg = LlamaConfig(**MODEL_CFG)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg).to(DEV, BF16).eval()
    probe = Probe(lm, backend="triton")
    rows = {}
    for T in MODEL_T:
        ids = torch.randint(0, cfg.vocab_size, (1, T), device=DEV)
        modes = {"sdpa": None, "capture": None} | ({"eager": None} if T == MODEL_T[0] else {})
        for mode in modes:
            lm.set_attn_implementation("eager" if mode == "eager" else "sdpa")

            def run():
                with torch.no_grad():
                    if mode == "capture":
                        with probe.capture(stats=all_stats(T)):
                            return probe.forward(ids, logits_to_keep=1)
                    return lm(ids, logits_to_keep=1, output_attentions=mode == "eager")

            run()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            ms = do_bench(run, warmup=1, rep=3 if T > MODEL_T[0] else 10, return_mode="median")
            modes[mode] = {"ms": ms, "extra_gb": (torch.cuda.max_memory_allocated() - before) / 2**30}
        rows[T] = modes
        base = modes["sdpa"]["ms"]
        log(f"T={T}: " + "; ".join(f"{m} {r['ms']:.1f} ms ({r['ms'] / base:.2f}x, +{r['extra_gb']:.2f} GB)"
                                   for m, r in modes.items()))
    RESULTS["model"] = rows


@section
def circuit():
    from transformers import LlamaConfig, LlamaForCausalLM

    from headscope.analyses.circuit_core import attribute
    from bench_circuit import half_corrupted  # this folder is on sys.path when gpu.py runs as a script
    from headscope.probe.graph import CircuitGraph

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      num_hidden_layers=30, vocab_size=49152, max_position_embeddings=16384)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg).float().eval()

    pair = functools.partial(half_corrupted, 1, lo=0, hi=cfg.vocab_size)  # (T, seed) -> a 1-row Batch

    seed = int.from_bytes(os.urandom(4), "little")
    small = pair(64, seed)
    on_cpu = attribute(CircuitGraph(lm), [small], steps=1)
    lm.to(DEV)
    graph = CircuitGraph(lm)
    on_gpu = attribute(graph, [small.to(DEV)], steps=1)
    with torch.no_grad():
        logits, _ = graph.forward(small.clean.to(DEV))
        hf = lm(small.clean.to(DEV)).logits
    rel = float((on_gpu - on_cpu).abs().max() / on_cpu.abs().max())
    log(f"seed {seed}: graph logits vs HF {max_err(logits, hf):.2e}; EAP-IG scores CUDA vs CPU, max |diff| / "
        f"max |score| = {rel:.2e}")
    rows = {"logits_err": max_err(logits, hf), "scores_rel_err": rel}
    for T in CIRCUIT_T:
        b = pair(T, seed + 1).to(DEV)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        attribute(graph, [b], steps=1)
        torch.cuda.synchronize()
        rows[T] = {"s": time.perf_counter() - t0, "peak_gb": (torch.cuda.max_memory_allocated() - before) / 2**30,
                   "estimate_gb": graph.attribution_bytes(1, T) / 2**30}
        log(f"T={T}: one EAP-IG step {rows[T]['s']:.1f} s, peak +{rows[T]['peak_gb']:.2f} GB "
            f"(attribution_bytes {rows[T]['estimate_gb']:.2f} GB)")
    RESULTS["circuit"] = rows


def main() -> None:
    t0 = time.perf_counter()
    import transformers

    cached = "cache_results" in inspect.signature(triton.autotune).parameters
    log(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} "
        f"(autotune cache_results: {cached}) | transformers {transformers.__version__} | "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    try:
        preflight()
    except Exception:  # noqa: BLE001 - logged where the run's output goes, then stop
        log(traceback.format_exc())
        raise SystemExit("preflight failed: torch's flash op call in triton_stats._flash_out_lse") from None
    for run in (correctness, kernels, per_statistic, decoding, cold_start, model, circuit):
        run()
    RESULTS["total_s"] = time.perf_counter() - t0
    log(f"\ntotal {RESULTS['total_s']:.0f} s")
    if OUT:
        with open(os.path.join(OUT, "gpu.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


if __name__ == "__main__":
    main()
