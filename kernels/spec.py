"""The contract shared by every attention backend: what to compute and what to change.

Conventions (all backends, all callers):
- q: [B, H, Tq, D], k: [B, H_kv, Tk, D], v: [B, H_kv, Tk, Dv]; H % H_kv == 0 and query head h reads KV head
  h // (H // H_kv) (GQA, as HF's ``repeat_kv``).
- Queries are the *last* Tq positions of the key sequence: query i sits at key index
  ``Tk - Tq + i``. This covers a full prefill (Tq == Tk), a chunk of a chunked prefill and a
  decoding step with a KV cache (Tq == 1).
- Key s is visible to query t iff ``s <= t`` (causal), ``t - s < window`` (sliding window, if
  set) and ``kv_valid[b, s]`` (padding mask, if given). A query with no visible key outputs 0
  and gets ``lse = -inf`` and zero statistics.
- Statistics are fp32 and describe the attention *actually used*, i.e. after interventions.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

STAT_KEYS = (
    "lse",          # [B, H, Tq]        log-sum-exp of the (scaled, capped) logits
    "topk_idx",     # [B, H, Tq, k]     key indices, descending prob, ties -> lowest index
    "topk_prob",    # [B, H, Tq, k]
    "entropy",      # [B, H, Tq]        -sum p log p (nats)
    "segment_mass", # [B, H, Tq, S]     sum of p over each key segment [start, end)
    "win_dist",     # [B, H, Tq]        sum_s p[t,s] * min(t - s, window_dist)
    "mean_dist",    # [B, H, Tq]        sum_s p[t,s] * (t - s)
    "col_mass",     # [B, H, Tk]        sum over queries in the band of p[t,s]
    "col_count",    # [B, Tk]           number of queries contributing to col_mass (mask + band)
    "pattern",      # [B, H, R, Tk]     full rows for queries pattern_rows[0] <= i < pattern_rows[1]
)


@dataclass(frozen=True)
class StatsSpec:
    """Which per-head attention statistics to compute; everything defaults to off.

    ``segments`` are key-index ranges ``[start, end)``; ``col_band=(lo, hi)`` keeps only
    query/key pairs with ``lo <= t - s <= hi`` in the column sums (``hi=None`` means no upper
    bound); ``pattern_rows`` is a query-index range (relative to this call's queries) whose
    full probability rows are returned, meant for small display windows only.
    """

    lse: bool = False
    topk: int = 0
    entropy: bool = False
    segments: tuple[tuple[int, int], ...] = ()
    window_dist: int | None = None
    mean_dist: bool = False
    col_mass: bool = False
    col_band: tuple[int, int | None] | None = None
    pattern_rows: tuple[int, int] | None = None

    def __post_init__(self):
        if self.topk < 0:
            raise ValueError(f"topk must be >= 0, got {self.topk}")
        if self.window_dist is not None and self.window_dist < 1:
            raise ValueError(f"window_dist must be >= 1, got {self.window_dist}")
        for seg in self.segments:
            if len(seg) != 2 or seg[0] < 0 or seg[1] < seg[0]:
                raise ValueError(f"segment must be (start, end) with 0 <= start <= end, got {seg}")
        if self.col_band is not None:
            lo, hi = self.col_band
            if lo < 0 or (hi is not None and hi < lo):
                raise ValueError(f"col_band must be (lo, hi) with 0 <= lo <= hi, got {self.col_band}")
        if self.pattern_rows is not None:
            a, b = self.pattern_rows
            if a < 0 or b < a:
                raise ValueError(f"pattern_rows must be (start, end), got {self.pattern_rows}")

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))

    @property
    def needs_columns(self) -> bool:
        return self.col_mass


@dataclass
class HeadEdits:
    """Per-head interventions applied inside the attention call, in this order:

    1. ``uniform[h]``: the head attends uniformly to its visible keys (exact prefix mean of v,
       the "undifferentiated attention" of Ships / retrieval masking).
    2. ``key_pos`` / ``key_scale[h]``: probabilities on the listed key indices are multiplied by
       ``key_scale[h]`` and the row is renormalised (ACT / VAR redistribution; 1 = no change).
    3. ``replace_mask[h]``: the head output is replaced by ``replace_value[h]`` (mean ablation;
       ``replace_value`` is [H, D] or broadcastable to [B, H, Tq, D]).
    4. ``out_scale[h]``: the head output is multiplied (0 = zero ablation, alpha for VHR / SC).
    """

    uniform: torch.Tensor | None = None        # [H] bool
    key_pos: torch.Tensor | None = None        # [P] long, key indices
    key_scale: torch.Tensor | None = None      # [H] float
    replace_mask: torch.Tensor | None = None   # [H] bool
    replace_value: torch.Tensor | None = None  # [H, D] or broadcastable to [B, H, Tq, D]
    out_scale: torch.Tensor | None = None      # [H] float

    def validate(self, n_heads: int) -> None:
        for name in ("uniform", "key_scale", "replace_mask", "out_scale"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (n_heads,):
                raise ValueError(f"HeadEdits.{name} must have shape [{n_heads}], got {tuple(t.shape)}")
        if (self.key_pos is None) != (self.key_scale is None):
            raise ValueError("HeadEdits.key_pos and key_scale must be given together")
        if (self.replace_mask is None) != (self.replace_value is None):
            raise ValueError("HeadEdits.replace_mask and replace_value must be given together")

    @property
    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def key_weights(self, n_heads: int, Tk: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """[H, Tk] multipliers of the probabilities (1 off ``key_pos``): what every backend re-weights by."""
        w = torch.ones(n_heads, Tk, device=device, dtype=dtype)
        if self.key_pos is not None:
            w[:, self.key_pos.to(device).long()] = self.key_scale.to(device=device, dtype=dtype)[:, None]
        return w


@dataclass
class AttnResult:
    out: torch.Tensor | None               # [B, H, Tq, Dv], dtype of v; None if output=False
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def check_inputs(q, k, v, kv_valid=None) -> tuple[int, int, int, int, int, int]:
    """Validate shapes; return (B, H, H_kv, Tq, Tk, D). Raises ValueError naming the problem."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D: [B, H, T, D]")
    B, H, Tq, D = q.shape
    Bk, H_kv, Tk, Dk = k.shape
    if k.shape[:3] != v.shape[:3] or Bk != B or Dk != D:
        raise ValueError(f"incompatible shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if H % H_kv:
        raise ValueError(f"query heads ({H}) must be a multiple of KV heads ({H_kv})")
    if Tq > Tk:
        raise ValueError(f"more queries ({Tq}) than keys ({Tk})")
    if kv_valid is not None and tuple(kv_valid.shape) != (B, Tk):
        raise ValueError(f"kv_valid must be [B, Tk] = [{B}, {Tk}], got {tuple(kv_valid.shape)}")
    return B, H, H_kv, Tq, Tk, D
