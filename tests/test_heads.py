"""headscope.heads: labels and the one ranking rule, on hand-worked matrices."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from headscope.errors import HeadscopeError
from headscope.heads import descending_rank, head_label, parse_head, ranked_heads, top_labels


def test_ranking_ties_by_layer_then_head_and_nan_last():
    s = np.array([[0.5, np.nan, 0.9],
                  [0.5, 0.9, -np.inf]])
    assert ranked_heads(s) == [(0, 2), (1, 1), (0, 0), (1, 0), (1, 2), (0, 1)]
    assert ranked_heads(s, 3, ascending=True) == [(1, 2), (0, 0), (1, 0)]
    assert ranked_heads(s, finite=True) == [(0, 2), (1, 1), (0, 0), (1, 0)]
    assert top_labels(s, 2) == ["L0H2", "L1H1"] and top_labels(s, 1, index="kv_head") == ["L0KV2"]
    assert descending_rank(np.array([[0.5, 0.9], [0.5, 0.1]])).tolist() == [[2, 1], [2, 4]]


def test_labels_round_trip_and_bad_input():
    assert [parse_head(head_label(3, 5)), parse_head(head_label(2, 1, "kv_head"))] == [(3, 5), (2, 1)]
    with pytest.raises(HeadscopeError, match="not a head label"):
        parse_head("head five")
    with pytest.raises(HeadscopeError, match=r"\[L, H\]"):
        ranked_heads(np.zeros(4))


def test_heads_module_is_torch_free():
    import subprocess
    code = "import sys, headscope.heads; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
