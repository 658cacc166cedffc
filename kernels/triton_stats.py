"""Statistics from a known normaliser: output + LSE from a flash kernel, then one Triton pass.

Why: the fused forward (``triton_attn``) rescales every running statistic at each key tile
and repeats the flash forward's P @ V; on an H200 that cost 6.7x SDPA at 32k. With each row's
log-sum-exp known in advance, ``p = exp(x - lse)`` is final the first time a score is seen, so
one extra QK^T pass gives every statistic with plain sums: no rescaling, no V, no P @ V.

``attend_triton_lse`` (same contract as ``attend_triton``):

1. Output and LSE. On CUDA with bf16/fp16 inputs, no soft-capping and no padding mask: torch's
   own FlashAttention-2 (``aten._flash_attention_forward``: native GQA, bottom-right causal
   alignment, sliding window). Otherwise the fused Triton forward in its output + LSE variant.
   Output-only edits (replace, out_scale) are applied afterwards in torch. Edits that change the
   probabilities (uniform heads, key re-weighting) need the edited normaliser *and* the raw LSE,
   which no flash kernel returns: those calls go to ``attend_triton`` whole (one fused pass).
2. ``_stats_from_lse``: the statistics pass. Grid (query slab, key split, batch * head).

   - Row statistics are per-split partial sums ``sum p f(t, s)`` (entropy as ``sum p (lse - x)``,
     each term >= 0, so no cancellation for peaked rows), written to [splits, rows, columns] and
     summed in torch. Because ``p`` is already normalised, partial sums over key splits add
     exactly: this is split-K decoding (``Tq == 1`` over many programs) without the LSE-weighted
     merge that flash-decoding needs for running (unnormalised) sums.
   - Top-k keeps the k best logits per row and split; a tile is merged only for as many rounds
     as the row that needs most has keys above its current k-th value (zero rounds: the tile is
     skipped after one compare). Top-1 is a running max with its index. Splits' lists are merged
     in torch by a stable sort (ties: lowest key index, as the contract says).
   - Column mass is fused into the same pass, query-major: a program owns query blocks
     ``s, 2S-1-s, 2S+s, ...`` (snake order, so causal work is balanced) and accumulates its
     column sums into its own slice ``ColPart[s]`` (read-add-write by that program only), then
     torch sums the slabs in a fixed order. **Deterministic** (no atomics: bitwise-repeatable
     results for tests and for comparing runs), at the price of n_slabs x Tk x heads fp32 of
     scratch (64 MB at 32k keys, 32 heads, 16 slabs). Column atomics would save that scratch
     and the final sum, but make the low bits depend on scheduling; the key-major alternative
     (program per key block) would need atomics or a second pass for every row statistic.

Rows whose k-th probability is 0 and ``topk > MAX_TOPK`` are ranked densely on the device from
the known LSE by ``triton_attn._fix_topk`` (exact tie rule); ``pattern`` rows likewise. Nothing
here falls back to the chunked backend; the one remaining chunked fallback on CUDA is
``attend_triton``'s own for ``topk > MAX_TOPK``, reached here only with probability edits.

Numerics: the LSE from FlashAttention is computed from the same bf16/fp16 operands with fp32
accumulation, so ``sum_s p`` is 1 to fp32 rounding (the rows are not renormalised). fp32 inputs
take the Triton forward for the LSE and 3xTF32 dots here, as ``triton_attn``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .autotune import INTERPRET, tuned
from .chunked import _col_count, _visible_counts
from .spec import AttnResult, HeadEdits, StatsSpec, check_inputs
from .triton_attn import (MAX_TOPK, _apply_output_edits, _band_bounds, _dense_probs, _fix_topk, _head_bases,
                          _load_key_tile, _pow2, _tile_logits, attend_triton)

_SPLIT_ALIGN = 256      # key splits are multiples of every BLOCK_N, so no tile straddles two
_MIN_SPLIT = 1024       # keys per split below which splitting costs more than it fills


def _configs():
    # the tiles that do not spill with every statistic on at head_dim 128 (ptxas sm_90,
    # tests/triton_compile.py --all-configs): 16-row tiles for decoding, 64/128-row at 8 warps;
    # the key loop's stages are set in the kernel (tl.range)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=3)
            for bm, bn, w in ((16, 32, 4), (16, 64, 4), (64, 32, 8), (64, 64, 8), (128, 32, 8), (128, 64, 8))]


_TUNE_KEY = ["TQ_BUCKET", "TK_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_WINDOW", "SOFTCAP", "HAS_KV_VALID",
             "ENTROPY", "WIN_DIST", "MEAN_DIST", "NSEG", "TOPK", "COL_MASS", "HAS_BAND", "UPCAST"]


@triton.jit
def _topk_insert(tk_v, tk_i, x, start_n, n_rounds, TOPK: tl.constexpr, TOPKP: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Insert a tile's best logits into the sorted per-row lists, ``n_rounds`` (<= TOPK) times.

    Each round takes every row's tile maximum (lowest index on ties) and inserts it after the
    list's entries >= it: those come from earlier tiles, i.e. lower indices, so they win ties.
    A value not above the k-th entry lands at or past slot TOPK and changes nothing. Slots past
    TOPK (padding to a power of two) stay -inf.
    """
    kcol = tl.arange(0, TOPKP)[None, :]
    offs_n = tl.arange(0, BLOCK_N)
    for r in tl.static_range(TOPK):   # unrolled + guarded: a nested scf.for would stop the K pipelining
        if r < n_rounds:
            tv, ti = tl.max(x, 1, return_indices=True, return_indices_tie_break_left=True)
            x = tl.where(offs_n[None, :] == ti[:, None], float("-inf"), x)
            pos = tl.sum((tk_v >= tv[:, None]).to(tl.int32), 1)[:, None]     # [BLOCK_M, 1]
            sh_v = tk_v
            sh_i = tk_i
            for j in tl.static_range(1, TOPK):                                # sh[:, j] = tk[:, j - 1]
                sh_v = tl.where(kcol == j, tl.max(tl.where(kcol == j - 1, tk_v, float("-inf")), 1)[:, None], sh_v)
                sh_i = tl.where(kcol == j, tl.sum(tl.where(kcol == j - 1, tk_i, 0), 1)[:, None], sh_i)
            ins = (kcol == pos) & (kcol < TOPK)
            after = (kcol > pos) & (kcol < TOPK)
            tk_v = tl.where(ins, tv[:, None], tl.where(after, sh_v, tk_v))
            tk_i = tl.where(ins, (ti + start_n)[:, None], tl.where(after, sh_i, tk_i))
    return tk_v, tk_i


