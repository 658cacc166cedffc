"""Attention sinks (primary and secondary) and massive activations.

``sinks`` computes, per input (truncated to ``T`` tokens, default 64), from the kernels' column
statistics ``col_mass`` / ``col_count`` (patterns are never materialised):

- **Gu column mean** (Gu et al., ICLR 2025): ``alpha[l,h,s] = col_mass[l,h,s] / col_count[l,s]``, the
  mean attention key s receives over the queries that can see it (``1/(T-k+1) sum_{t>=k} A[t,k]`` in
  the paper's 1-based notation; ``col_count`` also handles sliding-window layers). **Sink rate**
  ``100/(L H) sum_{l,h} 1[alpha[l,h,k] > eps]`` at key position ``k`` (0-based, default 0 = first
  token), averaged over inputs; defaults eps = 0.3, T = 64 as the authors' script. Inputs shorter
  than T are skipped (the reference asserts), since the rate falls as T grows. ``input=repeated``
  feeds one random token repeated T times with no BOS unless ``--prepend-bos true`` asks for one
  (Gu et al. report 0% for RoPE models: every position is then identical, so nothing singles out
  the first); ``input=random`` feeds T random ids (BOS first under the one BOS policy,
  ``ModelInfo.leading_bos``: when the tokenizer adds one, or with ``--prepend-bos true``).
- **Sink tokens**: positions whose head-averaged ``alpha`` exceeds ``sink_threshold`` among those
  seen by at least ``min_queries`` queries (the last keys' column means rest on one or two queries);
  per head, the **sink fraction** is the share of its attention mass on those tokens (dormant /
  no-op heads are near 1).
- **ACT detection** (Yu et al., ICML 2024, reference code): per head, keys with ``alpha > 0.1``; the
  first detected key is assumed to be BOS and dropped. Caveat kept as in the reference: when the
  head does not flag position 0 (no BOS, or BOS below the threshold), the dropped "BOS" is a real
  sink; ``act_first_not_bos`` counts the heads where that happened. Like the reference, every key
  (also the last ones, with few queries) is eligible.
- **Secondary sinks** (Wong et al., arXiv 2512.22213, reference code ``hidden_state_norm_detection``):
  on the residual stream after each layer (``blocks.*.hook_resid_post``; the last entry is the final
  norm's output, as in HF ``hidden_states`` which the reference reads: ``final_norm_last``), the
  primary sink is the candidate position (0..2 for chat-template inputs, 0..1 otherwise) with the
  largest mean norm over layers; with its norms ``n_l`` and ``d = diff(n)``, the active range is
  ``start = argmax d + 1``, ``end = start + argmin d[start:] + 1``; a later position is flagged at
  layer l in [start, end) if ``|cos(h_l[i], h_l[primary])| > 0.9`` (fp32). Lifetime = number of
  flagged layers: ``secondary`` if 4 < lifetime < L - 15, ``primary_like`` (the reference's
  ``bos_sink``) if >= L - 15, else ``noise``; level = (first flagged layer, lifetime). The primary
  itself is labelled from its active range, as in the reference. Per-layer **sink score** of each
  detected sink: ``alpha`` averaged over heads (provisional: the defining notebook is missing).
  Note the reference runs bf16; here the model runs in ``--dtype`` (fp32 by default).

``massive`` (Sun et al. 2024): per layer, token and feature dimension of ``hook_resid_post``, an
activation is massive if ``|h| > abs_threshold`` (100) and ``|h| > ratio`` (1000) times the median
``|h|`` of that layer's hidden state (all tokens and dimensions of the input); dimensions flagged in
many inputs are reported as recurring.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from headscope.errors import HeadscopeError
from headscope.heads import top_labels
from headscope.kernels import StatsSpec

from .base import (PREPEND_BOS, Analysis, Example, ExampleOutput, Finalized, Option, ScoreMeta, Work,
                   forward_memory, register)
from .datasets import data_examples, encode_record, shipped_data

DEFAULT_DATA = "natural_texts.jsonl"


# --------------------------------------------------------------------------- pure math: attention
def column_means(col_mass: torch.Tensor, col_count: torch.Tensor) -> torch.Tensor:
    """Gu's alpha [L, H, T] (float64) from col_mass [L, H, T] and col_count [L, T] (or [T]).

    Keys no query can see (count 0) get 0."""
    cnt = col_count.double()
    cnt = cnt[:, None, :] if cnt.dim() == 2 else cnt
    return torch.where(cnt > 0, col_mass.double() / cnt.clamp_min(1), torch.zeros((), dtype=torch.float64))


def captured_alpha(stats: dict[int, dict[str, torch.Tensor]], n_layers: int, row: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha [L, H, T] float64, col_mass [L, H, T], col_count [L, T]) of batch row ``row`` of a capture's stats.

    Each layer is divided by its own ``col_count``: on sliding-window models (Gemma 2/3) the
    global layers' keys are seen by more queries than the windowed ones', so one layer's count
    for all would misstate alpha beyond the window. Used by ``sinks`` and the dashboard alike."""
    col_mass = torch.stack([stats[l]["col_mass"][row] for l in range(n_layers)])     # [L, H, T]
    col_count = torch.stack([stats[l]["col_count"][row] for l in range(n_layers)])   # [L, T]
    return column_means(col_mass, col_count), col_mass, col_count


