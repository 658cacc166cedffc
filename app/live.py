"""Model-facing work for the dashboard: capture on a prompt, interventions, example inputs.

Everything goes through the Probe API (docs/PROBE_API.md) and returns numpy/plain data, so the
Streamlit layer only draws. Memory stays bounded at long context: row statistics come from the
streaming kernels ([L, H, T] per statistic), full pattern rows only for the chosen layers and a
window of at most ``MAX_ROWS`` queries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from headscope.errors import HeadscopeError
from headscope.heads import top_labels

from .views import softmax

MAX_ROWS = 256       # query rows of full attention pattern captured at once (memory: layers x H x rows x T)


# --------------------------------------------------------------------------- tokens
def encode(lm, text: str, prepend_bos: bool = False) -> list[int]:
    """Token ids of ``text`` as the analyses encode a text record (``datasets.encode_record``: the
    one BOS policy), so what Inspect shows for token 0 is comparable with ``headscope score sinks``."""
    from headscope.analyses.datasets import encode_record
    if not text.strip():
        raise HeadscopeError("the prompt is empty")
    ids = encode_record({"text": text}, lm.tokenizer, prepend_bos=prepend_bos, bos_id=lm.info.bos_token_id).ids
    lm.info.check_length(len(ids))
    return ids


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token as the text it decodes to (byte-level 'Ġ' shown as a space)."""
    return [tokenizer.decode([int(i)]) for i in ids]


def parse_heads(labels: Sequence[str], info) -> list[tuple[int, int]]:
    from headscope.heads import parse_head
    out = []
    for lab in labels:
        l, h = parse_head(lab)
        info.check_head(l, h)
        out.append((l, h))
    return out


# --------------------------------------------------------------------------- capture
@dataclass
class PromptCapture:
    """What the Inspect page shows for one prompt. Arrays are [L, H, T] unless noted."""

    ids: list[int]
    tokens: list[str]
    alpha: np.ndarray          # attention each key receives, averaged over the queries that see it
    col_mass: np.ndarray       # attention each key receives, summed over all queries
    count: np.ndarray          # [T] number of queries that see each key without a window (sink eligibility)
    entropy: np.ndarray
    mean_dist: np.ndarray      # sum_s p[t,s] (t - s): the head's span at query t
    topk_idx: np.ndarray       # [L, H, T, k]
    topk_prob: np.ndarray      # [L, H, T, k]
    next_probs: np.ndarray     # [vocab] at the last position
    rows: tuple[int, int]      # query rows kept in ``patterns``
    patterns: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (l, h) -> [R, T]


def capture_prompt(probe, lm, ids: Sequence[int], heads: Sequence[tuple[int, int]], *,
                   rows: tuple[int, int] | None = None, topk: int = 5) -> PromptCapture:
    """Two forwards: row/column statistics for every head, then full pattern rows for ``heads``.

    ``rows`` (default: the last ``MAX_ROWS`` queries) bounds the pattern memory at
    ``len(layers) * H * R * T`` floats.
    """
    import torch

    from headscope.kernels import StatsSpec
    T = len(ids)
    x = torch.tensor([list(ids)], dtype=torch.long)
    a, b = rows if rows is not None else (max(0, T - MAX_ROWS), T)
    a, b = max(0, min(a, T - 1)), max(1, min(b, T))
    if b - a > MAX_ROWS:
        raise HeadscopeError(f"pattern window of {b - a} rows is too large (at most {MAX_ROWS})")
    spec = StatsSpec(topk=max(1, min(topk, T)), entropy=True, mean_dist=True, col_mass=True)
    with probe.capture(stats=spec) as cap:
        out = probe.forward(x, logits_to_keep=1)
    from headscope.analyses.sinks import captured_alpha
    L = len(cap.stats)
    st = {k: np.stack([cap.stats[l][k][0].float().numpy() for l in range(L)])
          for k in ("entropy", "mean_dist", "topk_idx", "topk_prob")}
    alpha, col_mass, col_count = captured_alpha(cap.stats, L)                  # [L, H, T] x2, [L, T]
    layers = sorted({l for l, _ in heads})
    patterns = {}
    if layers:
        with probe.capture(stats=StatsSpec(pattern_rows=(a, b)), layers=layers) as pc:
            probe.forward(x, logits_to_keep=1)
        for l, h in heads:
            patterns[(l, h)] = pc.stats[l]["pattern"][0, h].float().numpy()
    return PromptCapture(
        ids=list(ids), tokens=token_strings(lm.tokenizer, ids), alpha=alpha.numpy(), col_mass=col_mass.numpy(),
        count=col_count.max(0).values.numpy(),
        entropy=st["entropy"], mean_dist=st["mean_dist"],
        topk_idx=st["topk_idx"].astype(np.int64), topk_prob=st["topk_prob"],
        next_probs=softmax(out.logits[0, -1].float().numpy()), rows=(a, b), patterns=patterns)


