"""The dashboard's pure functions (headscope.app.views) against independent references."""
from __future__ import annotations

import numpy as np
import pytest

from headscope.app import views
from headscope.errors import HeadscopeError


@pytest.fixture
def rng():
    return np.random.default_rng()


def test_spearman_against_the_textbook_formula(rng):
    a, b = rng.random(40), rng.random(40)  # no ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1))
    d = np.argsort(np.argsort(a)) - np.argsort(np.argsort(b))
    assert views.spearman(a, b) == pytest.approx(1 - 6 * (d ** 2).sum() / (40 * (40 ** 2 - 1)))
    ac, bc = a - a.mean(), b - b.mean()
    assert views.pearson(a, b) == pytest.approx((ac * bc).sum() / np.sqrt((ac ** 2).sum() * (bc ** 2).sum()))
    assert np.isnan(views.spearman(np.ones(5), np.arange(5.0)))
    with pytest.raises(HeadscopeError, match="correlate"):
        views.spearman(a, b[:3])


def test_compare_scores_diff_and_overlap(rng):
    a = rng.random((3, 4))
    b = a.copy()
    b[0, 0] += 10  # becomes the top head of b only
    res = views.compare_scores(a, b, k=3)
    np.testing.assert_allclose(res["diff"], b - a)
    top_a = set(np.argsort(-a, axis=None)[:3])
    top_b = set(np.argsort(-b, axis=None)[:3])
    assert res["top3_overlap"] == pytest.approx(len(top_a & top_b) / 3)
    with pytest.raises(HeadscopeError, match="shapes differ"):
        views.compare_scores(a, rng.random((2, 4)))


def test_top_heads_sorted_like_a_naive_sort(rng):
    s = {"x": rng.random((5, 3)), "y": rng.random((5, 3)), "kv": rng.random((5, 1))}
    rows = views.top_heads(s, "x", k=4)
    flat = sorted(((s["x"][l, h], l, h) for l in range(5) for h in range(3)), reverse=True)[:4]
    assert [(r["layer"], r["index"]) for r in rows] == [(l, h) for _, l, h in flat]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["y"] == s["y"][flat[0][1], flat[0][2]]
    assert "kv" not in rows[0]  # a differently shaped score is never lined up
    low = views.top_heads(s, "x", k=2, ascending=True)
    assert low[0]["x"] == s["x"].min()


def test_descending_rank_ties_share_the_best_rank():
    r = views.descending_rank(np.array([[0.5, 0.9], [0.5, 0.1]]))
    assert r.tolist() == [[2, 1], [2, 4]]


def test_downsample_keeps_row_mass_and_sink_columns(rng):
    T = 700
    p = np.tril(rng.random((T, T)))
    p[:, 0] += 5.0
    p /= p.sum(1, keepdims=True)
    ds = views.downsample_pattern(p, max_q=50, max_k=60, keep_first=4)
    assert ds.mat.shape[0] <= 50 and ds.mat.shape[1] <= 60
    np.testing.assert_allclose(ds.mat.sum(1), 1.0, atol=1e-9)  # key bins sum, query bins average
    assert ds.k_edges[:5].tolist() == [0, 1, 2, 3, 4]              # the first keys stay single columns
    # reference: a naive loop over the bins
    i, j = 7, 30
    q0, q1, k0, k1 = ds.q_edges[i], ds.q_edges[i + 1], ds.k_edges[j], ds.k_edges[j + 1]
    ref = np.mean([p[q, k0:k1].sum() for q in range(q0, q1)])
    assert ds.mat[i, j] == pytest.approx(ref)
    small = views.downsample_pattern(p[:20, :20])
    assert not small.pooled and np.array_equal(small.mat, p[:20, :20])