def sink_rates(alpha, eps: float) -> np.ndarray:
    """Gu's sink rate per key: percent of heads with alpha > eps. alpha [heads..., T] (torch or numpy) -> [T].

    Torch-free in use (numpy on the values), so the dashboard's views reuse it."""
    a = np.asarray(alpha, dtype=np.float64)
    return 100.0 * (a > eps).reshape(-1, a.shape[-1]).mean(0)


def sink_rate(alpha_k: torch.Tensor, eps: float) -> float:
    """Percent of heads whose column mean at the key exceeds eps (one input, one key: alpha_k [heads...])."""
    return float(sink_rates(alpha_k.reshape(-1, 1), eps)[0])


def sink_tokens(alpha: torch.Tensor, counts: torch.Tensor, threshold: float, min_queries: int) -> list[int]:
    """Positions whose head-averaged alpha exceeds ``threshold``, among keys with >= min_queries queries.

    alpha [L, H, T]; counts [T] (queries per key)."""
    mean = alpha.mean((0, 1))
    ok = (mean > threshold) & (counts >= min_queries)
    return ok.nonzero().flatten().tolist()


def sink_fraction(col_mass: torch.Tensor, sinks: list[int]) -> torch.Tensor:
    """[L, H] share of each head's attention mass (summed over queries) that lands on ``sinks``."""
    total = col_mass.double().sum(-1)
    on = col_mass.double()[..., sinks].sum(-1) if sinks else torch.zeros_like(total)
    return torch.where(total > 0, on / total.clamp_min(1e-30), torch.zeros_like(total))


def act_detect(alpha: torch.Tensor, threshold: float = 0.1):
    """ACT's per-head sink sets: keys with alpha > threshold, first detected dropped (assumed BOS).

    Returns (n_sinks [L, H] int, first_not_bos [L, H] bool, Counter of kept positions over heads)."""
    L, H, _ = alpha.shape
    n = np.zeros((L, H), dtype=np.int64)
    first_not_bos = np.zeros((L, H), dtype=bool)
    where = Counter()
    flagged = alpha > threshold
    for l in range(L):
        for h in range(H):
            idx = flagged[l, h].nonzero().flatten().tolist()
            if not idx:
                continue
            first_not_bos[l, h] = idx[0] != 0
            n[l, h] = len(idx) - 1
            where.update(idx[1:])
    return n, first_not_bos, where


# --------------------------------------------------------------------------- pure math: residuals
def primary_position(resid: torch.Tensor, candidates: list[int]) -> int:
    """Candidate position with the largest mean residual norm over layers (resid [L, T, D])."""
    cands = [c for c in candidates if c < resid.shape[1]]
    norms = resid[:, cands].float().norm(dim=-1).mean(0)
    return cands[int(torch.argmax(norms))]


