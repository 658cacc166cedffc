"""Fused Triton attention that returns statistics instead of the [heads, q, k] matrix.

Two kernels in the style of the Triton fused-attention tutorial (FlashAttention-2 forward):

- ``_attn_stats_fwd`` (pass 1, one program per (query block, batch * head)): the flash forward.
  Online-softmax state ``m_i`` / ``l_i`` / ``acc``; every row statistic is a running sum that is
  rescaled by ``alpha = exp(m_old - m_new)`` exactly like ``acc``: entropy keeps
  ``sum p (x - m)`` (shifted by the running max, so ``log l - ent / l`` has no cancellation even
  for huge logits), distances keep ``sum p d``, segments keep ``sum p`` per key range. Top-k
  keeps the k best *logits* with their key indices (logits need no rescaling) and merges a tile
  only when some row's tile max beats its current k-th value. Writes the output, the row LSE
  and the row statistics.
- ``_attn_col_mass`` (pass 2, only when ``col_mass`` is requested): column sums need each row's
  *final* normaliser, so they cannot be fused into pass 1. One program per (key block,
  batch * head) recomputes the score tiles with the known LSE and loops over the query blocks
  that can see its keys, like the flash backward's dK/dV loop: deterministic, no atomics.

Interventions in-kernel: uniform heads replace their logits by 0 on visible keys (softmax of
equal logits = the exact mean over visible keys); key re-weighting adds ``log w`` to the logits
of the listed keys (``w * p`` renormalised is ``softmax(x + log w)``; ``w = 0`` masks the key).
``lse`` keeps describing the raw logits, so under those edits pass 1 also tracks a raw max and
normaliser. ``replace`` and ``out_scale`` are elementwise on the output and applied by the
wrapper in torch.

Done in torch around the kernels (small, O(rows * Tk) for a few rows):
- ``pattern`` rows: recomputed from the LSE for the requested rows only.
- Top-k rows whose k-th probability is 0 (fewer than k keys with non-zero weight: the first
  rows of a causal sequence, tiny windows, rows peaked beyond fp32's exp range): the contract
  breaks ties between zero-probability keys by lowest index over *all* keys, masked ones
  included, which the kernel's logit ordering cannot see. Those rows are recomputed densely and
  ranked with the chunked backend's tie-exact top-k. Fully masked rows get indices 0..k-1 directly.
- ``col_count`` is closed-form (an interval length per key).

Falls back to ``attend_chunked`` for: ``topk > MAX_TOPK`` (top-k only; the rest stays in
Triton). Not done: split-K decoding (``Tq == 1`` runs one program per head over all keys, which
under-fills a large GPU at long context).

Numerics: scores, softmax and statistics in fp32. fp32 inputs use 3xTF32 dots (``tf32x3``,
fp32-accurate on tensor cores; plain TF32 would put ~1e-3 relative error into the logits);
bf16/fp16 inputs use tensor-core dots with fp32 accumulation and P cast to V's dtype for P @ V,
as in FlashAttention, so ``out`` carries bf16-level error while the statistics stay fp32.

Interpreter (``TRITON_INTERPRET=1``, CPU tensors) for tests: bf16 operands to ``tl.dot`` give
wrong results there, so every operand is upcast to fp32 (``UPCAST``); autotuning with more than
one config fails there, so a single small config is used; ``tanh`` is written with ``exp``
(libdevice is unavailable). The interpreter checks semantics only. Compilation, registers and
shared memory are checked without a GPU by compiling for sm_90 with Triton's bundled ptxas
(``tests/triton_compile.py``, run by ``tests/test_kernels_triton_compile.py``); speed needs a GPU
(``benchmarks/bench_kernels.py``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .autotune import INTERPRET as _INTERPRET
from .autotune import tuned
from .chunked import _col_count, _topk_lowest_index, _visible_counts, attend_chunked
from .reference import visible_mask
from .spec import AttnResult, HeadEdits, StatsSpec, check_inputs

MAX_TOPK = 16
_NO_BAND = 1 << 30


def _band_bounds(band: tuple[int, int | None] | None) -> tuple[int, int]:
    """A column band's (lo, hi) distances for the kernels; no band or an open end -> ``_NO_BAND``."""
    if band is None:
        return 0, _NO_BAND
    return band[0], _NO_BAND if band[1] is None else band[1]


