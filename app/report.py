"""Circuit reports: ``headscope report RUN... --format html|md|json`` and the dashboard's export.

One data model (``build_report``) is rendered three ways:

- **json**: machine-readable; validated against ``report_schema.json`` (shipped beside this file)
  before it is written, so a consumer can rely on the shape;
- **html**: one self-contained file, plotly.js inlined once (no CDN, opens offline);
- **md**: Markdown plus a ``<name>_files/`` folder of SVG figures drawn by ``headscope.app.svg``
  (no kaleido/Chrome needed).

Several runs of one model combine into a head-level *role map* (the report's "Head roles"): every
head that stands out in some score becomes a node carrying its roles (induction, retrieval, safety,
sink, global/local, ...), and ablation/patching effects (effect-type scores, interventions saved
from the dashboard) are attached to the heads as annotations. Runs of different models give one
map per model. A ``circuit`` run adds its edge-level circuit (``circuit_report``).
"""
from __future__ import annotations

import datetime as _dt
import functools
import html
import io
import json
import math
import re
import shlex
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import plotly.graph_objects as go

from headscope.errors import HeadscopeError
from headscope.fmt import number
from headscope.heads import ranked_heads

from . import circuit_report, svg
from .views import (Downsampled, descending_rank, downsample_pattern, head_label, heatmap_figure, parse_head,
                    pattern_figure, run_model, scalar_summary, stored_pattern_labels, top_heads)

SCHEMA_ID = "headscope.report/2"
SCHEMA_PATH = Path(__file__).with_name("report_schema.json")
FORMATS = ("html", "md", "json")
TOP_K = 10          # top heads listed per score
ROLE_TOP_K = 5      # heads taking a role from a score that has no threshold

# a score's role: by score name first, then by analysis; otherwise the score name itself
ROLE_BY_SCORE = {"induction": "induction", "previous_token": "previous-token", "duplicate_token": "duplicate-token",
                 "local_freq": "local", "global_freq": "global"}
ROLE_BY_ANALYSIS = {"retrieval": "retrieval", "ships": "safety", "gships": "safety", "sahara": "safety",
                    "sinks": "sink", "vhd": "vision", "chd": "context"}
# a score whose description says it measures ablating/patching the head is an effect (Ships' KL,
# generalized Ships' angle, ...); its top heads get it as an annotation
EFFECT_WORDS = ("ablat", "patch", "knock")


