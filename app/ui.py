"""The dashboard's pages: a thin Streamlit layer over ``views`` (figures, tables), ``live`` (model
work), ``jobs`` (background runs) and ``report`` (export).

Each page is a function, so ``streamlit_app.py`` can hand them to ``st.navigation`` and tests can
run any one alone with ``AppTest.from_function``. Pages read two settings from the environment
that ``headscope app`` sets: ``HEADSCOPE_RUNS`` (the runs folder; the only place the app writes)
and ``HEADSCOPE_MODEL`` (the model it opens on). Every path that comes from the UI goes through
``store.safe_join`` so it cannot leave the runs folder.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

from headscope.analyses.base import describe_estimate, format_seconds
from headscope.analyses.store import STATUSES, resolve_run, safe_join, scan_runs
from headscope.errors import HeadscopeError
from headscope.fmt import number

from . import live, views
from .jobs import JobManager, ModelPool, Tasks, shipped_data_dir

DEFAULT_MODEL = "smollm2-135m"
UPLOADS = "uploads"   # user data files, inside the runs folder
SAMPLE_PROMPTS = [
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is",
    "Alice gave Bob a book. Then Bob gave the book back to",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
]
SAMPLE_PATCH_SOURCE = "The capital of Germany is Berlin. The capital of Japan is Tokyo. The capital of Spain is"


# --------------------------------------------------------------------------- settings and resources
@dataclass(frozen=True)
class Settings:
    runs: Path
    model: str


def settings() -> Settings:
    return Settings(runs=Path(os.environ.get("HEADSCOPE_RUNS", "runs")).resolve(),
                    model=os.environ.get("HEADSCOPE_MODEL") or DEFAULT_MODEL)


@st.cache_resource(show_spinner=False)
def model_pool() -> ModelPool:
    """Models of this app process, each loaded once, shared by sessions and background jobs."""
    return ModelPool()


@st.cache_resource(show_spinner=False)
def job_manager(root: str) -> JobManager:
    return JobManager(Path(root), model_pool())


@st.cache_resource(show_spinner=False)
def tasks() -> Tasks:
    return Tasks()


def current_model() -> str:
    return st.session_state.get("model") or settings().model


def model_choices(launch_model: str) -> list[str]:
    """The launch model plus the registry; no free-form paths (the app reads no arbitrary folders).

    The registry lives in a module that imports torch (seconds); it is only consulted once the
    background model load has imported it, so the first page renders at once.
    """
    mod = sys.modules.get("headscope.probe.models")
    names = list(getattr(mod, "REGISTRY", None) or [])
    return list(dict.fromkeys([launch_model, *names]))


def loaded_model(wait_s: float = 0.0):
    """The session's model if it is ready; otherwise start loading, show its state, return None."""
    name = current_model()
    pool = model_pool()
    pool.start(name)
    try:
        return pool.get(name, timeout=wait_s)
    except HeadscopeError as e:
        status = pool.status(name)
        if status.startswith("error"):
            st.error(f"model {name}: {status[7:]}")
            if st.button("retry loading"):
                pool.start(name)
                st.rerun()
        else:
            st.info(f"loading model **{name}** in the background (first load converts and caches it; "
                    f"the page refreshes itself)… {e if 'still loading' not in str(e) else ''}")
            _rerun_when(lambda: model_pool().status(name) != "loading")
        return None


@st.fragment(run_every=1.0)
def _rerun_when(done) -> None:
    """Poll background work without blocking: a timed fragment that reruns the page once ``done()``."""
    if done():
        st.rerun(scope="app")


def sidebar() -> None:
    s = settings()
    for key, (title, _) in PAGE_SPEC.items():
        if key in _PAGES:
            st.sidebar.page_link(_PAGES[key], label=title)
    st.sidebar.divider()
    st.sidebar.markdown("### headscope")
    choices = model_choices(s.model)
    st.sidebar.selectbox("model", choices, key="model", help="the model Inspect, Intervene and New run use")
    status = model_pool().status(current_model())
    st.sidebar.caption(f"model status: {status if not status.startswith('error') else 'error (see page)'}")
    st.sidebar.caption(f"runs folder: `{s.runs}`")


def _runs() -> list:
    return scan_runs(settings().runs)[0]


def _guarded(page):
    """A page whose HeadscopeErrors (a damaged run file, say) show as one error line, not a traceback."""
    @functools.wraps(page)
    def run_page() -> None:
        try:
            page()
        except HeadscopeError as e:
            _error(e)
    return run_page


def _chart(fig, key: str) -> None:
    st.plotly_chart(fig, key=key, config={"displaylogo": False})


def _error(e: Exception) -> None:
    st.error(str(e) if isinstance(e, HeadscopeError) else f"{type(e).__name__}: {e}")


def _remember_run(run_id: str) -> None:
    st.session_state["run"] = run_id
    st.query_params["run"] = run_id


def _run_select(runs: list, label: str, key: str, *, default: str | None = None):
    """Selectbox over runs. Initial choice: the URL's ``?run=``, then the run remembered in the
    session, then ``default``, then the first run."""
    if not runs:
        return None
    ids = [r.id for r in runs]
    if key not in st.session_state:
        for want in (st.query_params.get("run"), st.session_state.get("run"), default):
            if want in ids:
                st.session_state[key] = want
                break
    rid = st.selectbox(label, ids, key=key,
                       format_func=lambda i: f"{i}  ·  {next(r for r in runs if r.id == i).status}")
    return next(r for r in runs if r.id == rid)