@tuned(_configs(), _TUNE_KEY, reset_to_zero=["ColPart"])
@triton.jit
def _stats_from_lse(Q, K, KvOk, SegBounds, Lse, RowPart, TopV, TopI, ColPart,  #
                    stride_qb, stride_qh, stride_qm, stride_qd,  #
                    stride_kb, stride_kh, stride_kn, stride_kd,  #
                    H, GROUP, Tq, Tk, D, qk_scale, softcap, window, win_dist, band_lo, band_hi, split_len,  #
                    TQ_BUCKET, TK_BUCKET,  #
                    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    SOFTCAP: tl.constexpr, HAS_KV_VALID: tl.constexpr,  #
                    ENTROPY: tl.constexpr, WIN_DIST: tl.constexpr, MEAN_DIST: tl.constexpr,
                    NSEG: tl.constexpr, NRP: tl.constexpr, TOPK: tl.constexpr, TOPKP: tl.constexpr,
                    COL_MASS: tl.constexpr, HAS_BAND: tl.constexpr,  #
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,  #
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    slab = tl.program_id(0)
    split = tl.program_id(1)
    off_bh = tl.program_id(2)
    n_slabs = tl.num_programs(0)
    n_bh = tl.num_programs(2)
    off_b, off_h, off_hk, q_base, k_base = _head_bases(Q, K, off_bh, H, GROUP, stride_qb, stride_qh,
                                                       stride_kb, stride_kh)
    kv_base = KvOk + off_b.to(tl.int64) * Tk
    col_base = ColPart + (slab * n_bh + off_bh).to(tl.int64) * Tk
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    rcol = tl.arange(0, NRP)[None, :]        # row-statistic columns: entropy, win, mean, segments
    kcol = tl.arange(0, TOPKP)[None, :]
    k_lo = split * split_len
    k_hi = tl.minimum(k_lo + split_len, Tk)
    P0 = Tk - Tq

    n_mb = tl.cdiv(Tq, BLOCK_M)
    for r in range(0, tl.cdiv(n_mb, n_slabs)):
        # snake order (slab s takes blocks s, 2S-1-s, 2S+s, ...): under a causal mask every slab
        # gets about the same number of key tiles; a block past the end leaves its row parts alone
        mb = r * n_slabs + tl.where(r % 2 == 0, slab, n_slabs - 1 - slab)
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Tq
        t = P0 + offs_m
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_M, HEAD_DIM]
        if UPCAST:
            q = q.to(tl.float32)
        row = off_bh.to(tl.int64) * Tq + offs_m                               # index into [B * H, Tq]
        lse = tl.load(Lse + row, mask=row_ok, other=float("-inf"))
        ok = row_ok & (lse > float("-inf"))
        lse = tl.where(ok, lse, 0.0)
        rows = tl.zeros([BLOCK_M, NRP], tl.float32)
        tk_v = tl.full([BLOCK_M, TOPKP], float("-inf"), tl.float32)
        tk_i = tl.zeros([BLOCK_M, TOPKP], tl.int32)

        lo = k_lo
        if HAS_WINDOW:  # both bounds are multiples of BLOCK_N
            lo = tl.maximum(lo, (tl.maximum(P0 + mb * BLOCK_M - window + 1, 0) // BLOCK_N) * BLOCK_N)
        hi = k_hi
        if CAUSAL:
            hi = tl.minimum(hi, P0 + mb * BLOCK_M + BLOCK_M)
        if mb >= n_mb:   # past the last block (the snake's last round): visit no keys
            hi = lo
        # explicit stages: without a loop-carried dot accumulator Triton 3.9 does not pipeline the
        # K loads on its own (no async copies in the TTGIR; tests/triton_compile.py)
        for start_n in tl.range(lo, hi, BLOCK_N, num_stages=3):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            cols = start_n + offs_n
            kT, kv_ok, _ = _load_key_tile(k_base, kv_base, kv_base, cols, offs_d, stride_kn, stride_kd, Tk, D,
                                          HAS_KV_VALID, False, UPCAST, BLOCK_N)
            x, _ = _tile_logits(q, kT, t, cols, Tk, kv_ok, 0.0, False, qk_scale, softcap, window,
                                CAUSAL, HAS_WINDOW, SOFTCAP, HAS_KV_VALID, False, False, DOT_PRECISION)
            p = tl.where(ok[:, None], tl.exp(x - lse[:, None]), 0.0)       # [BLOCK_M, BLOCK_N], final
            if ENTROPY:
                ent = tl.sum(tl.where(p > 0, p * (lse[:, None] - x), 0.0), 1)
                rows = tl.where(rcol == 0, rows + ent[:, None], rows)
            if WIN_DIST or MEAN_DIST:
                d = tl.maximum(t[:, None] - cols[None, :], 0).to(tl.float32)
                if WIN_DIST:
                    rows = tl.where(rcol == 1, rows + tl.sum(p * tl.minimum(d, win_dist), 1)[:, None], rows)
                if MEAN_DIST:
                    rows = tl.where(rcol == 2, rows + tl.sum(p * d, 1)[:, None], rows)
            for j in tl.static_range(NSEG):
                a = tl.load(SegBounds + 2 * j)
                b = tl.load(SegBounds + 2 * j + 1)
                if (start_n < b) & (start_n + BLOCK_N > a):
                    part = tl.sum(tl.where((cols[None, :] >= a) & (cols[None, :] < b), p, 0.0), 1)
                    rows = tl.where(rcol == 3 + j, rows + part[:, None], rows)
            if TOPK == 1:
                tv, ti = tl.max(x, 1, return_indices=True, return_indices_tie_break_left=True)
                take = (tv[:, None] > tk_v) & (kcol == 0)                    # [BLOCK_M, 2]: slot 0 used
                tk_v = tl.where(take, tv[:, None], tk_v)
                tk_i = tl.where(take, (ti + start_n)[:, None], tk_i)
            elif TOPK > 1:
                kth = tl.max(tl.where(kcol == TOPK - 1, tk_v, float("-inf")), 1)
                need = tl.max(tl.sum((x > kth[:, None]).to(tl.int32), 1), 0)
                tk_v, tk_i = _topk_insert(tk_v, tk_i, x, start_n, tl.minimum(need, TOPK), TOPK, TOPKP, BLOCK_N)
            if COL_MASS:
                pc = p
                if HAS_BAND:
                    dd = t[:, None] - cols[None, :]
                    pc = tl.where((dd >= band_lo) & (dd <= band_hi), p, 0.0)
                in_k = cols < Tk
                prev = tl.load(col_base + cols, mask=in_k, other=0.0)
                tl.store(col_base + cols, prev + tl.sum(pc, 0), mask=in_k)

        part = split.to(tl.int64) * n_bh * Tq + row                         # index into [splits, B * H, Tq]
        if NRP > 1:
            tl.store(RowPart + part[:, None] * NRP + rcol, rows, mask=row_ok[:, None])
        if TOPK > 0:
            kmask = row_ok[:, None] & (kcol < TOPK)
            tl.store(TopV + part[:, None] * TOPK + kcol, tk_v, mask=kmask)
            tl.store(TopI + part[:, None] * TOPK + kcol, tk_i, mask=kmask)


def _grid_shape(B: int, H: int, Tq: int, Tk: int, device) -> tuple[int, int, int]:
    """(query slabs, key splits, split length): enough programs to fill the device.

    Prefill: one key split, slabs so that slabs x heads ~ 4 programs per multiprocessor (never
    more slabs than 64-row query blocks). Decoding / small Tq: the keys are split instead.
    """
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = 4 * sms
    bh = B * H
    n_slabs = max(1, min(triton.cdiv(Tq, 64), triton.cdiv(want, bh), 64))
    n_split = 1
    if n_slabs * bh < want and Tk >= 2 * _MIN_SPLIT:
        n_split = max(1, min(triton.cdiv(want, n_slabs * bh), Tk // _MIN_SPLIT))
    split_len = triton.cdiv(triton.cdiv(Tk, n_split), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return n_slabs, triton.cdiv(Tk, split_len), split_len


def stats_from_lse(q, k, lse, spec: StatsSpec, *, scale: float, causal: bool, window: int | None,
                   softcap: float | None, kv_valid: torch.Tensor | None, split_len: int | None = None,
                   n_slabs: int | None = None) -> dict[str, torch.Tensor]:
    """Every ``spec`` statistic of unedited attention from its row LSE ``lse`` [B, H, Tq] (fp32).

    ``split_len`` (a multiple of 256) and ``n_slabs`` override the grid (tests use them to
    exercise split-K and slab interleaving on small shapes). ``lse`` must be the normaliser of
    the same logits (same scale, cap and mask): a wrong LSE gives rows that do not sum to 1, which
    this pass cannot detect.
    """
    B, H, Tq, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    dev, fp32 = q.device, torch.float32
    slabs, n_split, s_len = _grid_shape(B, H, Tq, Tk, dev)
    if split_len is not None:
        s_len, n_split = split_len, triton.cdiv(Tk, split_len)
    slabs = n_slabs or slabs
    kk = min(spec.topk, Tk)
    k_in = 0 if kk > MAX_TOPK else kk
    segs = [(min(a, Tk), min(b, Tk)) for a, b in spec.segments]
    n_rows = (3 + len(segs)) if (spec.entropy or spec.window_dist is not None or spec.mean_dist or segs) else 1
    row_part = torch.empty(n_split, B * H, Tq, _pow2(n_rows), device=dev, dtype=fp32) if n_rows > 1 else lse
    top_v = torch.empty(n_split, B * H, Tq, k_in, device=dev, dtype=fp32) if k_in else lse
    top_i = torch.empty(n_split, B * H, Tq, k_in, device=dev, dtype=torch.int32) if k_in else lse
    # zeroed again by the autotuner before each trial: never alias it with an input
    col_part = torch.zeros(slabs, B * H, Tk, device=dev, dtype=fp32) if spec.col_mass else torch.empty(1, device=dev)
    # a host-to-device copy only when there are segments (decoding steps are launch-bound)
    seg_bounds = torch.tensor([x for ab in segs for x in ab], device=dev, dtype=torch.int32) if segs else lse
    kv_ok = kv_valid.to(torch.int8).contiguous() if kv_valid is not None else lse
    band = spec.col_band
    if n_rows > 1 or k_in or spec.col_mass:  # lse / pattern / long top-k alone need no pass
        _stats_from_lse[(slabs, n_split, B * H)](
            q, k, kv_ok, seg_bounds, lse.contiguous(), row_part, top_v, top_i, col_part,
            *q.stride(), *k.stride(), H, H // H_kv, Tq, Tk, D,
            scale / softcap if softcap is not None else scale, softcap or 0.0, window or 0,
            float(spec.window_dist or 0), *_band_bounds(band), s_len, _pow2(Tq), _pow2(Tk),
            HEAD_DIM=_pow2(D, 16), CAUSAL=causal, HAS_WINDOW=window is not None, SOFTCAP=softcap is not None,
            HAS_KV_VALID=kv_valid is not None, ENTROPY=spec.entropy, WIN_DIST=spec.window_dist is not None,
            MEAN_DIST=spec.mean_dist, NSEG=len(segs), NRP=_pow2(n_rows), TOPK=k_in, TOPKP=_pow2(k_in, 2),
            COL_MASS=spec.col_mass, HAS_BAND=band is not None, UPCAST=INTERPRET and q.dtype != fp32,
            DOT_PRECISION="ieee" if INTERPRET else ("tf32x3" if q.dtype == fp32 else None))

    stats: dict[str, torch.Tensor] = {}
    if n_rows > 1:
        rows = row_part.sum(0).view(B, H, Tq, -1)                       # fixed-order sum over splits
        if spec.entropy:
            stats["entropy"] = rows[..., 0].contiguous()
        if spec.window_dist is not None:
            stats["win_dist"] = rows[..., 1].contiguous()
        if spec.mean_dist:
            stats["mean_dist"] = rows[..., 2].contiguous()
        if segs:
            stats["segment_mass"] = rows[..., 3:3 + len(segs)].contiguous()
    dense = dict(scale=scale, causal=causal, window=window, softcap=softcap, kv_valid=kv_valid, uni=None,
                 bias=None)
    if kk:
        if k_in:
            val, idx = top_v.view(n_split, B, H, Tq, k_in)[0], top_i.view(n_split, B, H, Tq, k_in)[0]
            if n_split > 1:  # merge the splits' lists: a stable sort keeps lower splits (lower keys) first on ties
                cand_v = top_v.permute(1, 2, 0, 3).reshape(B, H, Tq, n_split * k_in)
                val, order = torch.sort(cand_v, dim=-1, descending=True, stable=True)
                val = val[..., :k_in]
                idx = top_i.permute(1, 2, 0, 3).reshape(B, H, Tq, n_split * k_in).gather(-1, order[..., :k_in])
            fin = lse > float("-inf")
            prob = torch.where(fin[..., None], torch.exp(val - torch.where(fin, lse, 0.0)[..., None]), 0.0)
            idx = idx.long()
        else:      # beyond the kernel's list length: every row ranked densely from its LSE
            idx = torch.zeros(B, H, Tq, kk, device=dev, dtype=torch.long)
            prob = torch.zeros(B, H, Tq, kk, device=dev, dtype=fp32)
        stats["topk_idx"], stats["topk_prob"] = _fix_topk(idx, prob, q, k, lse, dense)
    if spec.col_mass:
        stats["col_mass"] = col_part.sum(0).view(B, H, Tk)
        stats["col_count"] = _col_count(B, Tq, Tk, causal=causal, window=window, band=band, kv_valid=kv_valid,
                                        device=dev)
    if spec.pattern_rows is not None:
        a, b = spec.pattern_rows[0], min(spec.pattern_rows[1], Tq)
        stats["pattern"] = _dense_probs(q, k, torch.arange(a, max(a, b), device=dev), lse, **dense)
    return stats


def flash_applies(q, v, softcap, kv_valid) -> bool:
    """torch's FlashAttention-2 can produce this call's output and LSE (CUDA, half precision,
    head_dim a multiple of 8 up to 256 and the same for v, no soft-capping, no padding mask)."""
    return (q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and softcap is None
            and kv_valid is None and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256 and v.shape[-1] == q.shape[-1])


def _flash_out_lse(q, k, v, *, scale, causal, window):
    """Output [B, H, Tq, Dv] and LSE [B, H, Tq] from torch's FlashAttention-2 forward.

    FA2 aligns the causal mask bottom-right (query i at key Tk - Tq + i), as the contract does,
    and reads GQA heads natively. ``benchmarks/gpu.py`` checks both against the float64
    reference on the GPU, since neither can be exercised on a CPU.
    """
    Tq, Tk = q.shape[2], k.shape[2]
    left = window - 1 if window is not None else -1
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, Tq, Tk, 0.0, causal, False,
        scale=scale, window_size_left=left, window_size_right=0 if causal else -1)
    return out.transpose(1, 2), lse[..., :Tq]   # some builds pad the LSE's query axis


def attend_triton_lse(q, k, v, spec: StatsSpec | None = None, edits: HeadEdits | None = None, *,
                      scale: float | None = None, causal: bool = True, window: int | None = None,
                      softcap: float | None = None, kv_valid: torch.Tensor | None = None,
                      output: bool = True) -> AttnResult:
    """Output (flash) and ``spec`` statistics from one statistics pass over the known LSE.

    Same contract as ``attend_triton``. Calls with probability edits (uniform heads, key
    re-weighting) are answered by ``attend_triton`` (see the module docstring).
    """
    spec = spec or StatsSpec()
    B, H, H_kv, Tq, Tk, D = check_inputs(q, k, v, kv_valid)
    kw = dict(scale=scale, causal=causal, window=window, softcap=softcap, kv_valid=kv_valid)
    has_edits = edits is not None and not edits.empty
    if has_edits:
        edits.validate(H)
        if edits.uniform is not None or edits.key_pos is not None:
            return attend_triton(q, k, v, spec, edits, output=output, **kw)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kv_valid = kv_valid.to(q.device).bool() if kv_valid is not None else None
    if flash_applies(q, v, softcap, kv_valid):   # also without output: the LSE is the point
        out, lse = _flash_out_lse(q, k, v, scale=scale, causal=causal, window=window)
        out = out if output else None
    else:
        r = attend_triton(q, k, v, StatsSpec(lse=True), None, output=output, **dict(kw, scale=scale))
        out, lse = r.out, r.stats["lse"]
    stats = stats_from_lse(q, k, lse, spec, scale=scale, causal=causal, window=window, softcap=softcap,
                           kv_valid=kv_valid)
    if spec.lse:
        stats["lse"] = lse
    if output and has_edits:
        sees = _visible_counts(B, Tq, Tk, causal=causal, window=window, kv_valid=kv_valid,
                               device=q.device) > 0                                # [B, Tq]
        out = _apply_output_edits(out.float(), edits, sees).to(v.dtype)
    return AttnResult(out=out, stats=stats)
