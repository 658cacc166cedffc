"""Generation with per-step capture, against HF eager ``generate(output_attentions=True)``."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from headscope.errors import HeadscopeError
from headscope.kernels import StatsSpec
from headscope.probe import HeadAblation, Probe
from headscope.probe.hook import cache_kwarg

from .helpers import VOCAB, assert_top1, eager, one_thread, tiny_model  # noqa: F401 (fixture)


def prompt(seed: int, T: int = 9) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, T), generator=torch.Generator().manual_seed(seed))


def hf_generate(model, ids, n, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, output_attentions=True,
                              return_dict_in_generate=True, pad_token_id=0, **kw)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_greedy_steps_match_hf_generate(family):
    """Same tokens; each step's top-1 key equals the argmax of HF's decode-step attention row
    (gemma3: 10 steps past a window of 6, where HF's sliding cache drops keys)."""
    model = tiny_model(family)
    ids = prompt(1)
    T, n = ids.shape[1], 10
    ref = hf_generate(model, ids, n)
    probe = Probe(model)
    gen = probe.generate(ids, max_new_tokens=n, stats=StatsSpec(topk=1, col_mass=True))
    assert gen.new_tokens == ref.sequences[0, T:].tolist()
    assert len(gen.step_stats) == len(gen.new_tokens)
    top = gen.stacked("topk_idx")                                 # [steps, L, 1, H, 1, 1]
    assert top.shape[:2] == (len(gen.new_tokens), probe.anatomy.n_layers)
    for i in range(len(gen.new_tokens)):
        for l in range(probe.anatomy.n_layers):
            row = ref.attentions[i][l][:, :, -1]                  # [1, H, Tk_step]
            q_pos = T - 1 + i
            offset = q_pos + 1 - row.shape[-1]                    # keys HF's sliding cache dropped
            assert_top1(top[i, l, :, :, 0, 0] - offset, row)
            full = torch.zeros(1, row.shape[1], q_pos + 1)
            full[..., offset:] = row
            torch.testing.assert_close(gen.step_stats[i][l]["col_mass"], full, atol=1e-5, rtol=0)


def test_step_activations_match_one_pass():
    model = tiny_model("llama")
    ids = prompt(2)
    T = ids.shape[1]
    probe = Probe(model)
    gen = probe.generate(ids, max_new_tokens=6, activations=["blocks.*.hook_resid_pre", "logits"],
                         capture_prefill=True, stats=StatsSpec(entropy=True))
    full = torch.cat([ids, torch.tensor([gen.new_tokens[:-1]])], 1)
    ref = eager(model, full)
    for i, acts in enumerate(gen.step_acts):
        pos = T - 1 + i
        for l in range(3):
            torch.testing.assert_close(acts[f"blocks.{l}.hook_resid_pre"][:, 0], ref.hidden_states[l][:, pos],
                                       atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(acts["logits"][:, 0], ref.logits[:, pos], atol=1e-4, rtol=0)
        assert int(acts["logits"][0, 0].argmax()) == gen.new_tokens[i]
    # the prefill capture covers prompt[:-1]
    p = ref.attentions[1][:, :, :T - 1, :T - 1].double()
    ent = -(p * p.clamp_min(1e-300).log()).sum(-1)
    torch.testing.assert_close(gen.prefill.stats[1]["entropy"].double(), ent, atol=2e-5, rtol=0)
    assert gen.prefill.acts["blocks.0.hook_resid_pre"].shape[1] == T - 1


def test_sampling_is_seeded():
    model = tiny_model("llama")
    ids = prompt(3)
    probe = Probe(model)
    a = probe.generate(ids, max_new_tokens=8, do_sample=True, seed=5, temperature=1.5)
    b = probe.generate(ids, max_new_tokens=8, do_sample=True, seed=5, temperature=1.5)
    assert a.new_tokens == b.new_tokens
    # the same draws from an independent loop over eager logits
    g = torch.Generator().manual_seed(5)
    seq = ids
    want = []
    for _ in range(len(a.new_tokens)):
        logits = eager(model, seq).logits[0, -1].float() / 1.5
        tok = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        want.append(tok)
        seq = torch.cat([seq, torch.tensor([[tok]])], 1)
    assert a.new_tokens == want
    greedy = probe.generate(ids, max_new_tokens=8)
    assert probe.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, seed=1).new_tokens == greedy.new_tokens


class StubTokenizer:
    """Decodes ids as space-separated numbers, so stop strings are predictable."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids)


def test_stop_conditions():
    model = copy.deepcopy(tiny_model("gpt2"))             # gpt2's eos (50256) is outside the tiny vocab
    ids = prompt(4)
    probe = Probe(model, tokenizer=StubTokenizer())
    greedy = probe.generate(ids, max_new_tokens=6)
    assert greedy.stop_reason == "max_tokens" and len(greedy.new_tokens) == 6
    assert greedy.text == " ".join(map(str, greedy.new_tokens))
    model.generation_config.eos_token_id = greedy.new_tokens[2]
    first = greedy.new_tokens.index(greedy.new_tokens[2])
    eos = probe.generate(ids, max_new_tokens=6)
    assert eos.stop_reason == "eos" and eos.new_tokens == greedy.new_tokens[:first + 1]
    model.generation_config.eos_token_id = None
    stop = probe.generate(ids, max_new_tokens=6, stop_strings=[f" {greedy.new_tokens[1]} "])
    assert stop.stop_reason == "stop_string" and len(stop.new_tokens) <= 3


def test_generation_under_ablation():
    """phase='all' == HF generate with that head's z zeroed everywhere; phase='decode' == a manual
    loop whose prompt[:-1] prefill is clean and whose steps are ablated."""
    model = tiny_model("llama")
    probe = Probe(model)
    an = probe.anatomy
    ids = prompt(5)
    active = {"on": True}

    def zero_head(m, args):
        if not active["on"]:
            return None
        z = args[0].clone()
        z[..., 1 * 16:2 * 16] = 0
        return (z,)
    h = an.out_proj[1].register_forward_pre_hook(zero_head)
    try:
        want_all = hf_generate(model, ids, 8).sequences[0, ids.shape[1]:].tolist()
        # decode-phase only: manual cache loop
        active["on"] = False
        with torch.no_grad():
            cache = DynamicCache(config=model.config)  # filled in place by each call
            model(ids[:, :-1], use_cache=True, **{cache_kwarg(model): cache})
            tok, want_decode = ids[:, -1:], []
            active["on"] = True
            for _ in range(8):
                out = model(tok, use_cache=True, **{cache_kwarg(model): cache})
                want_decode.append(int(out.logits[0, -1].argmax()))
                tok = torch.tensor([[want_decode[-1]]])
    finally:
        h.remove()
    with probe.intervene([HeadAblation(1, 1, "zero")]):
        gen_all = probe.generate(ids, max_new_tokens=8)
    with probe.intervene([HeadAblation(1, 1, "zero")], phase="decode"):
        gen_dec = probe.generate(ids, max_new_tokens=8)
    assert gen_all.new_tokens == want_all
    assert gen_dec.new_tokens == want_decode
    assert gen_dec.interventions[0]["kv_cache_built_with"] is False
    assert gen_all.interventions[0]["kv_cache_built_with"] is True


def test_context_limit():
    probe = Probe(tiny_model("llama"))                     # max_position_embeddings = 64
    long = torch.randint(0, VOCAB, (1, 70))
    with pytest.raises(HeadscopeError, match="allow_beyond_context"):
        probe.forward(long)
    assert probe.forward(long, allow_beyond_context=True).logits.shape == (1, 70, VOCAB)
    with pytest.raises(HeadscopeError, match="context"):
        probe.generate(long[:, :60], max_new_tokens=10)
    gpt2 = Probe(tiny_model("gpt2"))
    with pytest.raises(HeadscopeError, match="learned position"):
        gpt2.forward(long, allow_beyond_context=True)


@pytest.mark.slow
def test_real_model_steps_match_hf_generate(smollm2):
    model = smollm2.model
    ids = smollm2.tokenizer("The opposite of hot is cold. The opposite of up is", return_tensors="pt").input_ids
    T, n = ids.shape[1], 6
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        ref = hf_generate(model, ids, n)
    finally:
        model.set_attn_implementation(previous)
    gen = Probe(smollm2).generate(ids, max_new_tokens=n, stats=StatsSpec(topk=1))
    assert gen.new_tokens == ref.sequences[0, T:].tolist()
    top = gen.stacked("topk_idx")[..., 0, 0]                      # [steps, L, 1, H]
    for i in range(n):
        rows = torch.stack([a[:, :, -1] for a in ref.attentions[i]])  # [L, 1, H, T + i]
        assert_top1(top[i], rows)
