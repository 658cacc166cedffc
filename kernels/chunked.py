"""Query-chunked attention in plain torch: statistics and interventions without [H, Tq, Tk].

The CPU default backend and the fallback for anything the Triton kernels do not cover. Queries
are processed in blocks of ``block_q`` rows; for each block the whole visible key range is scored
at once, so every row has its exact max and normaliser and no online rescaling is needed. Memory
is O(B * H * block_q * S) where S is the key slice a block can see (``Tk`` for causal layers,
``window + block_q`` for sliding-window layers: a windowed layer costs O(T * W), not O(T^2)).

Per block (GQA: the G query heads of a KV head are stacked as G * C rows of one GEMM):

    s = mask(softcap(q k^T * scale)) - rowmax     # [B, H, C, S] fp32, <= 0, masked <= NEG
    p = softmax(s)                                # max(s) = 0, so max(p) = 1 / Z exactly
    edits rewrite p (uniform heads: softmax of 0 on visible keys; re-weighting: p[:, kp] *= w)
    out = (p @ v) / Zw                            # Zw = 1 unless re-weighted; skipped if output=False
    segment / distance masses: p summed once per key interval between all their boundaries
    mean distance: p @ (t0 - s), a matvec; the diagonal tile and the window band elementwise
    entropy = log Z + log Zw - (sum q s + sum_kp q log w) / Zw     (q = re-weighted p)
    col_mass += (1 / Zw)^T p                      # a matvec, fixed order: deterministic

Why it is shaped like this (measured on the 2-core AVX-512 CPU, see ``benchmarks/README.md``):
- The two GEMMs (q k^T and p @ v) are most of the time; they run at ~45-60 GFLOP/s, ~15%
  faster at 64-row blocks than at 42, so blocks are multiples of 16 rows. Without the output
  the statistics cost ~1.8x a bare q k^T + softmax.
- ``torch.softmax`` is faster than ``torch.exp`` alone (cheaper vectorised exp), and gives Z
  for free through max(p) = 1 / Z.
- Masked logits hold a finite ``NEG`` (float32 min), not -inf: softmax still gives exactly 0
  and ``p * s`` stays 0 instead of NaN, so entropy needs no ``where`` pass. Masks are filled on
  the few C-wide tiles at causal/window edges; padding is a broadcast add (a broadcast
  ``masked_fill`` over the block costs as much as the softmax).
- Score buffers are allocated once per call and reused (``matmul(out=)``, ``softmax(out=)``):
  a fresh multi-MB tensor per block costs page faults comparable to the GEMM itself.
- Linear row statistics are slice sums and one matvec (~1 ms per 30 MB block each), not extra
  GEMM columns: ``p @ E`` with a few columns runs at a fraction of GEMM speed, and carrying them
  in the output GEMM would need a copy of v and would not exist when the output is skipped.
- Few query rows (decoding): ``k @ q^T`` then a transpose is 2-4x faster than ``q @ k^T``.
- Small workspaces are reused across calls (``_workspace``): page faults on fresh buffers
  were a third of a decoding step.
- Top-k never runs ``torch.topk`` over whole rows (nor ``torch.max`` with indices): group
  maxima over 64-key groups pick candidates, and only rows with exact ties near the top-k
  boundary take the slow exact path (see ``_topk_lowest_index``).

Failure modes: logits must be finite (an overflowing q.k gives NaN, as in any attention);
negative ``key_scale`` values are not meaningful (entropy takes ``log w`` only where w > 0).
"""
from __future__ import annotations

import math
import threading

import torch

from .spec import AttnResult, HeadEdits, StatsSpec, check_inputs

NEG = torch.finfo(torch.float32).min  # finite "-inf": exp(NEG - m) == 0 and 0 * NEG == 0
PAD_BIAS = -1e30                      # added for padded keys; NEG + PAD_BIAS still rounds to NEG
_BLOCK_ELEMS = 1 << 23                # target fp32 elements per [B, H, C, S] score buffer (32 MB)
_GROUP = 64                           # keys per group for the top-k candidate search


