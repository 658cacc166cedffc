"""Interventions and sweeps, each against a direct computation on the HF eager model.

- zero / scale / mean ablation == editing that head's slice of the W_O input with a torch hook;
- uniform attention == eager with the head's query rows zeroed (q = 0 gives uniform weights);
- key reweighting == an eager attention function (registered here) that rescales the probabilities;
- patching every head at every position clean -> corrupted reproduces the clean logits.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import AttentionInterface

from headscope.errors import HeadscopeError
from headscope.kernels import StatsSpec
from headscope.probe import (HeadAblation, KeyReweight, Patch, Probe, kl_div, logit_diff, sweep_heads_states,
                             target_logprob)

from .helpers import VOCAB, eager, hook_counts, one_thread, tiny_model  # noqa: F401 (fixture)

D = 16  # d_head of every tiny model


def ids_for(seed: int, shape=(2, 14)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def with_z_edit(model, layer: int, fn, ids, mask=None):
    """Eager logits with ``fn(z [B, T, H, D]) -> z`` applied to the W_O input of ``layer``."""
    an = Probe(model).anatomy
    h = an.out_proj[layer].register_forward_pre_hook(
        lambda m, a: (fn(a[0].unflatten(-1, (an.n_heads, D)).clone()).flatten(-2),))
    try:
        return eager(model, ids, mask).logits
    finally:
        h.remove()


def zero_query(model, family: str, layer: int, head: int):
    """A copy of ``model`` whose head ``head`` in ``layer`` has q = 0 (weights and bias)."""
    m = copy.deepcopy(model)
    rows = slice(head * D, (head + 1) * D)
    with torch.no_grad():
        if family == "gpt2":
            attn = m.transformer.h[layer].attn
            attn.c_attn.weight[:, rows] = 0
            attn.c_attn.bias[rows] = 0
        else:
            q = m.model.layers[layer].self_attn.q_proj
            q.weight[rows] = 0
            if q.bias is not None:
                q.bias[rows] = 0
    return m


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2", "gpt2"])
def test_head_ablations_match_direct_edits(family):
    model = tiny_model(family)
    probe = Probe(model)
    ids = ids_for(10)
    T = ids.shape[1]
    mean_vec = torch.randn(D)
    mean_pos = torch.randn(T, D)
    cases = [
        (HeadAblation(1, 2, "zero"), lambda z: z.index_fill(2, torch.tensor([2]), 0.0)),
        (HeadAblation(1, 3, "scale", 0.3), lambda z: torch.cat([z[:, :, :3], 0.3 * z[:, :, 3:]], 2)),
        (HeadAblation(1, 0, "mean", mean_vec), lambda z: torch.cat([mean_vec.expand_as(z[:, :, :1]), z[:, :, 1:]], 2)),
        (HeadAblation(1, 0, "mean", mean_pos), lambda z: torch.cat([mean_pos[None, :, None].expand_as(z[:, :, :1]), z[:, :, 1:]], 2)),
        (HeadAblation(1, None, "zero"), lambda z: z * 0),
    ]
    clean = eager(model, ids).logits
    for op, fn in cases:
        want = with_z_edit(model, 1, fn, ids)
        assert (want - clean).abs().max() > 1e-3, "the edit must change the logits"
        with probe.intervene([op]):
            got = probe.forward(ids).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=str(op))


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_uniform_equals_zero_query(family):
    """Uniform attention (in-kernel) == eager with q = 0, on sliding and global layers."""
    model = tiny_model(family)
    probe = Probe(model)
    ids = ids_for(11, (2, 16))
    for layer in (0, 1):  # gemma3: layer 0 sliding (window 6), layer 1 global
        want = eager(zero_query(model, family, layer, 1), ids).logits
        with probe.intervene([HeadAblation(layer, 1, "uniform")]), \
                probe.capture(stats=StatsSpec(entropy=True)) as cap:
            got = probe.forward(ids, chunk_size=5).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        n_visible = torch.tensor([min(t + 1, probe.anatomy.windows[layer] or 99) for t in range(16)])
        torch.testing.assert_close(cap.stats[layer]["entropy"][:, 1], n_visible.log().expand(2, -1), atol=1e-5, rtol=0)


def _reweight_attention(layer, head, positions, beta):
    """Eager attention that multiplies one head's probabilities on ``positions`` by beta and renormalises."""
    def fn(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kw):
        G = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        s = (q @ k.transpose(-1, -2)).double() * scaling + attention_mask.double()
        p = torch.softmax(s, -1)
        if module.layer_idx == layer:
            w = torch.ones(p.shape[-1], dtype=p.dtype)
            w[positions] = beta
            p[:, head] = p[:, head] * w
            p[:, head] /= p[:, head].sum(-1, keepdim=True)
        return (p.to(v.dtype) @ v).transpose(1, 2), None
    return fn


