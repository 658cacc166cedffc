"""Small static SVG figures for Markdown reports, dependency-free.

Plotly's static export needs kaleido plus a Chrome build, which an offline machine may lack; a
layer x head heatmap and a circuit diagram are simple enough to write as SVG directly. The
output is plain text, so it diffs, opens in any browser and renders in Markdown viewers.
"""
from __future__ import annotations

from html import escape

import numpy as np

# viridis sampled at 10 points; linear interpolation between them is visually indistinguishable
_VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58",
            "#b5de2b", "#fde725"]

ROLE_COLORS = {"induction": "#1f77b4", "previous-token": "#17becf", "duplicate-token": "#9edae5",
               "retrieval": "#2ca02c", "safety": "#d62728", "sink": "#7f7f7f", "global": "#9467bd",
               "local": "#c5b0d5", "vision": "#ff7f0e"}


def _hex(c: str) -> np.ndarray:
    return np.array([int(c[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float64)


def _xml(text: str) -> str:
    """``text`` escaped for SVG, control characters (byte tokens such as '\x1a', not allowed in XML)
    written as escapes."""
    return escape("".join(c if c >= " " or c in "\t\n\r" else f"\\x{ord(c):02x}" for c in str(text)))


def viridis(t: float) -> str:
    """Colour for ``t`` in [0, 1] (clipped; NaN -> light grey)."""
    if not np.isfinite(t):
        return "#dddddd"
    t = min(max(float(t), 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    c = _hex(_VIRIDIS[i]) * (1 - (t - i)) + _hex(_VIRIDIS[i + 1]) * (t - i)
    return "#" + "".join(f"{int(round(x)):02x}" for x in c)


def role_color(role: str) -> str:
    return ROLE_COLORS.get(role, "#8c564b")


def heatmap_svg(m: np.ndarray, title: str = "", *, unit: str = "head", ylabel: str = "layer",
                cell: int | None = None, x_ticks: list[str] | None = None, y_ticks: list[str] | None = None) -> str:
    """A rows x columns heatmap (default: layer x head) with axis ticks, a colour bar and per-cell
    tooltips; ``x_ticks`` / ``y_ticks`` label the columns / rows (e.g. tokens) instead of indices."""
    m = np.asarray(m, dtype=np.float64)
    L, H = m.shape
    xt = x_ticks or [str(i) for i in range(H)]
    yt = y_ticks or [str(i) for i in range(L)]
    cell = cell or max(6, min(22, 480 // max(H, 1), 600 // max(L, 1)))
    left = 44 if y_ticks is None else 12 + 6 * min(24, max(map(len, yt)))
    top, right = 34, 70
    bottom = 30 if x_ticks is None else 24 + 5 * min(24, max(map(len, xt)))
    w, h = left + H * cell + right, top + L * cell + bottom
    finite = m[np.isfinite(m)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    span = hi - lo or 1.0
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           f'font-family="sans-serif" font-size="10">',
           f'<text x="{left}" y="14" font-size="12" font-weight="bold">{_xml(title)}</text>']
    for l in range(L):
        for hh in range(H):
            v = m[l, hh]
            tip = f"L{l} {unit} {hh}" if y_ticks is None else f"{ylabel} {yt[l]}, {unit} {xt[hh]}"
            out.append(f'<rect x="{left + hh * cell}" y="{top + l * cell}" width="{cell}" height="{cell}" '
                       f'fill="{viridis((v - lo) / span)}"><title>{_xml(tip)}: {v:.4g}</title></rect>')
    step_l = max(1, L // (15 if y_ticks is None else 24))
    for l in range(0, L, step_l):
        out.append(f'<text x="{left - 4}" y="{top + l * cell + cell * 0.75}" text-anchor="end">'
                   f'{_xml(yt[l][:24])}</text>')
    step_h = max(1, H // (20 if x_ticks is None else 32))
    for hh in range(0, H, step_h):
        x, y = left + hh * cell + cell / 2, top + L * cell + 12
        rot = "" if x_ticks is None else f' transform="rotate(-60 {x} {y})"'
        out.append(f'<text x="{x}" y="{y}" text-anchor="{"middle" if x_ticks is None else "end"}"{rot}>'
                   f'{_xml(xt[hh][:24])}</text>')
    out.append(f'<text x="{left + H * cell / 2}" y="{h - 4}" text-anchor="middle">{unit}</text>')
    out.append(f'<text x="10" y="{top + L * cell / 2}" transform="rotate(-90 10 {top + L * cell / 2})" '
               f'text-anchor="middle">{escape(ylabel)}</text>')
    # colour bar
    bx, bh = left + H * cell + 12, L * cell
    for i in range(20):
        out.append(f'<rect x="{bx}" y="{top + bh * (19 - i) / 20:.1f}" width="12" height="{bh / 20 + 0.5:.1f}" '
                   f'fill="{viridis(i / 19)}"/>')
    out.append(f'<text x="{bx + 15}" y="{top + 8}">{hi:.3g}</text>')
    out.append(f'<text x="{bx + 15}" y="{top + bh}">{lo:.3g}</text>')
    out.append("</svg>")
    return "\n".join(out)


def circuit_svg(nodes: list[dict], n_layers: int, n_heads: int, title: str = "", *, role_of) -> str:
    """Heads with roles on a layer (x) x head (y) grid, coloured by ``role_of(node)``, labelled
    with every role and effect annotation (tooltips)."""
    cw, ch = max(16, min(40, 900 // max(n_layers, 1))), 22
    left, top = 40, 34
    roles = sorted({role_of(n) for n in nodes})
    w = left + n_layers * cw + 260  # room for the legend
    h = top + max(n_heads * ch, 20 * len(roles) + 10) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           f'font-family="sans-serif" font-size="10">',
           f'<text x="{left}" y="14" font-size="12" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{n_layers * cw}" height="{n_heads * ch}" fill="#f7f7f7" stroke="#ccc"/>']
    for l in range(0, n_layers, max(1, n_layers // 15)):
        out.append(f'<text x="{left + l * cw + cw / 2}" y="{top + n_heads * ch + 12}" text-anchor="middle">{l}</text>')
    for hh in range(n_heads):
        out.append(f'<text x="{left - 4}" y="{top + hh * ch + ch * 0.65}" text-anchor="end">{hh}</text>')
    out.append(f'<text x="{left + n_layers * cw / 2}" y="{top + n_heads * ch + 26}" text-anchor="middle">layer</text>')
    for n in nodes:
        cx, cy = left + n["layer"] * cw + cw / 2, top + n["head_index"] * ch + ch / 2
        tip = "; ".join([f'{r["role"]} ({r["score"]}={r["value"]:.3g})' for r in n["roles"]] +
                        [f'{e["kind"]}: {e["metric"]}={e["value"]:.3g}' for e in n.get("effects", [])])
        ring = ' stroke="black" stroke-width="2"' if n.get("effects") else ""
        out.append(f'<circle cx="{cx}" cy="{cy}" r="{min(cw, ch) / 2 - 2}" fill="{role_color(role_of(n))}"{ring}>'
                   f'<title>{escape(n["head"])}: {escape(tip)}</title></circle>')
        if len(nodes) <= 60:  # a static figure has no hover: name the heads
            out.append(f'<text x="{cx + min(cw, ch) / 2}" y="{cy - ch / 2 + 7}" '
                       f'font-size="8">{escape(n["head"])}</text>')
    lx = left + n_layers * cw + 14
    for i, role in enumerate(roles):
        out.append(f'<circle cx="{lx + 6}" cy="{top + 10 + 20 * i}" r="6" fill="{role_color(role)}"/>'
                   f'<text x="{lx + 16}" y="{top + 14 + 20 * i}">{escape(role)}</text>')
    out.append(f'<text x="{lx}" y="{top + 14 + 20 * len(roles)}">ringed = has an ablation/patching effect</text>')
    out.append("</svg>")
    return "\n".join(out)
