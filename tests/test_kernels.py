"""Chunked attention backend vs the naive float64 reference, on fresh random inputs.

Inputs are random per run; the seed is printed in every failure message and can be pinned with
HEADSCOPE_TEST_SEED=<int> to reproduce one. ``assert_matches`` and ``make_case`` are also used
by ``test_kernels_triton.py``.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from headscope.kernels import attend
from headscope.kernels.chunked import attend_chunked
from headscope.kernels.reference import attend_reference
from headscope.kernels.spec import HeadEdits, StatsSpec

SEED = int(os.environ.get("HEADSCOPE_TEST_SEED", random.randrange(2**31)))


def make_case(B, H, H_kv, Tq, Tk, D, *, pad=None, dtype=torch.float32, logit_scale=1.0, seed=0,
              integer=False):
    """q, k, v (+ kv_valid) for one case. ``pad``: None, 'left' (a left-padded batch whose padded
    queries see nothing) or 'random' (holes anywhere). ``integer``: small-integer q and k, so
    logits are exact integers and every tie is exact in fp32 and fp64 alike."""
    g = torch.Generator().manual_seed(SEED + seed)
    if integer:
        q = torch.randint(-1, 2, (B, H, Tq, D), generator=g).float()
        k = torch.randint(-1, 2, (B, H_kv, Tk, D), generator=g).float()
    else:
        q = torch.randn(B, H, Tq, D, generator=g) * logit_scale
        k = torch.randn(B, H_kv, Tk, D, generator=g) * logit_scale
    v = torch.randn(B, H_kv, Tk, D, generator=g)
    kv_valid = None
    if pad == "left":
        kv_valid = torch.ones(B, Tk, dtype=torch.bool)
        for b in range(B):
            kv_valid[b, : (b * Tk) // (2 * B) + b * 3] = False   # b = 0 unpadded
    elif pad == "random":
        kv_valid = torch.rand(B, Tk, generator=g) > 0.3
    return q.to(dtype), k.to(dtype), v.to(dtype), kv_valid


def full_spec(Tq, Tk, *, topk=4, band=(1, None)) -> StatsSpec:
    return StatsSpec(lse=True, topk=topk, entropy=True,
                     segments=((0, 3), (5, min(17, Tk)), (max(0, Tk - 4), Tk + 10)),
                     window_dist=3, mean_dist=True, col_mass=True, col_band=band,
                     pattern_rows=(min(2, Tq - 1), 9))


def all_edits(H, D, *, g) -> HeadEdits:
    """Every intervention at once, on different heads (heads may overlap)."""
    uni = torch.zeros(H, dtype=torch.bool)
    uni[0] = True
    rep = torch.zeros(H, dtype=torch.bool)
    rep[H - 1] = True
    scale = torch.ones(H)
    scale[: min(H, 3)] = torch.tensor([0.0, 3.0, 0.25])[: min(H, 3)]
    return HeadEdits(uniform=uni, key_pos=torch.tensor([0, 2, 7]), key_scale=scale,
                     replace_mask=rep, replace_value=torch.randn(H, D, generator=g),
                     out_scale=torch.rand(H, generator=g) * 2)


def reference_probs(q, k, v, edits, **kw) -> torch.Tensor:
    """[B, H, Tq, Tk] probabilities actually used, from the reference (for top-k checks)."""
    Tq = q.shape[2]
    return attend_reference(q, k, v, StatsSpec(pattern_rows=(0, Tq)), edits, **kw).stats["pattern"]


def assert_matches(got, ref, p_ref, *, tol=2e-5, out_atol=None, exact_idx=False, msg=""):
    """Compare an AttnResult to the reference: same keys, dtypes, -inf pattern, values within
    ``tol * (1 + |ref|)``. Top-k: probabilities match, the chosen keys carry those probabilities
    in the reference, and indices are identical wherever the ranking is unambiguous (gap > tol)
    -- or everywhere with ``exact_idx`` (inputs whose ties are exact)."""
    msg = f"[seed {SEED}] {msg}"
    assert (got.out is None) == (ref.out is None), f"{msg} out present in one result only"
    if ref.out is not None:
        assert got.out.dtype == ref.out.dtype, msg
        assert got.out.shape == ref.out.shape, msg
        out_atol = tol if out_atol is None else out_atol
        torch.testing.assert_close(got.out.float(), ref.out.float(), atol=out_atol, rtol=0,
                                   msg=lambda m: f"{msg} out: {m}")
    assert set(got.stats) == set(ref.stats), f"{msg} keys {sorted(got.stats)} vs {sorted(ref.stats)}"
    for key, r in ref.stats.items():
        a = got.stats[key]
        assert a.shape == r.shape, f"{msg} {key}: shape {tuple(a.shape)} vs {tuple(r.shape)}"
        assert a.dtype == r.dtype, f"{msg} {key}: dtype {a.dtype} vs {r.dtype}"
        if key == "topk_idx":
            continue
        if key == "col_count":
            assert torch.equal(a, r), f"{msg} col_count"
            continue
        assert torch.isfinite(a).logical_or(a == float("-inf")).all(), f"{msg} {key}: NaN or +inf"
        assert torch.equal(torch.isinf(a), torch.isinf(r)), f"{msg} {key}: -inf pattern differs"
        fin = torch.isfinite(r)
        err = (a[fin] - r[fin]).abs() / (1 + r[fin].abs())
        assert err.numel() == 0 or err.max() <= tol, f"{msg} {key}: max rel err {err.max():.3g} > {tol}"
    if "topk_idx" in ref.stats:
        idx, r_idx, r_prob = got.stats["topk_idx"], ref.stats["topk_idx"], ref.stats["topk_prob"]
        assert ((idx >= 0) & (idx < p_ref.shape[-1])).all(), f"{msg} topk_idx out of range"
        carried = p_ref.gather(-1, idx)
        assert (carried - r_prob).abs().max() <= tol, f"{msg} chosen keys do not carry the top-k probabilities"
        if exact_idx:
            assert torch.equal(idx, r_idx), f"{msg} topk_idx differs"
        else:
            # position j is unambiguous if its probability is > tol away from its neighbours
            # in the sorted row (including the first value left out)
            srt = p_ref.sort(-1, descending=True).values[..., : r_prob.shape[-1] + 1]
            gap_prev = torch.cat([torch.full_like(srt[..., :1], 9.0), srt[..., :-1] - srt[..., 1:]], -1)
            unamb = (gap_prev[..., :-1] > tol) & (gap_prev[..., 1:] > tol)
            assert torch.equal(idx[unamb], r_idx[unamb]), f"{msg} topk_idx differs on an unambiguous position"


def _run(q, k, v, spec, edits, kw, *, block_q=None, tol=2e-5, out_atol=None, exact_idx=False, msg=""):
    ref = attend_reference(q, k, v, spec, edits, **kw)
    got = attend_chunked(q, k, v, spec, edits, block_q=block_q, **kw)
    if kw.get("output") is False:
        assert ref.out is None
    assert_matches(got, ref, reference_probs(q, k, v, edits, **kw), tol=tol, out_atol=out_atol,
                   exact_idx=exact_idx, msg=msg)
    return got


# B, H, H_kv, Tq, Tk, D, pad, attention kwargs
CASES = [
    (2, 4, 4, 37, 37, 16, None, {}),                               # MHA prefill
    (1, 6, 2, 45, 61, 8, None, {}),                                # GQA 3, chunk of a prefill
    (2, 7, 1, 29, 29, 16, None, {"window": 5}),                    # GQA 7, sliding window
    (1, 3, 3, 50, 50, 8, None, {"causal": False}),                 # bidirectional
    (2, 4, 2, 33, 33, 8, None, {"softcap": 3.0, "window": 9}),     # Gemma-2 style
    (3, 6, 2, 40, 40, 16, "left", {}),                             # left padding, masked rows
    (2, 4, 4, 31, 47, 8, "random", {"window": 12}),                # holes + window
    (2, 6, 6, 23, 23, 8, "random", {"causal": False, "softcap": 1.5}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}kv{c[2]}q{c[3]}k{c[4]}{c[6] or ''}{c[7]}")
@pytest.mark.parametrize("block_q", [7, None])
@pytest.mark.parametrize("with_edits", [False, True])
def test_all_statistics_match_reference(case, block_q, with_edits):
    B, H, H_kv, Tq, Tk, D, pad, kw = case
    q, k, v, kv_valid = make_case(B, H, H_kv, Tq, Tk, D, pad=pad, seed=CASES.index(case))
    edits = all_edits(H, D, g=torch.Generator().manual_seed(SEED)) if with_edits else None
    _run(q, k, v, full_spec(Tq, Tk), edits, dict(kw, kv_valid=kv_valid), block_q=block_q,
         msg=f"{case} block_q={block_q} edits={with_edits}")


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[6]], ids=["gqa3", "window", "holes"])
def test_statistics_without_output(case):
    """output=False: ``out`` is None (the p @ v GEMM is skipped) and every statistic, under
    every edit, still matches the reference."""
    B, H, H_kv, Tq, Tk, D, pad, kw = case
    q, k, v, kv_valid = make_case(B, H, H_kv, Tq, Tk, D, pad=pad, seed=40 + CASES.index(case))
    edits = all_edits(H, D, g=torch.Generator().manual_seed(SEED + 2))
    for block_q in (7, None):
        got = _run(q, k, v, full_spec(Tq, Tk), edits, dict(kw, kv_valid=kv_valid, output=False),
                   block_q=block_q, msg=f"stats only {case} block_q={block_q}")
        assert got.out is None


@pytest.mark.parametrize("band", [None, (0, None), (2, 9), (5, 5), (0, 0), (30, None)])
def test_column_band(band):
    q, k, v, kv_valid = make_case(2, 4, 2, 41, 41, 8, pad="random", seed=11)
    spec = StatsSpec(col_mass=True, col_band=band)
    for kw in ({}, {"window": 6}, {"causal": False}):
        _run(q, k, v, spec, None, dict(kw, kv_valid=kv_valid), block_q=8, msg=f"band={band} {kw}")


@pytest.mark.parametrize("field", ["lse", "topk", "entropy", "segments", "window_dist", "mean_dist",
                                   "col_mass", "pattern_rows"])
def test_each_statistic_alone(field):
    """Each statistic on its own (buffers are shared differently when entropy is off)."""
    values = dict(lse=True, topk=3, entropy=True, segments=((4, 20),), window_dist=5, mean_dist=True,
                  col_mass=True, pattern_rows=(0, 40))
    spec = StatsSpec(**{field: values[field]})
    q, k, v, kv_valid = make_case(2, 6, 3, 40, 52, 16, pad="left", seed=12)
    edits = all_edits(6, 16, g=torch.Generator().manual_seed(SEED + 1))
    _run(q, k, v, spec, edits, dict(window=17, kv_valid=kv_valid), block_q=16, msg=field)


@pytest.mark.parametrize("H,H_kv,Tk,kw", [(7, 1, 3001, {}), (6, 2, 2500, {"window": 300}),
                                           (4, 4, 4099, {"softcap": 5.0})])
def test_decoding_single_query(H, H_kv, Tk, kw):
    q, k, v, kv_valid = make_case(2, H, H_kv, 1, Tk, 32, pad="random", seed=13)
    _run(q, k, v, full_spec(1, Tk, topk=8), None, dict(kw, kv_valid=kv_valid), msg=f"decode {kw}")


def test_decoding_exact_ties_over_long_rows():
    """Long rows take the grouped top-k path; uniform heads, duplicate keys and all-equal logits
    put exact ties across groups, which must still resolve to the lowest indices."""
    q, k, v, kv_valid = make_case(2, 6, 2, 1, 3000, 4, pad="random", integer=True, seed=20)
    k[:, :, 2900:2990] = k[:, :, 100:190]
    edits = HeadEdits(uniform=torch.tensor([0, 1, 0, 0, 0, 1], dtype=torch.bool),
                      key_pos=torch.tensor([7, 2950]), key_scale=torch.tensor([1, 1, 0.5, 2, 0, 1.0]))
    spec = StatsSpec(topk=8, lse=True)
    for qq in (q, torch.zeros_like(q)):
        for e in (None, edits):
            _run(qq, k, v, spec, e, dict(kv_valid=kv_valid, scale=1.0), exact_idx=True, msg="decode ties")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    """Low-precision inputs are upcast, so statistics keep fp32 accuracy; out comes back in v's dtype."""
    q, k, v, kv_valid = make_case(2, 6, 2, 35, 35, 16, pad="left", dtype=dtype, seed=14)
    got = _run(q, k, v, full_spec(35, 35), None, dict(window=11, kv_valid=kv_valid), block_q=8,
               out_atol=2e-2, msg=str(dtype))
    assert got.out.dtype == dtype


