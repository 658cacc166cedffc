"""Triton kernels vs the naive float64 reference, run by Triton's interpreter on CPU.

``TRITON_INTERPRET=1`` must be set before the kernels are decorated, so it is set here, before
anything imports ``headscope.kernels.triton_attn`` (the module is reloaded if something already
imported it compiled). Sizes stay small: the interpreter runs every tile op in numpy. The
interpreter checks semantics only; compilation and register limits are checked by
``test_kernels_triton_compile.py`` (ptxas, no GPU), speed needs a GPU (``benchmarks/bench_kernels.py``).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from headscope.kernels import triton_attn  # noqa: E402
from headscope.kernels.reference import attend_reference  # noqa: E402
from headscope.kernels.spec import HeadEdits, StatsSpec  # noqa: E402

if not triton_attn._INTERPRET:  # imported earlier in this process without the interpreter
    triton_attn = importlib.reload(triton_attn)
attend_triton = triton_attn.attend_triton

_spec = importlib.util.spec_from_file_location("_kernel_checks", Path(__file__).with_name("test_kernels.py"))
_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_checks)
SEED, make_case, full_spec, all_edits = _checks.SEED, _checks.make_case, _checks.full_spec, _checks.all_edits
assert_matches, reference_probs = _checks.assert_matches, _checks.reference_probs


def _run(q, k, v, spec, edits, kw, *, tol=2e-5, out_atol=None, exact_idx=False, msg=""):
    ref = attend_reference(q, k, v, spec, edits, **kw)
    got = attend_triton(q, k, v, spec, edits, **kw)
    assert_matches(got, ref, reference_probs(q, k, v, edits, **kw), tol=tol, out_atol=out_atol,
                   exact_idx=exact_idx, msg=f"triton {msg}")
    return got


# B, H, H_kv, Tq, Tk, D, pad, attention kwargs, with edits; the interpreter's tiles are 32 x 32
CASES = [
    (1, 2, 2, 45, 45, 16, None, {}, False),                            # MHA, 2 x 2 tiles
    (1, 3, 1, 40, 70, 16, None, {}, True),                             # GQA 3, chunk of a prefill
    (1, 7, 1, 33, 33, 8, None, {"window": 5}, True),                   # GQA 7, sliding window
    (1, 2, 2, 50, 50, 8, "random", {"causal": False, "softcap": 2.0}, False),
    (2, 2, 1, 40, 40, 16, "left", {"window": 20}, True),               # padded rows see nothing
    (1, 2, 2, 70, 70, 8, None, {"softcap": 4.0, "window": 37}, False),  # 3 x 3 tiles, skipped tiles
]


def _case_id(c) -> str:
    return f"H{c[1]}kv{c[2]}q{c[3]}k{c[4]}{c[6] or ''}{c[7]}{'E' if c[8] else ''}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_all_statistics_match_reference(case):
    B, H, H_kv, Tq, Tk, D, pad, kw, with_edits = case
    q, k, v, kv_valid = make_case(B, H, H_kv, Tq, Tk, D, pad=pad, seed=100 + CASES.index(case))
    edits = all_edits(H, D, g=torch.Generator().manual_seed(SEED)) if with_edits else None
    _run(q, k, v, full_spec(Tq, Tk), edits, dict(kw, kv_valid=kv_valid), msg=str(case))


def test_statistics_without_output():
    """HAS_OUT=False: the kernel skips P @ V and the output store; statistics unchanged."""
    q, k, v, kv_valid = make_case(1, 3, 1, 40, 70, 16, pad="random", seed=120)
    edits = all_edits(3, 16, g=torch.Generator().manual_seed(SEED))
    got = _run(q, k, v, full_spec(40, 70), edits, dict(kv_valid=kv_valid, output=False), msg="stats only")
    assert got.out is None


def test_decoding_single_query_gqa7():
    q, k, v, kv_valid = make_case(1, 7, 1, 1, 300, 16, pad="random", seed=110)
    _run(q, k, v, full_spec(1, 300, topk=8), None, dict(kv_valid=kv_valid), msg="decode")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    """bf16 operands to tl.dot are wrong under the interpreter; the UPCAST path must fix that."""
    q, k, v, kv_valid = make_case(1, 3, 1, 37, 37, 16, pad="left", dtype=dtype, seed=111)
    got = _run(q, k, v, full_spec(37, 37), None, dict(window=11, kv_valid=kv_valid), out_atol=2e-2,
               msg=str(dtype))
    assert got.out.dtype == dtype


def test_huge_logits_stay_finite():
    q, k, v, kv_valid = make_case(2, 2, 1, 40, 40, 16, pad="left", logit_scale=30.0, seed=112)
    edits = all_edits(2, 16, g=torch.Generator().manual_seed(SEED + 2))
    _run(q, k, v, full_spec(40, 40), edits, dict(kv_valid=kv_valid), tol=2e-3, msg="huge logits")


@pytest.mark.parametrize("kw", [{}, {"window": 4}])
def test_exact_ties_resolve_to_lowest_index(kw):
    q, k, v, kv_valid = make_case(1, 4, 2, 40, 40, 4, pad="random", integer=True, seed=113)
    k[:, :, 35] = k[:, :, 3]                                           # duplicate keys across tiles
    edits = HeadEdits(uniform=torch.tensor([0, 1, 0, 0], dtype=torch.bool),
                      key_pos=torch.tensor([5, 33]), key_scale=torch.tensor([1, 1, 0.5, 0.0]))
    _run(q, k, v, StatsSpec(topk=6, lse=True, entropy=True), edits, dict(kw, kv_valid=kv_valid, scale=1.0),
         exact_idx=True, msg=f"ties {kw}")


def test_column_bands():
    q, k, v, kv_valid = make_case(1, 2, 1, 45, 45, 8, pad="random", seed=114)
    for band, kw in [((0, None), {}), ((2, 9), {"window": 20}), ((5, 5), {"causal": False}), ((31, None), {})]:
        _run(q, k, v, StatsSpec(col_mass=True, col_band=band), None, dict(kw, kv_valid=kv_valid),
             msg=f"band {band} {kw}")


def test_topk_beyond_kernel_limit_falls_back():
    q, k, v, _ = make_case(1, 2, 2, 20, 40, 8, seed=115)
    _run(q, k, v, StatsSpec(topk=triton_attn.MAX_TOPK + 1, entropy=True), None, {}, msg="topk fallback")


def test_reweighting_every_visible_key_to_zero():
    q, k, v, _ = make_case(1, 3, 3, 6, 6, 8, seed=116)
    edits = HeadEdits(key_pos=torch.arange(6), key_scale=torch.tensor([0.0, 1.0, 0.0]),
                      replace_mask=torch.tensor([False, False, True]), replace_value=torch.ones(3, 8))
    got = _run(q, k, v, full_spec(6, 6), edits, {}, msg="all-zero weights")
    assert got.out[:, 0].abs().max() == 0 and (got.out[:, 2] == 1).all()


def test_cpu_tensors_without_interpreter_are_refused():
    code = ("import torch\nfrom headscope.kernels.triton_attn import attend_triton\n"
            "q = torch.randn(1, 1, 4, 16)\n"
            "try:\n    attend_triton(q, q, q)\nexcept ValueError as e:\n    print('refused:', e)\n")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "refused: the triton backend needs CUDA tensors" in res.stdout, res.stdout + res.stderr
