"""Edge attribution (EAP, EAP-IG), circuit search and faithfulness over a ``CircuitGraph``.

Scores: ``score[u, d]`` estimates how much the metric *drops* when edge u -> d carries the
corrupted activation instead of the clean one, to first order:

    EAP     (Syed et al. 2023):    (out_u(clean) - out_u(corrupt)) . dM/d in_d  at the clean input
    EAP-IG  (Hanna et al. 2024):   the same difference . mean over alpha of dM/d in_d at the input
                                   embeddings corrupt + alpha (clean - corrupt), alpha = (k - 1/2) / steps

summed over positions and averaged over prompts. One engine (``attribute``); EAP is ``steps=0``.
Gradients come from ``CircuitGraph.forward``: torch SDPA (flash) attention, forward and backward.

Memory per batch (``CircuitGraph.attribution_bytes``): the clean-minus-corrupted node outputs
(n_up x B x T x d_model floats, one buffer) and a checkpointed autograd graph, both linear in
B x T; flash attention forms no [B, H, T, T] matrix, forward or backward.
Each score contribution is added in a gradient hook as backward reaches its target, so no
per-target gradient is kept.

Faithfulness of a circuit C: (M(C) - M(empty)) / (M(full) - M(empty)), where M(C) is the metric of
the clean input with every edge outside C patched from the corrupted input. M(empty) is the
corrupted run's metric, so this is "the circuit-only model's metric divided by the full model's",
measured from the corrupted baseline. Near 0 when |M(full) - M(empty)| is tiny: check the task.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from headscope.errors import HeadscopeError
from headscope.probe.graph import Batch, CircuitGraph, GraphLayout, logit_diff_metric


def attribute(graph: CircuitGraph, batches: Sequence[Batch], *, steps: int = 0,
              metric=logit_diff_metric) -> torch.Tensor:
    """[n_up, n_targets] float64 edge scores (0 off the graph), averaged over the rows of ``batches``.

    ``steps=0``: EAP (gradient at the clean input). ``steps=k >= 1``: EAP-IG with k
    interpolation points on the input embeddings (k + 2 forwards and k backwards per batch).
    ``metric`` reads the logits at ``batch.last`` only: it gets them as [B, 1, V] (``Batch.at_last``).
    """
    if steps < 0:
        raise HeadscopeError(f"steps must be >= 0 (0 = EAP), got {steps}")
    n_rows = sum(b.clean.shape[0] for b in batches)
    if n_rows == 0:
        raise HeadscopeError("attribution needs at least one prompt pair")
    scores = torch.zeros(graph.valid.shape, dtype=torch.float64)
    n_in = graph.valid.sum(0).tolist()  # upstream count per target (upstream nodes come first)
    alphas = [1.0] if steps == 0 else [(k + 0.5) / steps for k in range(steps)]
    for batch in batches:
        with torch.no_grad():
            _, diff = graph.forward(batch.clean, last=batch.last)  # then [n_up, B, T, D] clean - corrupted:
            _, diff = graph.forward(batch.corrupt, subtract_from=diff, last=batch.last)
            emb0 = graph.base.embed_tokens(batch.corrupt)  # [B, T, D] corrupted input embeddings
        weight = batch.clean.shape[0] / n_rows / len(alphas)

        def on_input(d0: int, t: torch.Tensor, to_input: Callable) -> None:
            nu = int(n_in[d0])

            def add(grad: torch.Tensor) -> None:  # as backward reaches t; the gradient is then dropped
                g = to_input(grad)  # [B, T, n, D]
                s = torch.einsum("ubtd,btnd->un", diff[:nu], g)  # [nu, n]
                scores[:nu, d0:d0 + g.shape[2]] += weight * s.double().to(scores.device)
            t.register_hook(add)

        for a in alphas:
            emb = (emb0 + a * diff[0]).requires_grad_()  # [B, T, D] input embeddings
            with torch.enable_grad():
                logits, _ = graph.forward(embeds=emb, on_input=on_input, keep_outputs=False, last=batch.last)
                torch.autograd.grad(metric(logits, batch.at_last()), emb)  # runs the hooks; no parameter gradients
    return scores


eap = functools.partial(attribute, steps=0)
eap_ig = functools.partial(attribute, steps=5)


def circuit_metric(graph: CircuitGraph, batches: Sequence[Batch], masks: Iterable[torch.Tensor | None],
                   metric=logit_diff_metric) -> list[float]:
    """The metric (row-weighted mean over ``batches``) of each mask (None = full model) in one pass;
    ``metric`` reads the logits at ``batch.last`` only, as ``attribute``'s does.

    The corrupted node outputs are computed once per batch and reused for every mask.
    """
    masks = list(masks)
    totals = np.zeros(len(masks))
    n_rows = sum(b.clean.shape[0] for b in batches)
    with torch.no_grad():
        for batch in batches:
            _, corrupt = graph.forward(batch.corrupt, last=batch.last)
            for i, m in enumerate(masks):
                logits, _ = graph.forward(batch.clean, mask=m, corrupt=corrupt, keep_outputs=False, last=batch.last)
                totals[i] += float(metric(logits, batch.at_last())) * batch.clean.shape[0] / n_rows
    return totals.tolist()


def exact_scores(graph: CircuitGraph, batches: Sequence[Batch], metric=logit_diff_metric) -> torch.Tensor:
    """[n_up, n_targets] float64: the metric's drop when edge u -> d alone carries the corrupted
    activation (exact single-edge patching, 0 off the graph): what ``attribute`` estimates to first
    order. One patched forward per edge and batch, so for small graphs and for checking.
    """
    edges = graph.edges()
    masks = [None]
    for u, d in edges:
        m = graph.full_mask()
        m[u, d] = 0.0
        masks.append(m)
    vals = circuit_metric(graph, batches, masks, metric=metric)
    scores = torch.zeros(graph.valid.shape, dtype=torch.float64)
    for (u, d), v in zip(edges, vals[1:]):
        scores[u, d] = vals[0] - v
    return scores


def top_edges_mask(graph: GraphLayout, scores: torch.Tensor, n: int) -> torch.Tensor:
    """The n edges of largest |score| as a 0/1 mask (ties broken by edge order)."""
    flat = torch.where(graph.valid, scores.abs(), torch.tensor(-1.0, dtype=scores.dtype)).flatten()
    keep = torch.argsort(flat, descending=True, stable=True)[:n]
    mask = torch.zeros(flat.shape)
    mask[keep] = 1.0
    return mask.view(graph.valid.shape)


def prune_dangling(graph: GraphLayout, mask: torch.Tensor) -> torch.Tensor:
    """Drop edges that cannot reach ``logits`` or do not start from ``input``-reachable nodes.

    The stored circuit and the dashboard's sized circuits use this so they show connected
    circuits only. A pruned mask's metric can differ from the unpruned one's: a dropped edge
    that started at a node not fed from ``input`` still carried that node's (partly corrupted)
    activation.
    """
    m = (mask > 0) & graph.valid
    n_up = len(graph.upstream)
    node_of_target = graph.node_of_target
    # backward: which upstream nodes feed (transitively) into logits
    alive_out = torch.zeros(n_up, dtype=torch.bool)
    alive_tgt = torch.zeros(len(graph.targets), dtype=torch.bool)
    alive_tgt[-1] = True
    for d in range(len(graph.targets) - 1, -1, -1):
        if d < len(graph.targets) - 1:
            node = node_of_target[d]
            alive_tgt[d] = bool(alive_out[node])
        if alive_tgt[d]:
            alive_out |= m[:, d]
    # forward: which nodes receive something from input
    fed = torch.zeros(n_up, dtype=torch.bool)
    fed[0] = True
    for d in range(len(graph.targets)):
        node = node_of_target[d]
        if node is not None and bool((m[:, d] & fed).any()):
            fed[node] = True
    keep = m & alive_tgt[None, :] & fed[:, None]
    return keep.float()


def node_scores(graph: GraphLayout, scores: torch.Tensor) -> torch.Tensor:
    """[n_up] float64: each node's summed |score| over its out-edges and its input edges (a head's
    q, k and v); ``input``'s is its out-edges only."""
    absd = torch.where(graph.valid, scores.abs(), torch.zeros((), dtype=scores.dtype)).double()
    total = absd.sum(1)  # [n_up] out-edges
    for d, node in enumerate(graph.node_of_target):
        if node is not None:
            total[node] += absd[:, d].sum()
    return total