def test_huge_logits_stay_finite():
    """Logits in the thousands: no NaN/inf anywhere, rows effectively one-hot."""
    q, k, v, kv_valid = make_case(2, 4, 2, 33, 33, 16, pad="left", logit_scale=30.0, seed=15)
    spec = full_spec(33, 33)
    edits = all_edits(4, 16, g=torch.Generator().manual_seed(SEED + 2))
    for e in (None, edits):
        _run(q, k, v, spec, e, dict(kv_valid=kv_valid), block_q=8, tol=2e-3, msg="huge logits")
        _run(q, k, v, spec, e, dict(kv_valid=kv_valid, softcap=50.0), block_q=8, tol=2e-3, msg="huge+cap")


@pytest.mark.parametrize("kw", [{}, {"window": 4}, {"causal": False}])
def test_exact_ties_resolve_to_lowest_index(kw):
    """Integer logits: every tie is exact in both precisions, so top-k indices must be identical,
    including ties among zero-probability (masked) keys, uniform heads and re-weighted keys."""
    q, k, v, kv_valid = make_case(2, 6, 3, 30, 30, 4, pad="random", integer=True, seed=16)
    k[:, :, 10] = k[:, :, 3]                                       # duplicate keys
    edits = HeadEdits(uniform=torch.tensor([0, 1, 0, 0, 0, 0], dtype=torch.bool),
                      key_pos=torch.tensor([5, 6]), key_scale=torch.tensor([1, 1, 0.5, 2, 0, 1.0]))
    spec = StatsSpec(topk=6, lse=True)
    for e in (None, edits):
        _run(q, k, v, spec, e, dict(kw, kv_valid=kv_valid, scale=1.0), block_q=7, exact_idx=True, msg=f"ties {kw}")
    # all-equal logits: top-k is the lowest visible keys, then the lowest masked ones
    z = torch.zeros_like(q)
    _run(z, k, v, spec, None, dict(kw, kv_valid=kv_valid), block_q=7, exact_idx=True, msg=f"zeros {kw}")


