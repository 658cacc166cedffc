"""Direct logit attribution vs removing one head's direct path in a real forward (final norm frozen).

The reference runs the HF model itself: the head's output is read at its output projection, and
the final norm's output at the position is replaced by the hand-written norm of the residual minus
that head's write, with the clean run's scale. Families: Llama (RMSNorm), Gemma 3 (sandwich norms,
1 + w weights), GPT-2 (LayerNorm with bias, Conv1D).
"""
from __future__ import annotations

import pytest
import torch

from headscope.probe import Probe
from headscope.probe.dla import direct_logit_attribution

from .test_probe import VOCAB, one_thread, tiny_model  # noqa: F401 (fixture)


def _parts(model, family):
    if family == "gpt2":
        return model.transformer.h, lambda l: l.attn.c_proj, model.transformer.ln_f
    return model.model.layers, lambda l: l.self_attn.o_proj, model.model.norm


def _rms(v, x, eps, w):
    return w * v / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _reference(model, family, ids, layer, head, pos):
    """Clean logits minus logits with head (layer, head)'s direct write removed at ``pos``."""
    layers, out_proj, final_norm = _parts(model, family)
    H, d = model.config.num_attention_heads, model.config.hidden_size
    dh = getattr(model.config, "head_dim", None) or d // H
    seen = {}
    proj = out_proj(layers[layer])
    h1 = proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0][0, pos].double()))
    h2 = proj.register_forward_hook(lambda m, a, o: seen.__setitem__("o", o[0, pos].double()))
    h3 = final_norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0][0, pos].double()))
    with torch.no_grad():
        clean = model(ids).logits[0, pos].double()
    for h in (h1, h2, h3):
        h.remove()
    W = proj.weight.double()
    z = seen["z"][head * dh:(head + 1) * dh]
    c = z @ W[head * dh:(head + 1) * dh] if family == "gpt2" else W[:, head * dh:(head + 1) * dh] @ z
    if family == "gemma3":   # the residual gets post_attention_layernorm(o_proj output)
        pn = layers[layer].post_attention_layernorm
        c = _rms(c, seen["o"], pn.eps, 1 + pn.weight.double())
    x = seen["x"]
    if family == "gpt2":
        ln = final_norm
        removed = ln.weight.double() * (c - c.mean()) / torch.sqrt(x.var(unbiased=False) + ln.eps)
    elif family == "gemma3":
        removed = _rms(c, x, final_norm.eps, 1 + final_norm.weight.double())
    else:
        removed = _rms(c, x, final_norm.variance_epsilon, final_norm.weight.double())

    def replace(m, a, out):
        out = out.clone()
        out[0, pos] -= removed.to(out.dtype)
        return out
    h = final_norm.register_forward_hook(replace)
    try:
        with torch.no_grad():
            ablated = model(ids).logits[0, pos].double()
    finally:
        h.remove()
    return clean - ablated


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_dla_equals_direct_path_removal(family):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    ids = torch.randint(3, VOCAB, (1, 12), generator=g)
    pos = int(torch.randint(4, 12, (), generator=g))
    tokens = torch.randperm(VOCAB, generator=g)[:7]
    dla = direct_logit_attribution(Probe(model), ids, position=pos, tokens=tokens)
    assert dla.position == pos and dla.effects.shape == (model.config.num_hidden_layers, model.config.num_attention_heads, 7)
    for layer in range(model.config.num_hidden_layers):
        for head in range(model.config.num_attention_heads):
            want = _reference(model, family, ids, layer, head, pos)[tokens]
            torch.testing.assert_close(dla.effects[layer, head].double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_dla_on_the_default_model(smollm2):
    model = smollm2.model
    ids = smollm2.tokenizer("When Mary and John went to the store, John gave a drink to", return_tensors="pt").input_ids
    pos = ids.shape[1] - 1
    mary, john = (smollm2.tokenizer(" Mary").input_ids[-1], smollm2.tokenizer(" John").input_ids[-1])
    dla = direct_logit_attribution(Probe(smollm2), ids, tokens=[mary, john])
    for layer, head in ((0, 0), (15, 3), (22, 5), (29, 8)):
        want = _reference(model, "llama", ids, layer, head, pos)[[mary, john]]
        torch.testing.assert_close(dla.effects[layer, head].double(), want, atol=1e-4, rtol=1e-3)