# --------------------------------------------------------------------------- Runs
@_guarded
def runs_page() -> None:
    s = settings()
    st.title("Runs")
    runs, bad = scan_runs(s.runs)
    if bad:
        st.warning(f"{len(bad)} run folder(s) cannot be read")
        st.dataframe([{"id": b.id, "reason": b.reason} for b in bad], hide_index=True, key="runs_unreadable")
    if not runs:
        st.info(f"No runs in `{s.runs}` yet. Start one on the **New run** page or with "
                f"`headscope score induction`.")
        return
    c1, c2, c3, c4 = st.columns(4)
    analysis = c1.selectbox("analysis", ["(all)", *sorted({r.analysis for r in runs})], key="f_analysis")
    model = c2.selectbox("model", ["(all)", *sorted({views.run_model(r) for r in runs})], key="f_model")
    status = c3.selectbox("status", ["(all)", *STATUSES], key="f_status")
    text = c4.text_input("search", key="f_text", placeholder="id, config…")
    shown = views.filter_runs(runs, analysis=None if analysis == "(all)" else analysis,
                              model=None if model == "(all)" else model,
                              status=None if status == "(all)" else status, text=text)
    st.caption(f"{len(shown)} of {len(runs)} runs")
    st.dataframe(views.run_rows(shown), hide_index=True, key="runs_table")
    if not shown:
        return
    details, compare, export = st.tabs(["Details", "Compare two runs", "Export report"])
    with details:
        _run_details(shown)
    with compare:
        _compare(runs)
    with export:
        _export(shown)


def _run_details(runs: list) -> None:
    run = _run_select(runs, "run", "details_run")
    m = run.meta
    info = m.get("model", {})
    st.markdown(f"**{run.analysis}** on `{views.run_model(run)}` ({info.get('n_layers')} layers × "
                f"{info.get('n_heads')} heads, {info.get('n_kv_heads')} KV) · status **{run.status}** · "
                f"created {m.get('created', '?')} · {m.get('n_examples', 0)} examples")
    if m.get("error"):
        st.error(m["error"])
        if m.get("traceback"):
            with st.expander("traceback"):
                st.code(m["traceback"])
    summ = views.scalar_summary(m.get("summary"))
    if summ:
        st.dataframe([{"key": k, "value": number(v)} for k, v in summ.items()], hide_index=True, key="details_summary")
    scores = views.matrix_scores(run)
    if scores:
        name = st.selectbox("score", list(scores), key="details_score")
        _chart(views.heatmap_figure(scores[name], name, meta=m.get("score_meta", {}).get(name)), "details_heatmap")
        _link_heads(st, run.id)
    other = {n: v for n, v in run.scores().items() if v.ndim == 1}
    for n, v in other.items():
        _chart(views.bar_figure(v, n, "layer" if len(v) == info.get("n_layers") else "index"), f"details_bar_{n}")
    _arrays(run)
    with st.expander("config, versions, timings"):
        st.json({"config": m.get("config"), "versions": m.get("versions"), "timings": m.get("timings"),
                 "path": str(run.path)})


def _arrays(run) -> None:
    """The run's ``arrays.npz``: per-token series as lines, per-head maps as heatmaps, others by shape."""
    shapes = run.meta.get("array_shapes") or {}
    if not shapes:
        return
    st.markdown("**Arrays** (`arrays.npz`)")
    name = st.selectbox("array", list(shapes), key="details_array",
                        format_func=lambda k: f"{k} {tuple(shapes[k])}")
    a = run.arrays().get(name)
    info = run.meta.get("example_pattern") or {}
    if a is None:
        st.caption("arrays.npz is missing")
    elif name == "example_pattern" and "rows" in info:   # the headline head on the first example
        tokens, title = views.stored_pattern_labels(info)
        ds = views.downsample_pattern(a, q_start=info["rows"][0])
        _chart(views.pattern_figure(ds, tokens, q_offset=info["rows"][0], title=title), "details_array_fig")
    elif a.ndim == 1:
        _chart(views.series_figure({name: a}, title=name), "details_array_fig")
    elif a.ndim == 2 and a.shape[0] == run.meta.get("model", {}).get("n_layers"):
        _chart(views.heatmap_figure(a, name), "details_array_fig")
    else:
        st.caption(f"{name}: shape {a.shape}, dtype {a.dtype} (no standard view)")


def _compare(runs: list) -> None:
    with_scores = [r for r in runs if views.matrix_scores(r)]
    if len(with_scores) < 2:
        st.info("Comparing needs two runs with per-head scores.")
        return
    a = _run_select(with_scores, "first run", "cmp_a")
    same = [r for r in with_scores if r.analysis == a.analysis and r.id != a.id]
    if not same:
        st.info(f"No other {a.analysis} run to compare with.")
        return
    b = _run_select(same, "second run (same analysis)", "cmp_b")
    names = views.comparable_scores(a, b)
    if not names:
        st.warning("These runs have no score of the same shape (different models?).")
        return
    name = st.selectbox("score", names, key="cmp_score")
    k = st.slider("top-k for overlap", 1, 50, 10, key="cmp_k")
    sa, sb = a.scores()[name], b.scores()[name]
    res = views.compare_scores(sa, sb, k)
    c = st.columns(4)
    c[0].metric("Spearman ρ", f"{res['spearman']:.3f}")
    c[1].metric("Pearson r", f"{res['pearson']:.3f}")
    c[2].metric(f"top-{k} overlap", f"{res[f'top{k}_overlap']:.0%}")
    c[3].metric("max |Δ|", f"{res['max_abs_diff']:.3g}")
    index = a.meta.get("score_meta", {}).get(name, {}).get("index", "query_head")
    _chart(views.diff_figure(res["diff"], f"{name}: second − first", index), "cmp_diff")