def target_id(lm, target: str | None, logits=None) -> int:
    """The vocabulary id a metric follows: the first token of ``target``, else the argmax of
    ``logits`` (the model's own next token). An empty tokenisation raises."""
    if target:
        ids = lm.tokenizer(target, add_special_tokens=False)["input_ids"]
        if not ids:
            raise HeadscopeError(f"target {target!r} has no tokens")
        return int(ids[0])
    if logits is None:
        raise HeadscopeError("a target token is needed")
    return int(logits.argmax())


# one number per head for the current prompt: name -> (what it is, higher means)
OVERVIEW_STATS = {
    "entropy": "mean attention entropy over queries, nats (high = diffuse)",
    "sink mass (token 0)": "attention token 0 receives, averaged over queries (Gu's alpha_0)",
    "top-1 distance": "mean distance from each query to its most-attended key, tokens",
    "mean span": "mean over queries of sum_s p[t, s] (t - s), tokens",
    "mass on token span": "attention on the chosen token span, averaged over all queries",
}


def head_overview(cap: PromptCapture, stat: str, span: tuple[int, int] | None = None) -> np.ndarray:
    """[L, H] ``stat`` (a key of ``OVERVIEW_STATS``) for every head on the captured prompt.

    Read from the streaming statistics the capture already holds, no new forward. ``span`` = [a, b)
    token positions for "mass on token span": sum over queries and span keys of p[t, s], divided by
    the number of queries (queries before the span add 0).
    """
    T = cap.entropy.shape[-1]
    if stat == "entropy":
        return cap.entropy.mean(-1)
    if stat == "sink mass (token 0)":
        return cap.alpha[:, :, 0]
    if stat == "top-1 distance":
        return (np.arange(T) - cap.topk_idx[..., 0]).mean(-1)
    if stat == "mean span":
        return cap.mean_dist.mean(-1)
    if stat == "mass on token span":
        if span is None or not 0 <= span[0] < span[1] <= T:
            raise HeadscopeError(f"token span must be 0 <= first < end <= {T}, got {span}")
        return cap.col_mass[:, :, span[0]:span[1]].sum(-1) / T
    raise HeadscopeError(f"unknown head statistic {stat!r}; choose one of {', '.join(OVERVIEW_STATS)}")


def direct_logits(probe, lm, ids: Sequence[int], target: str | None = None, k: int = 8) -> dict:
    """Direct logit attribution of every head at the last position (``probe.dla``).

    ``target``: text whose first token is attributed (default: the model's top-1 next token).
    Returns the target's [L, H] effects and, per head, the ``k`` tokens its direct path pushes up
    and down most (logit units, final norm frozen).
    """
    import torch

    from headscope.probe.dla import direct_logit_attribution
    dla = direct_logit_attribution(probe, torch.tensor([list(ids)]))     # [L, H, V]
    tid = target_id(lm, target, dla.logits)
    up = torch.topk(dla.effects, k, dim=-1)                                  # [L, H, k]
    down = torch.topk(-dla.effects, k, dim=-1)
    return {"id": tid, "token": lm.tokenizer.decode([tid]), "effects": dla.effects[..., tid].numpy(),
            "up_ids": up.indices.numpy(), "up": up.values.numpy(),
            "down_ids": down.indices.numpy(), "down": -down.values.numpy()}


