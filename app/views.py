"""Pure functions behind the dashboard and the reports: tables, figures, comparisons, downsampling.

Nothing here imports Streamlit or torch, so every function is unit-tested on plain numpy input and
reused by ``headscope.app.report``. The app is generic over the analysis registry: a run is shown
from its ``run.json`` (``scores`` as [L, H] or [L, H_kv] matrices, ``score_meta``, ``summary``)
and its ``arrays.npz``; no analysis is special-cased here.

Conventions: heads are labelled ``L{layer}H{head}`` (``L{layer}KV{head}`` for KV-head scores);
token labels carry their position (``12·the``) because plotly merges equal category labels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas  # noqa: F401 - see below
import plotly.graph_objects as go
import scipy.stats

# plotly looks pandas up in sys.modules without importing it; if a background model load (which
# imports transformers -> pandas) is half-way through that import, plotly sees a partially
# initialised module and fails. Importing pandas here, before any thread starts, avoids the race.

from headscope.errors import HeadscopeError
from headscope.fmt import number
from headscope.heads import descending_rank, head_label, parse_head, ranked_heads  # noqa: F401 (re-exported)


def token_label(pos: int, tok: str) -> str:
    """Unique, visible label for a token on a plot axis (whitespace made visible, long tokens cut)."""
    vis = tok.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "␣")
    if len(vis) > 14:
        vis = vis[:13] + "…"
    return f"{pos}·{vis}"


# --------------------------------------------------------------------------- runs
def run_model(run) -> str:
    return str(run.meta.get("model", {}).get("id", "?"))


def matrix_scores(run) -> dict[str, np.ndarray]:
    """The run's 2-D (per-head) scores; other shapes are listed separately by the pages."""
    return {k: v for k, v in run.scores().items() if v.ndim == 2}


def run_rows(runs: Iterable) -> list[dict]:
    """One flat row per run for the runs table."""
    rows = []
    for r in runs:
        m = r.meta
        rows.append({
            "id": r.id,
            "analysis": r.analysis,
            "model": run_model(r),
            "status": r.status,
            "created": m.get("created", ""),
            "examples": m.get("n_examples"),
            "scores": ", ".join(m.get("scores", {}) or []),
            "run_s": (m.get("timings") or {}).get("run_s"),
            "error": m.get("error") or "",
        })
    return rows


def filter_runs(runs: Sequence, *, analysis: str | None = None, model: str | None = None,
                status: str | None = None, text: str = "") -> list:
    """Runs matching every given filter; ``text`` is a case-insensitive substring of id/analysis/model/config."""
    out = []
    needle = text.strip().lower()
    for r in runs:
        if analysis and r.analysis != analysis:
            continue
        if model and run_model(r) != model:
            continue
        if status and r.status != status:
            continue
        if needle:
            hay = " ".join([r.id, r.analysis, run_model(r), str(r.meta.get("config", ""))]).lower()
            if needle not in hay:
                continue
        out.append(r)
    return out


def scalar_summary(summary: dict | None) -> dict:
    """The scalar and short-list entries of a run summary (what fits in a metrics row)."""
    out = {}
    for k, v in (summary or {}).items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, list) and len(v) <= 10 and all(isinstance(x, (int, float, str)) for x in v):
            out[k] = ", ".join(map(number, v))   # no float noise in the metrics row
    return out


# --------------------------------------------------------------------------- head tables
def top_heads(scores: dict[str, np.ndarray], by: str, k: int | None = 20, *, ascending: bool = False,
              index: str = "query_head") -> list[dict]:
    """Rows ``{rank, head, layer, index, <by>, <other same-shape scores>...}`` sorted by ``by``.

    ``k=None`` keeps every head. Other scores are included only if they have the same shape,
    so a KV-head score is never lined up against query heads.
    """
    if by not in scores:
        raise HeadscopeError(f"no score {by!r}; have {', '.join(scores)}")
    main = np.asarray(scores[by], dtype=np.float64)
    if main.ndim != 2:
        raise HeadscopeError(f"score {by!r} is not per head (shape {main.shape})")
    others = {n: np.asarray(v) for n, v in scores.items() if n != by and np.shape(v) == main.shape}
    ranks = descending_rank(main)
    rows = []
    for l, h in ranked_heads(main, k, ascending=ascending):
        row = {"rank": int(ranks[l, h]), "head": head_label(l, h, index), "layer": l, "index": h,
               by: float(main[l, h])}
        row.update({n: float(v[l, h]) for n, v in others.items()})
        rows.append(row)
    return rows