def _export(runs: list) -> None:
    from . import report
    ids = [r.id for r in runs]
    pick = st.multiselect("runs in the report", ids, default=ids[: min(5, len(ids))], key="exp_runs")
    fmt = st.radio("format", report.FORMATS, horizontal=True, key="exp_fmt")
    chosen = [r for r in runs if r.id in pick]
    if not chosen:
        st.info("Pick at least one run.")
        return
    try:
        data = report.build_report(chosen)
        report.validate_report(data)
    except HeadscopeError as e:
        _error(e)
        return
    name = report.bundle_name(fmt, "headscope-report")
    # deferred: the file (HTML inlines plotly.js, ~5 MB) is built only when the button is pressed
    st.download_button(f"download {name}", lambda: report.bundle(chosen, fmt, "headscope-report")[1],
                       file_name=name, key="exp_download")
    for c in data["circuits"]:
        if c["nodes"]:
            _chart(report.circuit_figure(c), f"exp_circuit_{c['model']}")


# --------------------------------------------------------------------------- Heads
@_guarded
def heads_page() -> None:
    st.title("Heads")
    runs = [r for r in _runs() if views.matrix_scores(r)]
    if not runs:
        st.info("No run with per-head scores yet. Launch one on the **New run** page.")
        return
    mine = [r for r in runs if views.run_model(r) == current_model()]
    run = _run_select(runs, "run", "heads_run", default=(mine or runs)[0].id)
    _remember_run(run.id)
    scores = views.matrix_scores(run)
    smeta = run.meta.get("score_meta", {}) or {}
    name = st.selectbox("score", list(scores), key="heads_score")
    meta = smeta.get(name, {}) or {}
    index = meta.get("index", "query_head")
    _chart(views.heatmap_figure(scores[name], f"{run.analysis}: {name}", meta=meta), "heads_heatmap")
    if meta.get("higher_is"):
        thr = meta.get("threshold")
        st.caption(f"high value = {meta['higher_is']}" + ("" if thr is None else f"; threshold {thr}"))

    st.subheader("Top heads")
    c1, c2 = st.columns(2)
    k = c1.slider("how many", 5, int(scores[name].size), min(20, int(scores[name].size)), key="heads_k") \
        if scores[name].size > 5 else int(scores[name].size)
    asc = c2.toggle("lowest first", key="heads_asc")
    same_shape = {n: v for n, v in scores.items() if v.shape == scores[name].shape}
    st.dataframe(views.top_heads(same_shape, name, k, ascending=asc, index=index), hide_index=True,
                 key="heads_top")

    st.subheader("Head drill-down")
    labels = [views.head_label(l, h, index) for l, h in views.ranked_heads(scores[name])]
    if st.session_state.get("heads_head_for") != (run.id, name):   # another run or score: start at its top head
        st.session_state["heads_head_for"] = (run.id, name)
        st.session_state["heads_head"] = labels[0]
    lab = st.selectbox("head (sorted by score)", labels, key="heads_head")
    layer, head = views.parse_head(lab)
    arrays = run.arrays()
    st.dataframe(views.head_stats(scores, arrays, layer, head), hide_index=True, key="heads_stats")
    _per_example(run, name, scores[name].shape, layer, head)
    _example_pattern(run, layer, head, index)


def _per_example(run, name: str, shape: tuple, layer: int, head: int) -> None:
    """The head's score per example: stored in the run, or recomputed in the background."""
    st.markdown("**Score across examples**")
    vals = views.per_example_values(run.examples(), run.arrays(), name, shape, layer, head)
    key = f"perex:{run.id}"
    if vals is None:
        task = tasks().get(key)
        if task is not None and task.state == "done" and name in task.result:
            vals = [(i, float(a[layer, head])) for i, a in task.result[name]]
            st.caption("recomputed per example with the analysis's process() (values before finalize)")
    if vals:
        _chart(views.values_figure(vals, f"{views.head_label(layer, head)}: {name} per example"), "heads_perex")
        return
    st.caption("This run stored only the average over examples.")
    task = tasks().get(key)
    if task is not None and task.active:
        st.progress(task.fraction, text=f"recomputing… {task.done}/{task.total or '?'} examples")
        _rerun_when(lambda: not task.active)
        return
    if task is not None and task.state == "failed":
        st.error(task.error)
    n = st.number_input("examples to recompute", 1, 200, min(10, int(run.meta.get("n_examples") or 10)),
                        key="perex_n")
    if st.button("recompute per example (background)", key="perex_go"):
        loaded = loaded_model()
        if loaded is None:
            return
        if views.run_model(run) != loaded.lm.name:
            st.warning(f"this run is of {views.run_model(run)}; switch the model in the sidebar first")
            return
        tasks().start(key, lambda progress: live.per_example_arrays(run, loaded.lm, loaded.probe, int(n), progress))
        st.rerun()


