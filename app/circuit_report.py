"""The edge-level circuit of a ``circuit`` run, for reports: data, a layered SVG graph, the curve.

``edge_circuit(run, roles)`` is the JSON-ready section (``report_schema.json``: ``edge_circuits``).
The graph is an inline SVG: layers left to right (``input``, then each layer's heads with its MLP
below, then ``logits``), edge width ~ |score|, q / k / v / other edges in four colours, and a
hover title on every node (its roles from the other runs of the model) and edge (its score).
The faithfulness curve shows the top-n circuits against random circuits of the same size.
"""
from __future__ import annotations

import html
import math

import numpy as np
import torch

from headscope.analyses.circuit_core import prune_dangling, top_edges_mask
from headscope.analyses.circuit_export import EDGE_COLOURS
from headscope.probe.graph import GraphLayout

MAX_EDGES_DRAWN = 150


def edge_circuit(run, roles: dict[str, list[str]], n_edges: int | None = None, arrays: dict | None = None) -> dict:
    """The circuit section of ``run``; ``roles`` maps ``a{L}.h{H}`` to role names from other runs.

    ``n_edges``: show the top-n edges by |score| (dangling ones pruned) instead of the run's
    minimal circuit (the dashboard's size slider). ``arrays``: the run's arrays.npz if already read.
    """
    info = run.meta.get("model", {})
    layout = GraphLayout(int(info["n_layers"]), int(info["n_heads"]), info.get("n_kv_heads"))
    arrays = run.arrays() if arrays is None else arrays
    scores, chosen = arrays["edge_scores"], arrays["circuit"] > 0
    if n_edges is not None:
        mask = top_edges_mask(layout, torch.from_numpy(scores), n_edges)
        chosen = prune_dangling(layout, mask).numpy() > 0
    edges = []
    for u, d in zip(*np.nonzero(chosen)):
        node, qkv = layout.split_target(d)
        edges.append({"edge": layout.edge_name(u, d), "source": layout.upstream[u], "target": node, "qkv": qkv,
                      "score": float(scores[u, d])})
    edges.sort(key=lambda e: -abs(e["score"]))
    nodes = sorted({e["source"] for e in edges} | {e["target"] for e in edges}, key=_order)
    s = run.meta.get("summary", {})
    return {"run": run.id, "model": info.get("id", ""), "task": s.get("task"), "method": s.get("method"),
            "n_layers": layout.n_layers, "n_heads": layout.n_heads, "n_edges_total": layout.n_edges,
            "nodes": [{"name": n, "roles": roles.get(n, [])} for n in nodes], "edges": edges,
            "curve": s.get("curve", {}), "target_faithfulness": s.get("target_faithfulness"),
            "minimal_circuit_edges": s.get("minimal_circuit_edges"),
            "clean_metric": s.get("clean_metric"), "corrupted_metric": s.get("corrupted_metric"),
            "example_pairs": s.get("example_pairs", []), "settings": run.meta.get("config", {})}


def _order(name: str) -> tuple:
    """Forward order: input, per layer heads then MLP, logits."""
    if name == "input":
        return (-1, 0, 0)
    if name == "logits":
        return (10 ** 6, 0, 0)
    if name.startswith("m"):
        return (int(name[1:]), 1, 0)
    layer, head = name[1:].split(".h")
    return (int(layer), 0, int(head))