def test_key_reweight_matches_direct():
    model = copy.deepcopy(tiny_model("llama"))
    ids = ids_for(12)
    AttentionInterface.register("hs_test_reweight", _reweight_attention(2, 1, [0, 3], 0.2))
    AttentionMaskInterface.register("hs_test_reweight", eager_mask)
    model.set_attn_implementation("hs_test_reweight")
    want = eager(model, ids).logits
    model.set_attn_implementation("eager")
    probe = Probe(model)
    assert (want - eager(model, ids).logits).abs().max() > 1e-3
    with probe.intervene([KeyReweight(2, 1, positions=[0, 3], beta=0.2)]):
        got = probe.forward(ids, chunk_size=4).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_patch_everything_restores_clean(family):
    """Clean token embeddings + every head's z at every position (corrupted run) == the clean run;
    z alone is not enough (the corrupted embeddings still reach the MLPs)."""
    model = tiny_model(family)
    probe = Probe(model)
    clean, corrupt = ids_for(13), ids_for(14)
    L = probe.anatomy.n_layers
    names = ["hook_embed"] + [f"blocks.{l}.attn.hook_z" for l in range(L)]
    with probe.capture(activations=names) as cap:
        want = probe.forward(clean).logits
    patches = [Patch(n, value=cap.acts[n]) for n in names]
    with probe.intervene(patches[1:]):
        assert (probe.forward(corrupt).logits - want).abs().max() > 1e-2
    with probe.intervene(patches):
        got = probe.forward(corrupt, chunk_size=5).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # one head at one position: only that slice changes
    with probe.capture(activations=["blocks.1.attn.hook_z"]) as cc:
        probe.forward(corrupt)
    with probe.intervene([Patch("blocks.1.attn.hook_z", positions=[5], heads=[2], value=cap.acts["blocks.1.attn.hook_z"])]), \
            probe.capture(activations=["blocks.1.attn.hook_z"]) as pc:
        probe.forward(corrupt)
    z_want = cc.acts["blocks.1.attn.hook_z"].clone()
    z_want[:, 5, 2] = cap.acts["blocks.1.attn.hook_z"][:, 5, 2]
    torch.testing.assert_close(pc.acts["blocks.1.attn.hook_z"], z_want)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_sweep_heads_uniform_and_zero(family):
    model = tiny_model(family)
    probe = Probe(model)
    an = probe.anatomy
    ids = ids_for(15, (1, 12))
    metric = target_logprob([7], [-1])
    got = probe.sweep_heads(ids, metric, kind="uniform", batch_size=3)
    got_zero = probe.sweep_heads(ids, metric, kind="zero")
    for l in range(an.n_layers):
        for h in range(an.n_heads):
            want = metric(eager(zero_query(model, family, l, h), ids).logits)
            assert got[l, h] == pytest.approx(want, abs=1e-4)
            want_zero = metric(with_z_edit(model, l, lambda z, h=h: z.index_fill(2, torch.tensor([h]), 0.0), ids))
            assert got_zero[l, h] == pytest.approx(want_zero, abs=1e-4)


