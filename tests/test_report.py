"""Circuit reports (headscope.app.report): JSON against the shipped schema, self-contained HTML,
Markdown with its figures, and the ``headscope report`` command."""
from __future__ import annotations

import json
import re
import shlex
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import jsonschema
import numpy as np
import pytest

from headscope.analyses.base import list_analyses
from headscope.app import report
from headscope.cli import build_parser
from headscope.errors import HeadscopeError
from tests.helpers import arr, make_runs, write_run


@pytest.fixture
def runs(tmp_path):
    made = make_runs(tmp_path / "runs")
    iv = write_run(tmp_path / "runs", "iv", analysis="intervention", created="2025-01-05T00:00:00",
                   extra={"interventions": [{"heads": ["L3H5"], "kind": "zero", "prompt": "p",
                                             "metrics": {"kl": 0.25, "nan_metric": float("nan")}}]})
    rs = made["runs"]
    return [rs["ind-a"], rs["ind-b"], rs["kv"], iv], made


def schema() -> dict:
    return json.loads(report.SCHEMA_PATH.read_text())


class _Refs(HTMLParser):
    """External references a browser would fetch: script src, link href, img src, iframe src."""

    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        for attr in ("src", "href"):
            if tag in ("script", "link", "img", "iframe") and a.get(attr):
                self.refs.append(a[attr])


def test_json_report_matches_schema_and_scores(runs, tmp_path):
    rs, made = runs
    out = report.write_report(rs, "json", tmp_path / "r.json")
    data = json.loads(out.read_text())
    jsonschema.validate(data, schema())
    jsonschema.Draft202012Validator.check_schema(schema())
    entry = next(e for e in data["runs"] if e["id"] == "ind-a")
    s = made["ind_a"]["induction"]
    np.testing.assert_allclose(np.array(entry["scores"]["induction"]["values"]), s)
    order = np.argsort(-s, axis=None)[: report.TOP_K]
    assert [h["head"] for h in entry["scores"]["induction"]["top_heads"]] == [f"L{i // 6}H{i % 6}" for i in order]
    assert data["models"][0]["id"] == "synth-model" and data["versions"]["headscope"]
    assert entry["config"] == {"seed": 0, "limit": None}
    # interventions: NaN metrics are dropped (JSON has no NaN); effects land on the head's node
    assert data["interventions"] == [{"run": "iv", "model": "synth-model", "heads": ["L3H5"], "kind": "zero",
                                      "prompt": "p", "metrics": {"kl": 0.25}, "details": {}}]
    circuit = data["circuits"][0]
    node = next(n for n in circuit["nodes"] if n["head"] == "L3H5")
    assert {"run": "iv", "kind": "zero", "metric": "kl", "value": 0.25} in node["effects"]


def test_circuit_roles_follow_thresholds_and_top_k(runs):
    rs, made = runs
    c = report.build_circuit(rs[:2], "synth-model")
    roles = {(n["head"], r["role"], r["run"]) for n in c["nodes"] for r in n["roles"]}
    s = made["ind_a"]["induction"]  # threshold 0.8 in its score_meta
    want = {(f"L{l}H{h}", "induction", "ind-a") for l, h in zip(*np.nonzero(s >= 0.8))}
    assert {x for x in roles if x[1] == "induction" and x[2] == "ind-a"} == want
    p = made["ind_a"]["previous_token"]  # no threshold: the top ROLE_TOP_K heads
    top = np.argsort(-p, axis=None)[: report.ROLE_TOP_K]
    assert {x for x in roles if x[1] == "previous-token" and x[2] == "ind-a"} == \
        {(f"L{i // 6}H{i % 6}", "previous-token", "ind-a") for i in top}
    assert (c["n_layers"], c["n_heads"]) == (4, 6)