def _example_pattern(run, layer: int, head: int, index: str) -> None:
    st.markdown("**Pattern on an example**")
    records = [r for r in run.examples() if not r.get("skip")]
    if not records:
        st.caption("no stored examples")
        return
    info = run.meta.get("model", {})
    if index == "kv_head":
        g = max(1, int(info.get("n_heads", 1)) // max(1, int(info.get("n_kv_heads", 1))))
        head = st.selectbox("query head of this KV group", list(range(head * g, head * g + g)), key="pat_qhead")
    c1, c2, c3 = st.columns(3)
    ex = c1.selectbox("example", [str(r.get("id")) for r in records], key="pat_example")
    start = c2.number_input("first query", 0, None, 0, key="pat_start")
    length = c3.slider("window (queries)", 4, 128, 32, key="pat_len")
    cache_key = (run.id, ex, layer, head, start, length)
    cached = st.session_state.get("pat_result")
    have = cached is not None and cached[0] == cache_key
    if not st.button("show pattern", key="pat_go") and not have:
        return
    loaded = loaded_model()
    if loaded is None:
        return
    if views.run_model(run) != loaded.lm.name:
        st.warning(f"this run is of {views.run_model(run)}; switch the model in the sidebar to see patterns")
        return
    try:
        if have:
            ids, pat, a = cached[1]
        else:
            with st.spinner("capturing…"):
                ids = live.example_input_ids(run, ex, loaded.lm, loaded.probe)
                a = min(int(start), len(ids) - 1)
                cap = live.capture_prompt(loaded.probe, loaded.lm, ids, [(layer, head)],
                                          rows=(a, min(len(ids), a + length)))
                pat = cap.patterns[(layer, head)]
            st.session_state["pat_result"] = (cache_key, (ids, pat, a))
    except HeadscopeError as e:
        _error(e)
        return
    toks = live.token_strings(loaded.lm.tokenizer, ids)
    b = a + pat.shape[0]
    # keys beyond the window's last query get no attention (causal): cut them
    ds = views.downsample_pattern(pat[:, :b], keep_first=4)
    title = f"{views.head_label(layer, head)} on {ex}, queries {a}–{b - 1}"
    _chart(views.pattern_figure(ds, toks, q_offset=a, title=title), "pat_fig")
    stats = views.pattern_stats(pat, a)
    st.caption(f"on these queries: entropy {stats['entropy']:.3f} nats · mean distance {stats['mean_distance']:.2f} "
               f"tokens · {stats['first_key_mass']:.0%} of attention on token 0 · most attended key: "
               f"{views.token_label(stats['top_key'], toks[stats['top_key']])}")


# --------------------------------------------------------------------------- Inspect
def _prompt_samples() -> dict[str, str]:
    """Built-in prompts plus the texts shipped with headscope (read-only package data)."""
    out = {f"sample {i + 1}: {p[:40]}…": p for i, p in enumerate(SAMPLE_PROMPTS)}
    try:
        import json
        from importlib import resources
        f = resources.files("headscope.data") / "natural_texts.jsonl"
        for line in f.read_text(encoding="utf-8").splitlines()[:20]:
            rec = json.loads(line)
            out[f"{rec.get('id')}: {rec['text'][:40]}…"] = rec["text"]
    except (OSError, ValueError, KeyError, ModuleNotFoundError):
        pass
    return out


def _head_options(info) -> list[str]:
    return [views.head_label(l, h) for l in range(info.n_layers) for h in range(info.n_heads)]


def _default_heads(model: str, valid: list[str]) -> list[str]:
    for r in _runs():
        if views.run_model(r) == model and r.status == "complete":
            smeta = r.meta.get("score_meta", {}) or {}
            q = {n: m for n, m in views.matrix_scores(r).items()
                 if (smeta.get(n) or {}).get("index", "query_head") == "query_head"}
            heads = [h for h in live.heads_default(q) if h in valid]
            if heads:
                return heads
    return valid[:1]


def _prompt_input(key: str, default: str) -> str:
    samples = _prompt_samples()
    pick = st.selectbox("sample prompt", ["(type your own)", *samples], key=f"{key}_sample")
    if pick != "(type your own)" and st.session_state.get(f"{key}_last_pick") != pick:
        st.session_state[f"{key}_text"] = samples[pick]
    st.session_state[f"{key}_last_pick"] = pick
    if f"{key}_text" not in st.session_state:
        st.session_state[f"{key}_text"] = default
    return st.text_area("prompt", key=f"{key}_text", height=110)


def _take_clicked_head(chart_key: str, heads_key: str, valid: list[str], max_heads: int = 8) -> None:
    """A click on the layer x head grid ``chart_key`` adds that head to the multiselect ``heads_key``.

    Runs before the multiselect is drawn (Streamlit refuses changes to a drawn widget's state);
    each click is taken once, the newest head replacing the oldest beyond ``max_heads``."""
    points = ((st.session_state.get(chart_key) or {}).get("selection") or {}).get("points") or []
    if not points or points == st.session_state.get(chart_key + "_taken"):
        return
    st.session_state[chart_key + "_taken"] = points
    label = views.head_label(int(points[0]["y"]), int(points[0]["x"]))
    chosen = [h for h in st.session_state.get(heads_key, []) if h != label]
    if label in valid:
        st.session_state[heads_key] = (chosen + [label])[-max_heads:]


def inspect_page() -> None:
    st.title("Inspect")
    loaded = loaded_model()
    if loaded is None:
        return
    lm = loaded.lm
    info = lm.info
    text = _prompt_input("insp", SAMPLE_PROMPTS[0])
    valid = _head_options(info)
    if "insp_heads" not in st.session_state:
        st.session_state["insp_heads"] = _default_heads(lm.name, valid)
    _take_clicked_head("insp_grid", "insp_heads", valid)
    heads_l = st.multiselect("heads", valid, key="insp_heads", max_selections=8,
                             help="or click a cell of the all-heads grid below")
    c1, c2, c3, c4 = st.columns(4)
    bos = c1.checkbox("prepend BOS", False, key="insp_bos",
                      help="add the model's BOS where the tokenizer puts none first; off = as the tokenizer "
                           "does, the analyses' default, so token 0 here is token 0 of `headscope score sinks`")
    eps = c2.slider("sink threshold ε", 0.05, 0.9, 0.3, 0.05, key="insp_eps",
                    help="a key is a sink for a head when it gets more than ε of the attention on average (Gu et al.)")
    cells = c3.slider("max cells per axis", 32, 256, 128, 16, key="insp_cells",
                      help="longer patterns are pooled: key bins sum attention, query bins average rows")
    topk = c4.slider("top attended tokens", 3, 20, 8, key="insp_topk")
    try:
        ids = live.encode(lm, text, bos)
    except HeadscopeError as e:
        _error(e)
        return
    T = len(ids)
    a = 0
    if T > live.MAX_ROWS:
        a = st.slider("pattern window: first query", 0, T - 1, T - live.MAX_ROWS, key="insp_row0",
                      help=f"full pattern rows are kept for {live.MAX_ROWS} queries at a time")
    want = (lm.name, tuple(ids), tuple(heads_l), a)
    # first visit: capture the default prompt at once; later, on the button (typing is not re-run)
    if st.button("capture", type="primary", key="insp_go") or "insp_result" not in st.session_state:
        try:
            with st.spinner("capturing…"):
                cap = live.capture_prompt(loaded.probe, lm, ids, live.parse_heads(heads_l, info),
                                          rows=(a, min(T, a + live.MAX_ROWS)))
                fw = live.fai_waad_series(loaded.probe, lm, ids)
            st.session_state["insp_result"] = (want, cap, fw)
        except HeadscopeError as e:
            _error(e)
            return
    res = st.session_state.get("insp_result")
    if not res:
        return
    if res[0] != want:
        st.caption("The prompt or heads changed: press **capture** to update.")
    cap: live.PromptCapture = res[1]
    fw: dict | None = res[2]
    toks = cap.tokens
    eligible = views.sink_eligible(cap.count)
    sinks = views.sink_positions(cap.alpha, eps, eligible=eligible)
    rate = views.sink_rate(cap.alpha, eps, eligible)
    c = st.columns(3)
    c[0].metric("tokens", len(toks))
    c[1].metric("sink tokens", len(sinks), help="keys that are a sink for at least one head")
    c[2].metric("sink rate of token 0", f"{rate[0]:.0f}%", help="percent of heads with α₀ > ε (Gu et al.'s Sink₁)")
    st.markdown("**Tokens** (shade = share of heads using the token as a sink; red box = sink)")
    st.caption(f"keys seen by fewer than {int(cap.count[eligible].min())} queries are not tested: their "
               "mean attention averages too few rows")
    st.html(views.tokens_html(toks, rate / 100.0, sinks))
    _all_heads_grid(cap)
    for (l, h), pat in cap.patterns.items():
        st.markdown(f"#### {views.head_label(l, h)}")
        left, right = st.columns([3, 2])
        ds = views.downsample_pattern(pat, max_q=cells, max_k=cells)
        with left:
            _chart(views.pattern_figure(ds, toks, q_offset=cap.rows[0], title=f"{views.head_label(l, h)} attention",
                                        sink_positions=views.sink_positions(cap.alpha[l, h], eps, eligible=eligible)),
                   f"insp_pat_{l}_{h}")
        with right:
            st.caption("top attended tokens (mean attention received; how often a query's top-1)")
            st.dataframe(views.top_attended(cap.alpha[l, h], toks, topk, cap.topk_idx[l, h, :, 0]), hide_index=True,
                         key=f"insp_top_{l}_{h}")
            st.caption(f"mean entropy {cap.entropy[l, h].mean():.3f} nats · mean span "
                       f"{cap.mean_dist[l, h].mean():.2f} tokens")
    st.markdown("#### FAI / WAAD over tokens")
    if fw is None:
        st.caption("FAI/WAAD come from the fai analysis, which is not installed.")
    else:
        _chart(views.series_figure(fw["series"], toks, "FAI (global heads) and WAAD (local heads)",
                                   marks={"sink": sinks}), "insp_series")
        o = fw["options"]
        band = f"t − s ≥ {o['H_lo']}" + ("" if o["H_hi"] is None else f" and ≤ {o['H_hi']}")
        st.caption(f"as the fai analysis computes them (Li et al.), with its defaults: local heads = the "
                   f"{o['local_frac']:.0%} with the shortest mean span on this prompt ({len(fw['local'])}), global = "
                   f"the {o['global_frac']:.0%} longest ({len(fw['global'])}); W = {o['W']}, FAI band {band}.")
    _direct_logits(loaded, want, list(cap.patterns))
    st.markdown("#### Next token")
    top = np.argsort(-cap.next_probs)[:10]
    st.dataframe([{"token": lm.tokenizer.decode([int(i)]), "id": int(i), "p": float(cap.next_probs[i])} for i in top],
                 hide_index=True, key="insp_next")


def _all_heads_grid(cap) -> None:
    """Layer x head grid of one statistic of the captured prompt; a click opens that head's pattern."""
    st.markdown("#### All heads on this prompt")
    g1, g2 = st.columns([2, 3])
    stat = g1.selectbox("statistic", list(live.OVERVIEW_STATS), key="insp_stat")
    span = None
    if stat == "mass on token span":
        T = len(cap.tokens)
        span = g2.slider("token span [first, end)", 0, T, (0, min(1, T)), key="insp_span",
                         help="positions as in the token strip above (0 = first token)")
    try:
        grid = live.head_overview(cap, stat, tuple(span) if span else None)
    except HeadscopeError as e:
        _error(e)
        return
    fig = views.heatmap_figure(grid, stat, meta={"description": live.OVERVIEW_STATS[stat]})
    st.plotly_chart(fig, key="insp_grid", on_select="rerun", selection_mode="points",
                    config={"displaylogo": False})
    st.caption("click a cell to open that head's pattern below")


def _direct_logits(loaded, want, heads: list[tuple[int, int]]) -> None:
    """Direct logit attribution per head at the last position, and what the shown heads push."""
    st.markdown("#### Direct logit attribution (last position)")
    target = st.text_input("target token (empty: the predicted next token)", key="insp_dla_target").strip()
    key = (want, target)
    memo = st.session_state.get("insp_dla")
    if memo is None or memo[0] != key:
        try:
            with st.spinner("attributing…"):
                memo = (key, live.direct_logits(loaded.probe, loaded.lm, list(want[1]), target or None))
        except HeadscopeError as e:
            _error(e)
            return
        st.session_state["insp_dla"] = memo
    d = memo[1]
    _chart(views.heatmap_figure(d["effects"], f"direct effect on the logit of {d['token']!r}", colorscale="RdBu_r",
                                zmid=0.0, meta={"description": "each head's output through the final norm (scale "
                                                "frozen) and the unembedding; logit units"}), "insp_dla_map")
    dec = loaded.lm.tokenizer.decode
    for l, h in heads:
        rows = [{"pushes up": dec([int(i)]), "by": float(v), "pushes down": dec([int(j)]), "by ": float(w)}
                for i, v, j, w in zip(d["up_ids"][l, h], d["up"][l, h], d["down_ids"][l, h], d["down"][l, h])]
        st.caption(f"{views.head_label(l, h)}: direct effect {d['effects'][l, h]:+.3f} on {d['token']!r}")
        st.dataframe(rows, hide_index=True, key=f"insp_dla_{l}_{h}",
                     column_config={"by": st.column_config.NumberColumn(format="%+.3f"),
                                    "by ": st.column_config.NumberColumn(format="%+.3f")})


# --------------------------------------------------------------------------- Intervene
def intervene_page() -> None:
    st.title("Intervene")
    loaded = loaded_model()
    if loaded is None:
        return
    lm = loaded.lm
    text = _prompt_input("iv", SAMPLE_PROMPTS[0])
    valid = _head_options(lm.info)
    if "iv_heads" not in st.session_state:
        st.session_state["iv_heads"] = _default_heads(lm.name, valid)
    heads_l = st.multiselect("heads", valid, key="iv_heads")
    c1, c2, c3 = st.columns(3)
    kind = c1.selectbox("intervention", live.KINDS, key="iv_kind",
                        help="zero/scale: head output × 0/α · uniform: attend uniformly (Ships UA) · "
                             "mean: output := its mean over positions · patch: output from a source prompt")
    scale = c2.number_input("α (scale)", value=0.0, step=0.1, key="iv_scale") if kind == "scale" else 0.0
    n_new = c3.slider("generate tokens", 0, 40, 12, key="iv_gen")
    source = None
    if kind == "patch":
        source = st.text_input("source prompt (patch from)", key="iv_source", value=SAMPLE_PATCH_SOURCE)
    target = st.text_input("target token (optional, metric log p)", key="iv_target", value="")
    try:
        ids = live.encode(lm, text)
        heads = live.parse_heads(heads_l, lm.info)
        want = (lm.name, tuple(ids), tuple(heads), kind, scale, source, target, n_new)
        memo = st.session_state.get("iv_result")
        if memo and memo[0] == want:
            eff = memo[1]
        else:
            with st.spinner("running with and without the intervention…"):
                src = live.encode(lm, source) if source else None
                ops = live.make_ops(loaded.probe, ids, heads, kind, scale=scale, source_ids=src)
                eff = live.intervention_effect(loaded.probe, lm, ids, ops, max_new_tokens=n_new, target=target or None)
            st.session_state["iv_result"] = (want, eff)
    except HeadscopeError as e:
        _error(e)
        return
    m = eff["metrics"]
    c = st.columns(4)
    c[0].metric("KL(p ‖ p̃)", f"{m['kl']:.4f}")
    c[1].metric("top-1", repr(eff["top1_after"]), None if eff["top1_after"] == eff["top1_before"] else
                f"was {eff['top1_before']!r}", delta_color="off")
    c[2].metric("p(original top-1)", f"{m['p_top1_after']:.3f}", f"{m['p_top1_after'] - m['p_top1_before']:+.3f}")
    if "logp_target_after" in m:
        c[3].metric("log p(target)", f"{m['logp_target_after']:.3f}",
                    f"{m['logp_target_after'] - m['logp_target_before']:+.3f}")
    else:
        c[3].metric("entropy", f"{m['entropy_after']:.3f}", f"{m['entropy_after'] - m['entropy_before']:+.3f}")
    rows = views.distribution_change(eff["p_before"], eff["p_after"], lambda i: lm.tokenizer.decode([i]))
    _chart(views.distribution_figure(rows), "iv_dist")
    if n_new:
        g1, g2 = st.columns(2)
        g1.markdown("**generated, unmodified**")
        g1.code(eff["text_before"] or "", language=None)
        g2.markdown(f"**generated, with {kind}**")
        g2.code(eff["text_after"] or "", language=None)
    if st.button("save to run store", key="iv_save", help="saved interventions appear in reports"):
        rec = {"heads": [views.head_label(l, h) for l, h in heads], "kind": kind, "prompt": text,
               "metrics": m, "scale": scale if kind == "scale" else None, "source": source, "target": target,
               "top1_before": eff["top1_before"], "top1_after": eff["top1_after"],
               "text_before": eff["text_before"], "text_after": eff["text_after"]}
        try:
            run = live.save_intervention(settings().runs, lm, rec)
            st.success(f"saved as run {run.id}")
        except HeadscopeError as e:
            _error(e)
    _ablation_heatmap(loaded, ids, kind, scale, target)


def _ablation_heatmap(loaded, ids: list[int], kind: str, scale: float, target: str) -> None:
    """Every head ablated alone (batched sweep) on the Intervene prompt, as a layer x head map."""
    st.markdown("#### Ablation heatmap: every head alone")
    c1, c2 = st.columns([2, 1])
    metric = c1.selectbox("metric at the last position", live.SWEEP_METRICS, key="iv_sweep_metric")
    sweep_kind = kind if kind in ("zero", "uniform", "scale") else "zero"
    key = (loaded.lm.name, tuple(ids), sweep_kind, scale, metric, target)
    memo = st.session_state.get("iv_sweep")
    if c2.button(f"sweep {loaded.lm.info.n_layers * loaded.lm.info.n_heads} heads ({sweep_kind})", key="iv_sweep_go"):
        try:
            with st.spinner("one batched forward per layer…"):
                memo = (key, live.ablation_sweep(loaded.probe, loaded.lm, ids, sweep_kind, metric, target or None,
                                                 scale=scale))
        except HeadscopeError as e:
            _error(e)
            return
        st.session_state["iv_sweep"] = memo
    if memo is None:
        st.caption("runs one forward per layer with all of its heads ablated side by side (seconds on a CPU)")
        return
    if memo[0] != key:
        st.caption("The prompt or settings changed: press the sweep button to update.")
    scores, tok = memo[1]
    signed = memo[0][4] != live.SWEEP_METRICS[0]
    _chart(views.heatmap_figure(scores, f"{memo[0][4]} with each head {memo[0][2]}-ablated",
                                colorscale="RdBu_r" if signed else "Viridis", zmid=0.0 if signed else None,
                                meta={"description": f"target {tok!r}" if signed else "KL of the next-token "
                                      "distribution, nats"}), "iv_sweep_map")


# --------------------------------------------------------------------------- New run
def _option_widget(o, key: str):
    """A widget for one analysis Option; returns the raw value for ``Option.parse``."""
    label = o.label
    if o.choices is not None:
        choices = list(o.choices)
        return st.selectbox(label, choices, index=choices.index(o.default) if o.default in choices else 0,
                            key=key, help=o.help)
    if o.type is bool:
        return st.checkbox(label, bool(o.default), key=key, help=o.help)
    if o.type is int and o.default is not None:
        return int(st.number_input(label, value=int(o.default), step=1, key=key, help=o.help,
                                   min_value=None if o.min is None else int(o.min),
                                   max_value=None if o.max is None else int(o.max)))
    if o.type is float and o.default is not None:
        return float(st.number_input(label, value=float(o.default), format="%g", key=key, help=o.help,
                                     min_value=o.min, max_value=o.max))
    if o.type in (list, tuple):
        return st.text_input(label, ",".join(map(str, o.default or [])), key=key, help=o.help + " (comma-separated)")
    raw = st.text_input(label, "" if o.default is None else str(o.default), key=key,
                        help=o.help + (" (empty = default)" if o.default is None else ""))
    return raw if raw.strip() else None


def data_files(root: Path) -> dict[str, Path]:
    """Data files the New run page may use: shipped with headscope, or in ``<runs>/uploads``."""
    out: dict[str, Path] = {}
    base = shipped_data_dir()
    if base is not None:
        for p in sorted(base.glob("*")):
            if p.suffix in (".jsonl", ".txt") or (p.is_dir() and not p.name.startswith(("_", "."))):
                out[f"headscope data: {p.name}"] = p
    up = root / UPLOADS
    if up.is_dir():
        for p in sorted(up.iterdir()):
            out[f"uploaded: {p.name}"] = p
    return out


def save_upload(root: Path, name: str, data: bytes) -> Path:
    """Store an uploaded data file in ``<runs>/uploads`` (name sanitised, confined by safe_join)."""
    clean = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(name).name).lstrip(".") or "data.jsonl"
    p = safe_join(root, f"{UPLOADS}/{clean}")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


