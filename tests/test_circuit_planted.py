"""A planted circuit: a 2-layer attention-only Llama trained on CPU to continue repeated random sequences.

Construction (stated, because it shapes the result): 4 heads per layer. Heads 1-3 of each layer are
frozen at their random init, with q/k/v/o scaled 2x so that what they write is not negligible:
untrained distractors that read and write the residual stream. Only heads 0 can learn, so the model
has to build induction from a0.h0 (previous token) and a1.h0 (induction). The MLPs have width 1,
zeroed and frozen ("too narrow to matter"). All of it stays in the graph (110 edges). Without the
freeze (``freeze=False``, 1500 steps), the role spreads over the heads of each layer and the
circuit is dense: on seed 0 even the 11 edges with the largest exact single-edge effects reach
faithfulness 0.19 (EAP-IG's top 11: 0.30); on seed 1 no induction forms
(``benchmarks/bench_planted.py --free``). Which head does what is read from HF eager
attention, not from the circuit code.

Over training seeds 0-5 (``benchmarks/bench_planted.py``), every seed passes the edge-level checks
below; on seed 1 the greedy-by-node search needs a third node, the distractor a0.h1, which the
trained heads had come to use.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from headscope.analyses.circuit_core import (attribute, circuit_metric, faithfulness_curve, node_faithfulness_curve,
                                            node_scores, top_edges_mask, top_nodes_mask)
from headscope.probe.graph import Batch, CircuitGraph

V, H, D = 48, 4, 64


def train_planted(steps=1200, seed=0, distractor_scale=2.0, freeze=True):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=D, intermediate_size=1, num_attention_heads=H, num_key_value_heads=H,
                      num_hidden_layers=2, vocab_size=V, max_position_embeddings=64, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    dh = D // H
    for layer in model.model.layers:
        for p in layer.mlp.parameters():
            p.data.zero_()
            p.requires_grad_(False)
        at = layer.self_attn
        if not freeze:
            continue
        with torch.no_grad():  # heads 1..3: random, louder than the 0.02 init, never trained
            for proj in (at.q_proj, at.k_proj, at.v_proj):
                proj.weight[dh:] *= distractor_scale
            at.o_proj.weight[:, dh:] *= distractor_scale
        for proj in (at.q_proj, at.k_proj, at.v_proj):  # rows of heads 1..3: no gradient
            proj.weight.register_hook(lambda g: torch.cat([g[:dh], torch.zeros_like(g[dh:])], 0))
        at.o_proj.weight.register_hook(lambda g: torch.cat([g[:, :dh], torch.zeros_like(g[:, dh:])], 1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        n = int(torch.randint(4, 11, (1,), generator=g))  # varying period: no positional shortcut
        r = torch.randint(V, (64, n), generator=g)
        ids = torch.cat([r, r], 1)
        loss = torch.nn.functional.cross_entropy(model(ids).logits[:, n:-1].reshape(-1, V), ids[:, n + 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def induction_batch(B, n, seed):
    """clean r + r[:-1] (answer r[-1]); corrupted r' + r[:-1] (wrong r'[-1])."""
    g = torch.Generator().manual_seed(seed)
    r, r2 = torch.randint(V, (B, n), generator=g), torch.randint(V, (B, n), generator=g)
    clean, corrupt = torch.cat([r, r[:, :-1]], 1), torch.cat([r2, r[:, :-1]], 1)
    return Batch(clean, corrupt, torch.full((B,), 2 * n - 2), r[:, -1], r2[:, -1])


@pytest.mark.slow  # ~15 s of training on one core (benchmarks/README.md); no timing asserted here
def test_planted_induction_circuit_is_found():
    found, facts = check_edges(train_planted())
    # seed 0's k-edge is saturated (not on every seed: benchmarks/bench_planted.py)
    assert facts["drop"] > 10 * abs(facts["slope"])
    check_nodes(*found)


def check_edges(model):
    """The k-edge is found by |score| (4th of 110 by EAP-IG): the attribution is small, and EAP-IG's
    has the wrong *sign* (exact drop +10.5, EAP +0.33, EAP-IG -2.3), the first-order failure at a
    saturated softmax: the metric vs the edge's weight m is 1.73, 9.94, 12.23, 12.24 at m = 0, 0.5,
    0.98, 1, and EAP equals its slope at m = 1 (asserted below), so this is no sign bug."""
    # roles from HF eager attention: previous-token head in layer 0, induction head in layer 1
    n = 8
    ids = induction_batch(32, n, seed=99).clean
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions
    t = torch.arange(1, ids.shape[1])
    prev = att[0][:, :, t, t - 1].mean((0, 2))            # [H]
    t2 = torch.arange(n, ids.shape[1])
    ind = att[1][:, :, t2, t2 - n + 1].mean((0, 2))        # [H]
    p, i = int(prev.argmax()), int(ind.argmax())
    assert prev[p] > 0.5 and ind[i] > 0.5, (prev, ind)

    g = CircuitGraph(model)
    batches = [induction_batch(16, n, seed=1), induction_batch(16, 6, seed=2)]
    scores = attribute(g, batches, steps=5)
    k_edge = g.up_index[f"a0.h{p}"], g.target_index[f"a1.h{i}<k>"]
    # EAP's score of the k-edge is the metric's slope in the edge's weight at the clean run (exact
    # patching): saturated there, so it is small, while cutting the edge drops the metric a lot
    masks = [None]
    for a in (0.0, 0.98, 1.02):
        m = g.full_mask()
        m[k_edge] = a
        masks.append(m)
    full, cut, lo, hi = circuit_metric(g, batches, masks)  # cut: the edge fully corrupted
    facts = {"drop": full - cut, "slope": (hi - lo) / 0.04}  # what cutting the k-edge costs; EAP's slope
    assert float(attribute(g, batches, steps=0)[k_edge]) == pytest.approx((hi - lo) / 0.04, abs=2e-3, rel=2e-2)
    n_small = g.n_edges // 10  # under 10% of the edges
    top = top_edges_mask(g, scores, n_small)
    assert top[k_edge] == 1.0, "the previous-token -> induction k-edge is among the top edges"

    curve = faithfulness_curve(g, batches, scores, sizes=list(range(1, n_small + 1)), n_random=10, seed=0)
    reached = [s for s, f in zip(curve["sizes"], curve["faithfulness"]) if f >= 0.9]
    assert reached and reached[0] < 0.1 * g.n_edges, curve
    size = reached[0]
    assert curve["random_max"][size - 1] < 0.9, curve

    # the circuit's faithfulness, checked by exact patching of everything but its edges
    full, empty, circ = circuit_metric(g, batches, [None, g.empty_mask(), top_edges_mask(g, scores, size)])
    assert (circ - empty) / (full - empty) >= 0.9
    facts["edges"] = size
    return (g, batches, scores, p, i), facts


def check_nodes(g, batches, scores, p, i):
    """Greedy by node: heads / MLPs added in order of summed |edge score| until faithfulness 0.9."""
    n_nodes = len(g.upstream) - 1
    nodes = node_faithfulness_curve(g, batches, scores, sizes=list(range(1, n_nodes + 1)), n_random=10, seed=0)
    k = next(k for k, f in zip(nodes["units"], nodes["faithfulness"]) if f >= 0.9)
    order = torch.argsort(node_scores(g, scores)[1:], descending=True, stable=True)[:k] + 1
    found = {g.upstream[int(u)] for u in order}
    assert found == {f"a0.h{p}", f"a1.h{i}"}, (found, nodes)
    assert nodes["random_mean"][k - 1] < 0.5, nodes  # not the max: 1 in 45 random pairs of the 10 nodes is the circuit
    full, empty, circ = circuit_metric(g, batches, [None, g.empty_mask(), top_nodes_mask(g, scores, k)])
    assert (circ - empty) / (full - empty) >= 0.9