# --------------------------------------------------------------------------- data model
def _jsonable(x):
    """``x`` as strict JSON data: NaN/inf -> None (JSON has no NaN), numpy -> Python, other -> str."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def _version() -> str:
    from headscope import __version__
    return __version__


def _is_span(name: str, meta: dict) -> bool:
    text = (name + " " + meta.get("description", "") + " " + meta.get("higher_is", "")).lower()
    return "span" in name.lower() or ("global" in text and "local" in text)


def _is_effect(name: str, meta: dict) -> bool:
    text = (name + " " + meta.get("description", "")).lower()
    return "rank" not in name.lower() and any(w in text for w in EFFECT_WORDS)


def _role_heads(name: str, analysis: str, m: np.ndarray, meta: dict) -> list[tuple[str, int, int]]:
    """(role, layer, head) for the heads that stand out in score ``m``.

    A threshold in the score's metadata decides when present; otherwise the top ``ROLE_TOP_K``
    with a positive value (so a group-membership score such as Sahara's step, 0 = not selected,
    names only members). Span-type scores (FAI head span) give ``global`` to the longest and
    ``local`` to the shortest. Rank-type scores (lower is better) give no role.
    """
    if "rank" in name.lower():
        return []
    if _is_span(name, meta):
        return ([("global", l, h) for l, h in ranked_heads(m, ROLE_TOP_K, finite=True)] +
                [("local", l, h) for l, h in ranked_heads(m, ROLE_TOP_K, ascending=True, finite=True)])
    role = ROLE_BY_SCORE.get(name) or ROLE_BY_ANALYSIS.get(analysis) or name
    thr = meta.get("threshold")
    if thr is not None:
        return [(role, l, h) for l, h in ranked_heads(m, finite=True) if m[l, h] >= thr]
    return [(role, l, h) for l, h in ranked_heads(m, ROLE_TOP_K, finite=True) if m[l, h] > 0]


def reproduce_command(meta: dict) -> str | None:
    """The ``headscope score NAME --model M --flag value ...`` line that re-runs the analysis stored
    in run.json ``meta``: every option in its config is spelled out (defaults too, so a later change
    of a default cannot change the re-run). None for a run no analysis made (e.g. interventions
    saved by the dashboard). A relative ``--data`` path is relative to where the run was started;
    the report lists the data's sha256 (and the weights' digest) beside it."""
    from headscope.analyses.base import list_analyses
    cls = list_analyses().get(meta.get("analysis"))
    if cls is None:
        return None
    cfg = meta.get("config") or {}
    model = meta.get("model") or {}
    # a local folder by its absolute path (the name is as typed, relative to where the run started)
    name = model.get("path") if model.get("source") == "path" else model.get("name") or model.get("id")
    argv = ["headscope", "score", cls.name, "--model", str(name)]
    if cls.takes_data and cfg.get("data") is not None:
        argv += ["--data", str(cfg["data"])]
    for o in cls.all_options():
        v = cfg.get(o.name)
        if v is None:
            continue
        if isinstance(v, bool):
            v = "true" if v else "false"
        argv += [o.flag, str(v)]  # str(float) keeps every digit: the re-run gets the same value
    return shlex.join(argv)


def model_source(info: dict) -> dict:
    """Where a run's model came from (run.json ``model``): registry name, hub repo id, the GGUF file
    and its quantisation (read off the registry entry; None for a local folder or a GGUF whose file
    name does not say), parameter count and dtype the analysis ran in."""
    from headscope.probe.models import REGISTRY
    spec = REGISTRY.get(info.get("name")) if info.get("source") == "registry" else None
    gguf = quant = None
    if spec is not None:  # a split GGUF's parts are named <file>.partNN
        gguf = Path(re.sub(r"\.part\d+$", "", spec.parts[0].relpath)).name
        found = re.search(r"(?<![A-Za-z0-9])(Q\d(_[A-Z0-9]+)*|F16|F32|BF16)(?![A-Za-z0-9])", gguf, re.I)
        quant = found.group(1).upper() if found else None
    return {"registry": spec.name if spec else None, "source": info.get("source"),
            "repo_id": info.get("hf_id") or (spec.hf_id if spec else None),
            "gguf": gguf if gguf and gguf.endswith(".gguf") else None, "quantization": quant,
            "registry_description": spec.description if spec else None, "path": info.get("path"),
            "n_params": info.get("n_params"), "dtype": info.get("dtype")}


def _spread(records: Callable[[], list[dict]], arrays: dict, name: str,
            shape: tuple) -> tuple[np.ndarray | None, str | None]:
    """(std over examples, where it came from) for score ``name``: the run's ``<name>_std`` array,
    else the population std of the per-example values its examples.jsonl records (``records()``,
    read when first needed); (None, None) when the run keeps neither."""
    std = arrays.get(f"{name}_std")
    if std is not None and std.shape == shape:
        return np.asarray(std, dtype=np.float64), "stored std array"
    per = [np.asarray(r[name], dtype=np.float64) for r in records()
           if not r.get("skip") and isinstance(r.get(name), list)]
    per = [p for p in per if p.shape == shape]
    if len(per) >= 2:
        return np.stack(per).std(axis=0), f"std over {len(per)} stored examples"
    return None, None


def _example_pattern(run, arrays: dict) -> dict | None:
    """The run's stored example pattern (``analyses.base.example_pattern``), pooled to at most 48
    query x 96 key cells for display; ``{"skipped": why}`` as stored; None for runs older than it."""
    info = run.meta.get("example_pattern")
    rows = arrays.get("example_pattern") if info and "skipped" not in info else None
    if rows is None:
        return {"skipped": str(info["skipped"])} if info and "skipped" in info else None
    ds = downsample_pattern(rows, max_q=48, max_k=96, q_start=info["rows"][0])
    return {**_jsonable(info), "mat": _jsonable(ds.mat), "q_edges": ds.q_edges.tolist(), "k_edges": ds.k_edges.tolist()}


def pattern_view(p: dict) -> tuple[Downsampled, list[str], str]:
    """(pooled pattern, token labels, title) of a report entry's ``example_pattern``."""
    ds = Downsampled(np.array(p["mat"], dtype=np.float64), np.array(p["q_edges"]), np.array(p["k_edges"]))
    return (ds, *stored_pattern_labels(p))