def test_sweep_heads_padded_batch_and_mean():
    """Two left-padded prompts (no fork: copies run from layer 0): mean ablation with given means, and
    uniform attention over the real keys only."""
    model = tiny_model("llama")
    probe = Probe(model)
    ids = ids_for(16, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    means = torch.randn(3, 4, D)
    metric = logit_diff([5, 6], [9, 9])
    got = probe.sweep_heads(ids, metric, kind="mean", value=means, attention_mask=mask, heads=[(0, 1), (2, 3)])
    assert torch.isnan(got[1]).all()
    for l, h in [(0, 1), (2, 3)]:
        with probe.intervene([HeadAblation(l, h, "mean", means[l, h])]):
            want = metric(probe.forward(ids, attention_mask=mask).logits)
        want_direct = metric(with_z_edit(model, l, lambda z, h=h, v=means[l, h]: torch.cat(
            [z[:, :, :h], v.expand_as(z[:, :, :1]), z[:, :, h + 1:]], 2), ids, mask))
        assert got[l, h] == pytest.approx(want, abs=1e-4)
        assert got[l, h] == pytest.approx(want_direct, abs=1e-4)
    uniform = probe.sweep_heads(ids, metric, kind="uniform", attention_mask=mask, heads=[(1, 2)])
    assert uniform[1, 2] == pytest.approx(metric(eager(zero_query(model, "llama", 1, 2), ids, mask).logits), abs=1e-4)


def test_patch_sweep_matches_direct_patching():
    model = tiny_model("llama")
    probe = Probe(model)
    an = probe.anatomy
    clean, corrupt = ids_for(17, (1, 8)), ids_for(18, (1, 8))
    ref_clean = eager(model, clean)
    hooks_before = hook_counts(model)
    metric = kl_div(ref_clean.logits)
    z_clean = {}
    hooks = [an.out_proj[l].register_forward_pre_hook(lambda m, a, l=l: z_clean.__setitem__(l, a[0].clone()))
             for l in range(an.n_layers)]
    eager(model, clean)
    for h in hooks:
        h.remove()
    per_head = probe.patch_sweep(clean, corrupt, "blocks.*.attn.hook_z", metric, batch_size=3)
    for l in range(an.n_layers):
        for h in range(an.n_heads):
            zc = z_clean[l].unflatten(-1, (an.n_heads, D))
            want = metric(with_z_edit(model, l, lambda z, h=h, zc=zc: torch.cat(
                [z[:, :, :h], zc[:, :, h:h + 1], z[:, :, h + 1:]], 2), corrupt))
            assert per_head[l, h] == pytest.approx(want, abs=1e-5)
    per_pos = probe.patch_sweep(clean, corrupt, "blocks.*.hook_resid_pre", metric, per="position")
    for l in range(an.n_layers):
        for j in range(8):
            def put(m, args, kwargs, l=l, j=j):
                x = args[0].clone()
                x[:, j] = ref_clean.hidden_states[l][:, j]
                return (x, *args[1:]), kwargs
            hk = an.layers[l].register_forward_pre_hook(put, with_kwargs=True)
            try:
                want = metric(eager(model, corrupt).logits)
            finally:
                hk.remove()
            assert per_pos[l, j] == pytest.approx(want, abs=1e-5)
    assert hook_counts(model) == hooks_before


def test_metrics_against_hand_computation():
    logits = torch.randn(2, 5, 11)
    assert logit_diff(3, 4)(logits) == pytest.approx(float((logits[:, -1, 3] - logits[:, -1, 4]).mean()))
    assert logit_diff([1, 2], [3, 4], position=2)(logits) == pytest.approx(
        float(((logits[0, 2, 1] - logits[0, 2, 3]) + (logits[1, 2, 2] - logits[1, 2, 4])) / 2))
    lp = torch.log_softmax(logits.double(), -1)
    assert target_logprob([5, 6], [1, 2])(logits) == pytest.approx(float((lp[:, 1, 5] + lp[:, 2, 6]).mean()), abs=1e-6)
    ref = torch.randn(2, 5, 11)
    pr = torch.softmax(ref.double()[:, -1], -1)
    want = (pr * (pr.log() - lp[:, -1])).sum(-1).mean()
    assert kl_div(ref)(logits) == pytest.approx(float(want), abs=1e-6)
    assert kl_div(logits)(logits) == pytest.approx(0, abs=1e-6)


def test_phases_and_records():
    model = tiny_model("llama")
    probe = Probe(model)
    ids = ids_for(19)
    clean = eager(model, ids).logits
    with probe.intervene([HeadAblation(1, 0, "zero")], phase="decode") as iv:
        torch.testing.assert_close(probe.forward(ids).logits, clean, atol=1e-4, rtol=0)
    assert iv.records[0]["phase"] == "decode" and iv.records[0]["kv_cache_built_with"] is False
    with probe.intervene([HeadAblation(1, 0, "zero"), KeyReweight(2, None, [0], 0.5)], phase="prefill") as iv:
        assert (probe.forward(ids).logits - clean).abs().max() > 1e-3
    assert [r["kv_cache_built_with"] for r in iv.records] == [True, False]  # layer 2 is the last: no later KV
    assert iv.records[1]["rope"] == "after RoPE"


def test_interventions_undone_after_exceptions():
    model = tiny_model("llama")
    probe = Probe(model)
    ids = ids_for(20)
    clean = eager(model, ids).logits
    hooks_before = hook_counts(model)
    with pytest.raises(RuntimeError):
        with probe.intervene([HeadAblation(0, 0, "uniform")]):
            raise RuntimeError("user code fails inside the block")
    bad = Patch("blocks.1.hook_resid_pre", value=torch.zeros(3, 14, 64))  # batch 3 vs 2: fails mid-forward
    with pytest.raises(HeadscopeError, match="batch"):
        with probe.intervene([bad]), probe.capture(activations=["blocks.*.attn.hook_z"]):
            probe.forward(ids)
    assert model.config._attn_implementation == "eager"
    assert hook_counts(model) == hooks_before
    assert probe.intervention_records == [] and not probe.capturing
    torch.testing.assert_close(probe.forward(ids).logits, clean, atol=1e-4, rtol=0)


def test_bad_interventions_raise():
    probe = Probe(tiny_model("llama"))
    with pytest.raises(HeadscopeError):
        HeadAblation(0, 0, "scale")
    with pytest.raises(HeadscopeError, match="out of range"):
        with probe.intervene([HeadAblation(5, 0)]):
            pass
    with pytest.raises(HeadscopeError, match="one key set"):
        with probe.intervene([KeyReweight(0, 0, [1], 0.5), KeyReweight(0, 1, [2], 0.5)]):
            probe.forward(ids_for(0))
    with pytest.raises(HeadscopeError, match="wildcard"):
        Patch("blocks.*.attn.hook_z", value=torch.zeros(1))
    with pytest.raises(HeadscopeError, match="read-only"):
        with probe.intervene([Patch("blocks.0.attn.hook_result", value=torch.zeros(1, 4, 4, 64))]):
            pass


def test_two_threads_sweep_and_intervene_equal_their_serial_runs():
    """One Probe hammered from two threads: a ``sweep_heads_states`` (plain ``run`` forwards, which
    ``LockedProbe`` did not serialise) and ``intervene`` + ``forward``. Every result must equal its
    serial run: a forward that ran inside the other thread's ``intervene`` block would carry its
    ablation, one that ran inside a sweep would carry a row edit."""
    import sys
    import threading
    probe = Probe(tiny_model("llama"))
    ids_a, ids_b = ids_for(11, (2, 10)), ids_for(12, (1, 12))
    ops = [HeadAblation(l, None, "zero") for l in range(3)]       # every head off: any leak is visible
    want_a = sweep_heads_states(probe, ids_a)
    with probe.intervene(ops):
        want_b = probe.forward(ids_b).logits
    assert (want_b - probe.forward(ids_b).logits).abs().max() > 0.1   # the ablation changes the logits
    got_a, got_b, errors = [], [], []

    def sweeps():
        try:
            for _ in range(6):
                got_a.append(sweep_heads_states(probe, ids_a))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def interventions():
        try:
            for _ in range(30):
                with probe.intervene(ops):
                    got_b.append(probe.forward(ids_b).logits)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)                                    # switch threads often
    try:
        ts = [threading.Thread(target=sweeps), threading.Thread(target=interventions)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors
    assert len(got_a) == 6 and len(got_b) == 30
    for got in got_a:
        assert got.keys() == want_a.keys()
        for k in want_a:
            torch.testing.assert_close(got[k], want_a[k], atol=1e-5, rtol=0)
    for got in got_b:
        torch.testing.assert_close(got, want_b, atol=1e-5, rtol=0)