SWEEP_METRICS = ("KL(clean ‖ ablated)", "Δ log p(target)", "Δ logit(target)")


def ablation_sweep(probe, lm, ids: Sequence[int], kind: str, metric: str, target: str | None = None,
                   scale: float = 0.0) -> tuple[np.ndarray, str]:
    """[L, H] ``metric`` with each single head ablated (``kind``: zero, uniform or scale), one batched
    ``probe.sweep_heads`` (every layer's heads in one forward from that layer on), and the target token.

    Δ metrics are ablated minus clean at the last position; the target defaults to the clean top-1.
    """
    import torch

    from headscope.analyses.safety import ships_kl
    if kind not in ("zero", "uniform", "scale"):
        raise HeadscopeError(f"the ablation heatmap sweeps zero, uniform or scale ablation, not {kind!r}")
    if metric not in SWEEP_METRICS:
        raise HeadscopeError(f"unknown sweep metric {metric!r}; choose one of {', '.join(SWEEP_METRICS)}")
    x = torch.tensor([list(ids)])
    base = probe.forward(x, logits_to_keep=1).logits[0, -1].float()
    tid = target_id(lm, target, base)
    logp = torch.log_softmax(base, -1)

    def value(logits):                                                       # logits [1, 1, V]
        z = logits[0, -1].float()
        if metric == SWEEP_METRICS[0]:
            return float(ships_kl(base, z))
        if metric == SWEEP_METRICS[1]:
            return float(torch.log_softmax(z, -1)[tid] - logp[tid])
        return float(z[tid] - base[tid])
    scores = probe.sweep_heads(x, value, kind=kind, value=float(scale) if kind == "scale" else None, logits_to_keep=1)
    return scores.numpy(), lm.tokenizer.decode([tid])


def fai_waad_series(probe, lm, ids: Sequence[int]) -> dict | None:
    """FAI and WAAD over the whole prompt as the ``fai`` analysis computes them, with its default
    options (Li et al., SCIENCE.md section 5); ``None`` when that analysis is not installed.

    One more forward: FAI's column sums use the analysis's query band (``H_lo``/``H_hi``), which
    differs from the plain column means used for sinks.
    """
    import torch

    from headscope.kernels import StatsSpec
    try:
        from headscope.analyses import fai
    except ImportError:
        return None
    o = fai.FAIAnalysis.parse_options({})   # the analysis defaults
    L, N = lm.info.n_layers, len(ids)
    spec = StatsSpec(mean_dist=True, window_dist=o["W"], col_mass=True, col_band=(o["H_lo"], o["H_hi"]))
    with probe.capture(stats=spec) as cap:
        probe.forward(torch.tensor([list(ids)]), logits_to_keep=1)
    res = fai.fai_waad(cap.stats, L, N, start=0, layers=list(range(L)), W=o["W"], H_lo=o["H_lo"], H_hi=o["H_hi"],
                       local_frac=o["local_frac"], global_frac=o["global_frac"], exclude_bos=False)
    return {"series": {"WAAD (local heads)": res["waad"], "FAI (global heads)": res["fai"]},
            "local": res["local"], "global": res["global"],
            "options": {k: o[k] for k in ("W", "H_lo", "H_hi", "local_frac", "global_frac")}}


# --------------------------------------------------------------------------- interventions
KINDS = ("zero", "uniform", "scale", "mean", "patch")