CONFIRM_ABOVE_S = 120   # the New run page asks before launching a run estimated longer than this


def new_run_page() -> None:
    from headscope.analyses.base import list_analyses
    s = settings()
    st.title("New run")
    analyses = list_analyses()
    names = list(analyses)
    name = st.selectbox("analysis", names, key="nr_analysis",
                        index=names.index("induction") if "induction" in names else 0)
    cls = analyses[name]
    st.caption(cls.description)
    files = data_files(s.runs)
    with st.form("nr_form"):
        st.markdown(f"model: **{current_model()}** (change it in the sidebar)")
        raw = {}
        own, common = list(cls.options), [o for o in cls.all_options() if o not in cls.options and not o.cli_only]
        cols = st.columns(2)
        for i, o in enumerate(own):
            with cols[i % 2]:
                raw[o.name] = _option_widget(o, f"nr_{name}_{o.name}")
        with st.expander("common options (limit, seed, device, dtype, batch size)"):
            for o in common:
                raw[o.name] = _option_widget(o, f"nr_{name}_{o.name}")
        data_label, upload = "(none)", None
        if cls.takes_data:
            data_label = st.selectbox("data" + (" (required)" if cls.needs_data else ""),
                                      ["(none)", *files], key=f"nr_{name}_data", help=cls.data_help or None)
            upload = st.file_uploader("…or upload a data file (.jsonl / .txt)", type=["jsonl", "txt"],
                                      key=f"nr_{name}_up")
        else:
            st.caption(cls.data_help)
        go = st.form_submit_button("launch", type="primary")
    jm = job_manager(str(s.runs))
    if go:
        st.session_state.pop("nr_pending", None)
        try:
            data = None
            if upload is not None:
                data = str(save_upload(s.runs, upload.name, upload.getvalue()))
            elif data_label != "(none)":
                data = str(files[data_label])
            with st.spinner("estimating the cost (loads the model, times a few short forwards)"):
                work, seconds = jm.estimate(name, current_model(), raw, data)
            if seconds > CONFIRM_ABOVE_S:
                st.session_state["nr_pending"] = (name, current_model(), raw, data, work, seconds)
            else:
                st.info(f"estimated time ~{format_seconds(seconds)} on this machine")
                st.session_state["nr_last"] = jm.submit(name, current_model(), raw, data).run_id
        except HeadscopeError as e:
            _error(e)
    if st.session_state.get("nr_pending"):
        p_name, p_model, p_raw, p_data, work, seconds = st.session_state["nr_pending"]
        st.warning(f"{describe_estimate(work, seconds)}; lower the limit or the grid to make it shorter")
        if st.button("launch anyway", key="nr_confirm"):
            st.session_state.pop("nr_pending")
            try:
                st.session_state["nr_last"] = jm.submit(p_name, p_model, p_raw, p_data).run_id
            except HeadscopeError as e:
                _error(e)
    if st.session_state.get("nr_last"):  # kept in the session: the page reruns while the job runs
        st.success(f"started **{st.session_state['nr_last']}**; it runs in the background and lands in the run store")
    st.subheader("Jobs")
    _jobs_panel()


