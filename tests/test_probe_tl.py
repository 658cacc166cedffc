"""TransformerLens interop: BridgeProbe (TL hooks on a TransformerBridge) agrees with Probe (HF path)."""
from __future__ import annotations

import pytest
import torch

from headscope.errors import HeadscopeError
from headscope.kernels import StatsSpec
from headscope.probe import HeadAblation, KeyReweight, Patch, Probe

from .helpers import assert_top1, one_thread  # noqa: F401 (fixture)

STATS = StatsSpec(topk=1, entropy=True, segments=((0, 1), (3, 9)), mean_dist=True, window_dist=5, col_mass=True,
                  pattern_rows=(4, 8))
ACTS = ["hook_embed", "blocks.*.hook_resid_pre", "blocks.3.hook_resid_mid", "blocks.3.hook_attn_out",
        "blocks.3.hook_mlp_out", "blocks.*.attn.hook_z", "blocks.5.attn.hook_result", "ln_final.hook_normalized", "logits"]


@pytest.fixture(scope="module")
def probes(smollm2):
    """(HF-path Probe on the shared model, BridgeProbe on a private booted copy)."""
    from headscope.probe import load_model
    from headscope.probe.tl import BridgeProbe, boot_bridge

    private = load_model("smollm2-135m")
    return Probe(smollm2), BridgeProbe(boot_bridge(private)), smollm2.tokenizer


@pytest.mark.slow
def test_bridge_capture_matches_hf_path(probes):
    hf, tl, tok = probes
    ids = tok("Alice gave Bob a book, and then Bob gave Alice a pen because", return_tensors="pt").input_ids
    with hf.capture(stats=STATS, activations=ACTS) as a:
        hf.forward(ids)
    with tl.capture(stats=STATS, activations=ACTS) as b:
        tl.forward(ids)
    assert a.acts.keys() == b.acts.keys()
    for name in a.acts:
        torch.testing.assert_close(b.acts[name], a.acts[name], atol=2e-4, rtol=1e-4, msg=name)
    for l in range(hf.anatomy.n_layers):
        for key in ("entropy", "segment_mass", "mean_dist", "win_dist", "col_mass", "pattern", "topk_prob"):
            torch.testing.assert_close(b.stats[l][key], a.stats[l][key], atol=2e-4, rtol=1e-4, msg=f"L{l} {key}")
        assert torch.equal(b.stats[l]["col_count"], a.stats[l]["col_count"])
    full = torch.stack([b.stats[l]["pattern"] for l in range(hf.anatomy.n_layers)])  # rows 4..7
    top = torch.stack([a.stats[l]["topk_idx"][:, :, 4:8, 0] for l in range(hf.anatomy.n_layers)])
    assert_top1(top, full)


@pytest.mark.slow
def test_bridge_interventions_match_hf_path(probes):
    hf, tl, tok = probes
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    with hf.capture(activations=["blocks.4.attn.hook_z"]) as donor:
        hf.forward(tok("The capital of Spain is Madrid. The capital of Japan is", return_tensors="pt").input_ids)
    ops = [HeadAblation(2, 3, "zero"), HeadAblation(6, None, "scale", 0.5), HeadAblation(8, 1, "mean", torch.randn(64)),
           HeadAblation(10, 4, "uniform"), KeyReweight(12, 0, positions=[0], beta=0.1),
           Patch("blocks.4.attn.hook_z", positions=[2, 5], heads=[1], value=donor.acts["blocks.4.attn.hook_z"])]
    clean = hf.forward(ids).logits
    with hf.intervene(ops):
        want = hf.forward(ids).logits
    with tl.intervene(ops):
        got = tl.forward(ids).logits
    assert (want - clean).abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_probe_refuses_a_model_rewired_by_a_bridge_boot(tmp_path):
    """Booting a bridge swaps the model's layers for TransformerLens components; the Probe made
    before must say so (a HeadscopeError naming the fix), not crash inside TransformerLens with
    ``'KVMask' object has no attribute 'ndim'``. A fresh load stays usable."""
    from headscope.probe import load_model
    from headscope.probe.tl import boot_bridge
    from tests.helpers import make_tiny_model_dir
    lm = load_model(str(make_tiny_model_dir(tmp_path / "tiny")))
    probe = Probe(lm)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    probe.forward(ids)
    boot_bridge(lm)
    with pytest.raises(HeadscopeError, match="rewired.*TransformerLens.*load_model"):
        with probe.capture(stats=StatsSpec(entropy=True)):
            probe.forward(ids)
    with pytest.raises(HeadscopeError, match="rewired"):
        probe.sweep_heads(ids, metric=lambda lg: float(lg.sum()))
    fresh = Probe(load_model(str(make_tiny_model_dir(tmp_path / "tiny2"))))
    assert torch.isfinite(fresh.forward(ids).logits).all()
