"""Circuit runs end to end on a tiny model: the registered analysis, EAP-IG JSON / DOT, the report."""
import json

import numpy as np
import pytest
import torch

from headscope.analyses.base import run_analysis
from headscope.analyses.circuit_core import circuit_metric, top_edges_mask, top_nodes_mask
from headscope.analyses.circuit_export import from_eapig, to_dot, to_eapig
from headscope.errors import HeadscopeError
from headscope.probe import Probe, load_model
from headscope.probe.graph import GraphLayout

from .test_app import app_env, make_tiny_model_dir, model_env, tiny_model_dir  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(str(make_tiny_model_dir(tmp_path_factory.mktemp("circuit-model"))))


def test_eapig_json_round_trip_and_layout():
    L, H = 3, 4
    layout = GraphLayout(L, H, 2)
    # EAP-IG's sizes: n_forward = 1 + L (H + 1), n_backward = L (3H + 1) + 1
    assert layout.valid.shape == (1 + L * (H + 1), L * (3 * H + 1) + 1)
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(layout.valid.shape, generator=g, dtype=torch.float64) * layout.valid
    in_graph = top_edges_mask(layout, scores, 17).bool()
    d = json.loads(json.dumps(to_eapig(layout, scores, in_graph, d_model=32)))
    assert len(d["edges"]) == layout.n_edges
    assert d["edges"]["a0.h1->a1.h0<k>"]["score"] == float(scores[layout.parse_edge("a0.h1->a1.h0<k>")])
    assert set(d["nodes"]) == set(layout.upstream) | {"logits"}
    back, s2, g2, cfg = from_eapig(d)
    assert back.upstream == layout.upstream and back.targets == layout.targets
    assert torch.equal(back.valid, layout.valid)
    assert torch.equal(s2, scores) and torch.equal(g2, in_graph)
    assert cfg["n_key_value_heads"] == 2
    dot = to_dot(layout, scores, in_graph)
    assert dot.count("\" -> \"") == int(in_graph.sum())
    with pytest.raises(HeadscopeError):
        from_eapig({"cfg": {"n_layers": 1, "n_heads": 1}, "edges": {"a3.h0->logits": {"score": 1, "in_graph": True}}})


def test_circuit_run_metrics_match_hf_and_report_renders(tiny, tmp_path):
    run = run_analysis("circuit", lm=tiny, probe=Probe(tiny), out=tmp_path / "run", progress=False,
                       options={"task": "induction", "n_examples": 4, "batch_size": 2, "ig_steps": 2,
                                "curve_points": 5, "seq_len": 6})
    assert run.meta["status"] == "complete"
    s = run.meta["summary"]
    # independent check of the clean / corrupted metrics: HF's own forward on the stored prompts' ids
    from headscope.analyses.circuit import task_pairs
    from headscope.analyses.base import RunContext
    opts = {**run.meta["config"]}
    ctx = RunContext(lm=tiny, probe=None, options=opts, data_path=None)
    pairs = task_pairs(ctx)
    with torch.no_grad():
        def ld(which):
            vals = []
            for p in pairs:
                lg = tiny.model(torch.tensor([getattr(p, which)])).logits[0, -1]
                w = p.answer, p.wrong
                vals.append(float(lg[w[0]] - lg[w[1]]))
            return float(np.mean(vals))
        assert s["clean_metric"] == pytest.approx(ld("clean"), abs=1e-4)
        assert s["corrupted_metric"] == pytest.approx(ld("corrupt"), abs=1e-4)
    arrays = run.arrays()
    layout = GraphLayout(2, 4, 2)
    assert arrays["edge_scores"].shape == tuple(layout.valid.shape)
    assert not arrays["circuit"][~layout.valid.numpy()].any()
    in_c = np.array(run.meta["scores"]["in_circuit"])
    for l in range(2):
        for h in range(4):
            u = layout.up_index[f"a{l}.h{h}"]
            t = [layout.target_index[f"a{l}.h{h}<{c}>"] for c in "qkv"]
            assert in_c[l, h] == float(arrays["circuit"][u].any() or arrays["circuit"][:, t].any())
    from headscope.app.report import write_report
    html = write_report([run], "html", tmp_path / "r.html").read_text()
    assert "Faithfulness vs circuit size" in html and "<svg" in html
    data = json.loads(write_report([run], "json", tmp_path / "r.json").read_text())
    (c,) = data["edge_circuits"]
    assert len(c["edges"]) == int(arrays["circuit"].sum())
    md = write_report([run], "md", tmp_path / "r.md")
    assert (tmp_path / "r_files").is_dir() and "circuit graph" in md.read_text()