def graph_svg(c: dict) -> str:
    """The circuit as a layered graph (at most ``MAX_EDGES_DRAWN`` strongest edges)."""
    edges = c["edges"][:MAX_EDGES_DRAWN]
    names = sorted({e["source"] for e in edges} | {e["target"] for e in edges}, key=_order)
    roles = {n["name"]: n["roles"] for n in c["nodes"]}
    cols = sorted({_order(n)[0] for n in names})
    col_of = {k: i for i, k in enumerate(cols)}
    stacks: dict[int, list[str]] = {}
    for n in names:
        stacks.setdefault(col_of[_order(n)[0]], []).append(n)
    dx, dy, w, h = 130, 34, 78, 22
    rows = max((len(v) for v in stacks.values()), default=1)
    width, height = 40 + dx * len(cols), 70 + dy * rows
    pos = {n: (20 + dx * i, 50 + dy * j) for i, col in stacks.items() for j, n in enumerate(col)}
    top = max((abs(e["score"]) for e in edges), default=1.0) or 1.0
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11"><text x="10" y="18" font-size="13">{html.escape(_title(c))}</text>']
    for k, col in enumerate(cols):
        label = "embed" if col == -1 else "unembed" if col == 10 ** 6 else f"layer {col}"
        out.append(f'<text x="{20 + dx * k}" y="38" fill="#555">{label}</text>')
    for e in reversed(edges):  # strongest drawn last, on top
        (x1, y1), (x2, y2) = pos[e["source"]], pos[e["target"]]
        x1, y1, x2, y2 = x1 + w, y1 + h / 2, x2, y2 + h / 2 + {"q": -6, "k": 0, "v": 6, "": 0}[e["qkv"]]
        sw = 0.6 + 5 * abs(e["score"]) / top
        dash = ' stroke-dasharray="4 2"' if e["score"] < 0 else ""
        tip = html.escape(f"{e['edge']}: score {e['score']:.4g}")
        out.append(f'<path d="M{x1:.0f},{y1:.0f} C{x1 + 40:.0f},{y1:.0f} {x2 - 40:.0f},{y2:.0f} {x2:.0f},{y2:.0f}" '
                   f'fill="none" stroke="{EDGE_COLOURS[e["qkv"]]}" stroke-width="{sw:.2f}" stroke-opacity="0.75"'
                   f'{dash}><title>{tip}</title></path>')
    for n, (x, y) in pos.items():
        tip = html.escape(f"{n}" + (f" - roles: {', '.join(roles.get(n, []))}" if roles.get(n) else ""))
        fill = "#fde9c9" if roles.get(n) else "#eef2f7"
        out.append(f'<g><title>{tip}</title><rect x="{x}" y="{y}" width="{w}" height="{h}" rx="5" fill="{fill}" '
                   f'stroke="#333"/><text x="{x + w / 2}" y="{y + 15}" text-anchor="middle">{html.escape(n)}</text>'
                   '</g>')
    legend = " ".join(f'<tspan fill="{v}">{k or "other"}</tspan>' for k, v in EDGE_COLOURS.items())
    out.append(f'<text x="10" y="{height - 8}">edge colour: {legend}; width ~ |score|; dashed = negative; '
               f'shaded node = has a role in another run</text></svg>')
    return "".join(out)


def _title(c: dict) -> str:
    shown = min(len(c["edges"]), MAX_EDGES_DRAWN)
    return (f"{c['task']} circuit of {c['model']} ({c['method']}): {len(c['edges'])} of {c['n_edges_total']} edges"
            + (f", {shown} strongest drawn" if shown < len(c["edges"]) else ""))


