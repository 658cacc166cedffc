"""Dashboard pages, each run alone with streamlit's AppTest on a runs folder made in tmp.

Runs are written through the store API with synthetic but schema-valid scores; the pages that
need a model use a tiny random-init Llama saved as a local model directory (byte-level
tokenizer, 2 layers x 4 heads, GQA 2 KV heads), so nothing is downloaded and it loads in a second.
"""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from headscope.analyses.store import list_runs, load_run  # noqa: E402

from .helpers import arr, make_runs, make_tiny_model_dir, write_run  # noqa: E402, F401 (re-exported)

TIMEOUT = 60


# --------------------------------------------------------------------------- helpers (also used by other app tests)
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model") / "tiny-llama")


@pytest.fixture
def app_env(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    root.mkdir()
    made = make_runs(root)
    monkeypatch.setenv("HEADSCOPE_RUNS", str(root))
    monkeypatch.setenv("HEADSCOPE_MODEL", "synth-model")
    return root, made


@pytest.fixture
def model_env(app_env, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_MODEL", str(tiny_model_dir))
    return app_env


def page(name: str) -> AppTest:
    return AppTest.from_string(f"from headscope.app import ui\nui.{name}()", default_timeout=TIMEOUT)


def run_ready(at: AppTest, timeout: float = TIMEOUT) -> AppTest:
    """Run the page until it is past 'loading model' (the model loads in a background thread)."""
    at.run()
    t0 = time.time()
    while any("loading model" in i.value for i in at.info) and time.time() - t0 < timeout:
        time.sleep(0.2)
        at.run()
    return at


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


# --------------------------------------------------------------------------- Runs
def test_runs_page_lists_filters_and_details(app_env):
    root, made = app_env
    at = page("runs_page").run()
    assert not at.exception
    table = at.dataframe[0].value
    assert set(table["id"]) == {"ind-a", "ind-b", "kv", "bad"}
    at.selectbox(key="f_analysis").select("induction").run()
    assert set(at.dataframe[0].value["id"]) == {"ind-a", "ind-b"}
    at.selectbox(key="f_analysis").select("(all)").run()
    at.selectbox(key="f_status").select("failed").run()
    assert list(at.dataframe[0].value["id"]) == ["bad"]
    assert any("boom" in e.value for e in at.error)  # a failed run's error is shown
    at.selectbox(key="f_status").select("(all)").run()
    at.text_input(key="f_text").input("ind-b").run()
    assert list(at.dataframe[0].value["id"]) == ["ind-b"]
    # details: the heatmap of the selected run holds its scores
    spec = charts(at)[0]
    np.testing.assert_allclose(arr(spec["data"][0]["z"]), made["ind_b"]["induction"])


def test_runs_page_shows_stored_arrays(app_env):
    root, _ = app_env
    at = page("runs_page").run()
    at.selectbox(key="details_run").select("ind-a").run()
    at.selectbox(key="details_array").select("series").run()
    no_errors(at)
    fig = next(c for c in charts(at) if c["layout"]["title"]["text"] == "series")
    np.testing.assert_allclose(arr(fig["data"][0]["y"]), np.load(root / "ind-a" / "arrays.npz")["series"])
    at.selectbox(key="details_array").select("induction_std").run()
    assert any(c["data"][0]["type"] == "heatmap" and c["layout"]["title"]["text"].startswith("induction_std")
               for c in charts(at))


def test_runs_page_shows_the_stored_example_pattern(app_env):
    """A run's stored example pattern opens as a pattern (queries x keys, token labels), not as a
    layer x head map, whatever its number of rows."""
    root, _ = app_env
    rows = np.random.default_rng().dirichlet(np.ones(6), size=4)          # 4 query rows over 6 keys
    info = {"example": "ex0", "score": "induction", "head": "L1H2", "layer": 1, "head_index": 2, "value": 0.5,
            "rows": [2, 6], "tokens": ["a", "b", "c", "d", "e", "f"]}   # 4 rows = the synthetic model's layers
    write_run(root, "pat", scores={"induction": np.zeros((4, 6))}, arrays={"example_pattern": rows},
              extra={"example_pattern": info})
    at = page("runs_page").run()
    at.selectbox(key="details_run").select("pat").run()
    at.selectbox(key="details_array").select("example_pattern").run()
    no_errors(at)
    fig = next(c for c in charts(at) if c["layout"]["title"]["text"].startswith("L1H2 (top by induction, 0.5)"))
    np.testing.assert_allclose(arr(fig["data"][0]["z"]), rows)
    assert fig["data"][0]["y"][0].endswith("c") and fig["data"][0]["x"][5].endswith("f")


def test_runs_page_compare_two_runs(app_env):
    root, made = app_env
    at = page("runs_page").run()
    at.selectbox(key="cmp_a").select("ind-a").run()
    at.selectbox(key="cmp_score").select("induction").run()
    no_errors(at)
    assert at.selectbox(key="cmp_b").value == "ind-b"  # only runs of the same analysis are offered
    # textbook Spearman (random floats: no ties)
    d = (np.argsort(np.argsort(made["ind_a"]["induction"].ravel()))
         - np.argsort(np.argsort(made["ind_b"]["induction"].ravel())))
    rho = 1 - 6 * (d ** 2).sum() / (d.size * (d.size ** 2 - 1))
    metric = next(m for m in at.metric if m.label == "Spearman ρ")
    assert float(metric.value) == pytest.approx(rho, abs=5e-4)
    diff = next(c for c in charts(at) if "second − first" in c["layout"]["title"]["text"])
    np.testing.assert_allclose(arr(diff["data"][0]["z"]),
                               made["ind_b"]["induction"] - made["ind_a"]["induction"], atol=1e-9)


def test_runs_page_exports_reports(app_env):
    at = page("runs_page").run()
    at.multiselect(key="exp_runs").set_value(["ind-a", "ind-b"]).run()
    for fmt, name in (("json", "headscope-report.json"), ("html", "headscope-report.html"),
                      ("md", "headscope-report.zip")):
        at.radio(key="exp_fmt").set_value(fmt).run()
        no_errors(at)
        assert at.get("download_button")[0].proto.label == f"download {name}"


def test_runs_page_empty_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_RUNS", str(tmp_path / "none"))
    at = page("runs_page").run()
    no_errors(at)
    assert "No runs" in at.info[0].value


# --------------------------------------------------------------------------- Heads
def test_heads_page_heatmap_table_and_drilldown(app_env):
    root, made = app_env
    at = page("heads_page").run()
    at.selectbox(key="heads_run").select("ind-a").run()
    at.selectbox(key="heads_score").select("induction").run()
    no_errors(at)
    s = made["ind_a"]["induction"]
    heat = charts(at)[0]
    np.testing.assert_allclose(arr(heat["data"][0]["z"]), s)
    top = at.dataframe[0].value  # the top-heads table, then the head stats
    order = np.argsort(-s, axis=None)
    assert list(top["head"][:3]) == [f"L{i // 6}H{i % 6}" for i in order[:3]]
    # drill-down on the top head: its stats and its per-example scores (stored in examples.jsonl)
    best = f"L{order[0] // 6}H{order[0] % 6}"
    assert at.selectbox(key="heads_head").value == best
    stats = at.dataframe[1].value
    row = stats[stats["score"] == "induction"].iloc[0]
    assert row["rank"] == 1 and row["value"] == pytest.approx(s.max())
    per = next(c for c in charts(at) if "per example" in c["layout"]["title"]["text"])
    l, h = divmod(int(order[0]), 6)
    np.testing.assert_allclose(arr(per["data"][0]["y"]), made["per"][:, l, h])


def test_heads_drilldown_follows_the_score(app_env):
    """Switching the score (or run) starts the drill-down at the new score's top head, and the
    per-example chart shows unconnected points with plain-number ticks."""
    root, made = app_env
    at = page("heads_page").run()
    at.selectbox(key="heads_run").select("ind-a").run()
    first, second = "previous_token", "induction"   # the second has per-example values
    at.selectbox(key="heads_score").select(first).run()
    low = views_label(np.argsort(made["ind_a"][first], axis=None)[0])                # the lowest head of `first`
    at.selectbox(key="heads_head").select(low).run()
    at.selectbox(key="heads_score").select(second).run()
    no_errors(at)
    assert at.selectbox(key="heads_head").value == views_label(np.argsort(-made["ind_a"][second], axis=None)[0])
    per = next(c for c in charts(at) if "per example" in c["layout"]["title"]["text"])
    assert per["data"][0]["mode"] == "markers" and per["layout"]["yaxis"]["tickformat"] == ".3~g"


def views_label(flat_index: int, H: int = 6) -> str:
    return f"L{flat_index // H}H{flat_index % H}"


def test_heads_page_kv_scores_and_run_from_url(app_env):
    at = page("heads_page")
    at.query_params["run"] = "kv"
    at.run()
    no_errors(at)
    assert at.selectbox(key="heads_run").value == "kv"
    assert charts(at)[0]["layout"]["xaxis"]["title"]["text"] == "KV head"
    assert at.selectbox(key="heads_head").value.startswith("L") and "KV" in at.selectbox(key="heads_head").value


def test_heads_page_example_pattern_and_recompute(model_env, tiny_model_dir):
    """On a real run of the tiny model: the pattern of a head on a stored example, and the per-example
    scores recomputed in the background (the run kept only the average)."""
    from headscope.analyses.base import run_analysis
    from headscope.app import ui
    root, _ = model_env
    loaded = ui.model_pool().get(str(tiny_model_dir), timeout=TIMEOUT)
    run = run_analysis("induction", lm=loaded.lm, probe=loaded.probe, out=root / "tiny-ind", progress=False,
                       options={"n_examples": 3, "seq_len": 5})
    at = page("heads_page")
    at.query_params["run"] = "tiny-ind"
    at.run()
    at.selectbox(key="heads_score").select("induction").run()
    at.selectbox(key="heads_head").select("L1H2").run()
    at.selectbox(key="pat_example").select("seq0001").run()
    at.slider(key="pat_len").set_value(8).run()
    at.button(key="pat_go").click().run()
    no_errors(at)
    pat = next(c for c in charts(at) if c["layout"]["title"]["text"].startswith("L1H2 on seq0001"))
    z = arr(pat["data"][0]["z"])
    assert z.shape == (8, 8)  # queries 0-7, keys up to the last query (causal)
    np.testing.assert_allclose(z.sum(1), 1.0, atol=1e-5)
    at.button(key="perex_go").click().run()
    task = ui.tasks().get("perex:tiny-ind")
    t0 = time.time()
    while task.active and time.time() - t0 < TIMEOUT:
        time.sleep(0.1)
    at.run()
    no_errors(at)
    per = next(c for c in charts(at) if "per example" in c["layout"]["title"]["text"])
    vals = arr(per["data"][0]["y"])
    assert len(vals) == 3 and vals.mean() == pytest.approx(run.scores()["induction"][1, 2], abs=1e-6)


# --------------------------------------------------------------------------- model pages
def test_inspect_page_captures_default_prompt(model_env):
    at = run_ready(page("inspect_page"))
    no_errors(at)
    at.multiselect(key="insp_heads").set_value(["L0H1", "L1H3"]).run()
    at.button(key="insp_go").click().run()
    no_errors(at)
    titles = [c["layout"]["title"]["text"] for c in charts(at)]
    assert any(t.startswith("L0H1 attention") for t in titles) and any(t.startswith("L1H3 attention") for t in titles)
    assert any("FAI" in t and "WAAD" in t for t in titles)
    tops = [d.value for d in at.dataframe[:2]]  # top attended tokens of each head, in head order
    assert all(t["mean_attention"].is_monotonic_decreasing for t in tops)
    assert at.metric[0].label == "tokens" and int(at.metric[0].value) > 10


def test_inspect_grid_and_dla_and_intervene_sweep(model_env):
    """The all-heads grid and DLA map are [layers, heads]; the ablation heatmap appears on request."""
    at = run_ready(page("inspect_page"))
    no_errors(at)
    titles = {c["layout"]["title"]["text"].split("<br>")[0]: c for c in charts(at)}
    assert arr(titles["entropy"]["data"][0]["z"]).shape == (2, 4)
    dla = next(c for t, c in titles.items() if t.startswith("direct effect on the logit of"))
    assert arr(dla["data"][0]["z"]).shape == (2, 4)
    at.selectbox(key="insp_stat").select("mass on token span").run()
    no_errors(at)
    grid = next(c for c in charts(at) if c["layout"]["title"]["text"].startswith("mass on token span"))
    assert (arr(grid["data"][0]["z"]) >= 0).all()
    at = run_ready(page("intervene_page"))
    at.multiselect(key="iv_heads").set_value(["L0H0"]).run()
    at.button(key="iv_sweep_go").click().run()
    no_errors(at)
    sweep = next(c for c in charts(at) if "with each head zero-ablated" in c["layout"]["title"]["text"])
    assert arr(sweep["data"][0]["z"]).shape == (2, 4) and (arr(sweep["data"][0]["z"]) >= 0).all()  # KL >= 0


def test_inspect_page_long_prompt_is_pooled(model_env):
    at = run_ready(page("inspect_page"))
    at.text_area(key="insp_text").input("the cat sat on the mat. " * 30).run()
    at.button(key="insp_go").click().run()
    no_errors(at)
    pat = next(c for c in charts(at) if re.match(r"L\d+H\d+ attention", c["layout"]["title"]["text"]))
    assert "(pooled)" in pat["layout"]["title"]["text"]
    z = arr(pat["data"][0]["z"])
    assert z.shape[0] <= 128 and z.shape[1] <= 128


def test_intervene_page_live_and_save(model_env):
    root, _ = model_env
    at = run_ready(page("intervene_page"))
    at.multiselect(key="iv_heads").set_value(["L0H0", "L1H2"]).run()
    at.selectbox(key="iv_kind").select("uniform").run()
    at.slider(key="iv_gen").set_value(4).run()
    no_errors(at)
    kl = float(next(m for m in at.metric if m.label.startswith("KL")).value)
    assert kl >= 0
    assert len(at.code) == 2  # both continuations are shown
    at.button(key="iv_save").click().run()
    no_errors(at)
    saved = [r for r in list_runs(root) if r.analysis == "intervention"]
    assert len(saved) == 1
    rec = saved[0].meta["interventions"][0]
    assert rec["heads"] == ["L0H0", "L1H2"] and rec["kind"] == "uniform"
    assert rec["metrics"]["kl"] == pytest.approx(kl, abs=5e-5)


def test_intervene_page_bad_prompt_is_one_line(model_env):
    at = run_ready(page("intervene_page"))
    at.text_area(key="iv_text").input("   ").run()
    assert not at.exception
    assert "empty" in at.error[0].value


# --------------------------------------------------------------------------- New run
def test_new_run_page_launches_background_run(model_env):
    root, _ = model_env
    before = {r.id for r in list_runs(root)}
    at = page("new_run_page").run()
    assert at.selectbox(key="nr_analysis").value == "induction"
    at.number_input(key="nr_induction_n_examples").set_value(2)
    at.number_input(key="nr_induction_seq_len").set_value(6)
    at.button[0].click()  # the form's launch button
    at.run()
    no_errors(at)
    assert any("started" in s.value for s in at.success)
    from headscope.app import ui
    rid = next(iter({p.name for p in root.iterdir() if p.name.startswith("induction-")} - before))
    job = ui.job_manager(str(root.resolve())).wait(rid, timeout=TIMEOUT)
    assert job.state == "complete", job.error
    run = load_run(root / rid)
    assert run.status == "complete" and run.meta["n_examples"] == 2 and run.scores()["induction"].shape == (2, 4)
    # a new session (page refresh) finds the finished job on disk and in the store
    at2 = page("new_run_page").run()
    no_errors(at2)
    assert any(rid in s.value and "complete" in s.value for s in at2.success)


def test_new_run_page_asks_before_a_long_run(model_env, monkeypatch):
    """Above the threshold the form shows the estimate and starts nothing until confirmed."""
    from headscope.app import ui
    monkeypatch.setattr(ui, "CONFIRM_ABOVE_S", 0.0)
    root, _ = model_env
    before = {p.name for p in root.iterdir()}
    at = page("new_run_page").run()
    at.number_input(key="nr_induction_n_examples").set_value(2)
    at.number_input(key="nr_induction_seq_len").set_value(6)
    at.button[0].click()
    at.run()
    no_errors(at)
    # 2 sequences of 2 x 6 tokens (the tokenizer adds no BOS) in one batched forward (--batch-size auto),
    # then the example pattern's forward of one sequence
    assert any("estimated time ~" in w.value and "(2 forwards, 36 tokens" in w.value for w in at.warning)
    assert {p.name for p in root.iterdir() if p.name.startswith("induction-")} - before == set()
    at.button(key="nr_confirm").click()
    at.run()
    no_errors(at)
    rid = next(iter({p.name for p in root.iterdir() if p.name.startswith("induction-")} - before))
    assert ui.job_manager(str(root.resolve())).wait(rid, timeout=TIMEOUT).state == "complete"


def test_new_run_page_reports_orphaned_job(app_env):
    """A job file left 'running' by an app process that is gone shows as interrupted, resumable."""
    root, _ = app_env
    write_run(root, "induction-x", status="running", created="2025-02-01T00:00:00")
    (root / ".jobs").mkdir()
    (root / ".jobs" / "induction-x.json").write_text(json.dumps(
        {"run_id": "induction-x", "analysis": "induction", "model": "synth-model", "options": {},
         "state": "running", "done": 1, "total": 5, "pid": 2 ** 22 + 12345, "started": 1.0}))
    at = page("new_run_page").run()
    no_errors(at)
    assert any("interrupted" in w.value for w in at.warning)
    assert at.button(key="resume_induction-x")


def test_new_run_page_rejects_bad_options(app_env):
    at = page("new_run_page").run()
    at.text_input(key="nr_induction_limit").input("many")
    at.button[0].click()
    at.run()
    assert not at.exception
    assert "limit" in at.error[0].value


def test_uploads_stay_in_runs_folder(tmp_path):
    from headscope.app.ui import save_upload
    p = save_upload(tmp_path, "../../etc/evil.jsonl", b"{}\n")
    assert p.parent == (tmp_path / "uploads").resolve() and p.name == "evil.jsonl"
    hidden = save_upload(tmp_path, "..", b"x")
    assert hidden.parent == (tmp_path / "uploads").resolve()


# --------------------------------------------------------------------------- the whole app
def test_app_main_opens_on_runs_page(app_env):
    from headscope.app import APP_MAIN
    at = AppTest.from_file(str(APP_MAIN), default_timeout=TIMEOUT).run()
    no_errors(at)
    assert at.title[0].value == "Runs"
    assert at.sidebar.selectbox(key="model").value == "synth-model"