def _auto_block(B: int, H: int, Tq: int, Tk: int, window: int | None) -> int:
    """Query block size: one [B, H, C, S] fp32 score buffer near ``_BLOCK_ELEMS`` (bounds memory
    at long context), a multiple of 16 rows and at least 64 (MKL's GEMMs run ~30% faster at 64
    rows than at 32; at T = 16k, 96-row blocks beat 32-row ones by 25% overall), at most 256."""
    per_row = B * H * (Tk if window is None else min(Tk, window + 256))
    c = max(64, _BLOCK_ELEMS // max(per_row, 1) // 16 * 16)
    return int(min(Tq, 256, c))


_WS = threading.local()
_WS_KEEP = 1 << 24                    # workspaces up to 64 MB are kept between calls


def _workspace(n: int, device) -> torch.Tensor:
    """A flat fp32 scratch buffer of >= n elements.

    Small ones (decoding steps) are kept per thread and device and reused: a fresh multi-MB
    allocation is returned to the OS on free, so every call would pay ~2,000 page faults,
    ~10 ms, a third of a 32k-token decoding step. Held memory is bounded by ``_WS_KEEP``."""
    if n > _WS_KEEP:
        return torch.empty(n, device=device, dtype=torch.float32)
    cache = _WS.__dict__.setdefault("buffers", {})
    buf = cache.get(str(device))
    if buf is None or buf.numel() < n:
        buf = cache[str(device)] = torch.empty(max(n, 1 << 20), device=device, dtype=torch.float32)
    return buf


def _visible_counts(B: int, Tq: int, Tk: int, causal: bool, window: int | None,
                    kv_valid: torch.Tensor | None, device) -> torch.Tensor:
    """[B, Tq] number of keys each query sees, from prefix sums of the padding mask."""
    t = torch.arange(Tk - Tq, Tk, device=device)                     # [Tq] key index of each query
    hi = t + 1 if causal else torch.full_like(t, Tk)                 # exclusive upper key bound
    lo = (t - window + 1).clamp_min(0) if window is not None else torch.zeros_like(t)
    if kv_valid is None:
        return (hi - lo).clamp_min(0)[None].expand(B, Tq)
    cs = torch.zeros(B, Tk + 1, dtype=torch.long, device=device)
    cs[:, 1:] = kv_valid.long().cumsum(-1)                           # [B, Tk + 1]
    return (cs[:, hi] - cs[:, lo]).clamp_min(0)


def _col_count(B: int, Tq: int, Tk: int, causal: bool, window: int | None, band,
               kv_valid: torch.Tensor | None, device) -> torch.Tensor:
    """[B, Tk] queries that see key s and lie in the column band: an interval length per key."""
    s = torch.arange(Tk, device=device)
    lo = torch.full_like(s, Tk - Tq)                                  # first query position
    hi = torch.full_like(s, Tk - 1)
    if causal:
        lo = torch.maximum(lo, s)
    if window is not None:
        hi = torch.minimum(hi, s + window - 1)
    if band is not None:
        lo = torch.maximum(lo, s + band[0])
        if band[1] is not None:
            hi = torch.minimum(hi, s + band[1])
    n = (hi - lo + 1).clamp_min(0)[None].expand(B, Tk)
    return n * kv_valid.long() if kv_valid is not None else n.clone()


def _lexsort_desc(val: torch.Tensor, idx: torch.Tensor):
    """Order the last dim by value descending, then index ascending (small k only)."""
    idx, p = idx.sort(-1)
    val = val.gather(-1, p)
    val, p = val.sort(dim=-1, descending=True, stable=True)
    return val, idx.gather(-1, p)


def _topk_lowest_index(u: torch.Tensor, k: int, k0: int, Tk: int):
    """Top-k of rows that are ``u`` on keys [k0, k0 + S) and 0 on every other key of [0, Tk).

    u: [R, S], non-negative. Returns (values [R, kk], key indices [R, kk]), kk = min(k, Tk),
    descending, ties resolved to the lowest key index -- the order of a stable descending sort
    of the full row, which ``torch.topk`` does not promise. Strategy: on long rows, candidates
    from the largest group maxima (every top-k entry lies in one of the k + 1 largest groups);
    ``topk`` on the candidates; then the few rows with equal values among or just outside the
    chosen k (uniform heads, zero rows, duplicate keys) are re-ordered exactly: by index within
    the chosen set, and with an index-keyed search when the k-th value also occurs outside it.
    ``torch.topk`` costs ~1 us per row whatever its length, so everything else is kept O(k) per
    row or restricted to the tied rows.
    """
    R, S = u.shape
    kk = min(k, Tk)
    dev = u.device
    n_groups = S // _GROUP
    outside_max = None                                 # bound on every non-candidate entry
    if n_groups >= 4 * (kk + 1):
        S0 = n_groups * _GROUP
        gmax = u[:, :S0].unflatten(-1, (n_groups, _GROUP)).amax(-1)      # [R, n_groups]
        g_val, g_idx = gmax.topk(kk + 1, dim=-1)                          # [R, kk + 1]
        cand = (g_idx[..., None] * _GROUP + torch.arange(_GROUP, device=dev)).flatten(1)
        if S0 < S:
            cand = torch.cat([cand, torch.arange(S0, S, device=dev).expand(R, -1)], 1)
        outside_max = g_val[:, kk]
        top_val, pos = u.gather(1, cand).topk(kk + 1, dim=-1)
        top_idx = cand.gather(1, pos) + k0
    else:
        top_val, top_idx = u.topk(min(kk + 1, S), dim=-1)
        top_idx = top_idx + k0
    if top_val.shape[1] < kk:  # fewer keys in the slice than k: the rest are zeros outside it
        pad = kk - top_val.shape[1]
        top_val = torch.cat([top_val, top_val.new_zeros(R, pad)], 1)
        top_idx = torch.cat([top_idx, top_idx.new_full((R, pad), Tk)], 1)
    vk = top_val[:, kk - 1]                                               # [R] k-th largest value
    amb = (vk == 0) & (S < Tk)                     # zeros outside the slice tie with it
    if top_val.shape[1] > kk:
        amb |= top_val[:, kk] == vk
    if outside_max is not None:
        amb |= outside_max >= vk
    val, idx = top_val[:, :kk].contiguous(), top_idx[:, :kk].contiguous()
    tied = amb | (val[:, 1:] == val[:, :-1]).any(-1)
    rows = tied.nonzero().squeeze(1)
    if rows.numel():
        val[rows], idx[rows] = _lexsort_desc(val[rows], idx[rows])
        rows = amb.nonzero().squeeze(1)
    if rows.numel():
        v_a = vk[rows]                                                    # [A]
        n_gt = (val[rows] > v_a[:, None]).sum(-1, keepdim=True)           # [A, 1] strictly above
        big = torch.iinfo(torch.long).max
        keyed = torch.where(u[rows] == v_a[:, None], torch.arange(k0, k0 + S, device=dev), big)
        zero_row = (v_a == 0)[:, None]
        outside = torch.cat([torch.arange(0, min(k0, kk), device=dev),
                             torch.arange(k0 + S, min(Tk, k0 + S + kk), device=dev)])
        keyed = torch.cat([keyed, torch.where(zero_row, outside, big)], 1)
        ties = keyed.topk(kk, dim=-1, largest=False).values               # [A, kk] ascending
        j = torch.arange(kk, device=dev)
        take_top = j < n_gt
        idx[rows] = torch.where(take_top, idx[rows], ties.gather(1, (j - n_gt).clamp_min(0)))
        val[rows] = torch.where(take_top, val[rows], v_a[:, None])
    return val, idx


class _Edits:
    """HeadEdits resolved once per call into per-head tensors on the compute device."""

    def __init__(self, edits: HeadEdits | None, H: int, Tk: int, Dv: int, device):
        self.uniform_heads: list[int] = []
        self.kp_cols = None      # [P'] sorted key indices whose weight differs from 1 for some head
        self.kp_w = None         # [H, P'] weights at those keys
        self.replace = None      # ([H] bool, value broadcastable to [B, H, Tq, Dv])
        self.out_scale = None    # [H]
        if edits is None or edits.empty:
            return
        edits.validate(H)
        if edits.uniform is not None:
            self.uniform_heads = edits.uniform.bool().nonzero().flatten().tolist()
        if edits.key_pos is not None:
            w = edits.key_weights(H, Tk, device)                          # [H, Tk]
            cols = (w != 1).any(0).nonzero().flatten()
            if cols.numel():
                self.kp_cols, self.kp_w = cols, w[:, cols]
        if edits.replace_mask is not None:
            val = edits.replace_value.to(device).float()
            if val.dim() == 2:
                val = val[None, :, None, :]                               # [1, H, 1, Dv]
            self.replace = (edits.replace_mask.to(device).bool()[None, :, None, None], val)
        if edits.out_scale is not None:
            self.out_scale = edits.out_scale.to(device).float()[None, :, None, None]

    @property
    def reweights(self) -> bool:
        return self.kp_cols is not None


def attend_chunked(q, k, v, spec: StatsSpec | None = None, edits: HeadEdits | None = None, *,
                   scale: float | None = None, causal: bool = True, window: int | None = None,
                   softcap: float | None = None, kv_valid: torch.Tensor | None = None,
                   block_q: int | None = None, output: bool = True) -> AttnResult:
    """Attention output and ``spec`` statistics with ``edits`` applied, exact up to fp32.

    ``output=False`` skips the output (``out`` is None) and with it the ``p @ v`` GEMM, which
    costs as much as the logits: for statistics from cached q / k without running the model.

    ``block_q`` is the number of query rows per block (default: ``_auto_block``, one [B, H, C, S]
    fp32 score buffer of ~32 MB). Inputs of any float dtype are upcast to fp32 (q and k per
    block, v once); ``out`` comes back in ``v``'s dtype, statistics in
    fp32 (indices and ``col_count`` int64). Raises ValueError on inconsistent shapes, a window
    < 1 or a block_q < 1.
    """
    spec = spec or StatsSpec()
    B, H, H_kv, Tq, Tk, D = check_inputs(q, k, v, kv_valid=kv_valid)
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if block_q is not None and block_q < 1:
        raise ValueError(f"block_q must be >= 1, got {block_q}")
    dev, Dv, G = q.device, v.shape[-1], H // H_kv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    ed = _Edits(edits, H=H, Tk=Tk, Dv=Dv, device=dev)
    P0 = Tk - Tq                                                          # key index of query 0
    C = block_q or _auto_block(B, H, Tq, Tk, window=window)
    kvv = kv_valid.to(dev).bool() if kv_valid is not None else None
    kv_bias = None
    if kvv is not None and not bool(kvv.all()):
        kv_bias = torch.zeros(B, Tk, device=dev).masked_fill_(~kvv, PAD_BIAS)[:, None, None, :]
    n_vis = _visible_counts(B, Tq, Tk, causal=causal, window=window, kv_valid=kvv, device=dev)          # [B, Tq]
    need_pmax = spec.lse or spec.entropy

    # ---- outputs
    f32 = dict(device=dev, dtype=torch.float32)
    out = torch.empty(B, H, Tq, Dv, device=dev, dtype=v.dtype) if output else None
    st: dict[str, torch.Tensor] = {}
    if spec.lse:
        st["lse"] = torch.empty(B, H, Tq, **f32)
    kk = min(spec.topk, Tk)
    if kk:
        st["topk_idx"] = torch.empty(B, H, Tq, kk, device=dev, dtype=torch.long)
        st["topk_prob"] = torch.empty(B, H, Tq, kk, **f32)
    if spec.entropy:
        st["entropy"] = torch.empty(B, H, Tq, **f32)
    if spec.segments:
        st["segment_mass"] = torch.empty(B, H, Tq, len(spec.segments), **f32)
    if spec.window_dist is not None:
        st["win_dist"] = torch.empty(B, H, Tq, **f32)
    if spec.mean_dist:
        st["mean_dist"] = torch.empty(B, H, Tq, **f32)
    if spec.col_mass:
        st["col_mass"] = torch.zeros(B, H, Tk, **f32)
        st["col_count"] = _col_count(B, Tq, Tk, causal=causal, window=window, band=spec.col_band, kv_valid=kvv,
                                     device=dev)
    pr = None
    if spec.pattern_rows is not None:
        pr = (spec.pattern_rows[0], min(spec.pattern_rows[1], Tq))
        st["pattern"] = torch.zeros(B, H, max(0, pr[1] - pr[0]), Tk, **f32)

    vf = v.float() if output else None                                    # no copy for fp32 v
    kidx = torch.arange(Tk, device=dev)
    w_dist = spec.window_dist

    # ---- score workspaces, reused by every block (see module docstring)
    def key_range(i0: int, i1: int) -> tuple[int, int]:
        t0, t1 = P0 + i0, P0 + i1
        return (max(0, t0 - window + 1) if window is not None else 0), (t1 if causal else Tk)

    S_max = max(b - a for a, b in (key_range(i, min(Tq, i + C)) for i in range(0, Tq, C)))
    n_ws = B * H * C * S_max
    ws = _workspace(2 * n_ws, dev)
    s_buf, p_buf = ws[:n_ws], ws[n_ws:2 * n_ws]
    q5 = q.unflatten(1, (H_kv, G))                                        # [B, H_kv, G, Tq, D]
    qscale = scale / softcap if softcap is not None else scale

    for i0 in range(0, Tq, C):
        i1 = min(Tq, i0 + C)
        c = i1 - i0
        t0, t1 = P0 + i0, P0 + i1
        k0, k1 = key_range(i0, i1)
        S = k1 - k0
        n = B * H * c * S
        s_g = s_buf[:n].view(B, H_kv, G * c, S)                           # grouped for GQA GEMMs
        s = s_g.view(B, H, c, S)                                          # per query head
        p_g = p_buf[:n].view(B, H_kv, G * c, S)
        p = p_g.view(B, H, c, S)
        t = torch.arange(t0, t1, device=dev)[:, None]                     # [c, 1] key index of queries

        # ---- logits, soft-capping, masks
        qb = (q5[:, :, :, i0:i1].float() * qscale).reshape(B, H_kv, G * c, D)
        kb = k[:, :, k0:k1].float()                                       # [B, H_kv, S, D]
        if G * c < 16:  # few rows (decoding): MKL is 2-4x faster at k @ q^T than q @ k^T
            s_g.copy_(torch.matmul(kb, qb.transpose(-1, -2)).transpose(-1, -2))
        else:
            torch.matmul(qb, kb.transpose(-1, -2), out=s_g)
        if softcap is not None:
            s.tanh_().mul_(softcap)

        def mask_(x: torch.Tensor) -> None:
            """Push invisible (query, key) pairs of a [B, h, c, S] block to <= PAD_BIAS.

            Structural masks fill only the C-wide tiles at the causal/window edges; padding is
            a broadcast add (a broadcast masked_fill costs as much as exp)."""
            if causal and t0 + 1 < k1:                                    # keys after some query
                a = max(k0, t0 + 1)
                x[..., a - k0:].masked_fill_(kidx[a:k1] > t, NEG)
            if window is not None and k0 < t1 - window:                   # keys before some window
                b = t1 - window                                            # exclusive
                x[..., :b - k0].masked_fill_(kidx[k0:b] <= t - window, NEG)
            if kv_bias is not None:
                x.add_(kv_bias[..., k0:k1])

        def softmax_(x: torch.Tensor, y: torch.Tensor) -> None:
            """y = softmax(x) over keys, with 0 on rows that see nothing (softmax would be uniform)."""
            torch.softmax(x, -1, out=y)
            if not vis_all:
                y.masked_fill_(~vis_b[:, None, :, None], 0.0)

        mask_(s)
        vis_b = n_vis[:, i0:i1] > 0                                       # [B, c]
        vis_all = bool(vis_b.all())
        m = s.amax(-1)                                                    # [B, H, c]
        if not vis_all:
            m.masked_fill_(~vis_b[:, None, :], 0.0)
        s.sub_(m[..., None])                                              # s <= 0, max 0
        softmax_(s, p)
        # softmax(s) = exp(s) / Z with max(s) = 0, so the largest probability is exactly 1 / Z
        pmax_raw = p.amax(-1) if spec.lse and (ed.uniform_heads or ed.reweights) else None

        # ---- interventions on the weights
        for h in ed.uniform_heads:
            sh = s[:, h:h + 1]
            sh.zero_()
            mask_(sh)
            softmax_(sh, p[:, h:h + 1])                                   # 1/n on visible keys
        pmax = p.amax(-1) if need_pmax else None                          # 1 / Z of the weights used
        if ed.reweights:
            sel = ((ed.kp_cols >= k0) & (ed.kp_cols < k1)).nonzero().flatten()
            if sel.numel():
                cols = ed.kp_cols[sel] - k0
                w = ed.kp_w[:, sel]                                       # [H, P]
                p[..., cols] = p[..., cols] * w[None, :, None, :]

        # ---- row sums: 1 on visible rows unless re-weighted
        if ed.reweights:
            Zw = p.sum(-1)                                                # [B, H, c]
        else:
            Zw = vis_b[:, None, :].float().expand(B, H, c)
        rinv = torch.where(Zw > 0, 1.0 / Zw, 0.0)                         # [B, H, c]
        cuts = [x for seg in spec.segments for x in seg] + ([t0] if spec.mean_dist else []) + (
            [t0 - w_dist + 1] if w_dist is not None else [])
        masses = _interval_masses(p, k0=k0, k1=k1, cuts=cuts) if cuts else None

        # ---- output and its edits, in the spec's order
        if output:
            ob = torch.matmul(p_g, vf[:, :, k0:k1]).view(B, H, c, Dv) * rinv[..., None]
            if ed.replace is not None:
                rmask, val = ed.replace
                ob = torch.where(rmask, torch.broadcast_to(val, (B, H, Tq, Dv))[:, :, i0:i1], ob)
            if ed.out_scale is not None:
                ob = ob * ed.out_scale
            out[:, :, i0:i1] = ob if vis_all else ob.masked_fill_(~vis_b[:, None, :, None], 0.0)

        # ---- row statistics
        r = torch.arange(c, device=dev, dtype=torch.float32)               # t - t0
        if spec.lse:
            pm = pmax_raw if pmax_raw is not None else pmax
            st["lse"][:, :, i0:i1] = torch.where(pm > 0, m - torch.log(pm), float("-inf"))
        if kk:
            val, idx = _topk_lowest_index(p.reshape(-1, S), k=kk, k0=k0, Tk=Tk)
            st["topk_prob"][:, :, i0:i1] = (val.view(B, H, c, kk) * rinv[..., None])
            st["topk_idx"][:, :, i0:i1] = idx.view(B, H, c, kk)
        if spec.entropy:
            # p = exp(s) / Z, weights q = p * w, p' = q / Zw:
            # entropy = log Z + log Zw - (sum q s + sum_kp q log w) / Zw
            qs = torch.einsum("bhcs,bhcs->bhc", p, s)
            if ed.reweights and sel.numel():
                lw = torch.where(w > 0, torch.log(w.clamp_min(1e-45)), 0.0)
                qs = qs + (p[..., cols] * lw[None, :, None, :]).sum(-1)
            ent = torch.log(Zw) - torch.log(pmax) - qs * rinv
            st["entropy"][:, :, i0:i1] = torch.where(Zw > 0, ent, 0.0)
        if spec.mean_dist:
            # keys before t0: p . (t0 - s) + r * mass; the diagonal tile [t0, t1) directly
            md = r * masses(k0, t0)
            if t0 > k0:
                md = md + (p.reshape(-1, S)[:, :t0 - k0] @ (t0 - kidx[k0:t0]).float()).view(B, H, c)
            a, b = t0 - k0, min(k1, t1) - k0
            md = md + (p[..., a:b] * (r[:, None] - torch.arange(b - a, device=dev)).clamp_min(0)).sum(-1)
            st["mean_dist"][:, :, i0:i1] = md * rinv
        if w_dist is not None:
            a, b = max(k0, t0 - w_dist + 1), min(k1, t1)                  # band of mixed weights
            band = (p[..., a - k0:b - k0] * (t - kidx[a:b]).clamp(0, w_dist).float()).sum(-1)
            st["win_dist"][:, :, i0:i1] = (masses(k0, t0 - w_dist + 1) * w_dist + band) * rinv
        if spec.segments:
            seg = torch.stack([masses(a, b) for a, b in spec.segments], -1)   # [B, H, c, n_seg]
            st["segment_mass"][:, :, i0:i1] = seg * rinv[..., None]
        if pr is not None and pr[0] < i1 and pr[1] > i0:
            a, b = max(pr[0], i0), min(pr[1], i1)
            st["pattern"][:, :, a - pr[0]:b - pr[0], k0:k1] = p[:, :, a - i0:b - i0] * rinv[:, :, a - i0:b - i0, None]

        # ---- column statistics
        if spec.col_mass:
            _col_mass_block(st["col_mass"], p, rinv, t0=t0, t1=t1, k0=k0, k1=k1, band=spec.col_band)
    return AttnResult(out=out, stats=st)


def _interval_masses(p: torch.Tensor, k0: int, k1: int, cuts):
    """mass(a, b): row sums of p (keys [k0, k1)) over keys [a, b), for a, b among ``cuts``.

    The block's key range is split at every cut and each piece summed once, so segments,
    distance indicators and overlapping ranges together cost one read of p; a range's mass is
    a sum of its pieces (no prefix-sum differences, hence no cancellation). Ranges are clipped
    to [k0, k1): keys outside the block's slice carry no weight.
    """
    clip = lambda x: min(max(x, k0), k1)  # noqa: E731
    pts = sorted({k0, k1} | {clip(x) for x in cuts})
    pieces = torch.stack([p[..., a - k0:b - k0].sum(-1) for a, b in zip(pts, pts[1:])], -1)  # [B, H, c, n]
    pos = {x: i for i, x in enumerate(pts)}
    return lambda a, b: pieces[..., pos[clip(a)]:pos[clip(b)]].sum(-1)


def _col_mass_block(col: torch.Tensor, p: torch.Tensor, rinv: torch.Tensor, t0: int, t1: int,
                    k0: int, k1: int, band) -> None:
    """col[b, h, s] += sum over this block's rows t (in the band lo <= t - s <= hi) of p[t, s].

    p: [B, H, c, S] weights of keys [k0, k1), rinv: [B, H, c] their row normalisers. Keys every
    row of the block counts are one matvec ``rinv^T p``; only the two edges of the band (at most
    ~block_q keys wide each) need an elementwise mask.
    """
    dev = p.device
    r = rinv[..., None, :]                                                # [B, H, 1, c]
    if band is None:
        col[..., k0:k1] += (r @ p).squeeze(-2)
        return
    lo, hi = band
    some_a = k0 if hi is None else max(k0, t0 - hi)                       # keys some row counts
    some_b = min(k1, t1 - lo)
    if some_a >= some_b:
        return
    all_a = some_a if hi is None else max(some_a, t1 - 1 - hi)           # keys every row counts
    all_b = min(some_b, t0 - lo + 1)
    t = torch.arange(t0, t1, device=dev)[:, None]

    def partial(a: int, b: int) -> None:
        if a < b:
            d = t - torch.arange(a, b, device=dev)                        # [c, b - a]
            inb = (d >= lo) if hi is None else (d >= lo) & (d <= hi)
            col[..., a:b] += (p[..., a - k0:b - k0] * (rinv[..., None] * inb)).sum(-2)

    if all_a < all_b:
        col[..., all_a:all_b] += (r @ p[..., all_a - k0:all_b - k0]).squeeze(-2)
        partial(some_a, all_a)
        partial(all_b, some_b)
    else:
        partial(some_a, some_b)