def test_a_head_is_drawn_with_its_rarest_role(tmp_path):
    """Sinks (eps threshold) take most heads; the few induction heads among them keep their colour."""
    rng = np.random.default_rng()
    alpha = rng.uniform(0.31, 1.0, (4, 6))                     # every head sinks at eps = 0.3
    alpha[0, 0] = 0.1                                           # but one
    ind = np.zeros((4, 6))
    ind[2, 3], ind[3, 1] = 0.9, 0.5                             # two induction heads, both also sinks
    meta = lambda thr: {"description": "x", "index": "query_head", "higher_is": "x", "threshold": thr}  # noqa: E731
    sinks = write_run(tmp_path, "s", analysis="sinks", scores={"alpha_k": alpha}, score_meta={"alpha_k": meta(0.3)})
    induction = write_run(tmp_path, "i", scores={"induction": ind}, score_meta={"induction": meta(0.4)})
    for order in ([sinks, induction], [induction, sinks]):
        c = report.build_circuit(order, "synth-model")
        drawn = {n["head"]: report.node_role(n) for n in c["nodes"]}
        assert drawn.pop("L2H3") == drawn.pop("L3H1") == "induction"
        assert set(drawn.values()) == {"sink"} and len(drawn) == 24 - 1 - 2
        legend = {t.name for t in report.circuit_figure(c).data}
        assert legend == {"induction (2)", "sink (21)"}


def test_span_scores_give_global_and_local_roles(tmp_path):
    span = np.arange(24, dtype=float).reshape(4, 6)
    run = write_run(tmp_path, "fai", analysis="fai", scores={"head_span": span})
    c = report.build_circuit([run], "synth-model")
    by_role = {}
    for n in c["nodes"]:
        for r in n["roles"]:
            by_role.setdefault(r["role"], set()).add(n["head"])
    assert by_role["global"] == {"L3H5", "L3H4", "L3H3", "L3H2", "L3H1"}
    assert by_role["local"] == {"L0H0", "L0H1", "L0H2", "L0H3", "L0H4"}


def test_nan_scores_become_null_and_stay_valid(tmp_path):
    s = np.full((4, 6), np.nan)
    s[1, 2] = 0.5
    run = write_run(tmp_path, "nan", scores={"induction": s})
    data = report.build_report([run])
    jsonschema.validate(data, schema())
    vals = data["runs"][0]["scores"]["induction"]["values"]
    assert vals[0][0] is None and vals[1][2] == 0.5
    assert [h["head"] for h in data["runs"][0]["scores"]["induction"]["top_heads"]] == ["L1H2"]
    json.loads(json.dumps(data, allow_nan=False))  # strict JSON


def test_html_report_is_self_contained(runs, tmp_path):
    rs, made = runs
    out = report.write_report(rs, "html", tmp_path / "r.html")
    text = out.read_text()
    p = _Refs()
    p.feed(text)
    external = [r for r in p.refs if re.match(r"(https?:)?//", r)]
    assert not external, external
    assert text.count("plotly.js v") == 1  # the library is inlined exactly once
    expected = sum(len(r.scores()) for r in rs) + 1  # every per-head score + the circuit view
    assert text.count('class="plotly-graph-div"') == expected
    # each heatmap carries its run's values (plotly's typed-array encoding of the z matrix)
    figs = re.findall(r'Plotly\.newPlot\(\s*"[^"]+",\s*(\[.*?\]),\s*\{', text, flags=re.S)
    zs = [arr(d["z"]) for f in figs for d in json.loads(f) if d.get("type") == "heatmap"]
    assert any(z.shape == (4, 6) and np.allclose(z, made["ind_a"]["induction"]) for z in zs)


def test_markdown_report_references_its_svg_figures(runs, tmp_path):
    rs, made = runs
    out = report.write_report(rs, "md", tmp_path / "sub" / "r.md")
    text = out.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) == sum(len(r.scores()) for r in rs) + 1
    for rel in images:
        f = out.parent / rel
        assert f.is_file(), rel
        root = ET.fromstring(f.read_text())  # well-formed SVG
        assert root.tag.endswith("svg")
    heat = ET.fromstring((out.parent / "r_files/ind-a-induction.svg").read_text())
    ns = "{http://www.w3.org/2000/svg}"
    tips = [r.find(f"{ns}title").text for r in heat.iter(f"{ns}rect") if r.find(f"{ns}title") is not None]
    assert len(tips) == 24
    s = made["ind_a"]["induction"]
    assert f"L2 head 3: {s[2, 3]:.4g}" in tips


