"""Future attention influence (FAI) and windowed average attention distance (WAAD) per token.

Li et al., "Attention Illuminates LLM Reasoning: The Preplan-and-Anchor Rhythm Enables
Fine-Grained Policy Optimization" (arXiv 2510.13554); no public code, so every choice the paper
leaves open is an option here and named in the run. On a span R of scored tokens (the response of a
chat transcript, or a whole plain text), with ``A`` the post-softmax attention of query t to key s:

- head span ``d(l,h) = (1/|R|) sum_{t in R} sum_{s<=t} A[t,s] (t-s)`` from the kernels' ``mean_dist``
  (never a materialised pattern). With ``exclude_bos`` the first position's term is removed and the
  row renormalised: ``(mean_dist_t - t A[t,0]) / (1 - A[t,0])`` (A[t,0] from ``segment_mass``), so
  sink heads are ranked by where they look when not sinking (rows with 1 - A[t,0] < 1e-6 count as 0;
  the subtraction works on fp32 statistics, so its error grows like 1e-7 t / (1 - A[t,0]));
- local heads = the bottom ``local_frac`` (default 0.3) of heads by d, global heads = the top
  ``global_frac`` (0.3), among the heads of ``layers`` (default all; ``rl`` = the paper's RL choice of
  5 evenly spaced layers in [L/3, 2L/3]); heads are classified per example (per transcript);
- ``WAAD_t = sum_{s<=t} Abar_loc[t,s] min(t-s, W)``, W = 10, over the local heads' mean map;
- ``FAI_s = (1/|T(s)|) sum_{t in T(s)} Abar_glob[t,s]`` with
  ``T(s) = {t in R : s + H_lo <= t <= min(N-1, s + H_hi)}`` (0-based), default H_lo = 1 (the query
  itself excluded), H_hi = None (to the end); the paper's RL setting is H_lo = 10, H_hi = 100.

Both series are linear in the attention map, so the set-mean map is never formed: WAAD is the mean
over local heads of each head's ``win_dist`` and FAI the mean over global heads of each head's
banded column sum ``col_mass`` divided by ``|T(s)|``. The span always runs to the end of the
sequence (nothing is appended after a response), so every query t >= s of a span key s lies in R.

**Peaks** (the paper leaves "peak" undefined): position i of a series x is a peak if it is valid,
``x_i >= quantile(x over valid positions, peak_quantile)`` (default 0.9), ``x_i > x_{i-1}`` and
``x_i >= x_{i+1}`` (a missing or invalid neighbour counts as lower, so a plateau marks its first
element). Valid: WAAD at t >= W (comparable positions only); FAI where |T(s)| >= ``fai_min_queries``
(FAI is noisy near the end).

Also stored: the entropy of the next-token distribution that produced each span token (the paper
contrasts it at WAAD peaks with the average). Series go to ``arrays.npz`` concatenated over
examples with ``offsets``; rendered prompts go to ``examples.jsonl``.

The text / chat-transcript input helpers it shares with ``sinks`` live in ``datasets.py``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from headscope.errors import HeadscopeError
from headscope.heads import head_label, top_labels
from headscope.kernels import StatsSpec
from headscope.probe.geometry import text_config

from .base import PREPEND_BOS, Analysis, ExampleOutput, Finalized, Option, ScoreMeta, register
from .datasets import data_examples, encode_record, shipped_data


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """``all`` | ``rl`` (5 evenly spaced layers in [L//3, 2L//3], the paper's RL choice) | ``3,5,7``."""
    s = str(spec).strip().lower()
    if s == "all":
        return list(range(n_layers))
    if s == "rl":
        return sorted({int(round(x)) for x in np.linspace(n_layers // 3, (2 * n_layers) // 3, 5)})
    try:
        out = sorted({int(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise HeadscopeError(f"--layers: expected all, rl or comma-separated layer indices, got {spec!r}") from None
    if not out or out[0] < 0 or out[-1] >= n_layers:
        raise HeadscopeError(f"--layers {spec!r}: layers must be in 0..{n_layers - 1}")
    return out


# --------------------------------------------------------------------------- pure math
def head_span(mean_dist: torch.Tensor, t_pos: torch.Tensor, p_first: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head mean attention distance over the given query rows.

    mean_dist: [L, H, R] (sum_s p[t,s](t-s) for each row t), t_pos: [R] absolute positions of the
    rows; p_first: [L, H, R] attention to position 0, given to exclude it (renormalised rows).
    Returns [L, H] float64.
    """
    md = mean_dist.double()
    if p_first is not None:
        p0 = p_first.double()
        rest = 1.0 - p0
        md = torch.where(rest > 1e-6, (md - t_pos.double() * p0) / rest.clamp_min(1e-6), torch.zeros_like(md))
    return md.mean(-1)


def split_heads(span: torch.Tensor, layers: list[int], local_frac: float, global_frac: float):
    """Bottom / top fractions of the heads in ``layers`` by span: two lists of (layer, head).

    Sizes are ``max(1, round(frac * n))``; ties are broken by the lower (layer, head) index (stable sort).
    """
    H = span.shape[1]
    cand = [(l, h) for l in layers for h in range(H)]
    vals = np.array([float(span[l, h]) for l, h in cand])
    n = len(cand)
    n_loc, n_glob = max(1, int(round(local_frac * n))), max(1, int(round(global_frac * n)))
    up = np.argsort(vals, kind="stable")
    down = np.argsort(-vals, kind="stable")
    return [cand[i] for i in up[:n_loc]], [cand[i] for i in down[:n_glob]]


def band_count(N: int, start: int, H_lo: int, H_hi: int | None) -> np.ndarray:
    """|T(s)| for s in [start, N): queries t in [s + H_lo, min(N - 1, s + H_hi)]."""
    s = np.arange(start, N)
    hi = np.full_like(s, N - 1) if H_hi is None else np.minimum(N - 1, s + H_hi)
    return np.clip(hi - (s + H_lo) + 1, 0, None)


def find_peaks(x: np.ndarray, valid: np.ndarray, q: float) -> np.ndarray:
    """Bool mask of peaks (module docstring rule): valid, >= the q-quantile of valid values,
    > left neighbour, >= right neighbour (missing / invalid neighbours count as lower)."""
    x = np.asarray(x, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool) & np.isfinite(x)
    out = np.zeros(len(x), dtype=bool)
    if not valid.any():
        return out
    thr = np.quantile(x[valid], q)
    xv = np.where(valid, x, -np.inf)
    left = np.concatenate([[-np.inf], xv[:-1]])
    right = np.concatenate([xv[1:], [-np.inf]])
    return valid & (x >= thr) & (x > left) & (x >= right)


def token_entropy(final: torch.Tensor, model, block: int = 256) -> np.ndarray:
    """Next-token entropy (nats, float64) at each row of the final-norm output ``final`` [T, d_model].

    Logits are rebuilt ``block`` rows at a time with the model's output embedding (and its final
    logit soft-cap, if any), so [T, vocab] logits are never held: at 8k tokens and a 49k vocabulary
    they would take 1.6 GB per copy. Tests check the result against the model's own logits.
    """
    head = model.get_output_embeddings()
    cap = getattr(text_config(model.config), "final_logit_softcapping", None)
    w = head.weight
    out = []
    with torch.no_grad():
        for i in range(0, final.shape[0], block):
            lg = head(final[i:i + block].to(w.device, w.dtype)).double()
            if cap:
                lg = cap * torch.tanh(lg / cap)
            lp = torch.log_softmax(lg, dim=-1)
            out.append(-(lp.exp() * lp).sum(-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def fai_waad(stats: dict[int, dict[str, torch.Tensor]], n_layers: int, N: int, start: int, *,
             layers: list[int], W: int, H_lo: int, H_hi: int | None, local_frac: float, global_frac: float,
             exclude_bos: bool, row_offset: int = 0) -> dict:
    """Everything per example from captured statistics (batch 1).

    ``stats[l]`` holds ``mean_dist``/``win_dist`` [1, H, R'] for kept rows ``row_offset + i`` (covering
    the span), ``col_mass`` [1, H, N] with ``col_band=(H_lo, H_hi)`` and, with ``exclude_bos``,
    ``segment_mass`` [1, H, R', 1] over segment (0, 1).
    """
    rows = torch.arange(start, N) - row_offset                                                # span rows
    md = torch.stack([stats[l]["mean_dist"][0][:, rows] for l in range(n_layers)])           # [L, H, R]
    p0 = (torch.stack([stats[l]["segment_mass"][0][:, rows, 0] for l in range(n_layers)])
          if exclude_bos else None)
    span = head_span(md, torch.arange(start, N), p0)                                          # [L, H]
    loc, glob = split_heads(span, layers, local_frac, global_frac)
    # WAAD of the set-mean map = mean of per-head WAAD: win_dist is linear in the attention row
    waad = torch.stack([stats[l]["win_dist"][0][h, rows].double() for l, h in loc]).mean(0).numpy()
    # FAI of the set-mean map = mean over heads of the banded column sums (also linear), / |T(s)|
    colsum = torch.stack([stats[l]["col_mass"][0][h, start:N].double() for l, h in glob]).mean(0).numpy()
    # |T(s)| counted from the band itself: equal to the kernels' col_count on full-attention layers,
    # and still the paper's count on sliding-window layers (whose col_count drops unseen queries)
    cnt = band_count(N, start, H_lo, H_hi)
    with np.errstate(invalid="ignore", divide="ignore"):
        fai = np.where(cnt > 0, colsum / np.maximum(cnt, 1), np.nan)
    return {"span": span.numpy(), "local": loc, "global": glob, "waad": waad, "fai": fai, "count": cnt}


def _heads(hs) -> list[str]:
    return [head_label(l, h) for l, h in hs]


def _nan_to_none(x) -> list:
    return [None if not math.isfinite(v) else float(v) for v in np.asarray(x, dtype=np.float64)]


# --------------------------------------------------------------------------- analysis
DEFAULT_DATA = "chat_transcripts.jsonl"


@register
class FAIAnalysis(Analysis):
    name = "fai"
    length_flag = "--max-tokens"
    description = "Per-token FAI (global heads) and WAAD (local heads) on a response or text span, with peaks."
    data_help = ("JSONL with 'prompt' + 'response' (chat transcripts; the response is scored) or 'text' "
                 "(the whole text is scored), or .txt; default: the shipped chat_transcripts.jsonl")
    options = (
        Option("W", int, 10, "WAAD window: distances are capped at W"),
        Option("H_lo", int, 1, "FAI band: queries t with t - s >= H_lo (paper's RL setting: 10)"),
        Option("H_hi", int, None, "FAI band: queries t with t - s <= H_hi (None = to the end; RL setting: 100)"),
        Option("local_frac", float, 0.3, "fraction of heads with the smallest span that are local"),
        Option("global_frac", float, 0.3, "fraction of heads with the largest span that are global"),
        Option("exclude_bos", bool, False, "head span without the first position (rows renormalised)"),
        Option("layers", str, "all", "heads to classify: all | rl (5 layers in [L/3, 2L/3]) | comma list"),
        Option("chat_template", bool, True, "render prompt/response records with the model's chat template"),
        PREPEND_BOS,
        Option("max_tokens", int, 8192, "truncate each sequence to this many tokens"),
        Option("peak_quantile", float, 0.9, "peaks must reach this per-sequence quantile"),
        Option("fai_min_queries", int, 10, "FAI peaks need |T(s)| >= this many queries"),
        Option("token_entropy", bool, True, "store the entropy of the next-token distribution behind each span token"),
    )

    def examples(self, ctx):
        o = ctx.options
        if o["W"] < 1 or o["H_lo"] < 0 or (o["H_hi"] is not None and o["H_hi"] < o["H_lo"]):
            raise HeadscopeError("fai: need W >= 1 and 0 <= H_lo <= H_hi")
        for f in ("local_frac", "global_frac"):
            if not 0 < o[f] <= 1:
                raise HeadscopeError(f"fai: --{f.replace('_', '-')} must be in (0, 1]")
        if not 0 <= o["peak_quantile"] <= 1:
            raise HeadscopeError("fai: --peak-quantile must be in [0, 1]")
        parse_layers(o["layers"], ctx.info.n_layers)
        return data_examples(ctx, DEFAULT_DATA)

    def process(self, ctx, ex):
        o, info = ctx.options, ctx.info
        enc = encode_record(ex.data, ctx.lm.tokenizer, chat_template=o["chat_template"],
                            prepend_bos=o["prepend_bos"], bos_id=info.bos_token_id, max_tokens=o["max_tokens"])
        N, a = enc.end, enc.start
        if N - a < 2:
            return ExampleOutput(skip=True, details={"skip_reason": f"span has {N - a} tokens (need >= 2)",
                                                     "n_tokens": N})
        spec = StatsSpec(mean_dist=True, window_dist=o["W"], col_mass=True, col_band=(o["H_lo"], o["H_hi"]),
                         segments=((0, 1),) if o["exclude_bos"] else ())
        first = max(a - 1, 0) if o["token_entropy"] else a   # row a-1 gives the logits that produced token a
        acts = ["ln_final.hook_normalized"] if o["token_entropy"] else []
        with ctx.probe.capture(stats=spec, activations=acts, positions=slice(first, N)) as cap:
            ctx.probe.forward(torch.tensor([enc.ids]), logits_to_keep=1)
        L = info.n_layers
        layers = parse_layers(o["layers"], L)
        r = fai_waad(cap.stats, L, N, a, layers=layers, W=o["W"], H_lo=o["H_lo"], H_hi=o["H_hi"],
                     local_frac=o["local_frac"], global_frac=o["global_frac"], exclude_bos=o["exclude_bos"],
                     row_offset=first)
        pos = np.arange(a, N)
        waad_peak = find_peaks(r["waad"], pos >= o["W"], o["peak_quantile"])
        fai_peak = find_peaks(r["fai"], r["count"] >= o["fai_min_queries"], o["peak_quantile"])
        ent = np.full(N - a, np.nan)
        if o["token_entropy"]:
            fin = cap.acts["ln_final.hook_normalized"][0]    # [N - first, d_model], rows first..N-1
            # distributions at positions first..N-2 produced tokens first+1..N-1 (first + 1 - a is 0 or 1)
            ent[first + 1 - a:] = token_entropy(fin[: N - 1 - first], ctx.lm.model)
        tok = ctx.lm.tokenizer
        is_loc = np.zeros((L, info.n_heads))
        is_glob = np.zeros((L, info.n_heads))
        for l, h in r["local"]:
            is_loc[l, h] = 1
        for l, h in r["global"]:
            is_glob[l, h] = 1
        ids = np.array(enc.ids[a:])
        top = np.argsort(-np.nan_to_num(r["fai"], nan=-np.inf), kind="stable")[:5]
        ent_ok = np.isfinite(ent)
        details = {
            "kind": enc.kind, "n_tokens": N, "span": [a, N], "rendered_prompt": enc.rendered_prompt,
            "local_heads": _heads(r["local"]), "global_heads": _heads(r["global"]),
            "waad_peaks": (pos[waad_peak]).tolist(), "fai_peaks": (pos[fai_peak]).tolist(),
            "top_fai": [{"pos": int(pos[i]), "token": tok.decode([int(ids[i])]), "fai": float(r["fai"][i])}
                        for i in top if np.isfinite(r["fai"][i])],
            "entropy_mean": float(ent[ent_ok].mean()) if ent_ok.any() else None,
            "entropy_at_waad_peaks": float(ent[waad_peak & ent_ok].mean()) if (waad_peak & ent_ok).any() else None,
            "series": {"token_ids": ids.tolist(), "waad": _nan_to_none(r["waad"]), "fai": _nan_to_none(r["fai"]),
                       "fai_count": r["count"].tolist(), "entropy": _nan_to_none(ent)},
        }
        return ExampleOutput(arrays={"head_span": r["span"], "is_local": is_loc, "is_global": is_glob},
                             details=details)

    def finalize(self, ctx, agg, records):
        o = ctx.options
        used = [r for r in records if not r.get("skip")]
        if not used:
            raise HeadscopeError("fai: every example was skipped (spans shorter than 2 tokens?)")
        scores = {"head_span": agg["head_span"].mean, "local_freq": agg["is_local"].mean,
                  "global_freq": agg["is_global"].mean}
        what = "mean attention distance over span rows" + (" (first position excluded, rows renormalised)"
                                                            if o["exclude_bos"] else "")
        meta = {
            "head_span": ScoreMeta(what, higher_is="looks further back (global)"),
            "local_freq": ScoreMeta(f"fraction of examples with the head in the bottom {o['local_frac']:.0%} "
                                    "by span", higher_is="local head (feeds WAAD)"),
            "global_freq": ScoreMeta(f"fraction of examples with the head in the top {o['global_frac']:.0%} "
                                     "by span", higher_is="global head (feeds FAI)"),
        }
        # per-token series, concatenated over examples (rebuilt from examples.jsonl, so resume-safe)
        keys = ("token_ids", "waad", "fai", "fai_count", "entropy")
        cat = {k: [] for k in keys}
        pos, ex_idx, offsets, wp, fp = [], [], [0], [], []
        for i, r in enumerate(used):
            s = r["series"]
            a, n = r["span"][0], len(s["waad"])
            for k in keys:
                cat[k].append(np.array([np.nan if v is None else v for v in s[k]], dtype=np.float64))
            p = np.arange(a, a + n)
            pos.append(p)
            ex_idx.append(np.full(n, i))
            wp.append(np.isin(p, r["waad_peaks"]))
            fp.append(np.isin(p, r["fai_peaks"]))
            offsets.append(offsets[-1] + n)
        arrays = {"offsets": np.array(offsets), "position": np.concatenate(pos), "example": np.concatenate(ex_idx),
                  "token_ids": np.concatenate(cat["token_ids"]).astype(np.int64),
                  "waad": np.concatenate(cat["waad"]).astype(np.float32),
                  "fai": np.concatenate(cat["fai"]).astype(np.float32),
                  "fai_count": np.concatenate(cat["fai_count"]).astype(np.int64),
                  "entropy": np.concatenate(cat["entropy"]).astype(np.float32),
                  "waad_peak": np.concatenate(wp), "fai_peak": np.concatenate(fp),
                  "head_span_std": agg["head_span"].std}
        ent, wpk, fpk = arrays["entropy"], arrays["waad_peak"], arrays["fai_peak"]
        ok = np.isfinite(ent)
        summary = {
            "data_file": str(ctx.data_path or shipped_data(DEFAULT_DATA)), "example_ids": [r["id"] for r in used],
            "n_tokens_scored": int(len(ent)),
            "waad_peak_rate": float(wpk.mean()), "fai_peak_rate": float(fpk.mean()),
            "entropy_mean": float(ent[ok].mean()) if ok.any() else None,
            "entropy_at_waad_peaks": float(ent[ok & wpk].mean()) if (ok & wpk).any() else None,
            "entropy_at_fai_peaks": float(ent[ok & fpk].mean()) if (ok & fpk).any() else None,
            "fai_peak_on_waad_peak": float((fpk & wpk).sum() / max(fpk.sum(), 1)),
            "peak_rule": (f"local max >= per-sequence q{o['peak_quantile']}; "
                          f"WAAD t >= W, FAI |T(s)| >= {o['fai_min_queries']}"),
        }
        span = scores["head_span"]
        summary["top_global"] = top_labels(span, 5)
        summary["top_local"] = top_labels(span, 5, ascending=True)
        return Finalized(scores=scores, score_meta=meta, summary=summary, arrays=arrays)
