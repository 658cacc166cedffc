"""Failure modes of the probe: each is a one-line HeadscopeError, and the model is left as it was."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaForCausalLM, StaticCache

from headscope.errors import HeadscopeError
from headscope.kernels import StatsSpec
from headscope.probe import Probe
from headscope.probe.hook import cache_kwarg, installed

from .helpers import VOCAB, one_thread, tiny_model  # noqa: F401 (fixture)

IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


def test_non_finite_values_are_reported():
    model = copy.deepcopy(tiny_model("llama"))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    probe = Probe(model)
    with pytest.raises(HeadscopeError, match="non-finite.*blocks.1.hook_resid_post"):
        with probe.capture(activations=["blocks.1.hook_resid_post"]):
            probe.forward(IDS)
    with pytest.raises(HeadscopeError, match="non-finite.*queries/keys of layer 2"):
        with probe.capture(stats=StatsSpec(entropy=True), layers=[2]):
            probe.forward(IDS)
    with probe.capture(stats=StatsSpec(entropy=True), activations=["blocks.1.hook_resid_post"], check_finite=False) as cap:
        probe.forward(IDS)
    assert not torch.isfinite(cap.acts["blocks.1.hook_resid_post"]).all()
    assert model.config._attn_implementation == "eager"


def test_non_finite_cached_keys_are_reported_when_decoding():
    """The hook checks only each call's new keys; non-finite keys already in the cache (from an
    uncaptured prefill) still end in a one-line error, through the captured statistics."""
    from transformers import DynamicCache
    model = copy.deepcopy(tiny_model("llama"))
    w = model.model.layers[1].mlp.down_proj.weight
    probe = Probe(model)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        saved = w[0, 0].item()
        w[0, 0] = float("inf")
        probe.run(IDS[:1, :-1], None, cache=cache, logits_to_keep=1)   # layer-2 keys are now inf
        w[0, 0] = saved
    cap = probe.capture_session(StatsSpec(entropy=True), [2])                # what generate does per step
    with pytest.raises(HeadscopeError, match="non-finite.*attention statistic.*layer 2"):
        probe.run(IDS[:1, -1:], None, cache=cache, capture=cap, phase="decode")


def test_mask_other_than_causal_is_refused():
    cfg = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=16, vocab_size=VOCAB, sliding_window=4,
                           use_bidirectional_attention=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(HeadscopeError, match="gemma3_text.*other than causal"):
        Probe(model).forward(IDS)


def test_layer_outside_the_registry_is_detected():
    model = copy.deepcopy(tiny_model("llama"))
    attn = model.model.layers[1].self_attn
    attn.forward = lambda hidden_states, **kw: (attn.o_proj(hidden_states), None)  # bypasses the interface
    with pytest.raises(HeadscopeError, match=r"'llama' did not route attention of layer\(s\) \[1\]"):
        Probe(model).forward(IDS)


def test_model_without_attention_interface(monkeypatch):
    monkeypatch.setattr(LlamaForCausalLM, "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(HeadscopeError, match="'llama' does not call attention through"):
        Probe(tiny_model("llama")).forward(IDS)


def test_masks_and_caches_headscope_cannot_use():
    model = tiny_model("llama")
    mask4d = torch.zeros(2, 1, 10, 10)
    with installed(model), pytest.raises(HeadscopeError, match="4-D attention mask"):
        model(IDS, attention_mask=mask4d)
    cache = StaticCache(config=model.config, max_cache_len=32)
    with installed(model), pytest.raises(HeadscopeError, match="static"):
        model(IDS, use_cache=True, **{cache_kwarg(model): cache})
    assert model.config._attn_implementation == "eager"
    probe = Probe(model)
    with pytest.raises(HeadscopeError, match="must match input_ids"):
        probe.forward(IDS, attention_mask=mask4d)


def test_usage_errors():
    probe = Probe(tiny_model("llama"))
    with pytest.raises(HeadscopeError, match="unknown hook"):
        probe.capture(activations=["blocks.0.hook_q"]).__enter__()
    with pytest.raises(HeadscopeError, match="layer 7 out of range"):
        probe.capture(activations=["blocks.7.hook_resid_pre"]).__enter__()
    with probe.capture(stats=StatsSpec(topk=1)):
        with pytest.raises(HeadscopeError, match="do not nest"):
            with probe.capture(stats=StatsSpec(topk=1)):
                pass
        with pytest.raises(HeadscopeError, match="outside a capture"):
            probe.sweep_heads(IDS[:1], lambda lg: 0.0)
    with pytest.raises(HeadscopeError, match="outside the forward"):
        with probe.capture(stats=StatsSpec(topk=1), positions=[10]):
            probe.forward(IDS)
    with pytest.raises(HeadscopeError, match="unknown attention backend|choose one of"):
        Probe(tiny_model("llama"), backend="cuda-magic")