def curve_svg(c: dict) -> str:
    """Faithfulness of the top-n circuits and of random ones vs circuit size (log x)."""
    cv = c["curve"]
    if not cv.get("sizes"):
        return ""
    W, H, L, B = 520, 300, 50, 40
    xs = [math.log10(n) for n in cv["sizes"]]
    series = {"top-n (attribution)": ("#1f77b4", cv["faithfulness"]),
              "random, mean": ("#999999", cv.get("random_mean") or []),
              "random, max": ("#cccccc", cv.get("random_max") or [])}
    ys = [v for _, vals in series.values() for v in vals] + [0.0, 1.0]
    lo, hi = min(ys), max(ys)
    xmax = max(xs) or 1.0
    px = lambda x: L + (W - L - 20) * x / xmax  # noqa: E731
    py = lambda y: 20 + (H - 20 - B) * (hi - y) / ((hi - lo) or 1)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<line x1="{L}" y1="{py(1):.1f}" x2="{W - 20}" y2="{py(1):.1f}" stroke="#2ca02c" stroke-dasharray="3 3"/>',
           f'<line x1="{L}" y1="{py(0):.1f}" x2="{W - 20}" y2="{py(0):.1f}" stroke="#bbb"/>']
    if c.get("target_faithfulness") is not None:
        t = c["target_faithfulness"]
        out.append(f'<line x1="{L}" y1="{py(t):.1f}" x2="{W - 20}" y2="{py(t):.1f}" stroke="#d62728" '
                   f'stroke-dasharray="2 4"/><text x="{W - 20}" y="{py(t) - 3:.1f}" text-anchor="end" '
                   f'fill="#d62728">target {t}</text>')
    for k, (name, (colour, vals)) in enumerate(series.items()):
        if not vals:
            continue
        pts = " ".join(f"{px(x):.1f},{py(v):.1f}" for x, v in zip(xs, vals))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="3" fill="{colour}"><title>{n} edges: '
                f'{v:.3f}</title></circle>' for x, v, n in zip(xs, vals, cv["sizes"])]
        out.append(f'<text x="{L + 10}" y="{20 + 14 * k}" fill="{colour}">{name}</text>')
    for n, x in zip(cv["sizes"], xs):
        out.append(f'<text x="{px(x):.1f}" y="{H - B + 14}" text-anchor="middle">{n}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">circuit size (edges, log scale)</text>')
    out.append(f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" text-anchor="middle">faithfulness</text>')
    out.append(f'<text x="{L - 4}" y="{py(1) + 4:.1f}" text-anchor="end">1</text>'
               f'<text x="{L - 4}" y="{py(0) + 4:.1f}" text-anchor="end">0</text></svg>')
    return "".join(out)


def facts(c: dict) -> list[dict]:
    """Key/value rows: metric, faithfulness target, minimal size, settings to reproduce."""
    rows = [{"key": "task", "value": c["task"]}, {"key": "method", "value": c["method"]},
            {"key": "clean metric (logit diff)", "value": c["clean_metric"]},
            {"key": "corrupted metric", "value": c["corrupted_metric"]},
            {"key": "target faithfulness", "value": c["target_faithfulness"]},
            {"key": "minimal circuit (edges)", "value": _minimal(c)},
            {"key": "edges in the graph", "value": c["n_edges_total"]},
            {"key": "heads in the circuit", "value": circuit_heads(c)}]
    rows += [{"key": f"setting: {k}", "value": v} for k, v in c["settings"].items()]
    return rows


def _minimal(c: dict) -> str:
    n, total = c["minimal_circuit_edges"], c["n_edges_total"]
    if n is None:
        return f"none on the curve reaches {c['target_faithfulness']} (the full graph is shown)"
    return f"{n} (the full graph: no smaller circuit on the curve reaches the target)" if n == total else str(n)


def circuit_heads(c: dict, top: int = 15) -> str:
    """How many heads the shown circuit holds, the ``top`` of them by the |score| of their circuit
    edges first (a full-graph circuit would otherwise list every head in layer order)."""
    mass: dict[str, float] = {}
    for e in c["edges"]:
        for n in (e["source"], e["target"]):
            if n.startswith("a"):
                mass[n] = mass.get(n, 0.0) + abs(e["score"])
    heads = sorted(mass, key=lambda n: (-mass[n], _order(n)))
    if not heads:
        return "none"
    more = f"; {len(heads) - top} more" if len(heads) > top else ""
    return f"{len(heads)}, by |edge score| in the circuit: {', '.join(heads[:top])}{more}"


def edge_rows(c: dict, n: int = 25) -> list[dict]:
    return [{"edge": e["edge"], "input": e["qkv"] or "-", "score": e["score"]} for e in c["edges"][:n]]


def pair_rows(c: dict) -> list[dict]:
    return [{k: p.get(k, "") for k in ("clean", "corrupted", "answer", "wrong")} for p in c["example_pairs"]]