def _configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    # 8 warps at 64/128-row tiles: with every statistic on and head_dim 128, the forward needs
    # more than 255 registers per thread at 4 warps and spills; at 8 warps (64 or 128 x 32) it
    # does not (ptxas for sm_90, tests/test_kernels_triton_compile.py)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm in (16, 64, 128) for bn in (32, 64) for w in ((4,) if bm == 16 else (4, 8)) for s in (2, 3)]


_TUNE_KEY = ["TQ_BUCKET", "TK_BUCKET", "HEAD_DIM", "HEAD_DV", "CAUSAL", "HAS_WINDOW", "SOFTCAP",
             "HAS_KV_VALID", "HAS_BIAS", "HAS_UNIFORM", "UPCAST"]


@triton.jit
def _tanh(x):
    # libdevice tanh is unavailable in the interpreter; saturates cleanly to +-1 (exp -> inf / 0)
    e = tl.exp(2.0 * x)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _tile_logits(q, kT, t, cols, Tk, kv_ok, bias, is_uni, qk_scale, softcap, window,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                 HAS_KV_VALID: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_UNIFORM: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """Raw and edited logits of a [BLOCK_M, BLOCK_N] tile, -inf where the key is invisible."""
    x = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
    if SOFTCAP:
        x = _tanh(x) * softcap
    vis = cols[None, :] < Tk
    if CAUSAL:
        vis = vis & (cols[None, :] <= t[:, None])
    if HAS_WINDOW:
        vis = vis & (t[:, None] - cols[None, :] < window)
    if HAS_KV_VALID:
        vis = vis & kv_ok[None, :]
    x = tl.where(vis, x, float("-inf"))
    x_eff = x
    if HAS_UNIFORM:
        x_eff = tl.where(is_uni & vis, 0.0, x_eff)
    if HAS_BIAS:
        x_eff = x_eff + bias[None, :]
    return x, x_eff


@triton.jit
def _topk_merge(tk_v, tk_i, x, start_n, TOPK: tl.constexpr, TOPKP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Merge a tile's logits into the sorted per-row top-k (values desc, ties -> lower index).

    The running list only holds keys from earlier tiles, i.e. lower indices than any tile key,
    so it wins ties; inside the tile ``tl.max`` breaks ties to the left.
    """
    kcol = tl.arange(0, TOPKP)
    offs_n = tl.arange(0, BLOCK_N)
    new_v = tl.full([BLOCK_M, TOPKP], float("-inf"), tl.float32)
    new_i = tl.zeros([BLOCK_M, TOPKP], tl.int32)
    lp = tl.zeros([BLOCK_M], tl.int32)          # read position in the old list
    for j in tl.static_range(TOPK):
        tv, ti = tl.max(x, 1, return_indices=True, return_indices_tie_break_left=True)
        at_lp = kcol[None, :] == lp[:, None]
        lv = tl.max(tl.where(at_lp, tk_v, float("-inf")), 1)
        li = tl.sum(tl.where(at_lp, tk_i, 0), 1)
        take = tv > lv
        slot = kcol[None, :] == j
        new_v = tl.where(slot, tl.where(take, tv, lv)[:, None], new_v)
        new_i = tl.where(slot, tl.where(take, ti + start_n, li)[:, None], new_i)
        x = tl.where(take[:, None] & (offs_n[None, :] == ti[:, None]), float("-inf"), x)
        lp = lp + 1 - take.to(tl.int32)
    return new_v, new_i


@triton.jit
def _head_bases(Q, K, off_bh, H, GROUP, stride_qb, stride_qh, stride_kb, stride_kh):
    """Batch, query head and KV head (GQA) of program row ``off_bh = b * H + h``, with the base
    pointers of that head's queries and of its KV head's keys (int64 offsets: i32 overflows)."""
    off_b = off_bh // H
    off_h = off_bh % H
    off_hk = off_h // GROUP
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh
    return off_b, off_h, off_hk, q_base, k_base


@triton.jit
def _load_key_tile(k_base, kv_base, bias_base, cols, offs_d, stride_kn, stride_kd, Tk, D,
                   HAS_KV_VALID: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """K^T tile [HEAD_DIM, BLOCK_N], its padding mask and its re-weighting bias (log w)."""
    in_k = cols < Tk
    kT = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                 mask=in_k[None, :] & (offs_d[:, None] < D), other=0.0)
    if UPCAST:
        kT = kT.to(tl.float32)
    kv_ok = in_k
    if HAS_KV_VALID:
        kv_ok = tl.load(kv_base + cols, mask=in_k, other=0) != 0
    bias = tl.zeros([BLOCK_N], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_base + cols, mask=in_k, other=0.0)
    return kT, kv_ok, bias


@triton.jit
def _attn_stats_fwd_inner(acc, l_i, m_i, l_r, m_r, ent, wd, md, seg, tk_v, tk_i,  #
                          q, k_base, v_base, kv_base, bias_base, is_uni, SegBounds,  #
                          stride_kn, stride_kd, stride_vn, stride_vd,  #
                          t, lo, hi, Tk, D, DV, qk_scale, softcap, window, win_dist,  #
                          HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr,  #
                          CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,  #
                          HAS_KV_VALID: tl.constexpr, HAS_BIAS: tl.constexpr,
                          HAS_UNIFORM: tl.constexpr,  #
                          RAW_LSE: tl.constexpr, ENTROPY: tl.constexpr, WIN_DIST: tl.constexpr,
                          MEAN_DIST: tl.constexpr,  #
                          NSEG: tl.constexpr, SEGP: tl.constexpr, TOPK: tl.constexpr,
                          TOPKP: tl.constexpr, HAS_OUT: tl.constexpr,  #
                          UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,  #
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DV)
    scol = tl.arange(0, SEGP)
    kcol = tl.arange(0, TOPKP)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        in_k = cols < Tk
        kT, kv_ok, bias = _load_key_tile(k_base, kv_base, bias_base, cols, offs_d, stride_kn, stride_kd, Tk, D,
                                         HAS_KV_VALID, HAS_BIAS, UPCAST, BLOCK_N)
        x, x_eff = _tile_logits(q, kT, t, cols, Tk, kv_ok, bias, is_uni, qk_scale, softcap, window,
                                CAUSAL, HAS_WINDOW, SOFTCAP, HAS_KV_VALID, HAS_BIAS, HAS_UNIFORM,
                                DOT_PRECISION)
        # -- raw normaliser (lse describes the unedited logits)
        if RAW_LSE:
            m_r_new = tl.maximum(m_r, tl.max(x, 1))
            m_r_safe = tl.where(m_r_new == float("-inf"), 0.0, m_r_new)
            l_r = l_r * tl.exp(m_r - m_r_safe) + tl.sum(tl.exp(x - m_r_safe[:, None]), 1)
            m_r = m_r_new
        # -- online softmax of the edited logits
        tile_max = tl.max(x_eff, 1)
        m_new = tl.maximum(m_i, tile_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)    # rows with nothing visible yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(x_eff - m_safe[:, None])                       # [BLOCK_M, BLOCK_N], 0 if masked
        l_ij = tl.sum(p, 1)
        # -- row statistics, rescaled like acc
        if ENTROPY:
            shift = (tl.where(l_i > 0, m_i, m_safe) - m_safe) * l_i    # re-centre on the new max
            plogit = p * tl.where(x_eff > float("-inf"), x_eff - m_safe[:, None], 0.0)
            ent = alpha * (ent + shift) + tl.sum(plogit, 1)
        if WIN_DIST or MEAN_DIST:
            d = tl.maximum(t[:, None] - cols[None, :], 0).to(tl.float32)
            if MEAN_DIST:
                md = md * alpha + tl.sum(p * d, 1)
            if WIN_DIST:
                wd = wd * alpha + tl.sum(p * tl.minimum(d, win_dist), 1)
        if NSEG > 0:
            seg = seg * alpha[:, None]
            for j in tl.static_range(NSEG):
                a = tl.load(SegBounds + 2 * j)
                b = tl.load(SegBounds + 2 * j + 1)
                if (start_n < b) & (start_n + BLOCK_N > a):
                    part = tl.sum(tl.where((cols[None, :] >= a) & (cols[None, :] < b), p, 0.0), 1)
                    seg = tl.where(scol[None, :] == j, seg + part[:, None], seg)
        if TOPK > 0:
            kth = tl.max(tl.where(kcol[None, :] == TOPK - 1, tk_v, float("-inf")), 1)
            if tl.max((tile_max > kth).to(tl.int32), 0) > 0:
                tk_v, tk_i = _topk_merge(tk_v, tk_i, x_eff, start_n, TOPK, TOPKP, BLOCK_M, BLOCK_N)
        # -- output accumulator
        if HAS_OUT:
            acc = acc * alpha[:, None]
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                        mask=in_k[:, None] & (offs_dv[None, :] < DV), other=0.0)  # [BLOCK_N, HEAD_DV]
            if UPCAST:
                v = v.to(tl.float32)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        l_i = l_i * alpha + l_ij
        m_i = m_new
    return acc, l_i, m_i, l_r, m_r, ent, wd, md, seg, tk_v, tk_i


@tuned(_configs(), _TUNE_KEY + ["HAS_OUT"])
@triton.jit
def _attn_stats_fwd(Q, K, V, Out, KvOk, Bias, Uni, SegBounds,  #
                    LseEff, LseRaw, Ent, WinD, MeanD, Seg, TopV, TopI,  #
                    stride_qb, stride_qh, stride_qm, stride_qd,  #
                    stride_kb, stride_kh, stride_kn, stride_kd,  #
                    stride_vb, stride_vh, stride_vn, stride_vd,  #
                    stride_ob, stride_oh, stride_om, stride_od,  #
                    H, GROUP, Tq, Tk, D, DV, qk_scale, softcap, window, win_dist,  #
                    TQ_BUCKET, TK_BUCKET,  #
                    HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr,  #
                    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,  #
                    HAS_KV_VALID: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_UNIFORM: tl.constexpr,  #
                    RAW_LSE: tl.constexpr, ENTROPY: tl.constexpr, WIN_DIST: tl.constexpr,
                    MEAN_DIST: tl.constexpr,  #
                    NSEG: tl.constexpr, SEGP: tl.constexpr, TOPK: tl.constexpr,
                    TOPKP: tl.constexpr, HAS_OUT: tl.constexpr,  #
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,  #
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b, off_h, off_hk, q_base, k_base = _head_bases(Q, K, off_bh, H, GROUP, stride_qb, stride_qh,
                                                       stride_kb, stride_kh)
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh
    o_base = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    kv_base = KvOk + off_b.to(tl.int64) * Tk
    bias_base = Bias + off_h.to(tl.int64) * Tk
    is_uni = False
    if HAS_UNIFORM:
        is_uni = tl.load(Uni + off_h) != 0

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)   # query rows of this call
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DV)
    row_ok = offs_m < Tq
    t = Tk - Tq + offs_m                                  # key index of each query
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_M, HEAD_DIM]
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DV], tl.float32)
    m_r = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_r = tl.zeros([BLOCK_M], tl.float32)
    ent = tl.zeros([BLOCK_M], tl.float32)
    wd = tl.zeros([BLOCK_M], tl.float32)
    md = tl.zeros([BLOCK_M], tl.float32)
    seg = tl.zeros([BLOCK_M, SEGP], tl.float32)
    tk_v = tl.full([BLOCK_M, TOPKP], float("-inf"), tl.float32)
    tk_i = tl.zeros([BLOCK_M, TOPKP], tl.int32)

    # key range any row of this block can see
    t_first = Tk - Tq + start_m * BLOCK_M
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(t_first - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(t_first + BLOCK_M, Tk)
    acc, l_i, m_i, l_r, m_r, ent, wd, md, seg, tk_v, tk_i = _attn_stats_fwd_inner(
        acc, l_i, m_i, l_r, m_r, ent, wd, md, seg, tk_v, tk_i,  #
        q, k_base, v_base, kv_base, bias_base, is_uni, SegBounds,  #
        stride_kn, stride_kd, stride_vn, stride_vd,  #
        t, lo, hi, Tk, D, DV, qk_scale, softcap, window, win_dist,  #
        HEAD_DIM, HEAD_DV, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_KV_VALID, HAS_BIAS, HAS_UNIFORM,  #
        RAW_LSE, ENTROPY, WIN_DIST, MEAN_DIST, NSEG, SEGP, TOPK, TOPKP, HAS_OUT,  #
        UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N)

    # epilogue: rows whose edited weights are all zero (nothing visible) get 0 and lse = -inf
    valid = l_i > 0
    l_safe = tl.where(valid, l_i, 1.0)
    if HAS_OUT:
        out = tl.where(valid[:, None], acc / l_safe[:, None], 0.0)
        tl.store(o_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                 out.to(Out.type.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    row = off_bh.to(tl.int64) * Tq + offs_m               # index into [B * H, Tq] statistics
    lse = tl.where(valid, m_i + tl.log(l_safe), float("-inf"))
    tl.store(LseEff + row, lse, mask=row_ok)
    if RAW_LSE:
        lr = tl.where(l_r > 0, m_r + tl.log(tl.where(l_r > 0, l_r, 1.0)), float("-inf"))
        tl.store(LseRaw + row, lr, mask=row_ok)
    if ENTROPY:
        tl.store(Ent + row, tl.where(valid, tl.log(l_safe) - ent / l_safe, 0.0), mask=row_ok)
    if WIN_DIST:
        tl.store(WinD + row, wd / l_safe, mask=row_ok)
    if MEAN_DIST:
        tl.store(MeanD + row, md / l_safe, mask=row_ok)
    if NSEG > 0:
        scol = tl.arange(0, SEGP)
        tl.store(Seg + row[:, None] * NSEG + scol[None, :], seg / l_safe[:, None],
                 mask=row_ok[:, None] & (scol[None, :] < NSEG))
    if TOPK > 0:
        kcol = tl.arange(0, TOPKP)
        prob = tl.exp(tk_v - tl.where(valid, lse, 0.0)[:, None])   # exp(-inf) = 0 for unfilled slots
        kmask = row_ok[:, None] & (kcol[None, :] < TOPK)
        tl.store(TopV + row[:, None] * TOPK + kcol[None, :], prob, mask=kmask)
        tl.store(TopI + row[:, None] * TOPK + kcol[None, :], tk_i, mask=kmask)


@triton.jit
def _attn_col_mass_inner(col, kT, kv_ok, bias, is_uni, q_base, lse_base, cols,  #
                         stride_qm, stride_qd, lo, hi, Tq, Tk, D, qk_scale, softcap, window,
                         band_lo, band_hi,  #
                         HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                         SOFTCAP: tl.constexpr, HAS_KV_VALID: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_UNIFORM: tl.constexpr, HAS_BAND: tl.constexpr,  #
                         UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,  #
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Tq
        t = Tk - Tq + offs_m
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("-inf"))
        _, x_eff = _tile_logits(q, kT, t, cols, Tk, kv_ok, bias, is_uni, qk_scale, softcap,
                                window, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_KV_VALID, HAS_BIAS,
                                HAS_UNIFORM, DOT_PRECISION)
        ok = row_ok & (lse > float("-inf"))
        p = tl.where(ok[:, None], tl.exp(x_eff - tl.where(ok, lse, 0.0)[:, None]), 0.0)
        if HAS_BAND:
            d = t[:, None] - cols[None, :]
            p = tl.where((d >= band_lo) & (d <= band_hi), p, 0.0)
        col += tl.sum(p, 0)
    return col


@tuned(_configs(), _TUNE_KEY)
@triton.jit
def _attn_col_mass(Q, K, KvOk, Bias, Uni, LseEff, Col,  #
                   stride_qb, stride_qh, stride_qm, stride_qd,  #
                   stride_kb, stride_kh, stride_kn, stride_kd,  #
                   H, GROUP, Tq, Tk, D, qk_scale, softcap, window, band_lo, band_hi,  #
                   TQ_BUCKET, TK_BUCKET,  #
                   HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr,  #
                   CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,  #
                   HAS_KV_VALID: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_UNIFORM: tl.constexpr,  #
                   HAS_BAND: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,  #
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1)
    off_b, off_h, off_hk, q_base, k_base = _head_bases(Q, K, off_bh, H, GROUP, stride_qb, stride_qh,
                                                       stride_kb, stride_kh)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = start_n + tl.arange(0, BLOCK_N)
    in_k = cols < Tk
    kT, kv_ok, bias = _load_key_tile(k_base, KvOk + off_b.to(tl.int64) * Tk, Bias + off_h.to(tl.int64) * Tk, cols,
                                     offs_d, stride_kn, stride_kd, Tk, D, HAS_KV_VALID, HAS_BIAS, UPCAST, BLOCK_N)
    is_uni = False
    if HAS_UNIFORM:
        is_uni = tl.load(Uni + off_h) != 0

    # query rows that can see some key of this block: t >= s (causal), t - s >= band_lo,
    # t - s < window, t - s <= band_hi
    P0 = Tk - Tq
    lo = 0
    if CAUSAL:
        lo = tl.maximum(start_n - P0, 0)
    if HAS_BAND:
        lo = tl.maximum(start_n + band_lo - P0, lo)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = Tq
    if HAS_WINDOW:
        hi = tl.minimum(start_n + BLOCK_N - 1 + window - P0, hi)
    if HAS_BAND:
        hi = tl.minimum(start_n + BLOCK_N + band_hi - P0, hi)
    col = tl.zeros([BLOCK_N], tl.float32)
    col = _attn_col_mass_inner(col, kT, kv_ok, bias, is_uni, q_base,
                               LseEff + off_bh.to(tl.int64) * Tq, cols,  #
                               stride_qm, stride_qd, lo, hi, Tq, Tk, D, qk_scale, softcap, window,
                               band_lo, band_hi,  #
                               HEAD_DIM, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_KV_VALID, HAS_BIAS,
                               HAS_UNIFORM, HAS_BAND, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N)
    tl.store(Col + off_bh.to(tl.int64) * Tk + cols, col, mask=in_k)


# ----------------------------------------------------------------------------- wrapper

def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


def _dense_probs(q, k, rows, lse_eff, *, scale, causal, window, softcap, kv_valid, uni, bias):
    """Edited probabilities [B, H, R, Tk] of query rows ``rows`` from their known LSE (torch)."""
    B, H, _, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    G, R, Tq = H // H_kv, rows.numel(), q.shape[2]
    qr = q[:, :, rows].float().reshape(B, H_kv, G * R, D)
    x = (qr @ k.float().transpose(-1, -2)).view(B, H, R, Tk) * scale        # [B, H, R, Tk]
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    vis = visible_mask(Tq, Tk, causal=causal, window=window, kv_valid=kv_valid, rows=rows, device=q.device)
    if uni is not None:
        x = torch.where(uni.bool()[None, :, None, None], 0.0, x)
    if bias is not None:
        x = x + bias[None, :, None, :]
    lse = lse_eff[:, :, rows, None]
    ok = vis & (lse > float("-inf"))
    return torch.where(ok, torch.exp(x - torch.where(ok, lse, 0.0)), 0.0)


def attend_triton(q, k, v, spec: StatsSpec | None = None, edits: HeadEdits | None = None, *,
                  scale: float | None = None, causal: bool = True, window: int | None = None,
                  softcap: float | None = None, kv_valid: torch.Tensor | None = None,
                  output: bool = True) -> AttnResult:
    """Attention output and ``spec`` statistics with ``edits`` applied, from fused kernels.

    Same contract as ``attend_reference`` / ``attend_chunked``; ``output=False`` drops the
    ``p @ v`` dot and the output store (``out`` is None). Needs CUDA tensors, or CPU
    tensors with ``TRITON_INTERPRET=1`` set before this module is imported (tests).
    """
    spec = spec or StatsSpec()
    B, H, H_kv, Tq, Tk, D = check_inputs(q, k, v, kv_valid=kv_valid)
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not _INTERPRET and q.device.type != "cuda":
        raise ValueError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for tests); "
                         "use backend='chunked' on CPU")
    dev, Dv, G = q.device, v.shape[-1], H // H_kv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    fp32 = torch.float32
    upcast = _INTERPRET and q.dtype != fp32
    # fp32 on GPU: 3xTF32 (fp32-accurate on tensor cores); bf16/fp16: native dot, fp32 accumulate
    dot_precision = "ieee" if _INTERPRET else ("tf32x3" if q.dtype == fp32 else None)

    # ---- edits -> kernel inputs
    has_edits = edits is not None and not edits.empty
    if has_edits:
        edits.validate(H)
    uni = edits.uniform.to(dev).int().contiguous() if has_edits and edits.uniform is not None else None
    bias = None
    if has_edits and edits.key_pos is not None:
        w = edits.key_weights(H, Tk, dev)                                  # [H, Tk]
        if bool((w != 1).any()):
            bias = torch.log(w).contiguous()                               # [H, Tk], -inf for w = 0
    post_edit = output and has_edits and (edits.replace_mask is not None or edits.out_scale is not None)
    raw_lse = spec.lse and (uni is not None or bias is not None)

    kk = min(spec.topk, Tk)
    topk_fallback = kk > MAX_TOPK
    k_in = 0 if topk_fallback else kk
    segs = [(min(a, Tk), min(b, Tk)) for a, b in spec.segments]
    nseg = len(segs)

    # ---- outputs; a disabled output gets lse_eff as a placeholder pointer, which the kernel
    # never touches (its constexpr flag is off)
    lse_eff = torch.empty(B, H, Tq, device=dev, dtype=fp32)
    out = torch.empty(B, H, Tq, Dv, device=dev, dtype=fp32 if post_edit else v.dtype) if output else None
    f32 = lambda *shape: torch.empty(*shape, device=dev, dtype=fp32)  # noqa: E731
    lse_raw = f32(B, H, Tq) if raw_lse else lse_eff
    ent = f32(B, H, Tq) if spec.entropy else lse_eff
    wd = f32(B, H, Tq) if spec.window_dist is not None else lse_eff
    md = f32(B, H, Tq) if spec.mean_dist else lse_eff
    seg = f32(B, H, Tq, nseg) if nseg else lse_eff
    top_v = f32(B, H, Tq, k_in) if k_in else lse_eff
    top_i = torch.empty(B, H, Tq, k_in, device=dev, dtype=torch.int32) if k_in else lse_eff
    seg_bounds = torch.tensor([x for ab in segs for x in ab] or [0, 0], device=dev, dtype=torch.int32)
    kv_valid = kv_valid.to(dev).bool() if kv_valid is not None else None
    kv_ok = kv_valid.to(torch.int8).contiguous() if kv_valid is not None else lse_eff
    qk_scale = scale / softcap if softcap is not None else scale
    flags = dict(HEAD_DIM=_pow2(D, 16), HEAD_DV=_pow2(Dv, 16), CAUSAL=causal,
                 HAS_WINDOW=window is not None, SOFTCAP=softcap is not None,
                 HAS_KV_VALID=kv_valid is not None, HAS_BIAS=bias is not None,
                 HAS_UNIFORM=uni is not None, UPCAST=upcast, DOT_PRECISION=dot_precision)
    common = (H, G, Tq, Tk, D)
    buckets = (_pow2(Tq), _pow2(Tk))

    grid = lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), B * H)  # noqa: E731
    _attn_stats_fwd[grid](
        q, k, v, out if output else lse_eff, kv_ok, bias if bias is not None else lse_eff,
        uni if uni is not None else lse_eff, seg_bounds,
        lse_eff, lse_raw, ent, wd, md, seg, top_v, top_i,
        *q.stride(), *k.stride(), *v.stride(), *(out.stride() if output else (0, 0, 0, 0)),
        *common, Dv, qk_scale, softcap or 0.0, window or 0, float(spec.window_dist or 0), *buckets,
        RAW_LSE=raw_lse, ENTROPY=spec.entropy, WIN_DIST=spec.window_dist is not None,
        MEAN_DIST=spec.mean_dist, NSEG=nseg, SEGP=_pow2(nseg), TOPK=k_in, TOPKP=_pow2(k_in, 2),
        HAS_OUT=output, **flags)

    stats: dict[str, torch.Tensor] = {}
    if spec.lse:
        stats["lse"] = lse_raw if raw_lse else lse_eff
    dense = dict(scale=scale, causal=causal, window=window, softcap=softcap, kv_valid=kv_valid,
                 uni=uni, bias=bias)
    if k_in:
        stats["topk_idx"], stats["topk_prob"] = _fix_topk(top_i.long(), top_v, q, k, lse_eff, dense)
    if spec.entropy:
        stats["entropy"] = ent
    if nseg:
        stats["segment_mass"] = seg
    if spec.window_dist is not None:
        stats["win_dist"] = wd
    if spec.mean_dist:
        stats["mean_dist"] = md
    if spec.col_mass:
        col = f32(B, H, Tk)
        band = spec.col_band
        grid_c = lambda META: (triton.cdiv(Tk, META["BLOCK_N"]), B * H)  # noqa: E731
        _attn_col_mass[grid_c](
            q, k, kv_ok, bias if bias is not None else lse_eff, uni if uni is not None else lse_eff,
            lse_eff, col, *q.stride(), *k.stride(), *common, qk_scale, softcap or 0.0, window or 0,
            *_band_bounds(band), *buckets, HAS_BAND=band is not None, **flags)
        stats["col_mass"] = col
        stats["col_count"] = _col_count(B, Tq, Tk, causal=causal, window=window, band=band, kv_valid=kv_valid,
                                        device=dev)
    if spec.pattern_rows is not None:
        a, b = spec.pattern_rows[0], min(spec.pattern_rows[1], Tq)
        rows = torch.arange(a, max(a, b), device=dev)
        stats["pattern"] = _dense_probs(q, k, rows, lse_eff, **dense)
    if topk_fallback:
        r = attend_chunked(q, k, v, StatsSpec(topk=spec.topk), edits, scale=scale, causal=causal,
                           window=window, softcap=softcap, kv_valid=kv_valid, output=False)
        stats["topk_idx"], stats["topk_prob"] = r.stats["topk_idx"], r.stats["topk_prob"]

    if post_edit:
        sees = _visible_counts(B, Tq, Tk, causal=causal, window=window, kv_valid=kv_valid, device=dev) > 0   # [B, Tq]
        out = _apply_output_edits(out, edits, sees).to(v.dtype)
    return AttnResult(out=out, stats=stats)


def _fix_topk(idx, prob, q, k, lse_eff, dense):
    """Apply the contract's tie rule where the kernel's logit order cannot: zero probabilities.

    Ties among zero-probability keys go to the lowest key index over the whole row, masked keys
    included. Rows with nothing visible get 0..k-1; rows whose k-th probability is 0 are
    recomputed densely from their LSE and ranked by the chunked backend's exact top-k.
    """
    B, H, Tq, K = idx.shape
    Tk = k.shape[2]
    empty = (lse_eff == float("-inf"))[..., None]                           # [B, H, Tq, 1]
    idx = torch.where(empty, torch.arange(K, device=idx.device), idx)
    prob = torch.where(empty, 0.0, prob)
    flag = (prob[..., -1] == 0) & ~empty[..., 0]            # kernel output is sorted descending
    rows = flag.any(0).any(0).nonzero().flatten()
    for chunk in rows.split(max(1, (1 << 24) // (B * H * Tk))):
        p = _dense_probs(q, k, chunk, lse_eff, **dense)                     # [B, H, R, Tk]
        val, ix = _topk_lowest_index(p.reshape(-1, Tk), k=K, k0=0, Tk=Tk)
        f = flag[:, :, chunk, None]
        idx[:, :, chunk] = torch.where(f, ix.view(B, H, -1, K), idx[:, :, chunk])
        prob[:, :, chunk] = torch.where(f, val.view(B, H, -1, K), prob[:, :, chunk])
    return idx, prob


def _apply_output_edits(out: torch.Tensor, edits: HeadEdits, sees: torch.Tensor) -> torch.Tensor:
    """``replace`` then ``out_scale`` (spec order), then 0 for queries that see no key."""
    B, H, Tq, Dv = out.shape
    if edits.replace_mask is not None:
        val = edits.replace_value.to(out.device).float()
        if val.dim() == 2:
            val = val[None, :, None, :]
        out = torch.where(edits.replace_mask.to(out.device).bool()[None, :, None, None],
                          torch.broadcast_to(val, (B, H, Tq, Dv)), out)
    if edits.out_scale is not None:
        out = out * edits.out_scale.to(out.device).float()[None, :, None, None]
    return out.masked_fill(~sees[:, None, :, None], 0.0)
