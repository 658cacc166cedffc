"""The statistics-from-LSE path (``triton_stats``) vs the naive float64 reference, interpreted.

The LSE provider here is the fused Triton forward (torch's flash kernel needs CUDA; its part is
checked on the GPU by ``benchmarks/gpu.py``). Small key splits (``split_len=256``) and forced
slab counts exercise split-K decoding and the interleaved column partials on shapes the
interpreter runs in seconds.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from headscope.kernels import autotune, triton_attn, triton_stats  # noqa: E402
from headscope.kernels.reference import attend_reference  # noqa: E402
from headscope.kernels.spec import HeadEdits, StatsSpec  # noqa: E402
from tests.test_kernels import SEED, all_edits, assert_matches, full_spec, make_case, reference_probs  # noqa: E402

if not autotune.INTERPRET:  # imported earlier in this process without the interpreter
    autotune = importlib.reload(autotune)
    triton_attn = importlib.reload(triton_attn)
    triton_stats = importlib.reload(triton_stats)


def _check(q, k, v, spec, edits, kw, *, tol=2e-5, out_atol=None, exact_idx=False, msg="", **grid):
    ref = attend_reference(q, k, v, spec, edits, **kw)
    p_ref = reference_probs(q, k, v, edits, **kw)
    if grid:  # the statistics pass alone, on the reference's LSE, with a forced grid
        lse = attend_reference(q, k, v, StatsSpec(lse=True), **kw).stats["lse"]
        stats = triton_stats.stats_from_lse(q, k, lse, spec, **grid, **_masks(q, kw))
        got = type(ref)(out=None, stats=dict(stats, lse=lse) if spec.lse else stats)
        ref.out = None
    else:
        got = triton_stats.attend_triton_lse(q, k, v, spec, edits, **kw)
    assert_matches(got, ref, p_ref, tol=tol, out_atol=out_atol, exact_idx=exact_idx, msg=f"triton_lse {msg}")
    return got


def _masks(q, kw):
    return dict(scale=kw.get("scale", q.shape[-1] ** -0.5), causal=kw.get("causal", True),
                window=kw.get("window"), softcap=kw.get("softcap"), kv_valid=kw.get("kv_valid"))


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
CASES = [  # B, H, H_kv, Tq, Tk, D, pad, attention kwargs, output edits, dtype
    (1, 2, 2, 45, 45, 16, None, {}, False, F32),
    (1, 3, 1, 40, 70, 16, None, {}, True, BF16),                        # GQA 3, chunk of a prefill
    (1, 7, 1, 33, 33, 8, None, {"window": 5}, True, F32),               # sliding window
    (1, 2, 2, 50, 50, 8, "random", {"causal": False, "softcap": 2.0}, False, F16),
    (2, 2, 1, 40, 40, 16, "left", {"window": 20}, True, F32),           # padded rows see nothing
]


def _output_edits(H, D, g):
    e = all_edits(H, D, g=g)
    return HeadEdits(replace_mask=e.replace_mask, replace_value=e.replace_value, out_scale=e.out_scale)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"H{c[1]}kv{c[2]}q{c[3]}k{c[4]}{c[6] or ''}{c[7]}{c[9]}")
def test_every_statistic_matches_reference(case):
    """bf16/fp16 cases also check the interpreter's upcast and that ``out`` keeps v's dtype."""
    B, H, H_kv, Tq, Tk, D, pad, kw, with_edits, dtype = case
    q, k, v, kv_valid = make_case(B, H, H_kv, Tq, Tk, D, pad=pad, dtype=dtype, seed=300 + CASES.index(case))
    edits = _output_edits(H, D, torch.Generator().manual_seed(SEED)) if with_edits else None
    got = _check(q, k, v, full_spec(Tq, Tk), edits, dict(kw, kv_valid=kv_valid),
                 out_atol=None if dtype == F32 else 2e-2, msg=str(case))
    assert got.out.dtype == dtype


def test_probability_edits_go_to_the_fused_pass():
    """Uniform heads and key re-weighting need the edited and the raw normaliser: still exact."""
    q, k, v, kv_valid = make_case(1, 3, 1, 40, 40, 16, pad="random", seed=310)
    _check(q, k, v, full_spec(40, 40), all_edits(3, 16, g=torch.Generator().manual_seed(SEED)),
           dict(kv_valid=kv_valid), msg="prob edits")


@pytest.mark.parametrize("topk", [1, 5])
def test_split_k_decoding(topk):
    """Tq = 1 over 600 keys in three 256-key splits: partial sums and top-k lists merge exactly."""
    q, k, v, kv_valid = make_case(1, 4, 2, 1, 600, 16, pad="random", seed=320 + topk)
    spec = full_spec(1, 600, topk=topk)
    _check(q, k, v, spec, None, dict(kv_valid=kv_valid), split_len=256, n_slabs=1, msg=f"decode top{topk}")


def test_split_k_small_tq_window_and_band():
    q, k, v, _ = make_case(1, 2, 1, 20, 530, 8, seed=330)
    _check(q, k, v, full_spec(20, 530, topk=3, band=(2, 300)), None, {"window": 270}, split_len=256, n_slabs=1,
           msg="small Tq split")


@pytest.mark.parametrize("n_slabs", [2, 4])
def test_slabs_share_column_partials(n_slabs):
    """Six 16-row query blocks (the interpreter's tile) in snake order: on 2 slabs blocks 0, 3, 4
    and 1, 2, 5 share column partials; on 4 slabs two programs' second blocks are past the end.
    (Bitwise determinism needs real concurrency: ``benchmarks/gpu.py`` checks it on the GPU.)"""
    q, k, v, _ = make_case(1, 2, 1, 90, 90, 8, seed=340)
    _check(q, k, v, StatsSpec(col_mass=True, entropy=True, topk=2), None, {}, split_len=256, n_slabs=n_slabs,
           msg=f"{n_slabs} slabs")


def test_top1_and_ties():
    q, k, v, kv_valid = make_case(1, 4, 2, 40, 40, 4, pad="random", integer=True, seed=350)
    k[:, :, 35] = k[:, :, 3]                                            # duplicate keys across tiles
    for topk in (1, 6):
        _check(q, k, v, StatsSpec(topk=topk, lse=True), None, dict(kv_valid=kv_valid, scale=1.0),
               exact_idx=True, msg=f"ties top{topk}")


def test_topk_beyond_list_length_ranked_densely():
    q, k, v, _ = make_case(1, 2, 2, 20, 40, 8, seed=360)
    _check(q, k, v, StatsSpec(topk=triton_attn.MAX_TOPK + 1, entropy=True), None, {}, msg="long topk")


def test_lse_and_pattern_alone_skip_the_pass():
    q, k, v, _ = make_case(1, 3, 1, 30, 50, 8, seed=370)
    _check(q, k, v, StatsSpec(lse=True, pattern_rows=(3, 9)), None, {"window": 9}, msg="lse + pattern")


def test_huge_logits_entropy_without_cancellation():
    q, k, v, kv_valid = make_case(2, 2, 1, 40, 40, 16, pad="left", logit_scale=30.0, seed=380)
    _check(q, k, v, full_spec(40, 40), None, dict(kv_valid=kv_valid), tol=2e-3, msg="huge logits")