def fmt_value(v, std=None) -> str:
    """``v`` to its precision (``headscope.fmt.number``, with ``± std`` when there is a spread); "" for None."""
    return "" if v is None else number(v, std=std)


def _headline(entry: dict) -> list[str]:
    """One sentence per per-head score: the top head, its spread, and how many heads pass the threshold."""
    out = []
    for name, s in entry["scores"].items():
        if not s["top_heads"]:
            continue
        top = s["top_heads"][0]
        line = f"{name}: top {top['head']} = {fmt_value(top['value'], top['std'])}"
        if s["threshold"] is not None:
            vals = np.array(s["values"], dtype=np.float64)
            n_above = int(np.sum(np.nan_to_num(vals, nan=-np.inf) >= s["threshold"]))
            line += f"; {n_above} of {vals.size} heads ≥ threshold {fmt_value(s['threshold'])}"
        out.append(line)
    return out


def _run_entry(run, arrays: dict) -> dict:
    """The report's entry of ``run``; ``arrays``: its arrays.npz, read once by the caller (every
    score's spread, the example pattern and a circuit run's edges come from it)."""
    m = run.meta
    records = functools.cache(run.examples)   # examples.jsonl: read at most once, when a spread needs it
    scores_out = {}
    smeta = m.get("score_meta", {}) or {}
    for name, arr in run.scores().items():
        meta = smeta.get(name, {}) or {}
        std, spread = _spread(records, arrays, name, arr.shape) if arr.ndim == 2 else (None, None)
        entry = {"shape": list(arr.shape), "index": meta.get("index", "query_head"),
                 "description": meta.get("description", ""), "higher_is": meta.get("higher_is", ""),
                 "threshold": meta.get("threshold"), "values": _jsonable(arr), "std": _jsonable(std),
                 "spread": spread, "top_heads": []}
        if arr.ndim == 2:
            rows = top_heads({name: np.nan_to_num(arr, nan=-np.inf)}, name, TOP_K, index=entry["index"])
            entry["top_heads"] = [{k: r[k] for k in ("rank", "head", "layer", "index")} |
                                  {"value": r[name],
                                   "std": None if std is None else _jsonable(std[r["layer"], r["index"]])}
                                  for r in rows if math.isfinite(r[name])]
        scores_out[name] = entry
    out = {
        "id": run.id, "analysis": run.analysis, "status": run.status, "created": m.get("created"),
        "model": run_model(run), "model_source": _jsonable(model_source(m.get("model") or {})),
        "command": reproduce_command(m), "inputs": _jsonable(m.get("inputs") or {}),
        "config": _jsonable(m.get("config", {})),
        "versions": _jsonable(m.get("versions", {})), "timings": _jsonable(m.get("timings", {})),
        "n_examples": m.get("n_examples"), "n_used": m.get("n_used"),
        "error": m.get("error"), "summary": _jsonable(m.get("summary") or {}),
        "scores": scores_out, "arrays": {k: list(v) for k, v in (m.get("array_shapes") or {}).items()},
        "example_pattern": _example_pattern(run, arrays),
    }
    out["headline"] = _headline(out)
    return out


