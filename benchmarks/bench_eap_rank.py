"""How well EAP and EAP-IG rank edges against exact single-edge patching, over many init seeds.

The model and the Spearman are the ones of ``tests/test_circuit_graph.py`` (loaded from that file,
not imported through the repo root); the test asserts on three seeds, this sweeps many, with
prompt seeds (100+) the test does not use. Per run: Spearman of |score| vs |exact drop| over all
edges and over the edges whose exact effect is above 1e-4.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_eap_rank.py --seeds 20 --prompts 8,32,128
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=20, help="init seeds 0..N-1")
    ap.add_argument("--prompts", default="8,32,128", help="dataset sizes (multiples of 4)")
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location(
        "eap_case", Path(__file__).resolve().parents[1] / "tests" / "test_circuit_graph.py")
    case = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(case)
    from headscope.analyses.circuit_core import attribute, exact_scores
    from headscope.probe.graph import CircuitGraph

    rows = []
    for n_prompts in (int(p) for p in args.prompts.split(",")):
        for seed in range(args.seeds):
            g = CircuitGraph(case.anisotropic_llama(seed))
            batches = [case.one_token_pairs(seed=100 + s) for s in range(n_prompts // 4)]
            exact = np.abs(case.edge_values(g, exact_scores(g, batches)))
            above = exact > 1e-4
            r = [n_prompts, seed]
            for steps in (0, 5):
                a = np.abs(case.edge_values(g, attribute(g, batches, steps=steps)))
                r += [case.spearman(a, exact), case.spearman(a[above], exact[above])]
            rows.append(r)
            print(f"prompts {n_prompts:3d} seed {seed:2d}  all edges: EAP {r[2]:.3f} EAP-IG {r[4]:.3f}   "
                  f"above 1e-4 ({above.sum()}): EAP {r[3]:.3f} EAP-IG {r[5]:.3f}", flush=True)
    a = np.array(rows)
    for name, col in (("all edges, EAP", 2), ("all edges, EAP-IG", 4), ("above 1e-4, EAP", 3), ("above 1e-4, EAP-IG", 5)):
        print(f"{name:20s} min {a[:, col].min():.3f}  mean {a[:, col].mean():.3f}  max {a[:, col].max():.3f}  "
              f"runs below 0.9: {(a[:, col] < 0.9).sum()} of {len(a)}")


if __name__ == "__main__":
    main()
