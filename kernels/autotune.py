"""Autotune spaces for the Triton capture kernels: pruned before benchmarking, cached on disk.

Why: on an H200 the first call of a kernel variant spent 27-33 s benchmarking every config
(220 s for fp32 with head_dim 256, whose 64x32 / 8-warp / 2-stage config did not even fit in
shared memory). Three remedies, all here:

- ``prune``: Triton's ``early_config_prune`` hook drops, before anything is compiled, the
  configs whose tiles are larger than the problem (a 128-row tile for a 1-query decoding step),
  16-row tiles for long prefills, and those whose pipelined tiles cannot fit in the device's
  shared memory (a rough estimate, below; fp32 at head_dim 256 also keeps only the 16-row
  tiles, which ptxas measured to fit).
- ``tuned``: ``triton.autotune(..., cache_results=True)`` where the installed Triton has it
  (3.9 here; checked by signature, not by version), so the chosen config is stored in Triton's
  cache directory next to the compiled kernels and a second process re-benchmarks nothing.
- Under the interpreter a single config (more than one raises "0 active drivers" there).

Failure modes: the shared-memory estimate is rough both ways (the compiler keeps Q in registers
for wgmma but adds scratch for layout conversions: 262 KB measured where it says 205 KB for
fp32 64x32 at head_dim 256); a config that passes it can still fail to compile, which Triton's
autotuner then skips at the price of that compile. ``tests/triton_compile.py`` reports the real
figure per variant.
"""
from __future__ import annotations

import inspect
import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# sm_90 (H100/H200): 227 KB per block with the opt-in limit; the device's own value wins when known
_SMEM_SM90 = 232448


def smem_limit() -> int:
    """Shared memory one program may use on the current device (sm_90's figure without a GPU)."""
    try:
        import torch

        if torch.cuda.is_available():
            dev = torch.cuda.current_device()
            return int(torch.cuda.get_device_properties(dev).shared_memory_per_block_optin)
    except (ImportError, AttributeError, RuntimeError):
        pass
    return _SMEM_SM90


def smem_estimate(cfg: triton.Config, head_dim: int, head_dv: int, elem: int, with_v: bool) -> int:
    """Bytes of shared memory for one config: the Q tile plus ``num_stages`` K (and V) tiles,
    plus one [BLOCK_M, BLOCK_N] fp32 scratch tile for layout conversions."""
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    kv = bn * head_dim + (bn * head_dv if with_v else 0)
    return elem * (bm * head_dim + max(cfg.num_stages, 1) * kv) + 4 * bm * bn


def prune(configs, named_args, **kwargs):
    """``early_config_prune``: keep configs whose tiles fit the problem and the shared memory.

    Reads the kernel's ``Q`` dtype, ``HEAD_DIM`` / ``HEAD_DV`` / ``HAS_OUT`` constexprs and the
    ``TQ_BUCKET`` / ``TK_BUCKET`` arguments (powers of two of the query and key counts). Never
    returns an empty list: if nothing fits, the smallest config is kept (and fails loudly).
    """
    args = {**named_args, **kwargs}
    elem = args["Q"].element_size()
    hd, hdv = args["HEAD_DIM"], args.get("HEAD_DV", args["HEAD_DIM"])
    with_v = bool(args.get("HAS_OUT", False))
    tq, tk = args["TQ_BUCKET"], args["TK_BUCKET"]
    limit = smem_limit()
    fit = [c for c in configs
           if c.kwargs["BLOCK_M"] <= max(16, tq) and c.kwargs["BLOCK_N"] <= max(16, tk)
           and smem_estimate(c, hd, hdv, elem, with_v) <= limit]
    if elem == 4 and hd > 128:
        # fp32, head_dim 256: every 64-row tile of the fused forward needs > 232 KB or spills
        # kilobytes (ptxas sm_90, tests/triton_compile.py --dtype fp32 --head-dim 256)
        keep = [c for c in fit if c.kwargs["BLOCK_M"] == 16]
    else:   # 16-row tiles only for decoding / tiny Tq, where a 64-row one would be mostly empty
        keep = [c for c in fit if c.kwargs["BLOCK_M"] >= 64 or tq < 64]
    return keep or fit or [min(configs, key=lambda c: smem_estimate(c, hd, hdv, elem, with_v))]


def tuned(configs, key, reset_to_zero=None):
    """``triton.autotune`` with pruning, and with on-disk results where this Triton supports it.

    ``reset_to_zero``: output buffers the kernel accumulates into (read-add-write); benchmarking
    runs the kernel once per config on the real buffers, so without the reset the first call's
    result would hold every trial's sum. Such a buffer must not alias any input.
    """
    if INTERPRET:
        return triton.autotune(configs=configs[:1], key=key)
    extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                           reset_to_zero=reset_to_zero, **extra)