def active_range(norms: torch.Tensor) -> tuple[int, int]:
    """The reference's sink clipper on per-layer norms [L] of the primary: [start, end)."""
    L = norms.shape[0]
    if L < 2:
        return 0, L
    d = norms[1:] - norms[:-1]                  # [L - 1]
    start = int(torch.argmax(d)) + 1
    if start >= L - 1:                          # the rise is into the last layer: active to the end
        return start, L
    end = int(torch.argmin(d[start:])) + start + 1
    return start, end


def detect_secondary(resid: torch.Tensor, candidates: list[int], cos_threshold: float = 0.9,
                     clip: bool = True) -> tuple[int, tuple[int, int], dict[int, list[int]]]:
    """Reference secondary-sink detection on resid [L, T, D]: (primary, active range, {pos: layers}).

    The map holds the primary (its active layers) and every later position flagged in any layer."""
    L = resid.shape[0]
    p = primary_position(resid, candidates)
    start, end = active_range(resid[:, p].float().norm(dim=-1)) if clip else (0, L)
    found: dict[int, list[int]] = {p: list(range(start, end))}
    for l in range(start, end):
        h = resid[l].float()
        cos = torch.nn.functional.cosine_similarity(h[p + 1:], h[p][None], dim=-1)  # [T - p - 1]
        for i in ((cos.abs() > cos_threshold).nonzero().flatten() + p + 1).tolist():
            found.setdefault(i, []).append(l)
    return p, (start, end), found


def label_sink(lifetime: int, n_layers: int, min_lifetime: int = 4, margin: int = 15) -> str:
    """The reference's labelling machine (its ``bos_sink`` is called ``primary_like`` here)."""
    if min_lifetime < lifetime < n_layers - margin:
        return "secondary"
    if lifetime >= n_layers - margin:
        return "primary_like"
    return "noise"


# --------------------------------------------------------------------------- pure math: massive
def massive_mask(resid: torch.Tensor, abs_threshold: float = 100.0, ratio: float = 1000.0):
    """Massive activations of resid [L, T, D]: (mask [L, T, D] bool, per-layer median |h| [L])."""
    a = resid.float().abs()
    med = a.flatten(1).median(dim=-1).values  # [L]; lower middle value for even counts (torch)
    mask = (a > abs_threshold) & (a > ratio * med[:, None, None])
    return mask, med


# --------------------------------------------------------------------------- inputs
def _inputs(ctx, kind: str):
    o = ctx.options
    if kind == "data":
        return data_examples(ctx, DEFAULT_DATA)
    return [Example(id=f"{kind}{i:04d}", data={"seed": o["seed"] * 100_003 + i}) for i in range(o["n_examples"])]


def _encode(ctx, ex: Example, kind: str, T: int) -> tuple[list[int], bool]:
    """Token ids of one input and whether it came from a chat template."""
    o, info, tok = ctx.options, ctx.info, ctx.lm.tokenizer
    if kind == "data":
        enc = encode_record(ex.data, tok, chat_template=o["chat_template"], prepend_bos=o["prepend_bos"],
                            bos_id=info.bos_token_id)
        return enc.ids, enc.kind == "chat" and bool(getattr(tok, "chat_template", None)) and o["chat_template"]
    g = torch.Generator().manual_seed(ex.data["seed"])
    special = set(getattr(tok, "all_special_ids", []) or [])
    allowed = torch.tensor(sorted(set(range(info.vocab_size)) - special))
    n = T or 64
    if kind == "repeated":   # Gu's probe: every position the same token, so BOS only when asked for
        ids = [int(allowed[torch.randint(len(allowed), (1,), generator=g)])] * n
        bos = info.bos_token_id if o["prepend_bos"] else None
    else:
        ids = allowed[torch.randint(len(allowed), (n,), generator=g)].tolist()
        bos = info.leading_bos(o["prepend_bos"])
    return ([bos] + ids[:-1] if bos is not None else ids), False