def test_a_batch_beyond_memory_is_refused_before_the_run(tiny, tmp_path, monkeypatch):
    """8 pairs of 4,000 tokens in one batch, with 256 MiB said to be free: attribution's estimate
    (~9 KB per token on this model) is over half of it, so the run stops before it is written."""
    import headscope.analyses.base as base
    monkeypatch.setattr(base, "available_memory", lambda device: 256 * 2**20)
    with pytest.raises(HeadscopeError, match="--batch-size"):
        run_analysis("circuit", lm=tiny, probe=Probe(tiny), out=tmp_path / "run", progress=False,
                     options={"task": "induction", "n_examples": 8, "batch_size": 8, "seq_len": 2_000})
    assert not (tmp_path / "run").exists()


def test_user_jsonl_pairs(tiny, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"clean": "abcab", "corrupted": "xycab", "answer": "c", "wrong": "z"},
        {"clean": "pqrpq", "corrupted": "uvrpq", "answer": "r", "wrong": "w"}]) + "\n")
    run = run_analysis("circuit", lm=tiny, probe=Probe(tiny), data=data, out=tmp_path / "run", progress=False,
                       options={"n_examples": 2, "batch_size": 2, "method": "eap", "curve_points": 4})
    assert run.meta["summary"]["task"] == "data file" and run.meta["summary"]["n_pairs"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"clean": "abc", "corrupted": "abcd", "answer": "c", "wrong": "z"}) + "\n")
    with pytest.raises(HeadscopeError, match="record 1"):
        run_analysis("circuit", lm=tiny, probe=Probe(tiny), data=bad, out=tmp_path / "run2", progress=False)


def test_dashboard_circuit_page_sizes_and_patterns(model_env, tiny_model_dir):
    from streamlit.testing.v1 import AppTest

    from headscope.app import ui

    from .test_app import TIMEOUT, charts, no_errors, run_ready
    root, _ = model_env
    loaded = ui.model_pool().get(str(tiny_model_dir), timeout=TIMEOUT)
    run_analysis("circuit", lm=loaded.lm, probe=loaded.probe, out=root / "circ", progress=False,
                 options={"task": "induction", "n_examples": 2, "batch_size": 2, "method": "eap", "curve_points": 4,
                          "seq_len": 5})
    at = AppTest.from_string("from headscope.app import circuit_ui\ncircuit_ui.circuit_page()", default_timeout=TIMEOUT)
    at = run_ready(at)
    no_errors(at)
    at.slider(key="circ_n").set_value(6).run()
    no_errors(at)
    table = at.dataframe[0].value
    assert 0 < len(table) <= 6
    heads = at.selectbox(key="circ_head").options
    assert heads and all(h.startswith("a") for h in heads)
    at.selectbox(key="circ_head").select(heads[0]).run()
    at.button(key="pat_go").click().run()
    no_errors(at)
    layer, head = heads[0][1:].split(".h")
    assert any(c["layout"]["title"]["text"].startswith(f"L{layer}H{head} on ") for c in charts(at))


def test_node_circuits_hold_the_edges_between_the_top_nodes():
    """Node scores by hand: a1.h0 has |score| 5 on one out-edge, a0.h1 3 on one in-edge, the MLPs
    0.5 and 0.25; the top-2 node circuit is every edge among input, a0.h1, a1.h0 and logits."""
    layout = GraphLayout(2, 2, 1)
    scores = torch.zeros(layout.valid.shape, dtype=torch.float64)
    for name, v in [("a1.h0->logits", 5.0), ("input->a0.h1<v>", -3.0), ("m0->logits", 0.5), ("m1->logits", -0.25)]:
        scores[layout.parse_edge(name)] = v
    expected = ["input->a0.h1<q>", "input->a0.h1<k>", "input->a0.h1<v>", "input->a1.h0<q>", "input->a1.h0<k>",
                "input->a1.h0<v>", "a0.h1->a1.h0<q>", "a0.h1->a1.h0<k>", "a0.h1->a1.h0<v>", "input->logits",
                "a0.h1->logits", "a1.h0->logits"]
    assert torch.equal(top_nodes_mask(layout, scores, 2), layout.mask_from_edges(expected))
    three = top_nodes_mask(layout, scores, 3)  # + m0; it reads input, a0.h0 (not kept) and a0.h1
    assert torch.equal(three - top_nodes_mask(layout, scores, 2),
                       layout.mask_from_edges(["input->m0", "a0.h1->m0", "m0->a1.h0<q>", "m0->a1.h0<k>",
                                               "m0->a1.h0<v>", "m0->logits"]))