def head_z(probe, ids: Sequence[int], layers: Sequence[int]) -> dict:
    """``{layer: blocks.{l}.attn.hook_z}`` of ``ids``, each a tensor [1, T, H, d_head]."""
    import torch
    names = [f"blocks.{l}.attn.hook_z" for l in sorted(set(layers))]
    with probe.capture(activations=names) as cap:
        probe.forward(torch.tensor([list(ids)]), logits_to_keep=1)
    return {int(n.split(".")[1]): cap.acts[n] for n in names}


def make_ops(probe, ids: Sequence[int], heads: Sequence[tuple[int, int]], kind: str, *, scale: float = 0.0,
             source_ids: Sequence[int] | None = None) -> list:
    """Probe operators for ``kind`` on ``heads``.

    zero / scale: the head output times 0 / ``scale``; uniform: the head attends uniformly to its
    prefix (Ships' UA, retrieval masking); mean: the head output replaced by its mean over this
    prompt's positions; patch: the head output at each position replaced by its value on
    ``source_ids`` (positions that both prompts have, from the start).
    """
    from headscope.probe import HeadAblation, Patch
    if kind not in KINDS:
        raise HeadscopeError(f"unknown intervention {kind!r}; choose one of {', '.join(KINDS)}")
    if not heads:
        raise HeadscopeError("pick at least one head to intervene on")
    if kind in ("zero", "uniform"):
        return [HeadAblation(l, h, kind) for l, h in heads]
    if kind == "scale":
        return [HeadAblation(l, h, "scale", value=float(scale)) for l, h in heads]
    if kind == "mean":
        z = head_z(probe, ids, [l for l, _ in heads])
        return [HeadAblation(l, h, "mean", value=z[l][0, :, h].mean(0)) for l, h in heads]
    if not source_ids:
        raise HeadscopeError("patching needs a source prompt")
    z = head_z(probe, source_ids, [l for l, _ in heads])
    n = min(len(ids), len(source_ids))
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    return [Patch(f"blocks.{l}.attn.hook_z", positions=list(range(n)), heads=hs, value=z[l])
            for l, hs in by_layer.items()]


def intervention_effect(probe, lm, ids: Sequence[int], ops: list, *, max_new_tokens: int = 0,
                        target: str | None = None, k: int = 10) -> dict:
    """Next-token distribution, metrics and (optionally) greedy continuations without/with ``ops``.

    Metrics: KL(p || p_ablated) at the last position (the safety analysis's Ships KL), the top-1 token and its
    probability before/after, the entropy change, and log p(target) before/after when the target's
    first token is given.
    """
    import torch

    from headscope.analyses.safety import ships_kl
    x = torch.tensor([list(ids)])
    base = probe.forward(x, logits_to_keep=1).logits[0, -1]
    with probe.intervene(ops, phase="all"):
        after = probe.forward(x, logits_to_keep=1).logits[0, -1]
        gen_after = probe.generate(x, max_new_tokens=max_new_tokens) if max_new_tokens else None
    gen_before = probe.generate(x, max_new_tokens=max_new_tokens) if max_new_tokens else None
    p, q = softmax(base.float().numpy()), softmax(after.float().numpy())
    top_b, top_a = int(p.argmax()), int(q.argmax())
    ent = lambda d: float(-(d * np.log(d + 1e-30)).sum())  # noqa: E731
    metrics = {"kl": float(ships_kl(base, after)), "p_top1_before": float(p[top_b]), "p_top1_after": float(q[top_b]),
               "top1_changed": float(top_b != top_a), "entropy_before": ent(p), "entropy_after": ent(q)}
    if target:
        tid = target_id(lm, target)
        metrics["logp_target_before"] = float(np.log(p[tid] + 1e-30))
        metrics["logp_target_after"] = float(np.log(q[tid] + 1e-30))
    dec = lambda i: lm.tokenizer.decode([i])  # noqa: E731
    return {"p_before": p, "p_after": q, "metrics": metrics, "top1_before": dec(top_b), "top1_after": dec(top_a),
            "text_before": gen_before.text if gen_before else None, "text_after": gen_after.text if gen_after else None}


