"""Head labels and rankings, defined once and torch-free (numpy only).

Every summary (``top_*`` in run.json), CLI line, dashboard table and report names and orders
heads through here, so the same scores give the same "top heads" everywhere.

Labels: ``L{layer}H{head}`` for query heads, ``L{layer}KV{head}`` for KV-head scores.

Tie rule (every ranking): highest score first (lowest with ``ascending``); equal scores in
(layer, head) order, lowest first; NaN after every number, also in (layer, head) order.
``finite=True`` drops NaN and +-inf before the first ``k`` are taken.
"""
from __future__ import annotations

import numpy as np

from headscope.errors import HeadscopeError


def head_label(layer: int, head: int, index: str = "query_head") -> str:
    """``L3H5`` (``index="kv_head"``: ``L3KV5``)."""
    return f"L{layer}{'KV' if index == 'kv_head' else 'H'}{head}"


def parse_head(label: str) -> tuple[int, int]:
    """``'L3H5'`` / ``'L3KV1'`` / ``'3.5'`` -> (3, 5); a clear error for anything else."""
    s = label.strip().upper()
    try:
        if s.startswith("L"):
            layer, _, head = s[1:].replace("KV", "H").partition("H")
            return int(layer), int(head)
        layer, _, head = s.replace("-", ".").partition(".")
        return int(layer), int(head)
    except ValueError:
        raise HeadscopeError(f"not a head label: {label!r} (expected e.g. L3H5)") from None


def ranked_heads(scores, k: int | None = None, *, ascending: bool = False,
                 finite: bool = False) -> list[tuple[int, int]]:
    """(layer, head) of a [L, H] score matrix in rank order (module tie rule), the first ``k`` (None: all)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise HeadscopeError(f"a head ranking needs an [L, H] score, got shape {s.shape}")
    flat = s.ravel()
    nan = np.isnan(flat)
    key = np.where(nan, 0.0, flat if ascending else -flat)
    order = np.lexsort((key, nan))                    # stable: equal keys keep (layer, head) order
    if finite:
        order = order[np.isfinite(flat[order])]
    return [divmod(int(i), s.shape[1]) for i in order[:k]]


def top_labels(scores, k: int | None = None, *, ascending: bool = False, index: str = "query_head") -> list[str]:
    """``head_label``s of ``ranked_heads``: what run summaries store as ``top_<score>``."""
    return [head_label(l, h, index) for l, h in ranked_heads(scores, k, ascending=ascending)]


def descending_rank(scores) -> np.ndarray:
    """Rank of each head, 1 = highest score, ties share the best rank (so equal heads read equal)."""
    flat = np.asarray(scores, dtype=np.float64).ravel()
    rank = np.empty(len(flat), dtype=np.int64)
    prev, r = None, 0
    for pos, (_, i) in enumerate(ranked_heads(flat.reshape(1, -1))):
        if prev is None or flat[i] != prev:
            r = pos + 1
            prev = flat[i]
        rank[i] = r
    return rank.reshape(np.shape(scores))