def test_report_errors_are_one_line(runs, tmp_path):
    rs, _ = runs
    with pytest.raises(HeadscopeError, match="format"):
        report.write_report(rs, "pdf", tmp_path / "x.pdf")
    with pytest.raises(HeadscopeError, match="at least one run"):
        report.build_report([])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(HeadscopeError, match="cannot write"):
        report.write_report(rs, "json", blocker / "r.json")


def test_validate_report_rejects_bad_data(runs):
    rs, _ = runs
    data = report.build_report(rs)
    data["runs"][0]["scores"]["induction"]["top_heads"][0]["head"] = "head 5"
    with pytest.raises(HeadscopeError, match="report_schema.json"):
        report.validate_report(data)


def test_cli_report_command(runs, tmp_path, monkeypatch, capsys):
    from headscope.cli import main
    rs, _ = runs
    monkeypatch.setenv("HEADSCOPE_RUNS", str(rs[0].path.parent))
    out = tmp_path / "cli.json"
    assert main(["report", "ind-a", "ind-b", "--format", "json", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    jsonschema.validate(data, schema())
    assert [r["id"] for r in data["runs"]] == ["ind-a", "ind-b"]
    assert main(["report", "no-such-run", "--format", "json", "--out", str(out)]) == 2
    assert "no run" in capsys.readouterr().err


def test_group_and_rank_scores(tmp_path):
    """A membership score (Sahara's step, 0 = not chosen) names only members; a rank score no one."""
    step = np.zeros((4, 6))
    step[1, 2], step[3, 0] = 1, 2
    run = write_run(tmp_path, "sahara", analysis="sahara", scores={"sahara_step": step, "top_rank": np.ones((4, 6))})
    c = report.build_circuit([run], "synth-model")
    assert {n["head"]: [r["role"] for r in n["roles"]] for n in c["nodes"]} == {"L1H2": ["safety"], "L3H0": ["safety"]}


def test_ablation_scores_become_effects(tmp_path):
    kl = np.zeros((4, 6))
    kl[2, 1], kl[0, 5] = 0.9, 0.3
    meta = {"description": "mean KL(clean || head ablated, uniform)", "index": "query_head",
            "higher_is": "safety head", "threshold": None}
    run = write_run(tmp_path, "ships", analysis="ships", scores={"ships": kl}, score_meta={"ships": meta})
    c = report.build_circuit([run], "synth-model")
    eff = {n["head"]: n["effects"] for n in c["nodes"]}
    assert set(eff) == {"L2H1", "L0H5"}
    assert eff["L2H1"] == [{"run": "ships", "kind": "ablation score", "metric": "ships", "value": 0.9}]
    assert [r["role"] for n in c["nodes"] for r in n["roles"]] == ["safety", "safety"]


def test_dashboard_bundle(runs):
    rs, _ = runs
    import io
    import zipfile
    name, data = report.bundle(rs, "md", "export")
    assert name == "export.zip"
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = set(z.namelist())
        md = z.read("export.md").decode()
    assert set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)) == names - {"export.md"}
    name, data = report.bundle(rs, "json", "export")
    assert name == "export.json"
    jsonschema.validate(json.loads(data), schema())


# --------------------------------------------------------------------------- reproducibility and provenance
SMOLLM2_INFO = {"id": "smollm2-135m", "name": "smollm2-135m", "source": "registry", "n_layers": 4, "n_heads": 6,
                "n_kv_heads": 2, "hf_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "n_params": 134515008,
                "dtype": "float32", "path": "/cache/smollm2-135m"}


def _non_default(o):
    """A valid value of option ``o`` other than its default where one is easy to find."""
    if o.choices:
        return next((c for c in o.choices if c != o.default), o.default)
    if o.type is bool:
        return not o.default
    if o.type is int:
        v = 3 if o.default is None else o.default + 1
        return v if o.max is None or v <= o.max else o.default
    if o.type is float:
        v = (o.default or 0.0) * 0.5 + 0.1 + 0.2  # 0.30000000000000004: exact digits must survive
        return v if (o.min is None or v >= o.min) and (o.max is None or v <= o.max) else o.default
    return o.default


