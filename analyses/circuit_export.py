"""Circuit graphs in the formats other tools read: EAP-IG / MIB circuit-track JSON, and Graphviz DOT.

EAP-IG JSON (``Graph.to_json`` of hannamw/EAP-IG, the MIB circuit track's submission format)::

    {"cfg": {"n_layers", "n_heads", "parallel_attn_mlp", "d_model"},
     "nodes": {"input": {"in_graph": true}, "a0.h1": {...}, "m0": {...}, "logits": {...}},
     "edges": {"a0.h1->a1.h0<k>": {"score": 0.12, "in_graph": true}, "m0->logits": {...}}}

headscope adds ``n_key_value_heads`` to ``cfg`` (GQA: edges stay per query head). Scores use
headscope's sign: the estimated metric drop when the edge is corrupted.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from headscope.errors import HeadscopeError
from headscope.probe.graph import GraphLayout


def nodes_in_graph(layout: GraphLayout, in_graph: torch.Tensor) -> dict[str, bool]:
    """A node is in the graph when an in-graph edge leaves or enters it; ``logits`` always is."""
    out = {n: bool(in_graph[i].any()) for i, n in enumerate(layout.upstream)}
    for d in range(len(layout.targets) - 1):
        if bool(in_graph[:, d].any()):
            out[layout.split_target(d)[0]] = True
    out["logits"] = True
    return out


def to_eapig(layout: GraphLayout, scores: torch.Tensor, in_graph: torch.Tensor, d_model: int) -> dict:
    """The EAP-IG JSON dict of ``scores`` [n_up, n_targets] and the 0/1 ``in_graph`` mask."""
    cfg = {"n_layers": layout.n_layers, "n_heads": layout.n_heads, "parallel_attn_mlp": False,
           "d_model": int(d_model), "n_key_value_heads": layout.n_kv_heads}
    nodes = {n: {"in_graph": v} for n, v in nodes_in_graph(layout, in_graph).items()}
    edges = {layout.edge_name(u, d): {"score": float(scores[u, d]), "in_graph": bool(in_graph[u, d])}
             for u, d in layout.edges()}
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


def from_eapig(d: dict) -> tuple[GraphLayout, torch.Tensor, torch.Tensor, dict]:
    """(layout, scores float64, in_graph bool, cfg) from an EAP-IG JSON dict; a bad file raises."""
    try:
        cfg = d["cfg"]
        layout = GraphLayout(int(cfg["n_layers"]), int(cfg["n_heads"]), cfg.get("n_key_value_heads"))
        edges = d["edges"]
    except (KeyError, TypeError, ValueError) as e:
        raise HeadscopeError(f"not an EAP-IG circuit JSON (needs cfg with n_layers / n_heads, and edges): {e}"
                             ) from None
    if cfg.get("parallel_attn_mlp"):
        raise HeadscopeError("parallel attention/MLP graphs are not supported")
    scores = torch.zeros(layout.valid.shape, dtype=torch.float64)
    in_graph = torch.zeros(layout.valid.shape, dtype=torch.bool)
    for name, e in edges.items():
        u, t = layout.parse_edge(name)
        scores[u, t] = float(e["score"])
        in_graph[u, t] = bool(e["in_graph"])
    return layout, scores, in_graph, cfg


def write_eapig(path: str | Path, layout: GraphLayout, scores, in_graph, d_model: int) -> Path:
    path = Path(path)
    path.write_text(json.dumps(to_eapig(layout, scores, in_graph, d_model)))
    return path


def read_eapig(path: str | Path):
    try:
        return from_eapig(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise HeadscopeError(f"cannot read circuit JSON {path}: {e}") from None


EDGE_COLOURS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#d62728", "": "#777777"}  # by the target's input


def to_dot(layout: GraphLayout, scores: torch.Tensor, in_graph: torch.Tensor) -> str:
    """Graphviz DOT of the in-graph edges: layers left to right, pen width ~ |score|, q/k/v coloured."""
    keep = [(u, d) for u, d in layout.edges() if in_graph[u, d]]
    top = max((abs(float(scores[u, d])) for u, d in keep), default=1.0) or 1.0
    lines = ["digraph circuit {", "  rankdir=LR; node [shape=box, style=rounded, fontname=Helvetica];"]
    nodes = [n for n, v in nodes_in_graph(layout, in_graph).items() if v]
    by_layer: dict[str, list[str]] = {}
    for n in nodes:
        key = "input" if n == "input" else "logits" if n == "logits" else n[1:].split(".")[0]
        by_layer.setdefault(key, []).append(n)
    for key, group in by_layer.items():
        lines.append("  { rank=same; " + " ".join(f'"{n}";' for n in group) + " }")
    for u, d in keep:
        node, qkv = layout.split_target(d)
        s = float(scores[u, d])
        width = 0.5 + 4.5 * abs(s) / top
        lines.append(f'  "{layout.upstream[u]}" -> "{node}" [penwidth={width:.2f}, color="{EDGE_COLOURS[qkv]}", '
                     f'label="{qkv}", tooltip="{layout.edge_name(u, d)}: {s:.4g}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"