def head_stats(scores: dict[str, np.ndarray], arrays: dict[str, np.ndarray], layer: int, head: int) -> list[dict]:
    """The head's value, rank, percentile (and spread, from ``<score>_std`` arrays) in every score."""
    out = []
    for name, m in scores.items():
        m = np.asarray(m, dtype=np.float64)
        if m.ndim != 2 or layer >= m.shape[0] or head >= m.shape[1]:
            continue
        v = m[layer, head]
        rank = int(descending_rank(m)[layer, head])
        row = {"score": name, "value": float(v), "rank": rank, "of": int(m.size),
               "percentile": float(100.0 * (m < v).sum() / m.size),
               "layer_mean": float(m[layer].mean()), "global_mean": float(m.mean())}
        std = arrays.get(f"{name}_std")
        if std is not None and np.shape(std) == m.shape:
            row["std_over_examples"] = float(std[layer, head])
        out.append(row)
    return out


def per_example_values(records: list[dict], arrays: dict[str, np.ndarray], score: str, shape: tuple,
                       layer: int, head: int) -> list[tuple[str, float]] | None:
    """The head's value in each example, if the run stored per-example head arrays.

    Looks for a ``score`` field of the score's shape in each ``examples.jsonl`` record, then for an
    ``arrays.npz`` entry of shape [N, L, H] named ``score`` or ``<score>_per_example``. Returns
    ``None`` when the run kept only the average (the page then offers to recompute).
    """
    vals = []
    for r in records:
        if r.get("skip"):
            continue
        v = r.get(score)
        if v is None:
            continue
        a = np.asarray(v, dtype=np.float64) if isinstance(v, list) else None
        if a is None or a.shape != tuple(shape):
            continue
        vals.append((str(r.get("id")), float(a[layer, head])))
    if vals:
        return vals
    for key in (f"{score}_per_example", score):
        a = arrays.get(key)
        if a is not None and a.ndim == 3 and tuple(a.shape[1:]) == tuple(shape):
            ids = [str(r.get("id")) for r in records if not r.get("skip")]
            if len(ids) != a.shape[0]:
                ids = [str(i) for i in range(a.shape[0])]
            return [(ids[i], float(a[i, layer, head])) for i in range(a.shape[0])]
    return None


# --------------------------------------------------------------------------- comparisons
def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties get average ranks); NaN if either side is constant."""
    return _corr(scipy.stats.spearmanr, a, b)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return _corr(scipy.stats.pearsonr, a, b)


def _corr(fn, a, b) -> float:
    a, b = np.ravel(a), np.ravel(b)
    if len(a) != len(b):
        raise HeadscopeError(f"cannot correlate {len(a)} values with {len(b)}")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(fn(a, b).statistic)


def top_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Fraction of the top-``k`` heads of ``a`` that are also in the top-``k`` of ``b``."""
    k = max(1, min(k, np.size(a)))
    ta, tb = (set(ranked_heads(np.reshape(m, (-1, np.shape(m)[-1])), k)) for m in (a, b))
    return len(ta & tb) / k


def comparable_scores(run_a, run_b) -> list[str]:
    """Score names present in both runs with the same shape (what a comparison can use)."""
    sa, sb = run_a.scores(), run_b.scores()
    return [n for n in sa if n in sb and sa[n].shape == sb[n].shape and sa[n].ndim == 2]