def _interventions(run) -> list[dict]:
    """Interventions a run records (the dashboard saves them as ``meta['interventions']``)."""
    out = []
    for it in run.meta.get("interventions", []) or []:
        out.append({"run": run.id, "model": run_model(run), "heads": list(it.get("heads", [])),
                    "kind": str(it.get("kind", "")), "prompt": str(it.get("prompt", "")),
                    "metrics": {k: v for k, v in (it.get("metrics") or {}).items()
                                if isinstance(v, (int, float)) and math.isfinite(v)},
                    "details": _jsonable({k: v for k, v in it.items()
                                          if k not in ("heads", "kind", "prompt", "metrics")})})
    return out


def build_circuit(runs: list, model: str) -> dict:
    """The head-role map of ``runs`` (all of ``model``): nodes with roles and effects. The edge-level
    circuit of a ``circuit`` run is ``circuit_report.edge_circuit``."""
    info = {}
    nodes: dict[tuple[int, int], dict] = {}

    def node(l, h):
        return nodes.setdefault((l, h), {"head": head_label(l, h), "layer": l, "head_index": h,
                                         "roles": [], "effects": []})
    for run in runs:
        info = info or run.meta.get("model", {})
        smeta = run.meta.get("score_meta", {}) or {}
        for name, m in run.scores().items():
            meta = smeta.get(name, {}) or {}
            if m.ndim != 2 or meta.get("index", "query_head") != "query_head":
                continue  # KV-head scores would need pooling onto query heads; listed per run instead
            ranks = descending_rank(np.nan_to_num(m, nan=-np.inf))
            if _is_effect(name, meta):
                for l, h in ranked_heads(m, ROLE_TOP_K):
                    if math.isfinite(m[l, h]) and m[l, h] > 0:
                        node(l, h)["effects"].append({"run": run.id, "kind": "ablation score", "metric": name,
                                                      "value": float(m[l, h])})
            for role, l, h in _role_heads(name, run.analysis, m, meta):
                node(l, h)["roles"].append({"role": role, "run": run.id, "analysis": run.analysis, "score": name,
                                            "value": float(m[l, h]), "rank": int(ranks[l, h])})
        for it in _interventions(run):
            for lab in it["heads"]:
                l, h = parse_head(lab)
                for metric, v in it["metrics"].items():
                    node(l, h)["effects"].append({"run": run.id, "kind": it["kind"], "metric": metric, "value": v})
    held = {}   # heads per role: a head is drawn with its rarest role, so 200 sink heads do not hide 3 induction heads
    for n in nodes.values():
        for role in {r["role"] for r in n["roles"]}:
            held[role] = held.get(role, 0) + 1
    for n in nodes.values():
        n["roles"].sort(key=lambda r: (held[r["role"]], r["role"]))
    n_layers = int(info.get("n_layers") or 1 + max([k[0] for k in nodes] or [0]))
    n_heads = int(info.get("n_heads") or 1 + max([k[1] for k in nodes] or [0]))
    return {"model": model, "n_layers": n_layers, "n_heads": n_heads, "runs": [r.id for r in runs],
            "nodes": [nodes[k] for k in sorted(nodes)]}


def build_report(runs: list) -> dict:
    """The report as a JSON-ready dict (see ``report_schema.json``)."""
    if not runs:
        raise HeadscopeError("a report needs at least one run")
    by_model: dict[str, list] = {}
    for r in runs:
        by_model.setdefault(run_model(r), []).append(r)
    models = []
    for name, rs in by_model.items():
        info = dict(rs[0].meta.get("model", {}))
        info.setdefault("id", name)
        models.append(_jsonable(info))
    entries, edge, roles = [], {}, {}
    for r in runs:
        arrays = r.arrays()
        entries.append(_run_entry(r, arrays))
        if r.analysis == "circuit" and r.status == "complete":
            name = run_model(r)
            if name not in roles:
                roles[name] = _roles_by_node(by_model[name])
            edge[id(r)] = _jsonable(circuit_report.edge_circuit(r, roles[name], arrays=arrays))
    return {
        "schema": SCHEMA_ID,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "versions": {"headscope": _version()},
        "models": models,
        "runs": entries,
        "interventions": [it for r in runs for it in _interventions(r)],
        "circuits": [build_circuit(rs, name) for name, rs in by_model.items()],
        "edge_circuits": [edge[id(r)] for rs in by_model.values() for r in rs if id(r) in edge],
    }