def test_reweighting_every_visible_key_to_zero():
    """A row whose weights are all scaled to 0 outputs 0 (or the replacement) with zero statistics."""
    q, k, v, _ = make_case(1, 3, 3, 6, 6, 8, seed=17)
    edits = HeadEdits(key_pos=torch.arange(6), key_scale=torch.tensor([0.0, 1.0, 0.0]),
                      replace_mask=torch.tensor([False, False, True]), replace_value=torch.ones(3, 8))
    got = _run(q, k, v, full_spec(6, 6), edits, {}, block_q=4, msg="all-zero weights")
    assert got.out[:, 0].abs().max() == 0 and (got.out[:, 2] == 1).all()


def test_window_layer_only_scores_window_keys(monkeypatch):
    """A sliding-window layer must not touch keys outside the window (O(T * W), not O(T^2))."""
    q, k, v, _ = make_case(1, 2, 2, 300, 300, 8, seed=18)
    seen = []
    real = torch.matmul

    def spy(a, b, *args, **kwargs):
        seen.append(b.shape[-1])
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "matmul", spy)
    attend_chunked(q, k, v, StatsSpec(entropy=True), window=16, block_q=32)
    assert seen and max(seen) <= 16 + 32, f"scored {max(seen)} keys per block"


def test_dispatcher_and_errors():
    q, k, v, _ = make_case(1, 4, 2, 9, 9, 8, seed=19)
    spec = StatsSpec(entropy=True, topk=2)
    direct = attend_chunked(q, k, v, spec)
    via = attend(q, k, v, spec, backend="auto")
    assert torch.equal(direct.out, via.out) and torch.equal(direct.stats["entropy"], via.stats["entropy"])
    with pytest.raises(ValueError, match="window"):
        attend_chunked(q, k, v, spec, window=0)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        attend_chunked(q[:, :3], k, v, spec)
    with pytest.raises(ValueError, match="block_q"):
        attend_chunked(q, k, v, spec, block_q=0)
