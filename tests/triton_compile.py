"""Compile the Triton kernels for a CUDA architecture without a GPU (Triton's bundled ptxas).

Run as a script by ``test_kernels_triton_compile.py`` in a process without ``TRITON_INTERPRET``
(under the interpreter ``@triton.jit`` functions cannot be compiled). Prints one JSON line per
(kernel variant, config): registers and stack bytes per thread (cuobjdump), shared memory, the
number of asynchronous global-to-shared copies in the TTGIR (0: the key loads are not software
pipelined), or the compile error. The interpreter tests check semantics; this checks that the
kernels lower to real GPU code and what they cost in registers, which the interpreter cannot see.

    python tests/triton_compile.py --arch 90 [--all-configs | --pruned T] [--variant NAME ...]
        [--dtype fp32 --head-dim 256]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from headscope.kernels import triton_attn as ta  # noqa: E402
from headscope.kernels.autotune import prune  # noqa: E402
from headscope.kernels import triton_stats as ts  # noqa: E402

POINTERS = {"Q": "*{dt}", "K": "*{dt}", "V": "*{dt}", "Out": "*{dt}", "KvOk": "*i8", "Uni": "*i32",
            "SegBounds": "*i32", "TopI": "*i32", "Bias": "*fp32", "LseEff": "*fp32", "LseRaw": "*fp32",
            "Ent": "*fp32", "WinD": "*fp32", "MeanD": "*fp32", "Seg": "*fp32", "TopV": "*fp32", "Col": "*fp32",
            "Lse": "*fp32", "RowPart": "*fp32", "ColPart": "*fp32"}
FLOATS = {"qk_scale", "softcap", "win_dist"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MASKS = dict(CAUSAL=True, HAS_WINDOW=True, SOFTCAP=True, HAS_KV_VALID=True, HAS_BIAS=True, HAS_UNIFORM=True,
             UPCAST=False)
ALL_STATS = dict(RAW_LSE=True, ENTROPY=True, WIN_DIST=True, MEAN_DIST=True, NSEG=2, SEGP=2, TOPK=5, TOPKP=8)
LSE_MASKS = {k: v for k, v in MASKS.items() if k not in ("HAS_BIAS", "HAS_UNIFORM")}
VARIANTS = {  # name: (kernel, its autotune configs, constexprs beyond the masks and tiles)
    "fwd_all_stats": (ta._attn_stats_fwd, ta._configs, dict(MASKS, **ALL_STATS, HAS_OUT=True)),
    "fwd_stats_no_output": (ta._attn_stats_fwd, ta._configs, dict(MASKS, **ALL_STATS, HAS_OUT=False)),
    "fwd_output_lse": (ta._attn_stats_fwd, ta._configs,
                       dict(MASKS, RAW_LSE=False, ENTROPY=False, WIN_DIST=False, MEAN_DIST=False, NSEG=0, SEGP=1,
                            TOPK=0, TOPKP=2, HAS_OUT=True)),
    "col_mass": (ta._attn_col_mass, ta._configs, dict(MASKS, HAS_BAND=True)),
    # statistics from a known LSE (triton_stats): everything, the retrieval/sink set, top-5 alone
    "lse_all_stats": (ts._stats_from_lse, ts._configs,
                      dict(LSE_MASKS, ENTROPY=True, WIN_DIST=True, MEAN_DIST=True, NSEG=2, NRP=8, TOPK=5, TOPKP=8,
                           COL_MASS=True, HAS_BAND=True)),
    "lse_top1_entropy_col": (ts._stats_from_lse, ts._configs,
                             dict(LSE_MASKS, ENTROPY=True, WIN_DIST=False, MEAN_DIST=False, NSEG=0, NRP=4, TOPK=1,
                                  TOPKP=2, COL_MASS=True, HAS_BAND=False)),
    "lse_top5": (ts._stats_from_lse, ts._configs,
                 dict(LSE_MASKS, ENTROPY=False, WIN_DIST=False, MEAN_DIST=False, NSEG=0, NRP=1, TOPK=5, TOPKP=8,
                      COL_MASS=False, HAS_BAND=False)),
}


def signature(fn, dtype: str) -> dict:
    return {p.name: "constexpr" if p.is_constexpr else POINTERS[p.name].format(dt=dtype) if p.name in POINTERS
            else "fp32" if p.name in FLOATS else "i32" for p in fn.params}


def resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    return {"regs": int(m.group(1)), "stack": int(m.group(2))} if m else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 (A100) or 90 (H100)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--all-configs", action="store_true", help="every autotune config (default: first and last)")
    ap.add_argument("--variant", action="append", choices=list(VARIANTS), help="only these (repeatable)")
    ap.add_argument("--pruned", type=int, metavar="T",
                    help="the configs autotune.prune keeps for T queries and keys (instead of first and last)")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    prec = "tf32x3" if args.dtype == "fp32" else None
    for name, (kernel, space, extra) in VARIANTS.items():
        if args.variant and name not in args.variant:
            continue
        configs = space() if args.all_configs else [space()[0], space()[-1]]
        if args.pruned:
            q = torch.empty(0, dtype=DTYPES[args.dtype])
            configs = prune(space(), {"Q": q, "TQ_BUCKET": args.pruned, "TK_BUCKET": args.pruned},
                            HEAD_DIM=args.head_dim, HEAD_DV=args.head_dim, HAS_OUT=extra.get("HAS_OUT", False))
        for cfg in configs:
            consts = dict(cfg.kwargs, **extra, HEAD_DIM=args.head_dim, DOT_PRECISION=prec)
            if "HEAD_DV" in kernel.arg_names:
                consts["HEAD_DV"] = args.head_dim
            row = {"variant": name, "config": {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}}
            try:
                k = triton.compile(ASTSource(kernel.fn, signature(kernel.fn, args.dtype), consts), target=target,
                                   options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
                row.update(ok=True, shared=k.metadata.shared, **resources(k.asm["cubin"]),
                           async_copies=k.asm["ttgir"].count("async_copy_global_to_local"))
            except Exception as e:  # noqa: BLE001 - reported, the test fails on it
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[-800:]}")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