def _resid(cap, L: int, final_norm_last: bool, row: int = 0) -> torch.Tensor:
    """[L, T, D] residual of batch row ``row`` after each layer (last = final-norm output if asked)."""
    hs = [cap.acts[f"blocks.{l}.hook_resid_post"][row] for l in range(L)]
    if final_norm_last:
        hs[-1] = cap.acts["ln_final.hook_normalized"][row]
    return torch.stack(hs)


def _r(x, n=4) -> list:
    return [round(float(v), n) for v in x]


# --------------------------------------------------------------------------- analyses
@register
class SinksAnalysis(Analysis):
    name = "sinks"
    length_flag = "--T"
    description = "Gu sink rate, sink tokens, ACT detection, dormant heads and secondary sinks."
    data_help = ("JSONL with 'text' (or 'prompt' + 'response', rendered with the chat template), or .txt; "
                 "default: the shipped natural_texts.jsonl")
    options = (
        Option("eps", float, 0.3, "Gu threshold: a head sinks on key k if its column mean exceeds eps"),
        Option("T", int, 64, "truncate each input to T tokens; shorter inputs are skipped (0 = keep whole inputs)"),
        Option("k", int, 0, "key position of the sink rate (0-based; 0 = first token, Gu's k = 1)"),
        Option("input", str, "data", "data (--data texts), random (random ids) or repeated (one id repeated T times)",
               ("data", "random", "repeated")),
        Option("n_examples", int, 20, "number of inputs for input=random|repeated", min=1, max=1_000_000),
        PREPEND_BOS,
        Option("chat_template", bool, True, "render prompt/response records with the model's chat template"),
        Option("sink_threshold", float, 0.2, "sink token: head-averaged column mean above this"),
        Option("min_queries", int, 8, "sink token candidates need at least this many queries"),
        Option("act_threshold", float, 0.1, "ACT per-head sink threshold on the column mean"),
        Option("cos_threshold", float, 0.9, "secondary sinks: |cos(h_i, h_primary)| above this"),
        Option("min_lifetime", int, 4, "secondary sinks live more than this many layers"),
        Option("primary_margin", int, 15, "lifetimes >= L - margin are primary-like"),
        Option("final_norm_last", bool, True, "use the final-norm output as the last layer (as HF hidden_states)"),
    )

    def examples(self, ctx):
        o = ctx.options
        if not 0 <= o["eps"] < 1 or o["T"] < 0 or o["k"] < 0 or (o["T"] and o["k"] >= o["T"]):
            raise HeadscopeError("sinks: need 0 <= --eps < 1, --T >= 0 and 0 <= --k < --T")
        return _inputs(ctx, o["input"])

    def process(self, ctx, ex):
        return self.process_batch(ctx, [ex])[0]

    def process_batch(self, ctx, examples):
        """Inputs of one length share a forward: random and repeated inputs, and data with --T > 0
        (truncated to T, shorter ones skipped), are all T long, so a batch is one forward. With
        --T 0 on data the lengths differ; each length gets its own forward instead of left padding,
        since the statistics index positions of the unpadded input (key k, the primary sink's
        candidates 0..2, sink tokens by position) and padded keys would enter ``col_count``."""
        o = ctx.options
        outs: list[ExampleOutput | None] = [None] * len(examples)
        by_length: dict[int, list[tuple[int, list[int], bool]]] = {}
        for i, ex in enumerate(examples):
            ids, chat = self._ids(ctx, ex)
            if isinstance(ids, ExampleOutput):
                outs[i] = ids
            else:
                by_length.setdefault(len(ids), []).append((i, ids, chat))
        acts = ["blocks.*.hook_resid_post"] + (["ln_final.hook_normalized"] if o["final_norm_last"] else [])
        for rows in by_length.values():
            with ctx.probe.capture(stats=StatsSpec(col_mass=True), activations=acts) as cap:
                ctx.probe.forward(torch.tensor([ids for _, ids, _ in rows]), logits_to_keep=1)
            for b, (i, ids, chat) in enumerate(rows):
                outs[i] = self._scored(ctx, cap, b, ids, chat)
        return outs

    def example_memory(self, ctx, ex):
        """The captured residual stream dominates: (L + 1) x T x d_model float32 per input, twice
        (the capture and ``_resid``'s stack), plus the forward (``forward_memory``, last logits only)."""
        ids, _ = self._ids(ctx, ex)
        T = 1 if isinstance(ids, ExampleOutput) else len(ids)
        info = ctx.info
        return 2 * 4 * (info.n_layers + 1) * T * info.d_model + forward_memory(ctx, T, logits=1)

    def example_work(self, ctx, ex):
        """One forward of the truncated input; none for an input that is skipped."""
        ids, _ = self._ids(ctx, ex)
        return Work() if isinstance(ids, ExampleOutput) else Work.forward(1, len(ids))

    def _ids(self, ctx, ex) -> tuple[list[int] | ExampleOutput, bool]:
        """(token ids truncated to --T, chat?) of one input, or (its skip output, False)."""
        T, k = ctx.options["T"], ctx.options["k"]
        ids, chat = _encode(ctx, ex, ctx.options["input"], T)
        if T and len(ids) < T:
            return ExampleOutput(skip=True, details={"skip_reason": f"{len(ids)} tokens < T = {T}",
                                                     "n_tokens": len(ids)}), False
        ids = ids[:T] if T else ids
        if k >= len(ids):
            return ExampleOutput(skip=True, details={"skip_reason": f"{len(ids)} tokens <= k = {k}",
                                                     "n_tokens": len(ids)}), False
        return ids, chat

    def _scored(self, ctx, cap, row: int, ids: list[int], chat: bool) -> ExampleOutput:
        """The output of one input, batch row ``row`` of the capture ``cap``."""
        o, info = ctx.options, ctx.info
        T, k, L, n = o["T"], o["k"], info.n_layers, len(ids)
        alpha, col_mass, col_count = captured_alpha(cap.stats, L, row)                # [L, H, n] float64
        alpha_k = alpha[..., k]
        # sink tokens and dormant heads
        full_count = col_count.max(0).values
        sinks = sink_tokens(alpha, full_count, o["sink_threshold"], o["min_queries"])
        frac = sink_fraction(col_mass, sinks)
        # ACT
        n_act, first_not_bos, act_where = act_detect(alpha, o["act_threshold"])
        # secondary sinks
        resid = _resid(cap, L, o["final_norm_last"], row)
        primary, (start, end), found = detect_secondary(resid, [0, 1, 2] if chat else [0, 1], o["cos_threshold"])
        del resid
        tok = ctx.lm.tokenizer
        mean_alpha = alpha.mean(1)                                                   # [L, n] head-averaged
        found_list = []
        for pos, layers in sorted(found.items()):
            life = len(layers)
            found_list.append({
                "pos": pos, "token_id": ids[pos], "token": tok.decode([ids[pos]]), "primary": pos == primary,
                "first_layer": layers[0] if layers else None, "lifetime": life,
                "label": label_sink(life, L, o["min_lifetime"], o["primary_margin"]),
                "layers": layers, "score_by_layer": _r(mean_alpha[:, pos]),
            })
        details = {
            "n_tokens": n, "first_token": tok.decode([ids[0]]), "sink_rate": sink_rate(alpha_k, o["eps"]),
            "sink_tokens": [{"pos": s, "token": tok.decode([ids[s]]),
                             "alpha_mean": round(float(alpha[..., s].mean()), 4)} for s in sinks],
            "act": {"sinks_by_position": {str(p): c for p, c in sorted(act_where.items())},
                    "heads_first_not_bos": int(first_not_bos.sum())},
            "primary": {"pos": primary, "active_range": [start, end]},
            "candidates": [f for f in found_list if f["label"] != "noise" or f["primary"]],
            "n_noise": sum(f["label"] == "noise" for f in found_list if not f["primary"]),
        }
        arrays = {"alpha_k": alpha_k.numpy(), "sink_k": (alpha_k > o["eps"]).double().numpy(),
                  "sink_fraction": frac.numpy(), "act_sinks": n_act.astype(np.float64),
                  "act_first_not_bos": first_not_bos.astype(np.float64),
                  "primary_score_by_layer": mean_alpha[:, primary].numpy()}
        if T:  # fixed length: per-position profiles are comparable across inputs
            arrays["alpha_by_position"] = alpha.mean((0, 1)).numpy()
            arrays["sink_rate_by_position"] = sink_rates(alpha, o["eps"])
        return ExampleOutput(arrays=arrays, details=details)

    def finalize(self, ctx, agg, records):
        o = ctx.options
        used = [r for r in records if not r.get("skip")]
        if not used:
            raise HeadscopeError(f"sinks: every input was skipped (shorter than T = {o['T']}? --T 0 keeps whole inputs)")
        rates = np.array([r["sink_rate"] for r in used])
        scores = {"alpha_k": agg["alpha_k"].mean, "sink_frequency": agg["sink_k"].mean,
                  "sink_fraction": agg["sink_fraction"].mean, "act_sinks": agg["act_sinks"].mean}
        meta = {
            "alpha_k": ScoreMeta(f"Gu column mean of key position {o['k']} (mean attention it receives)",
                                 higher_is="sinks on that token", threshold=o["eps"]),
            "sink_frequency": ScoreMeta(f"fraction of inputs with alpha_k > eps = {o['eps']}", higher_is="sink head"),
            "sink_fraction": ScoreMeta("share of the head's attention mass on the input's sink tokens",
                                       higher_is="dormant / no-op head"),
            "act_sinks": ScoreMeta(f"ACT: keys with alpha > {o['act_threshold']} besides the first detected",
                                   higher_is="more extra sinks"),
        }
        levels, prim_ranges, sec_tokens, sink_pos = Counter(), Counter(), Counter(), Counter()
        n_with_secondary = 0
        for r in used:
            prim_ranges[tuple(r["primary"]["active_range"]) + (r["primary"]["pos"],)] += 1
            sec = [c for c in r["candidates"] if c["label"] == "secondary" and not c["primary"]]
            n_with_secondary += bool(sec)
            for c in sec:
                levels[(c["first_layer"], c["lifetime"])] += 1
                sec_tokens[c["token"]] += 1
            for s in r["sink_tokens"]:
                sink_pos["first" if s["pos"] == 0 else "later"] += 1
        summary = {
            "data_file": str(ctx.data_path or shipped_data(DEFAULT_DATA)) if o["input"] == "data" else None,
            "input": o["input"], "eps": o["eps"], "T": o["T"], "k": o["k"],
            "sink_rate": float(rates.mean()), "sink_rate_std": float(rates.std()),
            "n_inputs": len(used),
            "first_tokens": dict(Counter(r["first_token"] for r in used).most_common(5)),
            "mean_sink_tokens_per_input": float(np.mean([len(r["sink_tokens"]) for r in used])),
            "sink_tokens_first_vs_later": dict(sink_pos),
            "act_heads_first_not_bos": float(agg["act_first_not_bos"].mean.sum()),
            "primary_active_ranges": {f"pos{p} layers {a}-{b}": c for (a, b, p), c in prim_ranges.most_common(5)},
            "secondary_levels": {f"({a}, {b})": c for (a, b), c in levels.most_common()},
            "secondary_tokens": dict(sec_tokens.most_common(10)),
            "inputs_with_secondary": n_with_secondary,
        }
        summary["most_dormant"] = top_labels(scores["sink_fraction"], 5)
        arrays = {f"{k}_std": agg[k].std for k in ("alpha_k", "sink_fraction")}
        arrays["primary_score_by_layer"] = agg["primary_score_by_layer"].mean
        for k in ("alpha_by_position", "sink_rate_by_position"):
            if k in agg:
                arrays[k] = agg[k].mean
        arrays["sink_rate_per_input"] = rates
        return Finalized(scores=scores, score_meta=meta, summary=summary, arrays=arrays)


