"""Circuit graph: exact edge patching against HF and a hand-written forward; EAP / EAP-IG vs exact patching."""
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from headscope.analyses.circuit_core import attribute, circuit_metric, exact_scores
from headscope.errors import HeadscopeError
from headscope.kernels import StatsSpec
from headscope.probe import HeadAblation, Probe
from headscope.probe.graph import Batch, CircuitGraph, logit_diff_metric

from .helpers import VOCAB as HF_VOCAB
from .helpers import eager, hook_counts
from .helpers import tiny_model as hf_tiny_model

VOCAB = 61


def tiny_llama(layers=2, heads=4, kv_heads=2, seed=0, hidden=32):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=48, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # sharper attention and larger residual writes than the 0.02 init
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
            layer.self_attn.o_proj.weight.mul_(4)
            layer.mlp.down_proj.weight.mul_(4)
        model.model.embed_tokens.weight.mul_(10)
        model.lm_head.weight.mul_(10)
    return model


def pair(B=3, T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(VOCAB, (B, T), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2:5] = torch.randint(VOCAB, (B, 3), generator=g)  # a few corrupted tokens
    answer, wrong = torch.randint(VOCAB, (B,), generator=g), torch.randint(VOCAB, (B,), generator=g)
    return Batch(clean, corrupt, torch.full((B,), T - 1), answer, wrong)


def reference(model, ids, corrupt_out, removed):
    """Float64 forward by hand, per head in loops: edges in ``removed`` ({(upstream, target)}) carry
    the corrupted run's node output ``corrupt_out[name]``; returns (logits, node outputs by name)."""
    cfg = model.config
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    dh = D // H
    dd = lambda t: t.detach().double()  # noqa: E731
    eps = cfg.rms_norm_eps

    def rms(x, w):
        return dd(w) * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    B, T = ids.shape
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), torch.arange(T)[None])
    cos, sin = dd(cos[0]), dd(sin[0])  # [T, dh]

    def rope(x):  # [T, dh]
        half = dh // 2
        rot = torch.cat([-x[:, half:], x[:, :half]], -1)
        return x * cos + rot * sin

    out = {"input": dd(model.model.embed_tokens.weight)[ids]}
    order = ["input"]

    def inp(target):
        total = 0
        for u in order:
            total = total + (corrupt_out[u] if (u, target) in removed else out[u])
        return total

    for l, layer in enumerate(model.model.layers):
        at = layer.self_attn
        wq, wk, wv, wo = (dd(p.weight) for p in (at.q_proj, at.k_proj, at.v_proj, at.o_proj))
        new = {}
        for h in range(H):
            kvh = h // (H // Hkv)
            xq = rms(inp(f"a{l}.h{h}<q>"), layer.input_layernorm.weight)
            xk = rms(inp(f"a{l}.h{h}<k>"), layer.input_layernorm.weight)
            xv = rms(inp(f"a{l}.h{h}<v>"), layer.input_layernorm.weight)
            res = torch.zeros(B, T, D, dtype=torch.float64)
            for b in range(B):
                q = rope(xq[b] @ wq[h * dh:(h + 1) * dh].T)
                k = rope(xk[b] @ wk[kvh * dh:(kvh + 1) * dh].T)
                v = xv[b] @ wv[kvh * dh:(kvh + 1) * dh].T
                s = q @ k.T / math.sqrt(dh)
                s = s + torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
                z = torch.softmax(s, -1) @ v
                res[b] = z @ wo[:, h * dh:(h + 1) * dh].T
            new[f"a{l}.h{h}"] = res
        out.update(new)
        order += list(new)
        x = rms(inp(f"m{l}"), layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        gate, up, down = dd(mlp.gate_proj.weight), dd(mlp.up_proj.weight), dd(mlp.down_proj.weight)
        out[f"m{l}"] = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
        order.append(f"m{l}")
    logits = rms(inp("logits"), model.model.norm.weight) @ dd(model.lm_head.weight).T
    return logits, out


def test_full_and_empty_circuits_are_the_clean_and_corrupted_models():
    model = tiny_llama()
    g = CircuitGraph(model)
    b = pair()
    with torch.no_grad():
        hf_clean = model(b.clean).logits
        hf_corrupt = model(b.corrupt).logits
        logits, outs = g.forward(b.clean)
        _, corrupt = g.forward(b.corrupt)
        full, _ = g.forward(b.clean, mask=g.full_mask(), corrupt=corrupt)
        empty, _ = g.forward(b.clean, mask=g.empty_mask(), corrupt=corrupt)
    torch.testing.assert_close(logits, hf_clean, atol=1e-5, rtol=0)
    last = torch.tensor([3, 8, 5])  # logits of one position per row only
    with torch.no_grad():
        at_last, _ = g.forward(b.clean, last=last)
    torch.testing.assert_close(at_last[:, 0], hf_clean[torch.arange(3), last], atol=1e-5, rtol=0)
    torch.testing.assert_close(full, hf_clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(empty, hf_corrupt, atol=1e-5, rtol=0)
    m = circuit_metric(g, [b], [None, g.empty_mask()])
    assert m[0] == pytest.approx(float(logit_diff_metric(hf_clean, b)), abs=1e-5)
    assert m[1] == pytest.approx(float(logit_diff_metric(hf_corrupt, b)), abs=1e-5)
    assert (hf_clean - hf_corrupt)[:, -1].abs().max() > 0.1  # the corruption matters: the checks tell them apart


def patch_setup(seed):
    """The tiny model, its graph, a pair, the corrupted node outputs and a full mask to edit."""
    model = tiny_llama()
    g = CircuitGraph(model)
    b = pair(seed=seed)
    with torch.no_grad():
        _, corrupt = g.forward(b.corrupt)
    return model, g, b, corrupt, g.full_mask()


@pytest.mark.parametrize("removed", [
    {("a0.h1", "a1.h2<k>")},                                         # one k edge (kv head shared with h3)
    {("input", "a1.h0<v>"), ("m0", "logits"), ("a0.h3", "a1.h1<q>")},
    {("input", "a0.h0<q>"), ("input", "a0.h0<k>"), ("a1.h2", "m1"), ("a0.h2", "m0")},
])
def test_patching_an_edge_set_equals_a_hand_written_forward(removed):
    model, g, b, corrupt, mask = patch_setup(seed=5)
    with torch.no_grad():
        for u, d in removed:
            mask[g.up_index[u], g.target_index[d]] = 0.0
        logits, _ = g.forward(b.clean, mask=mask, corrupt=corrupt)
    _, ref_corrupt = reference(model, b.corrupt, {}, set())
    ref, _ = reference(model, b.clean, ref_corrupt, removed)
    ref_full, _ = reference(model, b.clean, ref_corrupt, set())
    torch.testing.assert_close(logits.double(), ref, atol=1e-5, rtol=0)
    assert (ref - ref_full).abs().max() > 1e-3  # the swapped path changes the output


def edge_values(g, scores):
    """[n_edges] numpy values of a [n_up, n_targets] score matrix, in ``g.edges()`` order."""
    return np.array([float(scores[u, d]) for u, d in g.edges()])


def one_token_pairs(seed, rows=4, T=9):
    """Random prompts with token 3 corrupted; the metric reads the last token (random answer/wrong)."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(VOCAB, (rows, T), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 3] = torch.randint(VOCAB, (rows,), generator=gen)
    answer, wrong = (torch.randint(VOCAB, (rows,), generator=gen) for _ in range(2))
    return Batch(clean, corrupt, torch.full((rows,), T - 1), answer, wrong)


def test_single_edge_patching_equals_the_float64_forward_on_every_edge():
    """Every one of the 110 single-edge patches, as the ranking test below uses them: the float32
    graph's metric drop equals the float64 hand-written forward's within 1e-6, so even the edges
    whose effect is 1e-6..1e-4 are ranked by real effects, not rounding."""
    model = anisotropic_llama(0)
    g = CircuitGraph(model)
    b = one_token_pairs(seed=100)
    drop = edge_values(g, exact_scores(g, [b]))
    _, ref_corrupt = reference(model, b.corrupt, {}, set())
    rows = torch.arange(4)

    def ref_metric(removed):
        logits, _ = reference(model, b.clean, ref_corrupt, removed)
        return float((logits[rows, 8, b.answer] - logits[rows, 8, b.wrong]).mean())

    full = ref_metric(set())
    ref = np.array([full - ref_metric({(g.upstream[u], g.targets[d])}) for u, d in g.edges()])
    assert (np.abs(ref) < 1e-4).sum() > 20 and np.abs(ref).max() > 0.1
    np.testing.assert_allclose(drop, ref, atol=1e-6, rtol=0)


def test_gqa_k_edge_of_one_query_head_leaves_its_group_mate_alone():
    _, g, b, corrupt, mask = patch_setup(seed=7)
    with torch.no_grad():
        mask[:, g.target_index["a1.h2<k>"]] = 0.0
        _, outs = g.forward(b.clean, mask=mask, corrupt=corrupt)
        _, clean = g.forward(b.clean)
    h2, h3 = g.up_index["a1.h2"], g.up_index["a1.h3"]
    assert (outs[h2] - clean[h2]).abs().max() > 1e-3
    torch.testing.assert_close(outs[h3], clean[h3], atol=1e-6, rtol=0)  # same KV head, own k input


def test_edge_names_and_counts():
    g = CircuitGraph(tiny_llama(layers=2, heads=2, kv_heads=1))
    # layer 0 heads read input (6 targets), m0 reads input + 2 heads, layer 1 heads read 4 nodes (6 targets),
    # m1 reads 6 nodes, logits all 7
    assert g.n_edges == 6 * 1 + 3 + 6 * 4 + 6 + 7
    assert g.parse_edge("a0.h1->a1.h0<k>") == (g.up_index["a0.h1"], g.target_index["a1.h0<k>"])
    assert g.edge_name(*g.parse_edge("m0->logits")) == "m0->logits"
    with pytest.raises(HeadscopeError):
        g.parse_edge("a1.h0->a0.h0<q>")
    with pytest.raises(HeadscopeError):
        g.mask_from_edges([(g.up_index["a1.h0"], g.target_index["a0.h0<q>"])])


def test_capture_and_intervene_work_alongside_the_graph():
    """Attribution and patched forwards leave the model as they found it: ``Probe.capture``'s
    statistics equal HF eager's before and after, an intervention gives the same logits before and
    after, and no attention implementation, hook or parameter gradient is left behind."""
    model = hf_tiny_model("llama")
    probe = Probe(model)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, HF_VOCAB, (2, 12), generator=g)
    corrupt = ids.clone()
    corrupt[:, 2:6] = torch.randint(0, HF_VOCAB, (2, 4), generator=g)
    ref = eager(model, ids)
    p = torch.stack([a.double() for a in ref.attentions])  # [L, B, H, T, T]
    ref_entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)  # [L, B, H, T]
    impl, hooks = model.config._attn_implementation, hook_counts(model)

    def use_probe():
        with probe.capture(stats=StatsSpec(entropy=True)) as cap:
            logits = probe.forward(ids).logits
        with probe.intervene([HeadAblation(1, 2, "zero")]):
            ablated = probe.forward(ids).logits
        return logits, torch.stack([cap.stats[l]["entropy"] for l in range(len(p))]), ablated

    before = use_probe()
    graph = CircuitGraph(model)
    batch = Batch(ids, corrupt, torch.tensor([11, 11]), ids[:, 0], ids[:, 1])
    assert attribute(graph, [batch], steps=2).abs().max() > 0
    circuit_metric(graph, [batch], [graph.empty_mask()])
    after = use_probe()
    for got in (before, after):
        torch.testing.assert_close(got[0], ref.logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(got[1].double(), ref_entropy, atol=2e-5, rtol=1e-4)
    assert torch.equal(before[2], after[2]) and (after[2] - after[0]).abs().max() > 1e-3
    assert model.config._attn_implementation == impl
    assert hook_counts(model) == hooks
    assert all(q.grad is None for q in model.parameters())


def test_sliding_windows_follow_the_probes_geometry():
    """Qwen2 with sliding-window layers is refused; a Mistral (window on every layer) runs prompts up
    to its window, where HF's attention is full causal (the graph equals HF's logits), and refuses longer ones."""
    from transformers import MistralConfig, Qwen2Config
    small = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=64)
    qwen = AutoModelForCausalLM.from_config(Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=0,
                                                         **small))
    with pytest.raises(HeadscopeError, match="sliding-window"):
        CircuitGraph(qwen)
    torch.manual_seed(0)
    mistral = AutoModelForCausalLM.from_config(MistralConfig(sliding_window=8, **small), attn_implementation="eager")
    g = CircuitGraph(mistral)
    ids = torch.randint(VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, _ = g.forward(ids)
        torch.testing.assert_close(logits, mistral(ids).logits, atol=1e-5, rtol=0)
        with pytest.raises(HeadscopeError, match="8-token sliding window"):
            g.forward(torch.cat([ids, ids[:, :1]], 1))


def test_unsupported_family_raises():
    from transformers import GPT2Config
    model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB))
    with pytest.raises(HeadscopeError, match="gpt2"):
        CircuitGraph(model)


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.parametrize("seed", [3, 5])
def test_eap_is_the_derivative_of_the_patched_metric_in_every_edge_weight(seed):
    """EAP's score of *every* edge (q, k, v, MLP, logits inputs) = d metric / d (edge's mask weight) at
    the clean run, by central differences of exact patching: no sign or indexing slip in the q/k/v
    target gradients (k and v gradients flow through other queries' attention)."""
    g = CircuitGraph(tiny_llama(seed=seed))
    b = pair(B=4, seed=11)
    scores = attribute(g, [b], steps=0)
    edges = g.edges()
    masks = []
    for u, d in edges:
        for a in (1 - 1e-2, 1 + 1e-2):
            m = g.full_mask()
            m[u, d] = a
            masks.append(m)
    lo, hi = np.array(circuit_metric(g, [b], masks)).reshape(-1, 2).T
    fd = (hi - lo) / 2e-2
    eap = np.array([float(scores[u, d]) for u, d in edges])
    assert np.abs(fd).max() > 1e-2  # the edges matter
    for c in ("<q>", "<k>", "<v>", "m", "logits"):
        sel = [i for i, (_, d) in enumerate(edges) if g.targets[d].endswith(c) or g.targets[d].startswith(c)]
        assert sel, c
        np.testing.assert_allclose(eap[sel], fd[sel], atol=1e-4, rtol=2e-2, err_msg=c)


def anisotropic_llama(seed):
    """The random-init 2-layer GQA Llama, with token embeddings that share a common direction as
    trained models' do: the mean embedding's norm is 0.6 of a token's (SmolLM2-135M measures 0.61,
    mean pairwise cosine 0.35; fully random embeddings have ~0)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(4)
            layer.mlp.down_proj.weight.mul_(4)
        model.lm_head.weight.mul_(10)
        emb = model.model.embed_tokens.weight  # [V, D]
        mean = torch.randn(emb.shape[1])
        emb.add_(mean / mean.norm() * 0.6 * emb.norm(dim=1).mean())
    return model


def test_eap_and_eap_ig_rank_edges_like_exact_single_edge_patching():
    """Spearman of |score| against |exact single-edge patching|, one corrupted token per prompt, logit
    difference, on three init seeds (10-12) that were not among those measured below.

    Over all 110 edges (the issue's criterion) both methods must reach 0.9. The stricter check is
    over the ~60 edges whose exact effect is above 1e-4 (the rest are 1e-6..1e-4, or exactly 0 where
    the corrupted token cannot reach; the test above shows they are not rounding).
    There EAP-IG must do better than EAP. EAP's gradients are exact (the test above); its misses are
    the edges input -> a0.h*<v> (then input -> a1.h*<v>). Corrupting a token swaps the whole layer-0
    residual at that position, and the RMSNorm's x / |x| is far from linear over that swap (its Jacobian
    drops the change along the clean direction), so EAP can get such an edge's size off by 2x, and its
    sign wrong where the exact effect is small. Embeddings that share a direction, as trained models' do
    (``anisotropic_llama``), shrink the swap but do not remove it.

    Measured over init seeds 0-19 with 8, 32 and 128 prompts (60 runs, prompt seeds 100+,
    ``benchmarks/bench_eap_rank.py``): over all edges EAP 0.926-0.992 and EAP-IG 0.947-0.986, every
    run >= 0.9 (EAP-IG is ~0.01 below EAP there: on the tiniest edges the gradient at the clean input
    is exact to first order, the path average is not). Over the edges above 1e-4: EAP 0.872-0.985
    (7 of 60 runs below 0.9), EAP-IG 0.914-0.995. Asserted: both >= 0.9 over all edges per seed;
    above 1e-4, EAP-IG >= 0.9 per seed and >= EAP on average, EAP >= 0.85 per seed and >= 0.9 per
    seed without the input edges (which places the misses).
    """
    s_all, s_eap, s_ig, s_inner = [], [], [], []
    for seed in (10, 11, 12):
        g = CircuitGraph(anisotropic_llama(seed))
        batches = [one_token_pairs(seed=s) for s in (11, 12)]
        edges = g.edges()
        exact = np.abs(edge_values(g, exact_scores(g, batches)))  # |metric drop| when the edge is corrupted
        above = exact > 1e-4
        assert above.sum() > 30 and exact.max() > 1e-2
        eap = attribute(g, batches, steps=0)
        ig = attribute(g, batches, steps=5)
        assert float(eap[~g.valid].abs().max()) == 0.0
        a_eap, a_ig = np.abs(edge_values(g, eap)), np.abs(edge_values(g, ig))
        s_all.append((spearman(a_eap, exact), spearman(a_ig, exact)))
        s_eap.append(spearman(a_eap[above], exact[above]))
        s_ig.append(spearman(a_ig[above], exact[above]))
        inner = above & np.array([u != g.up_index["input"] for u, _ in edges])
        s_inner.append(spearman(a_eap[inner], exact[inner]))
    assert np.min(s_all) >= 0.9, s_all
    assert min(s_ig) >= 0.9 and min(s_eap) >= 0.85 and min(s_inner) >= 0.9, (s_eap, s_ig, s_inner)
    assert np.mean(s_ig) >= np.mean(s_eap), (s_eap, s_ig)


@pytest.mark.slow
def test_smollm2_graph_is_the_model_and_patching_one_k_edge_is_local(smollm2):
    """The real model (GQA 9/3): the graph's full forward equals HF's logits; the empty circuit the
    corrupted ones; cutting every k input of one query head leaves its KV-group mates' outputs alone."""
    g = CircuitGraph(smollm2.model)
    tok = smollm2.tokenizer
    clean = torch.tensor([tok("When Mary and John went to the store, John gave a drink to")["input_ids"]])
    corrupt = torch.tensor([tok("When Alice and Bob went to the store, John gave a drink to")["input_ids"]])
    with torch.no_grad():
        hf_clean, hf_corrupt = smollm2.model(clean).logits, smollm2.model(corrupt).logits
        logits, _ = g.forward(clean)
        _, c_out = g.forward(corrupt)
        empty, _ = g.forward(clean, mask=g.empty_mask(), corrupt=c_out)
        mask = g.full_mask()
        mask[:, g.target_index["a10.h0<k>"]] = 0.0
        _, outs = g.forward(clean, mask=mask, corrupt=c_out)
        _, clean_out = g.forward(clean)
    torch.testing.assert_close(logits, hf_clean, atol=2e-4, rtol=0)
    torch.testing.assert_close(empty, hf_corrupt, atol=2e-4, rtol=0)
    h0, h1, h3 = (g.up_index[f"a10.h{h}"] for h in (0, 1, 3))
    assert (outs[h0] - clean_out[h0]).abs().max() > 1e-3
    torch.testing.assert_close(outs[h1], clean_out[h1], atol=1e-5, rtol=0)  # shares h0's KV head (3 per group)
    torch.testing.assert_close(outs[h3], clean_out[h3], atol=1e-5, rtol=0)


def test_attribution_keeps_an_autograd_graph_linear_in_context_length():
    """What attribution's autograd graph saves for backward (outside the checkpointed layers, which
    recompute their attention) grows linearly in T: doubling T at most doubles it. Before
    per-layer checkpointing and flash attention the [B, H, T, T] attention tensors were saved too
    (ratio ~3 here)."""
    g = CircuitGraph(tiny_llama(seed=2))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    totals = []
    for T in (32, 64):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            scores = attribute(g, [pair(B=2, T=T, seed=3)], steps=0)
        assert scores.abs().max() > 0
        totals.append(sum(saved))
    assert totals[1] <= 2.1 * totals[0], totals