@pytest.mark.parametrize("name", sorted(list_analyses()))
def test_reproduce_command_parses_back_to_the_stored_options(name, tmp_path):
    """The report's command line, fed to the CLI parser, gives back the run's model, data and options."""
    cls = list_analyses()[name]
    raw = {o.name: _non_default(o) for o in cls.all_options()}
    cfg = cls.parse_options(raw)  # what run_analysis stores in run.json
    data = str(tmp_path / "my data" / "p's.jsonl") if cls.takes_data else None
    meta = {"analysis": name, "model": SMOLLM2_INFO, "config": {**cfg, "data": data, "device_map": None}}
    argv = shlex.split(report.reproduce_command(meta))
    assert argv[:3] == ["headscope", "score", name]
    args = build_parser().parse_args(argv[1:])
    extra = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    assert cls.parse_options(extra) == cfg
    assert args.model == "smollm2-135m" and getattr(args, "data", None) == data
    assert report.reproduce_command({"analysis": "intervention", "config": {}, "model": SMOLLM2_INFO}) is None
    local = {"name": "tiny", "source": "path", "path": "/abs/tiny"}
    assert shlex.split(report.reproduce_command({"analysis": name, "config": {}, "model": local}))[3:5] == \
        ["--model", "/abs/tiny"]


@pytest.mark.parametrize("name,gguf,quant", [("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
                                             ("gemma3-270m", "gemma-3-270m-q4_k_m.gguf", "Q4_K_M")])
def test_model_source_names_the_gguf_and_quantisation(name, gguf, quant):
    src = report.model_source({"name": name, "source": "registry", "hf_id": "x/y", "n_params": 7})
    assert (src["registry"], src["gguf"], src["quantization"], src["repo_id"], src["n_params"]) == \
        (name, gguf, quant, "x/y", 7)
    local = report.model_source({"name": "/m", "source": "path", "path": "/m", "n_params": 5})
    assert (local["registry"], local["gguf"], local["quantization"], local["path"]) == (None, None, None, "/m")


def test_fmt_value_rounds_to_precision():
    assert report.fmt_value(0.6240000009536744) == "0.624"
    assert report.fmt_value(67.25925925925927) == "67.26"
    assert report.fmt_value(0.00000000005) == "5e-11"
    assert report.fmt_value(0.62412, 0.0131) == "0.624 ± 0.013"
    assert report.fmt_value(12.345, 2.1) == "12.3 ± 2.1"
    assert report.fmt_value(1234.7, 150.0) == "1235 ± 150"
    assert report.fmt_value(0.5, 0.0) == "0.5" and report.fmt_value(7) == "7"


@pytest.fixture
def provenance_runs(tmp_path):
    """ind-a: a stored induction_std array; per: only per-example records; both of a registry model."""
    made = make_runs(tmp_path / "runs")
    rng = np.random.default_rng(1)
    per = rng.random((4, 4, 6))
    cfg = {"limit": 4, "seed": 7, "device": "cpu", "dtype": "float32", "batch_size": 2, "n_examples": 4,
           "seq_len": 16, "prepend_bos": True, "scale": "headscope", "data": None}
    run = write_run(tmp_path / "runs", "per", scores={"induction": per.mean(0)}, model=SMOLLM2_INFO,
                    records=[{"id": f"s{i}", "skip": False, "induction": per[i].tolist()} for i in range(4)],
                    extra={"config": cfg, "summary": {"sink_rate": 67.25925925925927, "acc": 0.6240000009536744,
                                                            "by_layer": [0.1 + 0.2, 1 / 3]},
                           "versions": {"headscope": "0.1.0", "torch": "2.13.0+cpu"},
                           "inputs": {"data_sha256": None, "weights": "fa8f522d6668f9c7"}})
    return made, run, per, cfg


def test_markdown_report_alone_reruns_and_shows_provenance_and_spread(provenance_runs, tmp_path):
    made, run, per, cfg = provenance_runs
    text = report.write_report([made["runs"]["ind-a"], run], "md", tmp_path / "r.md").read_text()
    # the command line is in a fenced block and parses back to the stored settings
    cmds = re.findall(r"```sh\n(headscope score [^\n]+)\n```", text)
    assert len(cmds) == 2
    args = build_parser().parse_args(shlex.split(cmds[1])[1:])
    assert (args.analysis, args.model, args.opt_seed, args.opt_n_examples, args.opt_seq_len, args.opt_scale) == \
        ("induction", "smollm2-135m", "7", "4", "16", "headscope")
    for want in ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1", "HuggingFaceTB/SmolLM2-135M-Instruct", "134,515,008",
                 "| seq_len | 16 |", "| prepend_bos | True |", "| inputs.weights | fa8f522d6668f9c7 |",
                 "| torch | 2.13.0+cpu |", "| sink_rate | 67.26 |", "| acc | 0.624 |", "| by_layer | 0.3, 0.3333 |"):
        assert want in text, want
    assert "67.25925925925927" not in text and "0.6240000009536744" not in text
    # spread: per-example std (population) of the top head, and the stored std array of ind-a
    mean, std = per.mean(0), per.std(0)
    l, h = np.unravel_index(np.argmax(mean), mean.shape)
    d = max(0, 1 - int(np.floor(np.log10(std[l, h]))))
    assert f"| 1 | L{l}H{h} | {mean[l, h]:.{d}f} ± {std[l, h]:.{d}f} |" in text
    assert f"- induction: top L{l}H{h} = {mean[l, h]:.{d}f} ± {std[l, h]:.{d}f}" in text
    a, a_std = made["ind_a"]["induction"], made["runs"]["ind-a"].arrays()["induction_std"]
    l, h = np.unravel_index(np.argmax(a), a.shape)
    d = max(0, 1 - int(np.floor(np.log10(a_std[l, h]))))
    n_above = int((a >= 0.8).sum())
    want = f"- induction: top L{l}H{h} = {a[l, h]:.{d}f} ± {a_std[l, h]:.{d}f}; {n_above} of 24 heads ≥ threshold"
    assert want in text


