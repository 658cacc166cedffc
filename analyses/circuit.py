"""``circuit``: edge-level circuit discovery (EAP / EAP-IG) on a task, stored as a run.

Each example is one batch of clean/corrupted pairs (``--batch_size`` pairs); its edge scores are
averaged over batches. ``finalize`` draws the faithfulness curve of the top-n circuits against
random circuits of the same size (on every pair), picks the smallest circuit that reaches
``--target`` faithfulness (``--search greedy-node``: circuits of whole heads / MLPs, added in
order of their summed |edge score|; the curve's sizes are then node counts, stored as
``curve["units"]``, with the circuits' edge counts as ``curve["sizes"]``), and stores:

- ``arrays.npz``: ``edge_scores`` [n_up, n_targets] (EAP-IG's index layout, see
  ``headscope.probe.graph``) and ``circuit`` (0/1, the chosen circuit);
- ``summary``: task, prompts, clean / corrupted metric, the curve, the circuit's heads and edges;
- head scores [L, H]: ``edge_mass`` (sum of |score| over the head's in- and out-edges) and
  ``in_circuit`` (1 where the head is in the chosen circuit).

Forward and backward run through ``CircuitGraph.forward`` (torch SDPA flash attention, float32).
"""
from __future__ import annotations

import numpy as np
import torch

from headscope.data.circuit_tasks import TASKS, batches_of, induction_pairs, load_pairs, text_task_pairs
from headscope.errors import HeadscopeError
from headscope.probe.graph import CircuitGraph

from .base import (PREPEND_BOS, Analysis, Example, ExampleOutput, Finalized, Option, ScoreMeta, check_memory,
                   register)
from .circuit_core import (attribute, faithfulness_curve, minimal_circuit, node_faithfulness_curve, node_scores,
                           prune_dangling, size_grid, top_edges_mask, top_nodes_mask)
from .circuit_export import nodes_in_graph

N_SUMMARY_EDGES = 40


def task_pairs(ctx) -> list:
    """The run's pairs, regenerated from the options (so a resumed run sees the same data)."""
    o, tok = ctx.options, ctx.lm.tokenizer
    bos = ctx.info.leading_bos(o["prepend_bos"])
    if ctx.data_path is not None:
        return load_pairs(ctx.data_path, tok, bos)
    if o["task"] == "induction":
        exclude = set(getattr(tok, "all_special_ids", []) or [])
        return induction_pairs(o["n_examples"], ctx.info.vocab_size, ctx.seed, seq_len=o["seq_len"], bos=bos,
                               exclude=exclude, tok=tok)
    return text_task_pairs(o["task"], tok, o["n_examples"], ctx.seed, bos)


def graph_of(ctx) -> CircuitGraph:
    g = getattr(ctx, "_circuit_graph", None)
    if g is None:
        g = CircuitGraph(ctx.lm.model)
        ctx._circuit_graph = g
    return g


