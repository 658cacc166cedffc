"""Edge attribution (EAP, EAP-IG), circuit search and faithfulness over a ``CircuitGraph``.

Scores: ``score[u, d]`` estimates how much the metric *drops* when edge u -> d carries the
corrupted activation instead of the clean one, to first order:

    EAP     (Syed et al. 2023):    (out_u(clean) - out_u(corrupt)) . dM/d in_d  at the clean input
    EAP-IG  (Hanna et al. 2024):   the same difference . mean over alpha of dM/d in_d at the input
                                   embeddings corrupt + alpha (clean - corrupt), alpha = (k - 1/2) / steps

summed over positions and averaged over prompts. One engine (``attribute``); EAP is ``steps=0``.
Gradients come from ``CircuitGraph.forward``: plain torch attention, forward and backward.

Memory per batch: the clean and corrupted node outputs (2 x n_up x B x T x d_model floats) plus
one forward's autograd graph; ``batch_size`` bounds it. Long prompts: lower the batch size.

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
            _, clean = graph.forward(batch.clean)
            _, corrupt = graph.forward(batch.corrupt)
            diff = clean - corrupt  # [n_up, B, T, D]
        weight = batch.clean.shape[0] / n_rows / len(alphas)
        for a in alphas:
            emb = corrupt[0] + a * diff[0]  # [B, T, D] input embeddings
            groups: list[tuple[int, list, Callable]] = []
            with torch.enable_grad():
                logits, _ = graph.forward(embeds=emb, on_input=lambda d0, ls, f: groups.append((d0, ls, f)),
                                          keep_outputs=False)
                grads = torch.autograd.grad(metric(logits, batch), [x for _, ls, _ in groups for x in ls])
            i = 0
            with torch.no_grad():
                for d0, ls, to_input in groups:
                    g = to_input(grads[i:i + len(ls)])  # [B, T, n, D]
                    i += len(ls)
                    nu = int(n_in[d0])
                    s = torch.einsum("ubtd,btnd->un", diff[:nu], g)  # [n_up, n]
                    scores[:nu, d0:d0 + g.shape[2]] += weight * s.double()
    return scores


eap = functools.partial(attribute, steps=0)
eap_ig = functools.partial(attribute, steps=5)


def circuit_metric(graph: CircuitGraph, batches: Sequence[Batch], masks: Iterable[torch.Tensor | None],
                   metric=logit_diff_metric) -> list[float]:
    """The metric (row-weighted mean over ``batches``) of each mask (None = full model) in one pass.

    The corrupted node outputs are computed once per batch and reused for every mask.
    """
    masks = list(masks)
    totals = np.zeros(len(masks))
    n_rows = sum(b.clean.shape[0] for b in batches)
    with torch.no_grad():
        for batch in batches:
            _, corrupt = graph.forward(batch.corrupt)
            for i, m in enumerate(masks):
                logits, _ = graph.forward(batch.clean, mask=m, corrupt=corrupt, keep_outputs=False)
                totals[i] += float(metric(logits, batch)) * batch.clean.shape[0] / n_rows
    return totals.tolist()


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
    node_of_target = [graph.up_index.get(t.split("<")[0]) for t in graph.targets]  # target -> upstream node
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


def faithfulness_curve(graph: CircuitGraph, batches: Sequence[Batch], scores: torch.Tensor,
                       sizes: Sequence[int], n_random: int = 3, seed: int = 0,
                       metric=logit_diff_metric) -> dict:
    """Faithfulness of the top-n circuits and of random circuits of the same sizes.

    Returns ``{"sizes", "faithfulness", "random_mean", "random_max", "clean", "corrupted"}``; the
    random circuits are uniform draws of n edges of the graph (``seed``).
    """
    g = torch.Generator().manual_seed(seed)
    edges = graph.valid.flatten().nonzero()[:, 0]
    masks: list[torch.Tensor | None] = [None, graph.empty_mask()]
    masks += [top_edges_mask(graph, scores, n) for n in sizes]
    for n in sizes:
        for _ in range(n_random):
            m = torch.zeros(graph.valid.numel())
            m[edges[torch.randperm(len(edges), generator=g)[:n]]] = 1.0
            masks.append(m.view(graph.valid.shape))
    vals = circuit_metric(graph, batches, masks, metric)
    clean, corrupted = vals[0], vals[1]
    denom = clean - corrupted
    if abs(denom) < 1e-9:
        raise HeadscopeError("the clean and corrupted inputs give the same metric; faithfulness is undefined "
                             "(choose corrupted prompts that change the answer)")
    f = [(v - corrupted) / denom for v in vals[2:]]
    top, rnd = f[:len(sizes)], np.array(f[len(sizes):]).reshape(len(sizes), n_random) if n_random else None
    return {"sizes": list(map(int, sizes)), "faithfulness": top, "clean": clean, "corrupted": corrupted,
            "random_mean": rnd.mean(1).tolist() if rnd is not None else [],
            "random_max": rnd.max(1).tolist() if rnd is not None else []}


def minimal_circuit(curve: dict, target: float) -> int | None:
    """The smallest size on the curve whose faithfulness reaches ``target`` (None if none does)."""
    for n, f in zip(curve["sizes"], curve["faithfulness"]):
        if f >= target:
            return n
    return None


def size_grid(n_edges: int, points: int = 12) -> list[int]:
    """Circuit sizes for a curve: 1, then log-spaced up to every edge."""
    grid = np.unique(np.round(np.logspace(0, np.log10(n_edges), points)).astype(int))
    return grid.tolist()