def nodes_mask(graph: GraphLayout, nodes: torch.Tensor) -> torch.Tensor:
    """[n_up, n_targets] 0/1 mask of every edge between kept nodes (``nodes`` [n_up] bool), with
    ``input`` and ``logits`` always kept."""
    keep = nodes.clone()
    keep[0] = True
    into = torch.tensor([True if n is None else bool(keep[n]) for n in graph.node_of_target])
    return (graph.valid & keep[:, None] & into[None, :]).float()


def top_nodes_mask(graph: GraphLayout, scores: torch.Tensor, n: int) -> torch.Tensor:
    """The circuit of the n heads / MLPs of largest ``node_scores`` (ties by node order)."""
    ns = node_scores(graph, scores)
    ns[0] = -1.0  # input is always in
    keep = torch.zeros(len(graph.upstream), dtype=torch.bool)
    keep[torch.argsort(ns, descending=True, stable=True)[:n]] = True
    return nodes_mask(graph, keep)


def random_edges_mask(graph: GraphLayout, n: int, gen: torch.Generator) -> torch.Tensor:
    """n edges of the graph drawn uniformly."""
    edges = graph.valid.flatten().nonzero()[:, 0]
    m = torch.zeros(graph.valid.numel())
    m[edges[torch.randperm(len(edges), generator=gen)[:n]]] = 1.0
    return m.view(graph.valid.shape)