@st.fragment(run_every=1.5)
def _jobs_panel() -> None:
    """Progress of background runs, refreshed in place; read from memory and ``<runs>/.jobs``."""
    s = settings()
    jm = job_manager(str(s.runs))
    jobs = jm.recent(10)
    if not jobs:
        st.caption("no jobs yet")
        return
    for job in jobs:
        box = st.container(border=True)
        head = f"**{job.run_id}** · {job.analysis} · {job.model}"
        if jm.orphaned(job):
            box.warning(f"{head}: interrupted (the app stopped during the run); {job.done} examples saved")
            if box.button("resume", key=f"resume_{job.run_id}"):
                _resume(jm, job)
            continue
        if job.active:
            eta = f" · about {format_seconds(job.eta_s)} left" if job.eta_s is not None else ""
            box.progress(job.fraction, text=f"{head} · {job.state} · {job.done}/{job.total or '?'} examples{eta}")
        elif job.state == "complete":
            box.success(f"{head} · complete · {job.done} examples")
            _link_heads(box, job.run_id)
        else:
            box.error(f"{head} · {job.state}: {job.error}")
            if job.state == "partial" and box.button("resume", key=f"resume_{job.run_id}"):
                _resume(jm, job)


def _resume(jm: JobManager, job) -> None:
    try:
        run = resolve_run(job.run_id, jm.root)
        cfg = dict(run.meta.get("config", {}))
        data = cfg.pop("data", None)
        jm.submit(job.analysis, job.model, cfg, data, resume_run=job.run_id)
        st.rerun()
    except HeadscopeError as e:
        _error(e)