def test_greedy_node_search_run(tiny, tmp_path):
    """``--search greedy-node``: the curve is over node counts, its circuits' metrics are exact
    patching of the top-k node circuits, and the stored circuit lies within the chosen nodes."""
    run = run_analysis("circuit", lm=tiny, probe=Probe(tiny), out=tmp_path / "run", progress=False,
                       options={"task": "induction", "n_examples": 4, "batch_size": 4, "ig_steps": 2,
                                "curve_points": 4, "seq_len": 6, "search": "greedy-node", "target": 0.5})
    s = run.meta["summary"]
    cv = s["curve"]
    layout = GraphLayout(2, 4, 2)
    assert cv["units"][-1] == len(layout.upstream) - 1 and cv["units"] == sorted(set(cv["units"]))
    scores = torch.from_numpy(run.arrays()["edge_scores"])
    from headscope.analyses.base import RunContext
    from headscope.analyses.circuit import graph_of, task_pairs
    from headscope.data.circuit_tasks import batches_of
    ctx = RunContext(lm=tiny, probe=None, options={**run.meta["config"]}, data_path=None)
    g = graph_of(ctx)
    tops = [top_nodes_mask(g, scores, k) for k in cv["units"]]
    assert cv["sizes"] == [int(m.sum()) for m in tops]
    full, empty, *vals = circuit_metric(g, batches_of(task_pairs(ctx), 4), [None, g.empty_mask()] + tops)
    np.testing.assert_allclose(cv["faithfulness"], [(v - empty) / (full - empty) for v in vals], atol=1e-6)
    k = s["minimal_circuit_nodes"]
    assert k is not None and s["minimal_circuit_edges"] == int(top_nodes_mask(g, scores, k).sum())
    assert not (run.arrays()["circuit"] > top_nodes_mask(g, scores, k).numpy()).any()


def test_prune_dangling_keeps_only_paths_from_input_to_logits():
    layout = GraphLayout(2, 1)
    path = ["input->a0.h0<v>", "a0.h0->a1.h0<k>", "a1.h0->logits"]
    dangling = ["a0.h0->m0",          # m0 reaches nothing
                "m1->logits"]         # m1 is fed by nothing
    from headscope.analyses.circuit_core import prune_dangling
    kept = prune_dangling(layout, layout.mask_from_edges(path + dangling))
    assert torch.equal(kept, layout.mask_from_edges(path))


@pytest.mark.slow
@pytest.mark.parametrize("task", ["ioi", "greater_than", "retrieval", "induction"])
def test_shipped_tasks_on_smollm2_are_behaviours(smollm2, task):
    """Each task's pairs are equal-length with one-token answers, and the real model prefers the answer
    on clean prompts more than on corrupted ones (HF forward, not the circuit code)."""
    from headscope.data.circuit_tasks import induction_pairs, text_task_pairs
    tok = smollm2.tokenizer
    if task == "induction":
        pairs = induction_pairs(6, smollm2.info.vocab_size, 0, bos=smollm2.info.bos_token_id,
                                exclude=set(tok.all_special_ids), tok=tok)
    else:
        pairs = text_task_pairs(task, tok, 6, 0, None)
        for p in pairs:
            assert tok.decode([p.answer]).strip() == p.text["answer"].strip()
            assert tok.decode([p.wrong]).strip() == p.text["wrong"].strip()
    diffs = {"clean": [], "corrupt": []}
    with torch.no_grad():
        for p in pairs:
            assert len(p.clean) == len(p.corrupt)
            for which in diffs:
                lg = smollm2.model(torch.tensor([getattr(p, which)])).logits[0, -1]
                diffs[which].append(float(lg[p.answer] - lg[p.wrong]))
    assert np.mean(diffs["clean"]) > np.mean(diffs["corrupt"]) + 0.5, diffs


def test_report_names_circuit_heads_by_edge_mass_and_says_when_the_circuit_is_the_full_graph():
    from headscope.app.circuit_report import circuit_heads, facts
    edges = [{"source": s, "target": t, "score": v} for s, t, v in
             (("a0.h1", "a1.h0", -2.0), ("input", "a0.h1", 0.5), ("a1.h0", "logits", 1.0), ("a0.h0", "logits", 0.25))]
    c = {"edges": edges, "task": "t", "method": "eap", "clean_metric": 1.0, "corrupted_metric": 0.0,
         "target_faithfulness": 0.8, "minimal_circuit_edges": 110, "n_edges_total": 110, "settings": {}}
    # |score| summed per head: a1.h0 2 + 1, a0.h1 2 + 0.5, a0.h0 0.25
    assert circuit_heads(c, top=2) == "3, by |edge score| in the circuit: a1.h0, a0.h1; 1 more"
    rows = {r["key"]: r["value"] for r in facts(c)}
    assert rows["minimal circuit (edges)"].startswith("110 (the full graph")
    assert rows["minimal circuit (edges)"] != str(110)
    rows = {r["key"]: r["value"] for r in facts({**c, "minimal_circuit_edges": None})}
    assert rows["minimal circuit (edges)"].startswith("none on the curve reaches 0.8")
    rows = {r["key"]: r["value"] for r in facts({**c, "minimal_circuit_edges": 7})}
    assert rows["minimal circuit (edges)"] == "7"
