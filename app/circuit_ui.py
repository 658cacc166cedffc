"""Dashboard page for ``circuit`` runs: the circuit at a chosen size, its curve, and a head's attention."""
from __future__ import annotations

import streamlit as st

from headscope.errors import HeadscopeError

from . import circuit_report, ui


def circuit_page() -> None:
    st.title("Circuit")
    runs = [r for r in ui._runs() if r.analysis == "circuit" and r.status == "complete"]
    if not runs:
        st.info("No complete circuit run yet: `headscope score circuit --task ioi` or the **New run** page.")
        return
    run = ui._run_select(runs, "circuit run", "circ_run")
    try:
        arrays = run.arrays()
        n_total = int(run.meta["summary"]["n_edges_total"])
        default = int((arrays["circuit"] > 0).sum()) or 1   # the stored circuit's size
        n = st.slider("circuit size (top edges by |score|, dangling edges pruned)", 1, min(n_total, 2000),
                      min(default, 2000), key="circ_n")
        c = circuit_report.edge_circuit(run, {}, n_edges=n, arrays=arrays)
    except (HeadscopeError, KeyError) as e:
        ui._error(e)
        return
    st.caption(f"{c['task']} · {c['method']} · clean metric {c['clean_metric']:.3f} · corrupted "
               f"{c['corrupted_metric']:.3f} · minimal circuit for faithfulness {c['target_faithfulness']}: "
               f"{c['minimal_circuit_edges']} edges · {len(c['edges'])} edges shown after pruning")
    st.html(circuit_report.graph_svg(c))
    st.html(circuit_report.curve_svg(c))
    st.dataframe(circuit_report.edge_rows(c, n=50), hide_index=True)
    heads = [nd["name"] for nd in c["nodes"] if nd["name"].startswith("a")]
    if not heads:
        return
    pick = st.selectbox("head (its attention on an example prompt)", heads, key="circ_head")
    layer, head = (int(x) for x in pick[1:].split(".h"))
    ui._example_pattern(run, layer, head, "query_head")
