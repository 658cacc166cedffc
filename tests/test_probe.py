"""Probe capture: logits fidelity, attention statistics and activations against HF eager attention.

The reference is the same HF model run with eager attention and ``output_attentions=True``.
Statistics are recomputed from those maps in float64. Tiny random models cover the llama, gemma3
(sliding + global layers, QK-norm, MQA), gemma2 (logit softcap), qwen2 (qkv bias) and gpt2 (learned
positions, Conv1D) code paths; their q/k weights are sharpened so attention has clear maxima.
"""
from __future__ import annotations

import functools

import pytest
import torch

from headscope.kernels import StatsSpec
from headscope.probe import Probe

from .helpers import VOCAB, assert_top1, eager, one_thread, tiny_model  # noqa: F401 (fixture)

FAMILIES = ("llama", "gemma3", "gemma2", "qwen2", "gpt2")
ALL_STATS = StatsSpec(lse=True, topk=2, entropy=True, segments=((0, 1), (2, 9)), mean_dist=True, window_dist=4,
                      col_mass=True)


def ref_stats(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of ALL_STATS from eager maps p [B, H, T, T], float64, independent of the kernels."""
    p = p.double()
    T = p.shape[-1]
    dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp_min(0).double()
    return {
        "entropy": -(p * torch.log(p.clamp_min(1e-300))).sum(-1),
        "segment_mass": torch.stack([p[..., 0:1].sum(-1), p[..., 2:9].sum(-1)], -1),
        "mean_dist": (p * dist).sum(-1),
        "win_dist": (p * dist.clamp_max(4)).sum(-1),
        "col_mass": p.sum(-2),
    }


def assert_stats(stats: dict, p: torch.Tensor, q_valid: torch.Tensor | None = None, atol=2e-5) -> None:
    """Captured statistics vs eager maps p [B, H, T, T] at the real query positions ``q_valid`` [B, T]."""
    B, H, T, _ = p.shape
    q_valid = torch.ones(B, T, dtype=torch.bool) if q_valid is None else q_valid
    p = p.double() * q_valid[:, None, :, None]       # eager rows of padding queries are meaningless
    keep = q_valid[:, None, :].expand(B, H, T)
    ref = ref_stats(p)
    assert_top1(stats["topk_idx"][..., 0][keep], p[keep])
    torch.testing.assert_close(stats["topk_prob"][keep].double(), p.topk(2, dim=-1).values[keep], atol=atol, rtol=1e-4)
    for key in ("entropy", "segment_mass", "mean_dist", "win_dist"):
        torch.testing.assert_close(stats[key][keep].double(), ref[key][keep], atol=atol, rtol=1e-4, msg=key)
    torch.testing.assert_close(stats["col_mass"].double(), ref["col_mass"], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_capture_matches_eager(family, chunk_size):
    """Logits within 1e-4 of eager, statistics equal eager-derived ones, one pass or chunked prefill."""
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(1))
    ref = eager(model, ids)
    probe = Probe(model)
    with probe.capture(stats=ALL_STATS, activations=["logits"]) as cap:
        out = probe.forward(ids, chunk_size=chunk_size)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(cap.acts["logits"], ref.logits.float(), atol=1e-4, rtol=0)
    assert model.config._attn_implementation == "eager"        # switched back after the call
    for l, p in enumerate(ref.attentions):
        assert_stats(cap.stats[l], p)
        # col_count: queries that see key s (causal, and window where the layer has one)
        T = ids.shape[1]
        t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
        w = probe.anatomy.windows[l]
        vis = (s <= t) & ((t - s < w) if w else True)
        assert torch.equal(cap.stats[l]["col_count"], vis.sum(0).expand(2, T))


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_left_padding(family):
    """A left-padded batch: stats and logits at real positions equal eager with the same mask,
    and the padded row equals its unpadded run shifted by the pad length."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :6] = 0
    ref = eager(model, ids, mask)
    probe = Probe(model)
    q_valid = mask.bool()
    for chunk in (None, 4):
        with probe.capture(stats=ALL_STATS) as cap:
            out = probe.forward(ids, attention_mask=mask, chunk_size=chunk)
        torch.testing.assert_close(out.logits[q_valid], ref.logits[q_valid], atol=1e-4, rtol=0)
        for l, p in enumerate(ref.attentions):
            assert_stats(cap.stats[l], p, q_valid)
    with probe.capture(stats=ALL_STATS) as solo:
        probe.forward(ids[1:, 6:])
    torch.testing.assert_close(cap.stats[1]["topk_idx"][1, :, 6:, 0] - 6, solo.stats[1]["topk_idx"][0, ..., 0])
    torch.testing.assert_close(cap.stats[1]["entropy"][1, :, 6:], solo.stats[1]["entropy"][0], atol=2e-5, rtol=0)
    torch.testing.assert_close(cap.stats[1]["col_mass"][1, :, 6:], solo.stats[1]["col_mass"][0], atol=2e-5, rtol=0)
    assert cap.stats[1]["col_mass"][1, :, :6].abs().max() == 0


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_activations_match_hf(family):
    """TL-named activations equal HF hidden states / plain torch hooks, and TL's residual identities hold."""
    model = tiny_model(family)
    an = Probe(model).anatomy
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    z_ref, attn_ref = {}, {}
    hooks = [an.out_proj[l].register_forward_pre_hook(lambda m, a, l=l: z_ref.__setitem__(l, a[0].clone()))
             for l in range(an.n_layers)]
    hooks += [an.out_proj[l].register_forward_hook(lambda m, a, o, l=l: attn_ref.__setitem__(l, o.clone()))
              for l in range(an.n_layers)]
    try:
        ref = eager(model, ids)
    finally:
        for h in hooks:
            h.remove()
    probe = Probe(model)
    names = ["hook_embed", "blocks.*.hook_resid_pre", "blocks.*.hook_resid_mid", "blocks.*.hook_resid_post",
             "blocks.*.attn.hook_z", "blocks.*.attn.hook_result", "blocks.*.hook_attn_out", "blocks.*.hook_mlp_out",
             "ln_final.hook_normalized", "logits"]
    with probe.capture(activations=names) as cap:
        probe.forward(ids, chunk_size=5)
    a = cap.acts
    close = functools.partial(torch.testing.assert_close, atol=1e-5, rtol=1e-5)
    for l in range(an.n_layers):
        close(a[f"blocks.{l}.hook_resid_pre"], ref.hidden_states[l])
        close(a[f"blocks.{l}.attn.hook_z"], z_ref[l].unflatten(-1, (an.n_heads, an.d_head)))
        bias = an.out_proj[l].bias
        close(a[f"blocks.{l}.attn.hook_result"].sum(2) + (0 if bias is None else bias), attn_ref[l])
        close(a[f"blocks.{l}.hook_resid_mid"], a[f"blocks.{l}.hook_resid_pre"] + a[f"blocks.{l}.hook_attn_out"])
        close(a[f"blocks.{l}.hook_resid_post"], a[f"blocks.{l}.hook_resid_mid"] + a[f"blocks.{l}.hook_mlp_out"])
        if l + 1 < an.n_layers:
            close(a[f"blocks.{l}.hook_resid_post"], ref.hidden_states[l + 1])
    close(a["ln_final.hook_normalized"], ref.hidden_states[-1])
    if family == "gpt2":  # TL's resid_pre 0 = token + position embedding
        close(a["hook_embed"], model.transformer.wte(ids))
    else:
        close(a["hook_embed"], ref.hidden_states[0])
    with probe.capture(stats=StatsSpec(topk=1), activations=["blocks.0.attn.hook_z", "logits"], positions=[-1, 3]) as sub:
        probe.forward(ids)
    assert sub.positions.tolist() == [3, 11]
    close(sub.acts["logits"], ref.logits[:, [3, 11]])
    close(sub.acts["blocks.0.attn.hook_z"], a["blocks.0.attn.hook_z"][:, [3, 11]])
    assert_top1(sub.stats[0]["topk_idx"][..., 0], ref.attentions[0][:, :, [3, 11]])


def test_pattern_rows_and_segments_are_absolute():
    """pattern_rows / segments index the whole input, also across chunks and sliding-window caches."""
    model = tiny_model("gemma3")
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(4))
    ref = eager(model, ids)
    probe = Probe(model)
    spec = StatsSpec(pattern_rows=(7, 15), segments=((3, 12),))
    with probe.capture(stats=spec) as cap:
        probe.forward(ids, chunk_size=6)
    for l, p in enumerate(ref.attentions):
        torch.testing.assert_close(cap.stats[l]["pattern"], p[:, :, 7:15].float(), atol=1e-5, rtol=0)
        torch.testing.assert_close(cap.stats[l]["segment_mass"][..., 0], p[..., 3:12].sum(-1).float(), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_real_model_fidelity(smollm2):
    """SmolLM2-135M: logits vs eager within 1e-4, statistics vs eager maps, chunked == one pass."""
    model = smollm2.model
    ids = smollm2.tokenizer("The quick brown fox jumps over the lazy dog. " * 5, return_tensors="pt").input_ids[:, :48]
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        ref = eager(model, ids)
    finally:
        model.set_attn_implementation(previous)
    probe = Probe(smollm2)
    with probe.capture(stats=ALL_STATS) as cap:
        out = probe.forward(ids)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    for l in (0, 12, 29):
        assert_stats(cap.stats[l], ref.attentions[l], atol=1e-4)
    with probe.capture(stats=ALL_STATS) as chunked:
        probe.forward(ids, chunk_size=16)
    for l in range(model.config.num_hidden_layers):
        torch.testing.assert_close(chunked.stats[l]["col_mass"], cap.stats[l]["col_mass"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(chunked.stats[l]["entropy"], cap.stats[l]["entropy"], atol=1e-4, rtol=1e-4)