def random_nodes_mask(graph: GraphLayout, n: int, gen: torch.Generator) -> torch.Tensor:
    """The circuit of n heads / MLPs drawn uniformly."""
    keep = torch.zeros(len(graph.upstream), dtype=torch.bool)
    keep[1 + torch.randperm(len(graph.upstream) - 1, generator=gen)[:n]] = True
    return nodes_mask(graph, keep)


def search_curve(graph: CircuitGraph, batches: Sequence[Batch], scores: torch.Tensor, sizes: Sequence[int], *,
                 select: Callable, draw: Callable, n_random: int = 3, seed: int = 0,
                 metric=logit_diff_metric) -> dict:
    """Faithfulness of the circuits ``select(graph, scores, n)`` and of ``n_random`` random ones
    ``draw(graph, n, generator)`` for each n in ``sizes`` (the search's unit: edges or nodes).

    Returns ``{"units", "sizes", "faithfulness", "random_mean", "random_max", "clean", "corrupted"}``:
    ``units`` are the given sizes, ``sizes`` the edge counts of the selected circuits (what the
    report plots). Raises when clean and corrupted give the same metric.
    """
    g = torch.Generator().manual_seed(seed)
    tops = [select(graph, scores, n) for n in sizes]
    masks: list[torch.Tensor | None] = [None, graph.empty_mask()] + tops
    masks += [draw(graph, n, g) for n in sizes for _ in range(n_random)]
    vals = circuit_metric(graph, batches, masks, metric)
    clean, corrupted = vals[0], vals[1]
    denom = clean - corrupted
    if abs(denom) < 1e-9:
        raise HeadscopeError("the clean and corrupted inputs give the same metric; faithfulness is undefined "
                             "(choose corrupted prompts that change the answer)")
    f = [(v - corrupted) / denom for v in vals[2:]]
    top, rnd = f[:len(sizes)], np.array(f[len(sizes):]).reshape(len(sizes), n_random) if n_random else None
    return {"units": list(map(int, sizes)), "sizes": [int(m.sum()) for m in tops], "faithfulness": top,
            "clean": clean, "corrupted": corrupted,
            "random_mean": rnd.mean(1).tolist() if rnd is not None else [],
            "random_max": rnd.max(1).tolist() if rnd is not None else []}


# top-n edges by |score|; or whole nodes (heads, MLPs) in order of node_scores, adding one node at a time
faithfulness_curve = functools.partial(search_curve, select=top_edges_mask, draw=random_edges_mask)
node_faithfulness_curve = functools.partial(search_curve, select=top_nodes_mask, draw=random_nodes_mask)


def minimal_circuit(curve: dict, target: float) -> int | None:
    """The smallest size on the curve (in its search's unit) whose faithfulness reaches ``target``
    (None if none does)."""
    for n, f in zip(curve["units"], curve["faithfulness"]):
        if f >= target:
            return n
    return None


def size_grid(n_edges: int, points: int = 12) -> list[int]:
    """Circuit sizes for a curve: 1, then log-spaced up to every edge."""
    grid = np.unique(np.round(np.logspace(0, np.log10(n_edges), points)).astype(int))
    return grid.tolist()
