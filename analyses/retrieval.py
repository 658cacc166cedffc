"""Retrieval heads (Wu et al. 2024, arXiv 2404.15574) and the head-masking experiment.

``retrieval`` follows the reference code (nightdessert/Retrieval_Head, SCIENCE.md section 1):
greedy decoding with a KV cache on needle-in-a-haystack prompts (``niah.py``); at decode step
tau the query is the position whose logits produce ``w_tau`` (the last prompt token at tau = 0; the
prefill covers the prompt minus that token). Head (l, h) copies at tau when its top-1 key ``j``
lies in the needle-answer span [s, e) *and* the prompt holds ``w_tau`` there::

    RS_h(instance) = (1 / (e - s)) * sum_tau 1[s <= j_tau < e and x_{j_tau} = w_tau]

- code form (default): no de-duplication, so a score can exceed 1; ``set_form``: each needle
  position counts once (the paper's |g_h intersect k| / |k|);
- ``topk`` > 1: a step counts when any of the head's top-k keys copies (once per step, like the
  reference's ``break``);
- an instance counts only if the response's ROUGE-1 recall against the answer exceeds
  ``rouge_threshold`` (``rouge_score``, Porter stemming, as the reference); the score is the mean
  over those; heads above ``score_threshold`` are retrieval heads;
- a needle span that cannot be found skips the instance with a logged reason (the reference
  silently scores it 0);
- ``teacher_forced`` (never the default) scores one forward over prompt + gold answer instead. It
  is a different quantity (it also credits failed retrievals) and is stored under its own name.

GQA: scores are per query head. Top-k comes from the probe's streaming attention statistics
(``StatsSpec(topk=k)``, fp32, ties -> lowest key index), so no [heads, T] map is kept per step.

``retrieval_mask`` is the causal check: uniform attention (the head averages V over its prefix,
as the reference's zeroed query) on the top-K heads of a ``retrieval`` run, during decoding only
(the KV cache comes from the unmasked prefill), against K random heads drawn from the heads
*outside* the top max(K) set (the reference meant to exclude its top 100 but excluded nothing).

Both process one instance per forward (no ``process_batch``; ``--batch-size`` auto is 1): the
greedy decode stops per instance at EOS or a stop string and the prompts differ in length, so a
batch would need left padding, per-row stopping and top-k statistics that skip padded keys at
every step, which ``probe.generate`` does not do (docs/SCALE.md).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from headscope.errors import HeadscopeError
from headscope.heads import head_label, ranked_heads
from headscope.kernels import StatsSpec

from .base import Analysis, Example, ExampleOutput, Finalized, Option, ScoreMeta, Work, register
from .niah import TEMPLATES, NiahBuilder, load_haystack, load_needles, select_needles

STOP = ["\n"]
BINS = ((0.0, 0.0), (0.0, 0.1), (0.1, 0.5), (0.5, np.inf))  # =0, (0,.1], (.1,.5], >.5 (paper's bins)


# --------------------------------------------------------------------------- the score
def copy_scores(topk_idx, new_tokens, prompt_ids, span: tuple[int, int], set_form: bool = False) -> np.ndarray:
    """Retrieval score of one instance per head.

    ``topk_idx``: [steps, L, H, k] absolute key indices of each decode step (descending
    probability); ``new_tokens``: the ``steps`` generated ids, ``new_tokens[t]`` produced by step
    t's logits; ``prompt_ids``: the prompt; ``span``: the answer's [start, end) in the prompt.
    Returns [L, H] float64: copies / span length (code form) or distinct copied positions / span
    length (``set_form``). Keys past the prompt (generated tokens) are never in the span.
    """
    idx = torch.as_tensor(topk_idx, dtype=torch.long)
    steps, L, H, _ = idx.shape
    if steps != len(new_tokens):
        raise ValueError(f"{steps} decode steps of statistics but {len(new_tokens)} new tokens")
    s, e = span
    prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long)
    in_span = (idx >= s) & (idx < e)                                     # [steps, L, H, k]
    key_tok = prompt[idx.clamp(0, len(prompt) - 1)]
    hit = in_span & (key_tok == torch.as_tensor(new_tokens, dtype=torch.long)[:, None, None, None])
    first = hit.float().argmax(-1)                                       # first copying rank, per step
    any_hit = hit.any(-1)                                                # [steps, L, H]
    if not set_form:
        return (any_hit.sum(0).double() / (e - s)).numpy()
    pos = idx.gather(-1, first[..., None])[..., 0] - s                   # [steps, L, H] span offset
    seen = torch.zeros(L, H, e - s, dtype=torch.bool)
    for t in range(steps):
        li, hi = any_hit[t].nonzero(as_tuple=True)
        seen[li, hi, pos[t, li, hi]] = True
    return (seen.sum(-1).double() / (e - s)).numpy()


@functools.lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def rouge1_recall(answer: str, response: str) -> float:
    """ROUGE-1 recall of ``response`` against ``answer`` (``rouge_score``, Porter stemming): the
    share of the answer's unigrams (with multiplicity) that the response contains."""
    return float(_scorer().score(answer, response)["rouge1"].recall)