@register
class CircuitAnalysis(Analysis):
    name = "circuit"
    description = "Edge-level circuit (EAP / EAP-IG) of a task, with faithfulness vs random circuits."
    data_help = "optional JSONL of {clean, corrupted, answer, wrong} (overrides --task)"
    options = (
        Option("task", str, "ioi", "prompt generator (ignored with --data)", TASKS),
        Option("n_examples", int, 16, "number of clean/corrupted pairs"),
        Option("method", str, "eap-ig", "attribution method", ("eap", "eap-ig")),
        Option("ig_steps", int, 5, "EAP-IG interpolation steps"),
        Option("target", float, 0.8, "faithfulness the minimal circuit must reach"),
        Option("search", str, "topn", "circuit search: top-n edges by |score|, or whole heads / MLPs by "
               "summed |edge score| (greedy-node)", ("topn", "greedy-node")),
        Option("n_random", int, 2, "random circuits per size for the baseline"),
        Option("curve_points", int, 10, "circuit sizes on the faithfulness curve (log-spaced)"),
        Option("seq_len", int, 10, "induction: length of the random block"),
        PREPEND_BOS,
    )

    def examples(self, ctx):
        if ctx.options["method"] == "eap-ig" and ctx.options["ig_steps"] < 1:
            raise HeadscopeError(f"--ig-steps must be >= 1 for eap-ig, got {ctx.options['ig_steps']}")
        pairs = task_pairs(ctx)
        g = graph_of(ctx)  # an unsupported model, or a batch beyond memory, fails before the run is written
        bs = max(1, ctx.options["batch_size"])
        check_memory(g.attribution_bytes(min(bs, len(pairs)), max((len(p.clean) for p in pairs), default=0)),
                     "--batch-size")
        for i in range(0, len(pairs), bs):
            yield Example(id=f"batch{i // bs:04d}", data=(i, min(i + bs, len(pairs))))

    def inputs(self, ctx, ex) -> list[int]:
        """The batch's first clean prompt (the dashboard shows attention patterns on it)."""
        return task_pairs(ctx)[ex.data[0]].clean

    def process(self, ctx, ex):
        lo, hi = ex.data
        pairs = task_pairs(ctx)[lo:hi]
        g = graph_of(ctx)
        steps = ctx.options["ig_steps"] if ctx.options["method"] == "eap-ig" else 0
        batch = batches_of(pairs, len(pairs))[0].to(g.model.device)
        scores = attribute(g, [batch], steps=steps)
        return ExampleOutput(arrays={"edge_scores": scores.numpy()}, details={"pairs": [p.text for p in pairs]})

    def finalize(self, ctx, agg, records):
        o = ctx.options
        g = graph_of(ctx)
        scores = torch.from_numpy(agg["edge_scores"].mean)
        pairs = task_pairs(ctx)
        if o["limit"] is not None:
            pairs = pairs[:o["limit"] * max(1, o["batch_size"])]
        batches = batches_of(pairs, max(1, o["batch_size"]))
        by_node = o["search"] == "greedy-node"
        curve_of, select = ((node_faithfulness_curve, top_nodes_mask) if by_node
                            else (faithfulness_curve, top_edges_mask))
        sizes = size_grid(len(g.upstream) - 1 if by_node else g.n_edges, o["curve_points"])
        curve = curve_of(g, batches, scores, sizes, n_random=o["n_random"], seed=ctx.seed)
        n_min = minimal_circuit(curve, o["target"])
        selected = select(g, scores, n_min if n_min is not None else sizes[-1])
        chosen = prune_dangling(g, selected)
        in_graph = chosen.bool()
        L, H = g.n_layers, g.n_heads
        per_node, in_nodes = node_scores(g, scores), nodes_in_graph(g, in_graph)
        mass = np.array([[float(per_node[g.up_index[f"a{l}.h{h}"]]) for h in range(H)] for l in range(L)])
        member = np.array([[float(in_nodes[f"a{l}.h{h}"]) for h in range(H)] for l in range(L)])
        absd = scores.abs()
        order = torch.argsort(torch.where(in_graph, absd, torch.tensor(-1.0, dtype=absd.dtype)).flatten(),
                              descending=True)[:int(in_graph.sum())]
        edges = [{"edge": g.edge_name(*divmod(int(i), absd.shape[1])), "score": float(scores.flatten()[i])}
                 for i in order[:N_SUMMARY_EDGES]]
        heads = [f"a{l}.h{h}" for l in range(L) for h in range(H) if member[l, h]]
        examples = [p for r in records for p in r.get("pairs", [])][:5]
        summary = {
            "task": "data file" if ctx.data_path else o["task"], "method": o["method"],
            "ig_steps": o["ig_steps"] if o["method"] == "eap-ig" else None,
            "n_pairs": len(pairs), "n_edges_total": g.n_edges,
            "metric": "logit difference (answer - wrong), last token",
            "clean_metric": curve["clean"], "corrupted_metric": curve["corrupted"],
            "curve": curve, "target_faithfulness": o["target"], "search": o["search"],
            "minimal_circuit_edges": int(selected.sum()) if n_min is not None else None,
            "minimal_circuit_nodes": n_min if by_node else None,
            "circuit_edges": int(in_graph.sum()), "circuit_heads": heads, "top_circuit_edges": edges,
            "example_pairs": examples,
        }
        if n_min is None:
            ctx.log(f"circuit: no circuit on the curve reaches faithfulness {o['target']}; storing the full graph")
        meta = {"edge_mass": ScoreMeta("sum of |edge attribution| over the head's q/k/v input edges and output edges",
                                       higher_is="more involved in the task's circuit"),
                "in_circuit": ScoreMeta("1 if the head is in the minimal circuit reaching the target faithfulness",
                                        higher_is="in the circuit", threshold=0.5)}
        return Finalized(scores={"edge_mass": mass, "in_circuit": member}, score_meta=meta, summary=summary,
                         arrays={"edge_scores": scores.numpy(), "circuit": chosen.numpy()})