def test_html_report_shows_settings_openly(provenance_runs, tmp_path):
    made, run, per, cfg = provenance_runs
    text = report.write_report([run], "html", tmp_path / "r.html").read_text()
    assert "<details" not in text
    for k, v in cfg.items():
        if v is not None:
            assert f"<td>{k}</td><td>{v}</td>" in text, k
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in text and "headscope score induction --model smollm2-135m" in text
    assert "67.25925925925927" not in text and "<td>67.26</td>" in text
    data = report.build_report([run])
    jsonschema.validate(data, schema())
    np.testing.assert_allclose(np.array(data["runs"][0]["scores"]["induction"]["std"]), per.std(0))
    assert data["runs"][0]["model_source"]["quantization"] == "Q4_1"


def test_markdown_report_alone_reruns_a_real_run(tmp_path, monkeypatch):
    """score -> Markdown report -> the command line read back from the report gives the same scores."""
    from headscope.analyses.store import Run
    from headscope.cli import main
    from tests.helpers import make_tiny_model_dir
    monkeypatch.setenv("HEADSCOPE_THREADS", "1")
    make_tiny_model_dir(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    first = tmp_path / "first"
    assert main(["score", "induction", "--model", "tiny", "--n-examples", "3", "--seq-len", "8", "--seed", "5",
                 "--scale", "transformerlens", "--out", str(first), "--quiet"]) == 0
    run = Run(first, json.loads((first / "run.json").read_text()))
    text = report.write_report([run], "md", tmp_path / "r.md").read_text()
    cmd = re.search(r"```sh\n(headscope score [^\n]+)\n```", text).group(1)
    monkeypatch.chdir(first)  # the report is read elsewhere: a relative model path must not break it
    again = tmp_path / "again"
    assert main(shlex.split(cmd)[1:] + ["--out", str(again), "--quiet"]) == 0
    rerun = json.loads((again / "run.json").read_text())
    assert rerun["config"] == run.meta["config"]
    for name, s in run.scores().items():
        np.testing.assert_array_equal(np.array(rerun["scores"][name]), s)
    assert " ± " in text  # induction keeps <score>_std arrays: the spread is shown


def test_interrupted_run_is_reported(tmp_path):
    """A 'running' run nobody writes any more shows as interrupted; its report must still validate."""
    run = write_run(tmp_path, "dead", status="running")
    assert run.status == "interrupted"
    data = report.build_report([run])
    jsonschema.validate(data, schema())
    assert data["runs"][0]["status"] == "interrupted"


def test_report_shows_the_top_heads_pattern_on_an_example(tmp_path):
    """The run stores its headline head's attention on the first used example; the report shows it.
    Reference: HF eager ``output_attentions`` on the same ids, and numpy's argmax for the head."""
    import torch

    from headscope.analyses.base import run_analysis
    from headscope.analyses.induction import repeated_tokens
    from headscope.analyses.store import Run
    from headscope.probe import Probe, load_model
    from tests.helpers import make_tiny_model_dir
    lm = load_model(str(make_tiny_model_dir(tmp_path / "tiny")))
    seed = int(torch.randint(0, 10_000, ()).item())
    run = run_analysis("induction", lm=lm, probe=Probe(lm), out=tmp_path / "run", progress=False,
                       options={"n_examples": 2, "seq_len": 40, "seed": seed})
    s = run.scores()["induction"]
    layer, head = np.unravel_index(np.argmax(s), s.shape)
    meta = run.meta["example_pattern"]
    assert (meta["example"], meta["score"], meta["layer"], meta["head_index"]) == ("seq0000", "induction", layer, head)
    ids = repeated_tokens(lm.info.vocab_size, 40, seed * 100_003, None, set(lm.tokenizer.all_special_ids))
    lm.model.set_attn_implementation("eager")
    with torch.no_grad():
        att = lm.model(ids, output_attentions=True).attentions[layer][0, head].double().numpy()   # [T, T]
    assert meta["rows"] == [80 - 64, 80]
    np.testing.assert_allclose(run.arrays()["example_pattern"], att[16:], atol=1e-5)

    run = Run(run.path, json.loads((run.path / "run.json").read_text()))
    data = report.build_report([run])
    jsonschema.validate(data, schema())
    p = data["runs"][0]["example_pattern"]
    pooled = np.array(p["mat"])                                       # 64 x 80 -> at most 48 x 96 cells
    assert pooled.shape[0] <= 48 and pooled.shape[1] == 80
    q = np.array(p["q_edges"])
    ref = np.stack([att[16 + a:16 + b].mean(0) for a, b in zip(q[:-1], q[1:])])   # query bins average rows
    np.testing.assert_allclose(pooled, ref, atol=1e-5)
    html = report.write_report([run], "html", tmp_path / "r.html").read_text()
    assert "Example pattern" in html and f"L{layer}H{head}" in html
    text = report.write_report([run], "md", tmp_path / "r.md").read_text()
    svg_rel = re.search(r"!\[example pattern\]\(([^)]+)\)", text).group(1)
    ET.fromstring((tmp_path / svg_rel).read_text())                   # well-formed SVG


def test_runs_without_a_head_pattern_say_why(tmp_path):
    from headscope.analyses.base import run_analysis
    from headscope.probe import Probe, load_model
    from tests.helpers import make_tiny_model_dir
    lm = load_model(str(make_tiny_model_dir(tmp_path / "tiny")))
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": "a short text of some words"}) + "\n")
    run = run_analysis("massive", lm=lm, probe=Probe(lm), out=tmp_path / "run", progress=False, data=data)
    assert "example_pattern" not in run.arrays()
    text = report.write_report([run], "md", tmp_path / "r.md").read_text()
    assert "No example pattern: it scores residual activations, no head" in text
    jsonschema.validate(report.build_report([run]), schema())