# --------------------------------------------------------------------------- navigation
_PAGES: dict[str, object] = {}


def _link_heads(container, run_id: str) -> None:
    """A link to the Heads page showing ``run_id`` (only inside the multipage app; pages run alone
    in tests have no page registry)."""
    if "heads" in _PAGES:
        container.page_link(_PAGES["heads"], label="open in Heads",
                            query_params={"run": run_id})


def _circuit_page() -> None:
    from .circuit_ui import circuit_page  # circuit_ui imports this module
    circuit_page()


PAGE_SPEC = {"runs": ("Runs", runs_page), "heads": ("Heads", heads_page), "inspect": ("Inspect", inspect_page),
             "intervene": ("Intervene", intervene_page), "circuit": ("Circuit", _circuit_page),
             "new": ("New run", new_run_page)}


def navigation():
    """The app's pages for ``st.navigation``; remembered so pages can link to each other."""
    # no icons: streamlit fetches material-icon SVGs from a CDN, and the app must work offline
    for key, (title, fn) in PAGE_SPEC.items():   # the default page is served at "/" and reserves "/home"
        _PAGES[key] = st.Page(fn, title=title, url_path="home" if key == "runs" else key, default=key == "runs")
    # "/runs" (like "/heads") reaches the Runs page through an unlisted alias, so the sidebar draws
    # the links itself (``sidebar``) and the built-in menu is hidden
    alias = st.Page(runs_page, title="Runs", url_path="runs")
    return st.navigation([*_PAGES.values(), alias], position="hidden")