@register
class MassiveAnalysis(Analysis):
    name = "massive"
    length_flag = "--max-tokens"
    description = "Massive activations in the residual stream per layer, token and dimension."
    data_help = SinksAnalysis.data_help
    no_pattern = "it scores residual activations, no head"
    options = (
        Option("abs_threshold", float, 100.0, "massive: |h| above this"),
        Option("ratio", float, 1000.0, "massive: |h| above ratio x the layer's median |h|"),
        Option("max_tokens", int, 512, "truncate each input to this many tokens (0 = whole)"),
        PREPEND_BOS,
        Option("chat_template", bool, True, "render prompt/response records with the model's chat template"),
        Option("top", int, 20, "largest massive activations listed per input"),
    )

    def examples(self, ctx):
        return data_examples(ctx, DEFAULT_DATA)

    def process(self, ctx, ex):
        o, info = ctx.options, ctx.info
        L, tok = info.n_layers, ctx.lm.tokenizer
        ids = encode_record(ex.data, tok, chat_template=o["chat_template"], prepend_bos=o["prepend_bos"],
                            bos_id=info.bos_token_id, max_tokens=o["max_tokens"] or None).ids
        with ctx.probe.capture(activations=["blocks.*.hook_resid_post"]) as cap:
            ctx.probe.forward(torch.tensor([ids]), logits_to_keep=1)
        resid = torch.stack([cap.acts[f"blocks.{l}.hook_resid_post"][0] for l in range(L)])  # [L, T, D]
        del cap
        mask, med = massive_mask(resid, o["abs_threshold"], o["ratio"])
        a = resid.abs()
        vals = a[mask]
        idx = mask.nonzero()                                                          # [n, 3] (layer, pos, dim)
        order = torch.argsort(vals, descending=True)[: o["top"]]
        hits = Counter()
        for l, p, d in idx.tolist():
            hits[(p, d)] += 1
        details = {
            "n_tokens": len(ids), "n_massive": int(mask.sum()),
            "dims": sorted({int(d) for d in idx[:, 2].tolist()}),
            "positions": [{"pos": p, "token": tok.decode([ids[p]]), "dim": d, "n_layers": c}
                          for (p, d), c in sorted(hits.items())],
            "top": [{"layer": int(idx[i, 0]), "pos": int(idx[i, 1]), "dim": int(idx[i, 2]),
                     "value": round(float(resid[tuple(idx[i].tolist())]), 2),
                     "token": tok.decode([ids[int(idx[i, 1])]])} for i in order.tolist()],
        }
        arrays = {"count_by_layer": mask.sum((1, 2)).double().numpy(),
                  "max_abs_by_layer": a.amax((1, 2)).double().numpy(),
                  "median_abs_by_layer": med.double().numpy(),
                  "first_token_massive": mask[:, 0].any(-1).double().numpy(),
                  "dim_hits": mask.sum((0, 1)).double().numpy()}
        return ExampleOutput(arrays=arrays, details=details)

    def finalize(self, ctx, agg, records):
        used = [r for r in records if not r.get("skip")]
        dim_inputs = Counter(d for r in used for d in r["dims"])
        tok_counts = Counter(p["token"] for r in used for p in r["positions"])
        pos_counts = Counter("first" if p["pos"] == 0 else "later" for r in used for p in r["positions"])
        n = max(len(used), 1)
        summary = {
            "data_file": str(ctx.data_path or shipped_data(DEFAULT_DATA)),
            "n_inputs": len(used),
            "inputs_with_massive": sum(1 for r in used if r["n_massive"]),
            "recurring_dims": {str(d): round(c / n, 3) for d, c in dim_inputs.most_common(10)},
            "massive_tokens": dict(tok_counts.most_common(10)),
            "massive_positions_first_vs_later": dict(pos_counts),
            "max_abs": float(agg["max_abs_by_layer"].mean.max()),
            "rule": f"|h| > {ctx.options['abs_threshold']} and > {ctx.options['ratio']} x layer median |h|",
        }
        arrays = {k: agg[k].mean for k in ("count_by_layer", "max_abs_by_layer", "median_abs_by_layer",
                                           "first_token_massive", "dim_hits")}
        return Finalized(scores={}, score_meta={}, summary=summary, arrays=arrays)
