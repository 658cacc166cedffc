"""Wall time of ``circuit`` runs (IOI, induction) on the default model, and the heads they find.

Compares the induction circuit's heads with the ``induction`` analysis' top heads on the same model.
Run with one thread: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_circuit.py``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def top_heads(run, score: str, k: int = 10) -> list[str]:
    m = np.array(run.meta["scores"][score])
    return [f"a{i // m.shape[1]}.h{i % m.shape[1]}" for i in np.argsort(m, axis=None)[::-1][:k]]


def compare(circuits: dict, ind) -> None:
    """The circuits' top heads by edge mass next to the induction analysis' top induction heads."""
    top = top_heads(ind, "induction")
    print(f"induction analysis, top-10 induction heads: {', '.join(top)}")
    for task, run in circuits.items():
        mine = top_heads(run, "edge_mass")
        print(f"{task} circuit, top-10 heads by edge mass: {', '.join(mine)}; "
              f"shared with the induction top-10: {', '.join(h for h in mine if h in top) or 'none'}")


def half_corrupted(B: int, T: int, seed: int = 0, lo: int = 1000, hi: int = 20000):
    """Random prompts [B, T] with the first half corrupted; the metric reads the last token
    (answer / wrong: the first two tokens). Also used by ``gpu.py``'s circuit section."""
    from headscope.probe.graph import Batch
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(lo, hi, (B, T), generator=gen)
    corrupt = clean.clone()
    corrupt[:, :T // 2] = torch.randint(lo, hi, (B, T // 2), generator=gen)
    return Batch(clean, corrupt, torch.full((B,), T - 1), clean[:, 0], clean[:, 1])


def attribution_memory(model: str, B: int, T: int) -> None:
    """Wall time and peak RSS of one EAP-IG step (1 interpolation point) on random prompts [B, T]."""
    import resource

    from headscope.analyses.circuit_core import attribute
    from headscope.probe import load_model
    from headscope.probe.graph import CircuitGraph
    g = CircuitGraph(load_model(model).model)
    batch = half_corrupted(B, T)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    t0 = time.time()
    attribute(g, [batch], steps=1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"B={B} T={T}: {time.time() - t0:.1f} s, peak RSS {peak:.2f} GB (model loaded: {before:.2f} GB; "
          f"estimate of attribution's own: {g.attribution_bytes(B, T) / 1e9:.2f} GB)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-examples", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ig-steps", type=int, default=5)
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--summarize", default=None, help="only print the head comparison of the runs in this folder")
    ap.add_argument("--memory", default=None, metavar="B,T", help="only measure one attribution step at [B, T]")
    args = ap.parse_args()
    if args.memory:
        attribution_memory(args.model, *map(int, args.memory.split(",")))
        return
    if args.summarize:
        from headscope.analyses.store import load_run
        root = Path(args.summarize)
        compare({t: load_run(root / f"circuit-{t}") for t in ("ioi", "induction")}, load_run(root / "induction"))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from headscope.analyses.base import run_analysis
    from headscope.probe import Probe, load_model
    lm = load_model(args.model)
    probe = Probe(lm)
    root = Path(args.out or tempfile.mkdtemp(prefix="bench-circuit-"))
    print(f"model {args.model}, torch threads {torch.get_num_threads()}, runs in {root}")
    circuits = {}
    for task in ("ioi", "induction"):
        t0 = time.time()
        run = run_analysis("circuit", lm=lm, probe=probe, out=root / f"circuit-{task}", progress=False,
                           options={"task": task, "n_examples": args.n_examples, "batch_size": args.batch_size,
                                    "ig_steps": args.ig_steps, "curve_points": 8, "n_random": 2})
        s = run.meta["summary"]
        cv = s["curve"]
        circuits[task] = run
        print(f"\n== {task}: {time.time() - t0:.0f} s wall ({args.n_examples} pairs, eap-ig {args.ig_steps} steps)")
        print(f"clean {s['clean_metric']:.3f}, corrupted {s['corrupted_metric']:.3f}, minimal circuit for "
              f"{s['target_faithfulness']}: {s['minimal_circuit_edges']} of {s['n_edges_total']} edges")
        print("size        " + " ".join(f"{n:>7d}" for n in cv["sizes"]))
        print("top-n       " + " ".join(f"{v:7.3f}" for v in cv["faithfulness"]))
        print("random mean " + " ".join(f"{v:7.3f}" for v in cv["random_mean"]))
        print(f"heads in the minimal circuit: {len(s['circuit_heads'])}")
        print("top edges: " + ", ".join(f"{e['edge']} {e['score']:.3f}" for e in s["top_circuit_edges"][:12]))
    t0 = time.time()
    ind = run_analysis("induction", lm=lm, probe=probe, out=root / "induction", progress=False,
                       options={"n_examples": 10})
    print(f"\n== induction analysis: {time.time() - t0:.0f} s")
    compare(circuits, ind)


if __name__ == "__main__":
    main()