def test_sinks_by_hand():
    # one head, 3 tokens, every query puts 0.6+ on token 0: Gu's alpha by hand
    alpha = np.array([[(1 + 0.7 + 0.6) / 3, 0.4 / 2, 0.3]])
    assert views.sink_positions(alpha, eps=0.5) == [0]
    assert views.sink_rate(np.stack([alpha[0], [0.1, 0.1, 0.1]]), eps=0.5)[0] == 50.0
    # the last key's alpha is one diagonal entry: not tested unless enough queries see it
    late = np.array([[0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.8]])
    count = np.arange(8, 0, -1)
    assert views.sink_positions(late, eps=0.5) == [0, 7]
    elig = views.sink_eligible(count)  # at least max(4, T // 4) = 4 queries
    assert elig.tolist() == [True] * 5 + [False] * 3
    assert views.sink_positions(late, eps=0.5, eligible=elig) == [0]


def test_top_attended_counts_top1(rng):
    alpha = np.array([0.1, 0.5, 0.2, 0.2])
    rows = views.top_attended(alpha, ["a", "b", "c", "d"], k=2, top1_idx=np.array([1, 1, 0, 2]))
    assert [r["token"] for r in rows] == ["b", "c"]
    assert rows[0]["top1_count"] == 2


def test_softmax_inverts_log(rng):
    p = rng.random(50)
    p /= p.sum()
    np.testing.assert_allclose(views.softmax(np.log(p) + 3.0), p)


def test_distribution_change_includes_promoted_tokens():
    before = np.array([0.7, 0.2, 0.1, 0.0])
    after = np.array([0.1, 0.1, 0.1, 0.7])
    rows = views.distribution_change(before, after, str, k=1)
    assert {r["token_id"] for r in rows} == {0, 3}
    assert next(r for r in rows if r["token_id"] == 3)["change"] == pytest.approx(0.7)


def test_per_example_values_from_records_and_arrays(rng):
    per = rng.random((3, 2, 4))
    records = [{"id": f"e{i}", "score": per[i].tolist()} for i in range(3)] + [{"id": "skip", "skip": True}]
    vals = views.per_example_values(records, {}, "score", (2, 4), 1, 2)
    assert vals == [(f"e{i}", per[i, 1, 2]) for i in range(3)]
    vals2 = views.per_example_values([{"id": f"e{i}"} for i in range(3)], {"score_per_example": per}, "score",
                                     (2, 4), 0, 3)
    assert [v for _, v in vals2] == per[:, 0, 3].tolist()
    assert views.per_example_values([{"id": "e"}], {}, "score", (2, 4), 0, 0) is None


def test_heatmap_hover_and_labels(rng):
    m = rng.random((3, 4))
    fig = views.heatmap_figure(m, "t", meta={"description": "d", "index": "kv_head"})
    tr = fig.data[0]
    np.testing.assert_allclose(np.asarray(tr.z), m)
    assert tr.customdata[2][1][0] == "L2KV1"
    assert int(tr.customdata[2][1][1]) == int((m > m[2, 1]).sum() + 1)
    assert views.parse_head("L2KV1") == (2, 1) and views.parse_head("3.5") == (3, 5)
    with pytest.raises(HeadscopeError):
        views.parse_head("head five")


def test_series_figure_thins_long_series_keeping_peaks():
    s = np.zeros(10_000)
    s[7777] = 3.0
    fig = views.series_figure({"x": s}, max_points=1000)
    y = np.asarray(fig.data[0].y)
    assert len(y) <= 1000 and y.max() == 3.0


def test_pattern_stats_by_hand():
    # queries 1 and 2 of a 3-token prompt
    p = np.array([[0.5, 0.5, 0.0], [0.2, 0.2, 0.6]])
    st = views.pattern_stats(p, q_start=1)
    assert st["entropy"] == pytest.approx((np.log(2) - (0.4 * np.log(0.2) + 0.6 * np.log(0.6))) / 2)
    assert st["mean_distance"] == pytest.approx((0.5 * 1 + (0.2 * 2 + 0.2 * 1)) / 2)
    assert st["first_key_mass"] == pytest.approx(0.35) and st["top_key"] == 0