# --------------------------------------------------------------------------- examples of stored runs
def run_context(run, lm, probe):
    """The analysis and a RunContext rebuilt from a stored run's config (same examples, same seed)."""
    from headscope.analyses.base import RunContext, get_analysis
    cls = get_analysis(run.analysis)
    cfg = dict(run.meta.get("config", {}))
    data = cfg.pop("data", None)
    known = {o.name for o in cls.all_options()}
    opts = cls.parse_options({k: v for k, v in cfg.items() if k in known})
    if data and not Path(data).is_file():
        raise HeadscopeError(f"the run's data file {data} is no longer there")
    return cls(), RunContext(lm=lm, probe=probe, options=opts, data_path=Path(data) if data else None,
                             log=lambda *_: None)


def _examples(analysis, ctx, limit: int | None = None) -> list:
    exs = list(analysis.examples(ctx))
    lim = ctx.options.get("limit")
    exs = exs[:lim] if lim is not None else exs
    return exs[:limit] if limit is not None else exs


def example_ids(run, lm, probe) -> list[str]:
    analysis, ctx = run_context(run, lm, probe)
    return [ex.id for ex in _examples(analysis, ctx)]


def example_input_ids(run, example_id: str, lm, probe) -> list[int]:
    """The token ids the analysis feeds the model for one example of a stored run (``Analysis.inputs``)."""
    analysis, ctx = run_context(run, lm, probe)
    ex = next((e for e in _examples(analysis, ctx) if e.id == example_id), None)
    if ex is None:
        raise HeadscopeError(f"{run.id} has no example {example_id!r}")
    ids = analysis.inputs(ctx, ex)
    ids = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids)
    return [int(i) for i in (ids[0] if ids.ndim == 2 else ids)]


def per_example_arrays(run, lm, probe, n: int, on_progress: Callable[[int, int], None] | None = None
                       ) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Re-run the analysis's ``process`` on the first ``n`` examples; per-head arrays by name.

    For runs that stored only the average. These are the per-example arrays *before*
    ``finalize`` (for most analyses the score itself; the page says so).
    """
    analysis, ctx = run_context(run, lm, probe)
    exs = _examples(analysis, ctx, n)
    H = (lm.info.n_layers, lm.info.n_heads)
    Hkv = (lm.info.n_layers, lm.info.n_kv_heads)
    out: dict[str, list] = {}
    for i, ex in enumerate(exs):
        res = analysis.process(ctx, ex)
        if not res.skip:
            for k, v in res.arrays.items():
                a = np.asarray(v, dtype=np.float64)
                if a.shape in (H, Hkv):
                    out.setdefault(k, []).append((ex.id, a))
        if on_progress:
            on_progress(i + 1, len(exs))
    return out


def heads_default(run_scores: dict[str, np.ndarray], k: int = 3) -> list[str]:
    """Top-``k`` heads of the first per-head score: a sensible default selection."""
    for m in run_scores.values():
        if m.ndim == 2:
            return top_labels(m, k)
    return ["L0H0"]


def save_intervention(root: Path, lm, record: dict):
    """Store one intervention and its effect as a run folder (analysis ``intervention``), so it shows
    in the run browser and in reports (``meta['interventions']``)."""
    import datetime as _dt

    from headscope.analyses.base import _model_meta, versions
    from headscope.analyses.store import create_run, new_run_id, safe_join
    meta = {"analysis": "intervention", "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "model": _model_meta(lm), "config": {k: record.get(k) for k in ("kind", "heads", "scale")},
            "versions": versions()}
    base = new_run_id("intervention", lm.name)
    for i in range(1, 100):
        path = safe_join(Path(root), base if i == 1 else f"{base}-{i}")
        if not (path / "run.json").exists():
            break
    run, _ = create_run(path, meta)
    run.meta.update({"interventions": [record], "summary": {"kl": record["metrics"].get("kl")},
                     "n_examples": 1, "n_used": 1, "status": "complete", "error": None})
    run.save_meta()
    return run
