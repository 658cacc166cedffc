"""Naive float64 reference: materialises [B, H, Tq, Tk]. For tests only, never for real runs."""
from __future__ import annotations

import math

import torch

from .spec import AttnResult, HeadEdits, StatsSpec, check_inputs


def visible_mask(Tq: int, Tk: int, *, causal: bool = True, window: int | None = None,
                 kv_valid: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                 device=None) -> torch.Tensor:
    """[B or 1, 1, R, Tk] bool: key s visible to query i (at key index Tk - Tq + i).

    The one definition of visibility (causal, sliding window ``t - s < window``, padding) for
    everything that materialises maps: this reference, the Triton wrapper's dense rows, the
    TransformerLens bridge. ``rows``: the query indices wanted (default all Tq)."""
    i = torch.arange(Tq, device=device) if rows is None else rows.to(device)
    t = (Tk - Tq + i)[:, None]                             # [R, 1] key index of each query
    s = torch.arange(Tk, device=device)[None, :]           # [1, Tk]
    m = torch.ones(t.shape[0], Tk, dtype=torch.bool, device=device)
    if causal:
        m &= s <= t
    if window is not None:
        m &= (t - s) < window
    m = m[None, None]
    if kv_valid is not None:
        m = m & kv_valid.bool()[:, None, None, :]
    return m


def attend_reference(q, k, v, spec: StatsSpec | None = None, edits: HeadEdits | None = None, *,
                     scale: float | None = None, causal: bool = True, window: int | None = None,
                     softcap: float | None = None, kv_valid: torch.Tensor | None = None,
                     output: bool = True) -> AttnResult:
    spec = spec or StatsSpec()
    B, H, H_kv, Tq, Tk, D = check_inputs(q, k, v, kv_valid=kv_valid)
    G = H // H_kv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qd, kd, vd = q.double(), k.double(), v.double()
    kd = kd.repeat_interleave(G, dim=1)  # [B, H, Tk, D]
    vd = vd.repeat_interleave(G, dim=1)

    logits = qd @ kd.transpose(-1, -2) * scale  # [B, H, Tq, Tk]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    vis = visible_mask(Tq, Tk, causal=causal, window=window, kv_valid=kv_valid, device=q.device)
    vis = vis.expand(B, H, Tq, Tk)
    logits = logits.masked_fill(~vis, float("-inf"))
    any_vis = vis.any(-1, keepdim=True)
    lse = torch.logsumexp(logits, -1)  # -inf on empty rows
    p = torch.where(any_vis, torch.exp(logits - torch.where(any_vis, lse[..., None], 0.0)), 0.0)

    if edits is not None and not edits.empty:
        edits.validate(H)
        if edits.uniform is not None:
            u = edits.uniform.to(q.device).bool()[None, :, None, None]
            n = vis.sum(-1, keepdim=True).clamp_min(1)
            p = torch.where(u, vis.double() / n, p)
        if edits.key_pos is not None:
            w = edits.key_weights(H, Tk, device=q.device, dtype=torch.float64)                  # [H, Tk]
            p = p * w[None, :, None, :]
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)

    out = p @ vd  # [B, H, Tq, Dv]
    if edits is not None and not edits.empty:
        if edits.replace_mask is not None:
            val = edits.replace_value.to(q.device).double()
            if val.dim() == 2:
                val = val[None, :, None, :]
            out = torch.where(edits.replace_mask.to(q.device).bool()[None, :, None, None], val.expand_as(out), out)
        if edits.out_scale is not None:
            out = out * edits.out_scale.to(q.device).double()[None, :, None, None]
    out = torch.where(any_vis, out, 0.0)
    # lse of the logits the model used; under edits it still describes the raw logits
    stats = stats_from_probs(p, spec, vis, lse=lse if spec.lse else None)
    return AttnResult(out=out.to(v.dtype) if output else None, stats=stats)


def stats_from_probs(p: torch.Tensor, spec: StatsSpec, vis: torch.Tensor,
                     lse: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The ``spec`` statistics of materialised weights, as ``spec.py`` defines them (float64 math).

    p: [B, H, Tq, Tk] weights of queries at key index Tk - Tq + i, 0 where invisible; vis: [B or
    1, 1 or H, Tq, Tk] bool. ``lse`` [B, H, Tq] is passed through when given (it needs the logits).
    The one place a statistic is computed from a probability matrix: the reference backend and
    the TransformerLens bridge (``probe.tl.pattern_stats``) both call it."""
    Tq, Tk = p.shape[-2:]
    stats = {}
    t_idx = torch.arange(Tk - Tq, Tk, device=p.device)[:, None]
    s_idx = torch.arange(Tk, device=p.device)[None, :]
    dist = (t_idx - s_idx).clamp_min(0).double()  # [Tq, Tk]
    if lse is not None:
        stats["lse"] = lse.float()
    if spec.topk:
        kk = min(spec.topk, Tk)
        # stable descending sort: ties keep the lowest key index first
        order = torch.sort(p, dim=-1, descending=True, stable=True)
        stats["topk_idx"] = order.indices[..., :kk]
        stats["topk_prob"] = order.values[..., :kk].float()
    if spec.entropy:
        plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), 0.0)
        stats["entropy"] = (-plogp.sum(-1)).float()
    if spec.segments:
        stats["segment_mass"] = torch.stack(
            [p[..., a:b].sum(-1) for a, b in spec.segments], dim=-1).float()
    if spec.window_dist is not None:
        stats["win_dist"] = (p * dist.clamp_max(spec.window_dist)).sum(-1).float()
    if spec.mean_dist:
        stats["mean_dist"] = (p * dist).sum(-1).float()
    if spec.col_mass:
        band = torch.ones(Tq, Tk, dtype=torch.bool, device=p.device)
        if spec.col_band is not None:
            lo, hi = spec.col_band
            d = t_idx - s_idx
            band = d >= lo
            if hi is not None:
                band &= d <= hi
        inb = vis & band[None, None]
        stats["col_mass"] = (p * inb).sum(-2).float()
        stats["col_count"] = inb[:, 0].sum(-2)
    if spec.pattern_rows is not None:
        a, b = spec.pattern_rows
        stats["pattern"] = p[:, :, a:min(b, Tq)].float()
    return stats