def _roles_by_node(runs: list) -> dict[str, list[str]]:
    """``a{L}.h{H}`` -> role names the other runs of the model give the head (for circuit hovers)."""
    out: dict[str, list[str]] = {}
    for n in build_circuit([r for r in runs if r.analysis != "circuit"], "")["nodes"]:
        out[f"a{n['layer']}.h{n['head_index']}"] = sorted({r["role"] for r in n["roles"]})
    return out


def validate_report(data: dict) -> None:
    """Raise HeadscopeError if ``data`` does not match the shipped JSON schema."""
    import jsonschema
    schema = json.loads(SCHEMA_PATH.read_text())
    try:
        jsonschema.validate(data, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(map(str, e.absolute_path)) or "(root)"
        raise HeadscopeError(f"report does not match {SCHEMA_PATH.name} at {where}: {e.message}") from None


# --------------------------------------------------------------------------- figures
def node_role(n: dict) -> str:
    """The role a node is drawn with: its first role (the rarest in the map: ``build_circuit`` orders
    them), or ``intervened`` for effect-only heads."""
    return n["roles"][0]["role"] if n["roles"] else "intervened"


def circuit_figure(circuit: dict) -> go.Figure:
    """Plotly version of the head-role map: heads on a layer x head grid, one trace per role."""
    fig = go.Figure()
    by_role: dict[str, list] = {}
    for n in circuit["nodes"]:
        by_role.setdefault(node_role(n), []).append(n)
    for role, ns in sorted(by_role.items()):
        text = ["<br>".join([f"<b>{n['head']}</b>"] + [f"{r['role']}: {r['score']}={r['value']:.3g} (rank {r['rank']})"
                                                       for r in n["roles"]] +
                            [f"{e['kind']}: {e['metric']}={e['value']:.3g}" for e in n["effects"]]) for n in ns]
        fig.add_trace(go.Scatter(
            x=[n["layer"] for n in ns], y=[n["head_index"] for n in ns], mode="markers", name=f"{role} ({len(ns)})",
            hovertext=text, hoverinfo="text",  # names on hover only: grid labels overlap
            marker={"size": 16, "color": svg.role_color(role),
                    "line": {"width": [3 if n["effects"] else 0 for n in ns], "color": "black"}}))
    fig.update_layout(title={"text": f"head roles: {circuit['model']} (ringed heads have ablation/patching effects)"},
                      xaxis={"title": {"text": "layer"}, "range": [-1, circuit["n_layers"]],
                             "dtick": 1 if circuit["n_layers"] <= 40 else None},
                      yaxis={"title": {"text": "head"}, "range": [circuit["n_heads"], -1],
                             "dtick": 1 if circuit["n_heads"] <= 32 else None},
                      height=max(360, 40 * circuit["n_heads"] + 120), margin={"l": 50, "r": 20, "t": 60, "b": 40})
    return fig


def run_figures(entry: dict) -> list[tuple[str, go.Figure]]:
    """(score name, heatmap) for each per-head score of a report run entry."""
    figs = []
    for name, s in entry["scores"].items():
        if len(s["shape"]) == 2:
            m = np.array([[np.nan if v is None else v for v in row] for row in s["values"]], dtype=np.float64)
            figs.append((name, heatmap_figure(m, f"{entry['analysis']}: {name}", meta=s, index=s["index"])))
    return figs


# --------------------------------------------------------------------------- renderers
def _esc(x) -> str:
    return html.escape("" if x is None else str(x))


def _html_table(rows: list[dict]) -> str:
    if not rows:
        return "<p><i>none</i></p>"
    cols = list(rows[0])
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_esc(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(map(_fmt, v))
    return fmt_value(v)


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return "_none_\n"
    cols = list(rows[0])
    cell = lambda v: _fmt(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _run_overview(e: dict) -> dict:
    return {"run": e["id"], "analysis": e["analysis"], "model": e["model"], "status": e["status"],
            "created": e["created"], "examples": e["n_examples"], "scores": list(e["scores"])}


def _setting(v) -> str:
    """A setting as the user gave it (floats in Python's shortest exact form, not rounded)."""
    return "none" if v is None else str(v)


def _run_tables(e: dict) -> list[tuple[str, list[dict]]]:
    """(title, rows) of a run's visible facts, shared by the HTML and Markdown renderers: where the
    model came from, every setting and input digest, versions, timings, the scalar summary."""
    kv = lambda d: [{"key": k, "value": v} for k, v in d.items()]  # noqa: E731
    source = {k: v for k, v in e["model_source"].items() if v is not None}
    if isinstance(source.get("n_params"), int):
        source["n_params"] = f"{source['n_params']:,}"
    settings = {k: _setting(v) for k, v in e["config"].items()}
    settings.update({f"inputs.{k}": _setting(v) for k, v in e["inputs"].items()})
    return [("Model source", kv(source)), ("Settings", kv(settings)), ("Versions", kv(e["versions"])),
            ("Timings (s)", kv(e["timings"])),
            ("Summary", kv({k: e["summary"][k] for k in scalar_summary(e["summary"])}))]  # raw: _fmt rounds lists too


def _top_rows(s: dict) -> list[dict]:
    """Top heads of a score with their spread over examples (``value ± std``) where the run has one."""
    return [{"rank": r["rank"], "head": r["head"], "value": fmt_value(r["value"], r["std"])} for r in s["top_heads"]]


def _examples_text(e: dict) -> str:
    if e["n_used"] is None or e["n_used"] == e["n_examples"]:
        return f"{e['n_examples']} examples"
    return f"{e['n_used']} of {e['n_examples']} examples used"


def _spread_note(s: dict) -> str:
    return f"± is the {s['spread']}" if s["spread"] else "no spread over examples stored"


def _node_rows(c: dict) -> list[dict]:
    return [{"head": n["head"],
             "roles": [f"{r['role']} ({r['score']} {r['value']:.3g}, #{r['rank']})" for r in n["roles"]],
             "effects": [f"{e['kind']}: {e['metric']}={e['value']:.3g}" for e in n["effects"]]} for n in c["nodes"]]


def _intervention_rows(data: dict) -> list[dict]:
    return [{"run": i["run"], "heads": i["heads"], "kind": i["kind"], "prompt": i["prompt"][:80],
             **{k: v for k, v in i["metrics"].items()}} for i in data["interventions"]]


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}th{background:#f3f3f3}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}code{background:#f3f3f3;padding:0 3px}"""


def render_html(data: dict) -> str:
    """One self-contained HTML page: plotly.js is inlined with the first figure only."""
    parts: list[str] = []
    first = [True]

    def fig_html(fig: go.Figure) -> str:
        out = fig.to_html(full_html=False, include_plotlyjs=first[0], config={"displaylogo": False})
        first[0] = False
        return f'<div class="figure">{out}</div>'

    models = ", ".join(m["id"] for m in data["models"])
    parts.append(f"<h1>headscope circuit report</h1><p>model(s): <b>{_esc(models)}</b> · {len(data['runs'])} run(s) · "
                 f"created {_esc(data['created'])} · headscope {_esc(data['versions']['headscope'])}</p>")
    parts.append("<h2>Runs</h2>" + _html_table([_run_overview(e) for e in data["runs"]]))
    for c in data["circuits"]:
        parts.append(f"<h2>Head roles: {_esc(c['model'])}</h2><p>each head's roles from the runs' scores; "
                     "a <code>circuit</code> run's edge-level circuit follows in its own section</p>")
        parts.append(fig_html(circuit_figure(c)) if c["nodes"] else "<p><i>no heads stand out</i></p>")
        parts.append(_html_table(_node_rows(c)))
    for c in data["edge_circuits"]:
        parts.append(f"<h2>Circuit: {_esc(c['task'])} on {_esc(c['model'])} (run {_esc(c['run'])})</h2>")
        parts.append(f'<div class="figure">{circuit_report.graph_svg(c)}</div>')
        parts.append(f'<h3>Faithfulness vs circuit size</h3><div class="figure">{circuit_report.curve_svg(c)}</div>')
        parts.append(_html_table(circuit_report.facts(c)))
        parts.append("<h3>Strongest circuit edges</h3>" + _html_table(circuit_report.edge_rows(c)))
        parts.append("<h3>Example prompts</h3>" + _html_table(circuit_report.pair_rows(c)))
    if data["interventions"]:
        parts.append("<h2>Interventions</h2>" + _html_table(_intervention_rows(data)))
    for e in data["runs"]:
        parts.append(f"<h2>{_esc(e['analysis'])}: {_esc(e['id'])}</h2>")
        parts.append(f"<p>status <b>{_esc(e['status'])}</b>, model <code>{_esc(e['model'])}</code>, "
                     f"{_esc(_examples_text(e))}</p>")
        if e["error"]:
            parts.append(f"<p>error: <code>{_esc(e['error'])}</code></p>")
        if e["headline"]:
            parts.append("<ul class='headline'>" + "".join(f"<li>{_esc(h)}</li>" for h in e["headline"]) + "</ul>")
        parts.append(f"<p>re-run: <code>{_esc(e['command'])}</code></p>" if e["command"]
                     else "<p>not a CLI analysis: no command line re-runs it</p>")
        for title, rows in _run_tables(e):
            parts.append(f"<h3>{_esc(title)}</h3>" + _html_table(rows))
        for name, fig in run_figures(e):
            s = e["scores"][name]
            parts.append(fig_html(fig))
            parts.append(f"<p>top heads by <b>{_esc(name)}</b> ({_esc(_spread_note(s))})</p>" +
                         _html_table(_top_rows(s)))
        p = e["example_pattern"]
        if p and "skipped" not in p:
            ds, tokens, title = pattern_view(p)
            parts.append("<h3>Example pattern</h3>" +
                         fig_html(pattern_figure(ds, tokens, q_offset=p["rows"][0], title=title)))
        elif p:
            parts.append(f"<p>no example pattern: {_esc(p['skipped'])}</p>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>headscope report: {_esc(models)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)


def render_markdown(data: dict, files_dir: str) -> tuple[str, dict[str, str]]:
    """Markdown text and its SVG figures ``{relative path: svg}`` under ``files_dir``."""
    files: dict[str, str] = {}
    md = ["# headscope circuit report\n",
          f"model(s): **{', '.join(m['id'] for m in data['models'])}** · {len(data['runs'])} run(s) · "
          f"created {data['created']} · headscope {data['versions']['headscope']}\n",
          "## Runs\n", _md_table([_run_overview(e) for e in data["runs"]])]
    for c in data["circuits"]:
        md.append(f"## Head roles: {c['model']}\n")
        if c["nodes"]:
            rel = f"{files_dir}/circuit-{_slug(c['model'])}.svg"
            files[rel] = svg.circuit_svg(c["nodes"], c["n_layers"], c["n_heads"], f"head roles: {c['model']}",
                                         role_of=node_role)
            md.append(f"![head roles of {c['model']}]({rel})\n")
        md.append(_md_table(_node_rows(c)))
    for c in data["edge_circuits"]:
        md.append(f"## Circuit: {c['task']} on {c['model']} (run {c['run']})\n")
        for kind, fig in (("graph", circuit_report.graph_svg(c)), ("faithfulness", circuit_report.curve_svg(c))):
            rel = f"{files_dir}/{_slug(c['run'])}-circuit-{kind}.svg"
            files[rel] = fig
            md.append(f"![circuit {kind}]({rel})\n")
        md.append(_md_table(circuit_report.facts(c)))
        md.append("### Strongest circuit edges\n")
        md.append(_md_table(circuit_report.edge_rows(c)))
        md.append("### Example prompts\n")
        md.append(_md_table(circuit_report.pair_rows(c)))
    if data["interventions"]:
        md.append("## Interventions\n")
        md.append(_md_table(_intervention_rows(data)))
    for e in data["runs"]:
        md.append(f"## {e['analysis']}: {e['id']}\n")
        md.append(f"status **{e['status']}**, model `{e['model']}`, {_examples_text(e)}\n")
        if e["error"]:
            md.append(f"error: `{e['error']}`\n")
        md += [f"- {h}" for h in e["headline"]] + ([""] if e["headline"] else [])
        md.append(f"Re-run:\n\n```sh\n{e['command']}\n```\n" if e["command"]
                  else "Not a CLI analysis: no command line re-runs it.\n")
        for title, rows in _run_tables(e):
            md += [f"### {title}\n", _md_table(rows)]
        for name, s in e["scores"].items():
            if len(s["shape"]) != 2:
                continue
            m = np.array([[np.nan if v is None else v for v in row] for row in s["values"]], dtype=np.float64)
            rel = f"{files_dir}/{_slug(e['id'])}-{_slug(name)}.svg"
            unit = "KV head" if s["index"] == "kv_head" else "head"
            files[rel] = svg.heatmap_svg(m, f"{e['analysis']}: {name}", unit=unit)
            md.append(f"### {name}\n\n{s['description']}\n\n![{e['analysis']} {name} heatmap]({rel})\n")
            md.append(f"Top heads ({_spread_note(s)}):\n\n" + _md_table(_top_rows(s)))
        p = e["example_pattern"]
        if p and "skipped" not in p:
            ds, tokens, title = pattern_view(p)
            rel = f"{files_dir}/{_slug(e['id'])}-example-pattern.svg"
            files[rel] = svg.heatmap_svg(ds.mat, title, unit="key", ylabel="query",
                                         x_ticks=ds.labels(tokens, "k"),
                                         y_ticks=ds.labels(tokens, "q", p["rows"][0]))
            md.append(f"### Example pattern\n\n![example pattern]({rel})\n")
        elif p:
            md.append(f"No example pattern: {p['skipped']}\n")
    return "\n".join(md), files


def render(runs: list, fmt: str, stem: str = "report") -> dict[str, bytes]:
    """The report's files as ``{relative path: bytes}``: the report first, then (md) its SVGs."""
    if fmt not in FORMATS:
        raise HeadscopeError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    data = build_report(runs)
    validate_report(data)
    if fmt == "json":
        return {f"{stem}.json": (json.dumps(data, indent=1) + "\n").encode()}
    if fmt == "html":
        return {f"{stem}.html": render_html(data).encode()}
    text, figs = render_markdown(data, f"{stem}_files")
    return {f"{stem}.md": text.encode(), **{k: v.encode() for k, v in figs.items()}}


def bundle_name(fmt: str, stem: str = "report") -> str:
    """File name of ``bundle``'s download: the report itself, or a zip for Markdown + figures."""
    return f"{stem}.zip" if fmt == "md" else f"{stem}.{fmt}"


def bundle(runs: list, fmt: str, stem: str = "report") -> tuple[str, bytes]:
    """The report as one downloadable file (the dashboard's export): Markdown comes zipped with its
    figure folder so its image links keep working."""
    files = render(runs, fmt, stem)
    if fmt != "md":
        return bundle_name(fmt, stem), next(iter(files.values()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for rel, data in files.items():
            z.writestr(rel, data)
    return bundle_name(fmt, stem), buf.getvalue()


def write_report(runs: list, fmt: str = "html", out: str | Path | None = None) -> Path:
    """Write the report of ``runs`` to ``out`` (default ``report.<fmt>``); returns the main file.

    Markdown figures go to ``<out stem>_files/`` beside the file. Nothing is written if the runs
    cannot be reported (HeadscopeError) or the output folder is not writable (HeadscopeError).
    """
    out = Path(out) if out else Path(f"report.{fmt}")
    files = render(runs, fmt, out.stem)
    main = next(iter(files))  # render() puts the report itself first, figures after
    try:
        for rel, data in files.items():
            p = out if rel == main else out.parent / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    except OSError as e:
        raise HeadscopeError(f"cannot write report to {out}: {e.strerror or e}") from None
    return out