def compare_scores(a: np.ndarray, b: np.ndarray, k: int = 10) -> dict:
    """Difference (b - a) and agreement statistics of two score maps of one shape."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise HeadscopeError(f"score shapes differ: {a.shape} vs {b.shape} (different models?)")
    d = b - a
    return {"diff": d, "spearman": spearman(a, b), "pearson": pearson(a, b),
            f"top{k}_overlap": top_overlap(a, b, k), "max_abs_diff": float(np.abs(d).max()),
            "mean_abs_diff": float(np.abs(d).mean())}


# --------------------------------------------------------------------------- figures
def heatmap_figure(scores: np.ndarray, title: str = "", *, meta: dict | None = None,
                   index: str | None = None, colorscale: str = "Viridis", zmid: float | None = None,
                   height: int | None = None) -> go.Figure:
    """Layer x head heatmap; hover shows the head, its value, rank and (for GQA) its KV group."""
    m = np.asarray(scores, dtype=np.float64)
    if m.ndim != 2:
        raise HeadscopeError(f"heatmap needs a [layers, heads] matrix, got shape {m.shape}")
    meta = meta or {}
    index = index or meta.get("index", "query_head")
    L, H = m.shape
    ranks = descending_rank(m)
    labels = np.array([[head_label(l, h, index) for h in range(H)] for l in range(L)])
    custom = np.dstack([labels, ranks.astype(str)])
    unit = "KV head" if index == "kv_head" else "head"
    fig = go.Figure(go.Heatmap(
        z=m, x=list(range(H)), y=list(range(L)), customdata=custom, colorscale=colorscale,
        zmid=zmid, colorbar={"title": {"text": "value"}},
        hovertemplate=("%{customdata[0]}<br>layer %{y}, " + unit + " %{x}<br>value %{z:.4g}"
                       "<br>rank %{customdata[1]} of " + str(m.size) + "<extra></extra>")))
    sub = meta.get("description", "")
    fig.update_layout(
        title={"text": f"{title}<br><sup>{sub}</sup>" if sub else title},
        xaxis={"title": {"text": unit}, "dtick": 1 if H <= 32 else None},
        yaxis={"title": {"text": "layer"}, "autorange": "reversed", "dtick": 1 if L <= 40 else None},
        height=height or max(320, min(900, 60 + 18 * L)), margin={"l": 50, "r": 20, "t": 70, "b": 40})
    return fig


def diff_figure(diff: np.ndarray, title: str = "difference", index: str = "query_head") -> go.Figure:
    """Signed difference heatmap centred on 0 (red = higher in the second run)."""
    lim = float(np.abs(diff).max()) or 1.0
    fig = heatmap_figure(diff, title, index=index, colorscale="RdBu_r", zmid=0.0)
    fig.update_traces(zmin=-lim, zmax=lim)
    return fig


def bar_figure(values: np.ndarray, title: str, xlabel: str = "layer") -> go.Figure:
    v = np.asarray(values, dtype=np.float64).ravel()
    fig = go.Figure(go.Bar(x=list(range(len(v))), y=v))
    fig.update_layout(title={"text": title}, xaxis={"title": {"text": xlabel}}, height=320,
                      margin={"l": 50, "r": 20, "t": 50, "b": 40})
    return fig


def series_figure(series: dict[str, np.ndarray], tokens: Sequence[str] | None = None, title: str = "",
                  marks: dict[str, Sequence[int]] | None = None, max_points: int = 4000) -> go.Figure:
    """Per-token series (e.g. FAI, WAAD) over positions, one panel each (their scales differ);
    hover shows the token.

    Series longer than ``max_points`` are thinned by block max so peaks survive; ``marks`` draws
    vertical lines at the given positions (e.g. sink tokens).
    """
    from plotly.subplots import make_subplots
    fig = make_subplots(rows=len(series), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=list(series))
    for row, (name, s) in enumerate(series.items(), 1):
        s = np.asarray(s, dtype=np.float64).ravel()
        x = np.arange(len(s))
        if len(s) > max_points:
            b = math.ceil(len(s) / max_points)
            x = np.arange(0, len(s), b)
            s = np.maximum.reduceat(s, x)
        text = [tokens[i] if tokens is not None and i < len(tokens) else "" for i in x]
        fig.add_trace(go.Scatter(x=x, y=s, mode="lines", name=name, text=text,
                                 hovertemplate="pos %{x} %{text}<br>%{y:.4g}<extra>" + name + "</extra>"),
                      row=row, col=1)
    for label, positions in (marks or {}).items():
        for p in positions:
            fig.add_vline(x=p, line={"color": "crimson", "dash": "dot", "width": 1})
        if positions:  # one legend entry per mark kind
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=label,
                                     line={"color": "crimson", "dash": "dot"}), row=1, col=1)
    fig.update_xaxes(title={"text": "token position"}, row=len(series), col=1)
    fig.update_layout(title={"text": title}, height=160 + 180 * len(series),
                      margin={"l": 50, "r": 20, "t": 70, "b": 40})
    return fig


def values_figure(values: list[tuple[str, float]], title: str) -> go.Figure:
    """A head's value per example: unconnected points (examples are independent), the mean and the
    spread (mean ± std), y ticks in plain significant digits (no SI prefixes such as '250p')."""
    ids = [i for i, _ in values]
    v = np.array([x for _, x in values], dtype=np.float64)
    fig = go.Figure(go.Scatter(x=ids, y=v, mode="markers", name="per example",
                               hovertemplate="%{x}: %{y:.4g}<extra></extra>"))
    mean, std = float(v.mean()), float(v.std())
    if std > 0:
        fig.add_hrect(y0=mean - std, y1=mean + std, fillcolor="gray", opacity=0.12, line_width=0)
    fig.add_hline(y=mean, line={"dash": "dash"}, annotation_text=f"mean {mean:.3g} ± {std:.2g} (std)")
    fig.update_layout(title={"text": title}, xaxis={"title": {"text": "example"}, "type": "category"},
                      yaxis={"tickformat": ".3~g"}, height=320, margin={"l": 50, "r": 20, "t": 50, "b": 40})
    return fig


# --------------------------------------------------------------------------- attention patterns
@dataclass
class Downsampled:
    """A pooled attention pattern: ``mat[i, j]`` covers queries ``q_edges[i]:q_edges[i+1]`` and keys
    ``k_edges[j]:k_edges[j+1]``; key bins hold the *summed* mass (rows still sum to 1), query bins
    the mean row."""

    mat: np.ndarray
    q_edges: np.ndarray
    k_edges: np.ndarray

    @property
    def pooled(self) -> bool:
        return bool(np.any(np.diff(self.q_edges) > 1) or np.any(np.diff(self.k_edges) > 1))

    def labels(self, tokens: Sequence[str], axis: str, q_offset: int = 0) -> list[str]:
        edges = self.q_edges + q_offset if axis == "q" else self.k_edges
        out = []
        for a, b in zip(edges[:-1], edges[1:]):
            out.append(token_label(int(a), tokens[a]) if b - a == 1 else f"{a}–{b - 1}")
        return out


def _edges(n: int, max_bins: int, keep_first: int) -> np.ndarray:
    """Bin edges over ``range(n)``: the first ``keep_first`` positions alone, the rest in equal bins."""
    if n <= max_bins:
        return np.arange(n + 1)
    keep = min(keep_first, max_bins // 4, n)
    rest = np.linspace(keep, n, max_bins - keep + 1).round().astype(int)
    return np.unique(np.concatenate([np.arange(keep), rest]))


def downsample_pattern(pattern: np.ndarray, max_q: int = 160, max_k: int = 160, keep_first: int = 4,
                       q_start: int = 0) -> Downsampled:
    """Pool a pattern ``[Tq, Tk]`` (rows of queries ``q_start..``) to at most ``max_q x max_k`` cells.

    Why these choices: key bins *sum* attention so each displayed row still sums to one and a
    diffuse head does not look empty; query bins *average* rows; the first ``keep_first`` keys (the
    usual sink tokens, BOS) stay unpooled so a sink column is never smeared into its neighbours.
    Patterns that already fit are returned unchanged.
    """
    p = np.asarray(pattern, dtype=np.float64)
    if p.ndim != 2:
        raise HeadscopeError(f"pattern must be [queries, keys], got shape {p.shape}")
    Tq, Tk = p.shape
    qe = _edges(Tq, max_q, 0)
    ke = _edges(Tk, max_k, keep_first)
    cols = np.add.reduceat(p, ke[:-1], axis=1)                 # [Tq, nk] summed mass
    rows = np.add.reduceat(cols, qe[:-1], axis=0) / np.diff(qe)[:, None]  # [nq, nk] mean rows
    return Downsampled(rows, qe, ke)


def stored_pattern_labels(info: dict) -> tuple[list[str], str]:
    """(token labels, title) of a run's stored example pattern (``run.json["example_pattern"]``,
    written by ``analyses.base.example_pattern``); positions stand in for tokens a long input did
    not keep."""
    a, T = info["rows"]
    tokens = info.get("tokens") or [f"#{i}" for i in range(T)]
    value = "" if info.get("value") is None else f", {number(info['value'])}"
    return tokens, f"{info['head']} (top by {info['score']}{value}) on example {info['example']}, queries {a}-{T - 1}"


def pattern_stats(pattern: np.ndarray, q_start: int = 0) -> dict:
    """Summary of pattern rows ``[R, T]`` for queries ``q_start..``: mean entropy (nats), mean
    query-key distance, mean attention on key 0, and the key with the most attention in total."""
    p = np.asarray(pattern, dtype=np.float64)
    t = np.arange(q_start, q_start + p.shape[0])[:, None]
    s = np.arange(p.shape[1])[None, :]
    ent = -(p * np.log(np.where(p > 0, p, 1.0))).sum(1)
    return {"entropy": float(ent.mean()), "mean_distance": float((p * np.clip(t - s, 0, None)).sum(1).mean()),
            "first_key_mass": float(p[:, 0].mean()), "top_key": int(p.sum(0).argmax())}


def pattern_figure(ds: Downsampled, tokens: Sequence[str], *, q_offset: int = 0, title: str = "",
                   sink_positions: Iterable[int] = (), height: int = 520) -> go.Figure:
    """Heatmap of a (possibly pooled) pattern; key bins containing a sink token are marked on the axis."""
    qlab = ds.labels(tokens, "q", q_offset)
    klab = ds.labels(tokens, "k")
    fig = go.Figure(go.Heatmap(z=ds.mat, x=klab, y=qlab, colorscale="Blues", zmin=0,
                               hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra></extra>"))
    sinks = set(int(s) for s in sink_positions)
    for j, (a, b) in enumerate(zip(ds.k_edges[:-1], ds.k_edges[1:])):
        if any(a <= s < b for s in sinks):
            fig.add_vrect(x0=j - 0.5, x1=j + 0.5, line={"color": "crimson", "width": 1.5}, fillcolor="rgba(0,0,0,0)")
    fig.update_layout(title={"text": title + (" (pooled)" if ds.pooled else "")},
                      xaxis={"title": {"text": "key"}, "type": "category", "tickangle": -60},
                      yaxis={"title": {"text": "query"}, "type": "category", "autorange": "reversed"},
                      height=height, margin={"l": 90, "r": 20, "t": 50, "b": 90})
    return fig


def sink_rate(alpha: np.ndarray, eps: float = 0.3, eligible: np.ndarray | None = None) -> np.ndarray:
    """Per key position: percent of heads with alpha > eps (Gu's Sink^eps_k, ``analyses.sinks.sink_rates``).

    ``eligible`` [T] (bool) zeroes keys that too few queries see: the last keys' alpha averages a
    handful of rows (the very last one a single diagonal entry), so it says nothing about sinks.
    Imports the sinks analysis (and torch) on first use; the rest of this module stays torch-free.
    """
    from headscope.analyses.sinks import sink_rates
    rate = sink_rates(alpha, eps)
    return rate if eligible is None else np.where(eligible, rate, 0.0)


def sink_positions(alpha: np.ndarray, eps: float = 0.3, min_frac: float = 0.0,
                   eligible: np.ndarray | None = None) -> list[int]:
    """Key positions that are a sink (alpha > ``eps``) in more than ``min_frac`` of the heads given.

    ``alpha`` is [heads..., T] (any leading shape); with ``min_frac=0`` one head suffices.
    ``eligible`` as in ``sink_rate``.
    """
    frac = sink_rate(alpha, eps, eligible) / 100.0
    return [int(i) for i in np.nonzero(frac > min_frac)[0]]


def sink_eligible(count: np.ndarray, min_queries: int | None = None) -> np.ndarray:
    """Keys seen by at least ``min_queries`` queries (default: a quarter of the prompt, at least 4)."""
    c = np.asarray(count)
    need = max(4, len(c) // 4) if min_queries is None else min_queries
    return c >= min(need, c.max(initial=0))


def top_attended(alpha_head: np.ndarray, tokens: Sequence[str], k: int = 10,
                 top1_idx: np.ndarray | None = None) -> list[dict]:
    """A head's most attended keys: mean attention received, and how often the key is a query's top-1."""
    a = np.asarray(alpha_head, dtype=np.float64).ravel()
    order = np.argsort(-a, kind="mergesort")[:k]
    counts = np.bincount(np.asarray(top1_idx).ravel(), minlength=len(a)) if top1_idx is not None else None
    rows = []
    for i in order:
        row = {"position": int(i), "token": tokens[i] if i < len(tokens) else "", "mean_attention": float(a[i])}
        if counts is not None:
            row["top1_count"] = int(counts[i])
        rows.append(row)
    return rows


def tokens_html(tokens: Sequence[str], weights: np.ndarray | None = None, highlight: Iterable[int] = (),
                max_tokens: int = 2000) -> str:
    """Tokens as inline HTML spans, shaded by ``weights`` in [0, 1] and boxed red when in ``highlight``."""
    import html as _html
    hl = set(int(i) for i in highlight)
    w = None if weights is None else np.clip(np.asarray(weights, dtype=np.float64), 0, 1)
    parts = []
    for i, t in enumerate(tokens[:max_tokens]):
        style = "padding:0 1px;border-radius:3px;"
        if w is not None and i < len(w):
            style += f"background:rgba(31,119,180,{w[i]:.2f});"
        if i in hl:
            style += "outline:2px solid crimson;"
        parts.append(f'<span title="{i}" style="{style}">{_html.escape(t).replace(chr(10), "⏎")}</span>')
    if len(tokens) > max_tokens:
        parts.append(f" … ({len(tokens) - max_tokens} more tokens)")
    return '<div style="font-family:monospace;line-height:1.9;white-space:pre-wrap">' + "".join(parts) + "</div>"


# --------------------------------------------------------------------------- next-token distributions
def softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def distribution_change(p_before: np.ndarray, p_after: np.ndarray, decode, k: int = 10) -> list[dict]:
    """Top tokens of either distribution with their probability before/after and the change.

    ``decode(token_id) -> str``. The union of both top-``k`` sets is shown, so a token the
    intervention promotes appears even if it was unlikely before.
    """
    pb, pa = np.asarray(p_before, dtype=np.float64), np.asarray(p_after, dtype=np.float64)
    ids = list(dict.fromkeys(np.argsort(-pb)[:k].tolist() + np.argsort(-pa)[:k].tolist()))
    rows = [{"token_id": int(i), "token": decode(int(i)), "p_before": float(pb[i]), "p_after": float(pa[i]),
             "change": float(pa[i] - pb[i])} for i in ids]
    return sorted(rows, key=lambda r: -max(r["p_before"], r["p_after"]))


def distribution_figure(rows: list[dict], title: str = "next-token distribution") -> go.Figure:
    labels = [token_label(r["token_id"], r["token"]) for r in rows]
    fig = go.Figure([go.Bar(name="before", x=labels, y=[r["p_before"] for r in rows]),
                     go.Bar(name="after", x=labels, y=[r["p_after"] for r in rows])])
    fig.update_layout(barmode="group", title={"text": title}, yaxis={"title": {"text": "probability"}},
                      xaxis={"type": "category"}, height=360, margin={"l": 50, "r": 20, "t": 50, "b": 80})
    return fig