# --------------------------------------------------------------------------- shared set-up
def _ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HeadscopeError(f"--{name}: expected a comma list of integers, got {text!r}") from None
    if not vals:
        raise HeadscopeError(f"--{name}: empty list")
    return vals


def _depths(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HeadscopeError(f"--depths: expected a comma list of fractions, got {text!r}") from None
    if not vals or any(not 0.0 <= v <= 1.0 for v in vals):
        raise HeadscopeError(f"--depths: fractions in [0, 1] (e.g. 0,0.25,0.5), got {text!r}")
    return vals


def niah_options(lengths="512,1024,2048,4096", depths="0,0.25,0.5,0.75,1", needles="lisbon,password",
                 haystack="builtin", template="auto") -> tuple[Option, ...]:
    return (
        Option("lengths", str, lengths, "comma list of total lengths in the model's tokens (prompt + answer buffer)"),
        Option("depths", str, depths, "comma list of needle depths as fractions of the haystack (0 = start, 1 = end)"),
        Option("needles", str, needles, "comma list of needle ids from the needle file, or 'all'"),
        Option("haystack", str, haystack, "builtin (shipped prose), paul-graham (optional package, never shipped), "
                                          "a folder of .txt files or a .txt file"),
        Option("template", str, template, "prompt template: auto (chat if the tokenizer has one), base or chat",
               TEMPLATES if template else None),
    )


def _grid(ctx, o: dict, seed: int, answer_buffer: int) -> tuple[NiahBuilder, list[Example]]:
    """Validate the NIAH options and return the builder and the (needle, length, depth) examples
    with stable ids ``{needle}-L{length}-d{depth}``."""
    needles = select_needles(load_needles(ctx.data_path), o["needles"])
    lengths, depths = _ints(o["lengths"], "lengths"), _depths(o["depths"])
    max_ctx = ctx.info.max_context or max(lengths)
    builder = NiahBuilder(ctx.lm.tokenizer, load_haystack(o["haystack"]), max_context=max_ctx,
                          template=o["template"], answer_buffer=answer_buffer, seed=seed)
    for L in lengths:
        builder.check_length(L)
    exs = [Example(id=f"{n.id}-L{L}-d{d:g}", data=(n, L, d)) for n in needles for L in lengths for d in depths]
    if len({e.id for e in exs}) != len(exs):
        raise HeadscopeError("duplicate lengths, depths or needles in the grid")
    return builder, exs


def _head_name(flat: int, H: int) -> str:
    return head_label(*divmod(int(flat), H))


def _ranked(scores: np.ndarray) -> list[int]:
    """Flat head indices in ``headscope.heads`` rank order (descending, ties by (layer, head))."""
    return [l * scores.shape[-1] + h for l, h in ranked_heads(scores.reshape(-1, scores.shape[-1]))]


# --------------------------------------------------------------------------- retrieval
@register
class RetrievalAnalysis(Analysis):
    name = "retrieval"
    length_flag = "--lengths"
    description = "Retrieval heads: top-1 copy-paste from a needle while decoding NIAH prompts (Wu et al. 2024)."
    data_help = "optional needle file (JSON list of {id, needle, question, answer}, or the reference's JSONL)"
    options = niah_options() + (
        Option("topk", int, 1, "top-k attended keys checked per head and step (reference: 1)"),
        Option("set_form", bool, False, "count each needle position once (the paper's set form; default: code form)"),
        Option("teacher_forced", bool, False, "NOT the reference score: one forward over prompt + gold answer, "
                                              "no ROUGE filter (also credits failed retrievals)"),
        Option("rouge_threshold", float, 0.5, "keep instances whose ROUGE-1 recall exceeds this"),
        Option("score_threshold", float, 0.1, "retrieval heads score above this"),
        Option("max_new_tokens", int, 50, "greedy decoding budget (also the answer buffer of each length)"),
    )

    def examples(self, ctx):
        o = ctx.options
        if o["topk"] < 1:
            raise HeadscopeError("--topk must be >= 1")
        if o["max_new_tokens"] < 1:
            raise HeadscopeError("--max-new-tokens must be >= 1")
        self.builder, exs = _grid(ctx, o, ctx.seed, o["max_new_tokens"])
        return exs

    def process(self, ctx, ex):
        o = ctx.options
        needle, length, depth = ex.data
        inst = self.builder.build(needle, length, depth)
        details = inst.describe()
        if inst.span is None:
            ctx.log(f"warning: {ex.id}: the answer of needle {needle.id!r} was not found in the prompt "
                    f"(token-set overlap <= 0.9); instance skipped, not scored 0")
            return ExampleOutput(details={**details, "skip_reason": "needle span not found"}, skip=True)
        stats = StatsSpec(topk=o["topk"])
        if o["teacher_forced"]:
            scores, extra = self._teacher_forced(ctx, inst, stats, o["set_form"])
            return ExampleOutput(arrays={"retrieval_teacher_forced": scores,
                                         "active": (scores > 0).astype(np.float64)},
                                 details={**details, **extra, "head_scores": _sparse(scores)})
        gen = ctx.probe.generate(inst.input_ids, max_new_tokens=o["max_new_tokens"], stop_strings=STOP,
                                 do_sample=False, stats=stats)
        topk = gen.stacked("topk_idx")[:, :, 0, :, 0]                    # [steps, L, B, H, 1, k] -> [steps, L, H, k]
        scores = copy_scores(topk, gen.new_tokens, inst.input_ids, inst.span, o["set_form"])
        response = gen.text.strip()
        recall = rouge1_recall(needle.answer, response)
        details.update(response=response, rouge1_recall=recall, n_new_tokens=len(gen.new_tokens),
                       stop_reason=gen.stop_reason, passed=recall > o["rouge_threshold"],
                       head_scores=_sparse(scores))
        if recall <= o["rouge_threshold"]:
            return ExampleOutput(details={**details, "skip_reason": f"failed retrieval: ROUGE-1 recall "
                                          f"{recall:.2f} <= {o['rouge_threshold']}"}, skip=True)
        return ExampleOutput(arrays={"retrieval": scores, "active": (scores > 0).astype(np.float64)}, details=details)

    def example_work(self, ctx, ex):
        o = ctx.options
        inst = self.builder.build(*ex.data)
        if inst.span is None:
            return Work()
        if o["teacher_forced"]:
            return Work.forward(1, len(inst.input_ids) + len(self._gold(ctx, inst)))
        return Work.generation(len(inst.input_ids), o["max_new_tokens"])

    def _gold(self, ctx, inst) -> list[int]:
        return ctx.lm.tokenizer((" " if inst.template == "base" else "") + inst.needle.answer,
                                add_special_tokens=False)["input_ids"]

    def _teacher_forced(self, ctx, inst, stats, set_form):
        """One forward over prompt + gold answer; query i predicts gold token i."""
        gold = self._gold(ctx, inst)
        ids = inst.input_ids + gold
        n = len(inst.input_ids)
        with ctx.probe.capture(stats=stats, positions=list(range(n - 1, n - 1 + len(gold)))) as cap:
            ctx.probe.forward([ids], logits_to_keep=1)
        topk = torch.stack([cap.stats[l]["topk_idx"][0] for l in sorted(cap.stats)])  # [L, H, steps, k]
        scores = copy_scores(topk.permute(2, 0, 1, 3), gold, inst.input_ids, inst.span, set_form)
        return scores, {"n_gold_tokens": len(gold)}

    def finalize(self, ctx, agg, records):
        o = ctx.options
        key = "retrieval_teacher_forced" if o["teacher_forced"] else "retrieval"
        n_total = len(records)
        missing = [r["id"] for r in records if r.get("skip_reason") == "needle span not found"]
        scored = [r for r in records if "rouge1_recall" in r]
        kept = [r for r in records if not r.get("skip")]
        if key not in agg:
            raise HeadscopeError(f"retrieval: no instance counted ({len(scored)} decoded, none with ROUGE-1 recall "
                                 f"> {o['rouge_threshold']}; {len(missing)} without a needle span). Try shorter "
                                 f"lengths or other needles; responses are in examples.jsonl")
        scores = agg[key].mean
        L, H = scores.shape
        thr = o["score_threshold"]
        above = scores > thr
        order = _ranked(scores)
        form = ("set form (distinct needle positions)" if o["set_form"]
                else "code form (no de-duplication, can exceed 1)")
        desc = (f"top-{o['topk']} copy-paste rate from the needle per decoded token, {form}, mean over "
                + ("ALL instances, teacher-forced on the gold answer (not the reference score)" if o["teacher_forced"]
                   else f"instances with ROUGE-1 recall > {o['rouge_threshold']}"))
        meta = {key: ScoreMeta(desc, index="query_head", higher_is="retrieval head", threshold=thr),
                "active": ScoreMeta("share of counted instances in which the head copied at least once",
                                    index="query_head", higher_is="consistently active")}
        by_length: dict[str, list] = {}
        for r in scored:
            by_length.setdefault(str(r["length"]), []).append(bool(r["passed"]))
        summary = {
            "score": key,
            "template": kept[0]["template"] if kept else None,
            "n_instances": n_total,
            "n_counted": len(kept),
            "n_span_missing": len(missing),
            "pass_rate": (sum(r["passed"] for r in scored) / len(scored)) if scored else None,
            "pass_rate_by_length": {k: sum(v) / len(v) for k, v in by_length.items()},
            "mean_rouge1_recall": float(np.mean([r["rouge1_recall"] for r in scored])) if scored else None,
            "n_heads": L * H,
            "n_retrieval_heads": int(above.sum()),
            "frac_heads_above_threshold": float(above.mean()),
            "retrieval_heads": [_head_name(i, H) for i in order if scores.flat[i] > thr],
            "top_heads": [[_head_name(i, H), round(float(scores.flat[i]), 4)] for i in order[:10]],
            "bins_percent": {name: float(100 * np.mean((scores > lo) & (scores <= hi) if hi > 0 else scores == 0))
                             for name, (lo, hi) in zip(("=0", "(0,0.1]", "(0.1,0.5]", ">0.5"), BINS)},
            "always_active": [_head_name(i, H) for i in order if agg["active"].mean.flat[i] == 1.0],
        }
        if missing:
            summary["span_missing_ids"] = missing
        return Finalized(scores={key: scores, "active": agg["active"].mean}, score_meta=meta, summary=summary,
                         arrays={f"{key}_std": agg[key].std})


def _sparse(scores: np.ndarray) -> dict[str, float]:
    """Nonzero per-head scores as {"layer-head": value} (the reference JSON's keys)."""
    li, hi = np.nonzero(scores)
    return {f"{l}-{h}": round(float(scores[l, h]), 6) for l, h in zip(li.tolist(), hi.tolist())}


# --------------------------------------------------------------------------- masking
@register
class RetrievalMaskAnalysis(Analysis):
    name = "retrieval_mask"
    description = ("Masking experiment: NIAH accuracy with the top-K retrieval heads (from a retrieval run) under "
                   "uniform attention while decoding, vs K random heads outside the top set.")
    data_help = "optional needle file (as for retrieval; default: the source run's)"
    options = (
        Option("source", str, "", "retrieval run (id or folder) whose scores rank the heads (required)"),
        Option("ks", str, "1,2,5,10,20", "comma list of K: how many heads to mask"),
        Option("n_random", int, 3, "random head sets per K (seeds seed..seed+n_random-1)"),
        Option("rouge_threshold", float, 0.5, "an instance is solved when ROUGE-1 recall exceeds this"),
        Option("max_new_tokens", int, 50, "greedy decoding budget"),
    ) + niah_options(lengths="", depths="", needles="", haystack="", template="")

    def examples(self, ctx):
        from .store import resolve_run
        o = ctx.options
        if not o["source"]:
            raise HeadscopeError("retrieval_mask needs --source RUN (a complete retrieval run on the same model)")
        src = resolve_run(o["source"])
        if src.analysis != "retrieval" or src.status != "complete":
            raise HeadscopeError(f"--source {o['source']}: need a complete retrieval run, got a {src.status} "
                                 f"{src.analysis} run")
        if src.meta.get("model", {}).get("id") != ctx.lm.name:
            raise HeadscopeError(f"--source was run on {src.meta.get('model', {}).get('id')!r}, not {ctx.lm.name!r}")
        key = "retrieval_teacher_forced" if "retrieval_teacher_forced" in src.scores() else "retrieval"
        self.scores = src.scores()[key]
        self.source = {"id": src.id, "path": str(src.path), "score": key}
        # NIAH options left empty inherit the source run's; its seed and answer buffer rebuild its prompts
        cfg = src.meta["config"]
        grid = {k: (o[k] or cfg.get(k) or "") for k in ("lengths", "depths", "needles", "haystack", "template")}
        if grid["template"] not in TEMPLATES:
            raise HeadscopeError(f"--template must be one of {', '.join(TEMPLATES)}")
        if ctx.data_path is None and cfg.get("data"):
            from pathlib import Path
            ctx.data_path = Path(cfg["data"])
        self.ks = sorted(set(_ints(o["ks"], "ks")))
        n = self.scores.size
        if self.ks[0] < 1 or 2 * self.ks[-1] > n:
            raise HeadscopeError(f"--ks: each K must be >= 1 and leave K random heads outside the top {self.ks[-1]} "
                                 f"(K <= {n // 2} for {n} heads)")
        if o["n_random"] < 1:
            raise HeadscopeError("--n-random must be >= 1")
        self.builder, exs = _grid(ctx, {**o, **grid}, cfg.get("seed", 0), cfg.get("max_new_tokens", 50))
        self.top, self.random = head_sets(self.scores, self.ks, o["n_random"], ctx.seed)
        return exs

    def _recall(self, ctx, inst, heads: list[int]) -> tuple[float, str]:
        from headscope.probe import HeadAblation
        H = self.scores.shape[1]
        ops = [HeadAblation(layer=i // H, head=i % H, kind="uniform") for i in heads]
        with ctx.probe.intervene(ops, phase="decode"):
            gen = ctx.probe.generate(inst.input_ids, max_new_tokens=ctx.options["max_new_tokens"], stop_strings=STOP)
        response = gen.text.strip()
        return rouge1_recall(inst.needle.answer, response), response

    def example_work(self, ctx, ex):
        runs = 1 + len(self.ks) * (1 + len(self.random))         # unmasked, then top-K and each random set per K
        return Work.generation(len(self.builder.build(*ex.data).input_ids), ctx.options["max_new_tokens"]) * runs

    def process(self, ctx, ex):
        needle, length, depth = ex.data
        inst = self.builder.build(needle, length, depth)
        thr = ctx.options["rouge_threshold"]
        base, base_resp = self._recall(ctx, inst, [])
        top = np.zeros(len(self.ks))
        rnd = np.zeros((len(self.ks), ctx.options["n_random"]))
        responses = {"none": base_resp}
        for i, k in enumerate(self.ks):
            top[i], responses[f"top{k}"] = self._recall(ctx, inst, self.top[:k])
            for j, heads in enumerate(self.random):
                rnd[i, j], responses[f"random{k}-{j}"] = self._recall(ctx, inst, heads[:k])
        arrays = {"recall_none": np.array([base]), "recall_top": top, "recall_random": rnd,
                  "solved_none": np.array([float(base > thr)]), "solved_top": (top > thr).astype(float),
                  "solved_random": (rnd > thr).astype(float)}
        return ExampleOutput(arrays=arrays, details={**inst.describe(), "recall_none": base,
                                                     "recall_top": top.tolist(), "recall_random": rnd.tolist(),
                                                     "responses": responses})

    def finalize(self, ctx, agg, records):
        H = self.scores.shape[1]
        curve = []
        for i, k in enumerate(self.ks):
            rnd_recall = agg["recall_random"].mean[i]          # mean over instances, per random set
            rnd_solved = agg["solved_random"].mean[i]
            curve.append({"k": k, "top_recall": float(agg["recall_top"].mean[i]),
                          "top_solved": float(agg["solved_top"].mean[i]),
                          "random_recall": float(rnd_recall.mean()), "random_recall_std": float(rnd_recall.std()),
                          "random_solved": float(rnd_solved.mean()), "random_solved_std": float(rnd_solved.std()),
                          "top_heads_above_0": int(sum(self.scores.flat[h] > 0 for h in self.top[:k]))})
        summary = {"source_run": self.source, "ks": self.ks, "n_instances": len(records),
                   "unmasked_recall": float(agg["recall_none"].mean[0]),
                   "unmasked_solved": float(agg["solved_none"].mean[0]),
                   "curve": curve, "top_heads": [_head_name(h, H) for h in self.top[: self.ks[-1]]],
                   "random_heads": [[_head_name(h, H) for h in r[: self.ks[-1]]] for r in self.random],
                   "ablation": "uniform attention (q = 0) on decode steps only; KV cache from the unmasked prefill"}
        meta = {"source_retrieval": ScoreMeta(f"{self.source['score']} score of the source run {self.source['id']} "
                                              f"(copied, not recomputed): the top-K heads masked here are its K highest",
                                              index="query_head", higher_is="retrieval head")}
        arrays = {k: agg[k].mean for k in ("recall_top", "recall_random", "solved_top", "solved_random")}
        return Finalized(scores={"source_retrieval": self.scores}, score_meta=meta, summary=summary, arrays=arrays)


def head_sets(scores: np.ndarray, ks: list[int], n_random: int, seed: int) -> tuple[list[int], list[list[int]]]:
    """(top heads by score, ``n_random`` random orders of the *other* heads), as flat indices.

    The top list has max(ks) heads; random set j is a seeded permutation of the heads outside it,
    so the random K heads never include a top-K_max head and the sets of one seed are nested in K.
    """
    order = _ranked(np.asarray(scores))
    top = order[: max(ks)]
    rest = np.array(sorted(order[max(ks):]))
    rand = [np.random.default_rng([seed, j]).permutation(rest).tolist() for j in range(n_random)]
    return top, rand
