"""Vision-aware head divergence (VHD), T-VHD and VHR, and their text form (context-aware, ``chd``).

He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence" (arXiv
2412.13949). The authors' code was not inspected (SCIENCE.md section 4); every choice marked
[choice] below is ours and is recorded in the run config.

**VHD** of head ``i`` in layer ``l`` at generated token ``y_t``::

    VHD_{l,i}(t) = || o_{l,i}(y_t | y_<t, x_V, x_T) - o_{l,i}(y_t | y_<t, x_T) ||_2

``o`` is the head's output at the query that produces ``y_t``: the last prompt token for t = 0,
then ``y_{t-1}`` (the probe's ``generate`` convention). Procedure per example:

1. Generate ``y`` greedily *with* the image (``max_new_tokens``; EOS, if generated, counts as a token).
2. Teacher-force ``prompt_with + y[:-1]`` and ``prompt_without + y[:-1]`` and capture the head outputs
   at the ``len(y)`` decode queries of each. The no-image prompt is the with-image token ids with the
   image span deleted (``headscope.probe.vlm``), so the text prefix is identical token for token.
3. Per token: the distance between the two outputs, and both norms (L2 is norm-dominated).

Options: ``distance`` l2 (paper) or cosine (1 - cos) [choice: offered, l2 default]; ``where``
"before" o_proj (``hook_z``, d_head; SCIENCE.md's reading, unverified) or "after" (the per-head
contribution ``z_h @ W_O[h]``, ``hook_result``, d_model); ``positions`` [choice]: "contiguous" (the
no-image branch is renumbered 0..T'-1, what dropping the tokens means) or "preserve" (each text token
keeps its with-image position id; only the image content differs).

**Aggregation** [choice]: mean over an example's generated tokens, then mean over examples (every
example counts once, whatever its length). Scores are per query head (GQA explicit).

**T-VHD** per generated token [choice; both offered]: ``global_mean`` = mean of the k largest
VHD_{l,i}(t) over all heads; ``layer_sum`` = sum over layers of the sum of each layer's k largest
(k capped at the head count). Stored per token in ``arrays.npz`` (``tvhd``, with ``tvhd_offsets``
delimiting examples and ``tvhd_tokens`` the token ids). The paper reports lower T-VHD on
hallucinated object words; on the random-tower fixture it carries no such meaning.

**VHR** (after scoring, if ``vhr``): per layer, from the dataset-level VHD and no-image norm, drop
outlier heads whose VHD > mu+sigma **and** norm > mu+sigma (population std over the layer's heads),
then select the remaining heads whose VHD is strictly above the median of the remaining heads; scale
their output z by ``vhr_alpha`` (2) in every forward of generation (phase "all": the KV cache is built
with it), only on the last ``vhr_last_layers`` layers (default 14, the paper's "last 14" of
LLaVA's 32, unverified; 0 = all layers). Each example is regenerated and both texts are reported.

**Text form** ``chd`` (context-aware head divergence): the same computation with a context segment
(a document in the user turn, or the system prompt) in place of the image, for any text model;
data is JSONL with ``context`` and ``question``. The segment is tokenised on its own and spliced
between the separately tokenised text before and after it, so the no-context branch is exactly the
with-context ids minus the segment (tokenising the joined string could merge tokens across the
boundary). Scores and arrays use the names ``chd``/``tchd`` and ``norm_context``/``norm_nocontext``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from headscope.errors import HeadscopeError
from headscope.heads import head_label, top_labels

from .base import Analysis, Example, ExampleOutput, Finalized, Option, ScoreMeta, Work, register
from .datasets import load_records

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_CONTEXT_DATA = DATA_DIR / "context_divergence.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_MARK = "\x00HEADSCOPE_CONTEXT\x00"

DIVERGENCE_OPTIONS = (
    Option("max_new_tokens", int, 16, "tokens generated greedily with the image/context; scores average over them"),
    Option("distance", str, "l2", "distance between the two head outputs: l2, or cosine (1 - cos)", ("l2", "cosine")),
    Option("where", str, "before", "head output before o_proj (hook_z) or after it (z_h @ W_O[h], hook_result)",
           ("before", "after")),
    Option("positions", str, "contiguous", "position ids of the branch without the segment: renumbered "
           "(contiguous) or the with-segment ids kept, leaving a gap (preserve)", ("contiguous", "preserve")),
    Option("tvhd_rule", str, "global_mean", "per-token aggregate: mean of the global top-k heads, or per-layer "
           "top-k summed over layers", ("global_mean", "layer_sum")),
    Option("tvhd_k", int, 10, "k of the per-token top-k aggregate"),
    Option("chat", bool, True, "wrap the prompt in the chat template (when the model has one)"),
    Option("vhr", bool, True, "after scoring, regenerate every example with the selected heads amplified (VHR)"),
    Option("vhr_alpha", float, 2.0, "VHR scale of the selected heads' outputs"),
    Option("vhr_last_layers", int, 14, "VHR only on the last N layers (0 = every layer; 14 is the paper's "
           "setting for 32-layer LLaVA, unverified)"),
)


# --------------------------------------------------------------------------- math
def divergence(o_with: torch.Tensor, o_without: torch.Tensor, distance: str) -> torch.Tensor:
    """Per-head distance of ``[..., d]`` outputs in fp32: L2, or 1 - cosine (0 for a zero vector)."""
    a, b = o_with.float(), o_without.float()
    if distance == "l2":
        return (a - b).norm(dim=-1)
    if distance == "cosine":
        return 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
    raise HeadscopeError(f"unknown distance {distance!r} (l2 or cosine)")


def token_aggregate(d: torch.Tensor, rule: str, k: int) -> torch.Tensor:
    """T-VHD: ``d`` [n_tokens, L, H] -> [n_tokens] (see module docstring)."""
    if k < 1:
        raise HeadscopeError(f"tvhd_k must be >= 1, got {k}")
    n, L, H = d.shape
    if rule == "global_mean":
        return d.reshape(n, L * H).topk(min(k, L * H), dim=-1).values.mean(-1)
    if rule == "layer_sum":
        return d.topk(min(k, H), dim=-1).values.sum((-1, -2))
    raise HeadscopeError(f"unknown tvhd_rule {rule!r}")


def vhr_select(vhd: np.ndarray, norm_without: np.ndarray, last_layers: int = 0) -> np.ndarray:
    """VHR head selection -> bool [L, H]. Per layer: drop heads with VHD > mu+sigma and norm >
    mu+sigma (population std), then keep the rest whose VHD is above the rest's median."""
    vhd, norm = np.asarray(vhd, dtype=np.float64), np.asarray(norm_without, dtype=np.float64)
    L, _ = vhd.shape
    mask = np.zeros(vhd.shape, dtype=bool)
    first = 0 if last_layers <= 0 else max(L - last_layers, 0)
    for l in range(first, L):
        v, n = vhd[l], norm[l]
        outlier = (v > v.mean() + v.std()) & (n > n.mean() + n.std())
        rest = ~outlier
        if rest.any():
            mask[l] = rest & (v > np.median(v[rest]))
    return mask


def head_names(mask: np.ndarray) -> list[str]:
    return [head_label(l, h) for l, h in zip(*np.nonzero(mask))]


# --------------------------------------------------------------------------- branches
@dataclass
class Branches:
    """One example as two token sequences that differ only by a deleted segment.

    ``with_feed()`` / ``without_feed(n_generated)`` return context managers that wrap every
    forward of the branch (the VLM's image features; "preserve" position ids).
    """

    with_ids: torch.Tensor                     # [1, T]
    without_ids: torch.Tensor                  # [1, T']
    kept: torch.Tensor                         # [T'] with-branch position of each without-branch token
    with_feed: Callable[[], contextlib.AbstractContextManager]
    without_feed: Callable[[int], contextlib.AbstractContextManager]
    details: dict = field(default_factory=dict)


def _position_feed(model, br_kept: torch.Tensor, T_with: int, mode: str):
    """``without_feed`` for a branch: nothing ("contiguous"), or the with-branch position ids."""
    from headscope.probe.vlm import feed

    def make(n_generated: int):
        if mode == "contiguous":
            return contextlib.nullcontext()
        pos = torch.cat([br_kept, torch.arange(T_with, T_with + max(n_generated, 1))])[None]
        return feed(model, position_ids=pos)
    return make


def context_branches(tokenizer, context: str, question: str, *, chat: bool, context_in: str) -> tuple:
    """(with_ids [1, T], without_ids [1, T'], segment (a, b), rendered prompt) for the text form.

    The rendered prompt holds a marker where the segment goes; the text before the marker, the
    segment and the text after are tokenised separately and concatenated.
    """
    if chat and getattr(tokenizer, "chat_template", None):
        if context_in == "system":
            msgs = [{"role": "system", "content": _MARK}, {"role": "user", "content": question}]
            segment = context
        else:
            msgs = [{"role": "user", "content": _MARK + question}]
            segment = context + "\n\n"
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        special = False  # the template writes BOS etc. itself
    else:
        text = _MARK + f"Question: {question}\nAnswer:"
        segment, special = context + "\n\n", True
    if text.count(_MARK) != 1:
        raise HeadscopeError("the chat template dropped or repeated the context segment")
    before, after = text.split(_MARK)
    ids_before = tokenizer(before, add_special_tokens=special)["input_ids"] if before or special else []
    ids_seg = tokenizer(segment, add_special_tokens=False)["input_ids"]
    ids_after = tokenizer(after, add_special_tokens=False)["input_ids"]
    if not ids_seg:
        raise HeadscopeError("the context segment is empty")
    a, b = len(ids_before), len(ids_before) + len(ids_seg)
    with_ids = torch.tensor([ids_before + ids_seg + ids_after])
    without_ids = torch.tensor([ids_before + ids_after])
    return with_ids, without_ids, (a, b), text.replace(_MARK, segment)


# --------------------------------------------------------------------------- the analyses
class _Divergence(Analysis):
    """Shared machinery of ``vhd`` and ``chd``; subclasses build the ``Branches`` of an example."""

    score: str = ""          # "vhd" / "chd"
    token_score: str = ""    # "tvhd" / "tchd"
    with_label: str = ""     # "image" / "context"

    def branches(self, ctx, ex: Example) -> Branches:
        raise NotImplementedError

    # -- capture -------------------------------------------------------------------------------
    def head_outputs(self, ctx, ids: torch.Tensor, first: int, n: int, feed_cm) -> torch.Tensor:
        """Head outputs at queries ``first .. first + n - 1`` of one forward -> [n, L, H, d]."""
        hook = "attn.hook_z" if ctx.options["where"] == "before" else "attn.hook_result"
        L = ctx.info.n_layers
        with ctx.probe.capture(activations=[f"blocks.*.{hook}"], positions=list(range(first, first + n))) as cap:
            with feed_cm:
                ctx.probe.forward(ids)
        return torch.stack([cap.acts[f"blocks.{l}.{hook}"][0] for l in range(L)], 1)

    def generate(self, ctx, br: Branches, heads: np.ndarray | None = None):
        """Greedy generation of the with-branch; with ``heads`` [L, H] scaled by vhr_alpha (VHR)."""
        from headscope.probe import HeadAblation

        ops = [] if heads is None else [HeadAblation(layer=int(l), head=int(h), kind="scale",
                                                     value=float(ctx.options["vhr_alpha"]))
                                        for l, h in zip(*np.nonzero(heads))]
        with ctx.probe.intervene(ops, phase="all") if ops else contextlib.nullcontext():
            with br.with_feed():
                return ctx.probe.generate(br.with_ids, max_new_tokens=ctx.options["max_new_tokens"])

    def example_work(self, ctx, ex):
        """A greedy generation of the with-branch, then one forward per branch over its prompt and the
        generated tokens but the last; with ``--vhr``, the regeneration ``run_vhr`` may do. An upper
        bound: a generation that stops early shortens the two forwards, and VHR regenerates nothing
        when it selects no head."""
        br, n = self.branches(ctx, ex), ctx.options["max_new_tokens"]
        T, T0 = br.with_ids.shape[1], br.without_ids.shape[1]
        gen = Work.generation(T, n)
        forwards = Work.forward(1, T + n - 1) + Work.forward(1, T0 + n - 1)
        return gen + forwards + (gen if ctx.options["vhr"] else Work())

    # -- steps ---------------------------------------------------------------------------------
    def process(self, ctx, ex):
        o = ctx.options
        if o["max_new_tokens"] < 1:
            raise HeadscopeError("--max-new-tokens must be >= 1")
        br = self.branches(ctx, ex)
        gen = self.generate(ctx, br)
        y = list(gen.new_tokens)
        n = len(y)
        tail = torch.tensor([y[:-1]], dtype=torch.long)
        T, T0 = br.with_ids.shape[1], br.without_ids.shape[1]
        o_with = self.head_outputs(ctx, torch.cat([br.with_ids, tail], 1), T - 1, n, br.with_feed())
        o_without = self.head_outputs(ctx, torch.cat([br.without_ids, tail], 1), T0 - 1, n, br.without_feed(n))
        d = divergence(o_with, o_without, o["distance"])                 # [n, L, H]
        tv = token_aggregate(d, o["tvhd_rule"], o["tvhd_k"])             # [n]
        tok = ctx.lm.tokenizer
        details = {**br.details, "text": gen.text, "stop_reason": gen.stop_reason, "new_tokens": y,
                   "tokens": [tok.decode([t]) for t in y], self.token_score: tv.tolist(),
                   f"mean_{self.score}": float(d.mean())}
        arrays = {self.score: d.mean(0).numpy(),
                  f"norm_{self.with_label}": o_with.float().norm(dim=-1).mean(0).numpy(),
                  f"norm_no{self.with_label}": o_without.float().norm(dim=-1).mean(0).numpy()}
        return ExampleOutput(arrays=arrays, details=details)

    def finalize(self, ctx, agg, records):
        o = ctx.options
        s, nw, nwo = self.score, f"norm_{self.with_label}", f"norm_no{self.with_label}"
        scores = {s: agg[s].mean, nw: agg[nw].mean, nwo: agg[nwo].mean}
        unit = "before o_proj (hook_z)" if o["where"] == "before" else "after o_proj (z_h @ W_O[h])"
        dist = "L2 distance" if o["distance"] == "l2" else "cosine distance (1 - cos)"
        meta = {
            s: ScoreMeta(f"{dist} between each head's output {unit} with and without the {self.with_label}, "
                         f"mean over generated tokens and examples", higher_is=f"{self.with_label}-aware head"),
            nw: ScoreMeta(f"mean L2 norm of the head output {unit} with the {self.with_label}",
                          higher_is="larger output"),
            nwo: ScoreMeta(f"mean L2 norm of the head output {unit} without the {self.with_label}",
                           higher_is="larger output"),
        }
        used = [r for r in records if not r.get("skip")]
        tv = [np.asarray(r[self.token_score], dtype=np.float32) for r in used]
        arrays = {f"{s}_std": agg[s].std,
                  self.token_score: np.concatenate(tv) if tv else np.zeros(0, np.float32),
                  f"{self.token_score}_offsets": np.cumsum([0] + [len(t) for t in tv]),
                  f"{self.token_score}_tokens": np.concatenate([np.asarray(r["new_tokens"], np.int64) for r in used])
                  if used else np.zeros(0, np.int64)}
        summary = {f"top_{s}": top_labels(scores[s], 10),
                   f"mean_{self.token_score}": float(np.mean(np.concatenate(tv))) if tv else None,
                   "choices": {"distance": o["distance"], "where": o["where"], "positions": o["positions"],
                               "tvhd_rule": o["tvhd_rule"], "tvhd_k": o["tvhd_k"],
                               "aggregation": "mean over generated tokens, then over examples"}}
        if o["vhr"]:
            mask = vhr_select(scores[s], scores[nwo], o["vhr_last_layers"])
            arrays["vhr_heads"] = mask.astype(np.int8)
            summary["vhr"] = self.run_vhr(ctx, mask, used)
        return Finalized(scores=scores, score_meta=meta, summary=summary, arrays=arrays)

    def run_vhr(self, ctx, mask: np.ndarray, used: list[dict]) -> dict:
        """Regenerate every used example with the selected heads scaled; report both texts."""
        o = ctx.options
        out = {"alpha": o["vhr_alpha"], "layers": "all" if o["vhr_last_layers"] <= 0 else f"last {o['vhr_last_layers']}",
               "selection": "per layer: drop VHD>mu+sigma and norm>mu+sigma, keep VHD > median of the rest",
               "phase": "all (prefill and decode; KV cache built with it)",
               "n_heads": int(mask.sum()), "heads": head_names(mask), "examples": []}
        if not mask.any():
            return out
        by_id = {ex.id: ex for ex in self.examples(ctx)}
        changed = 0
        for r in used:
            ex = by_id.get(r["id"])
            if ex is None:
                continue
            gen = self.generate(ctx, self.branches(ctx, ex), heads=mask)
            same = list(gen.new_tokens) == list(r["new_tokens"])
            first_diff = next((i for i, (a, b) in enumerate(zip(gen.new_tokens, r["new_tokens"])) if a != b),
                              None if same else min(len(gen.new_tokens), len(r["new_tokens"])))
            changed += not same
            out["examples"].append({"id": r["id"], "text": r["text"], "text_vhr": gen.text, "changed": not same,
                                    "first_diff_token": first_diff})
        out["fraction_changed"] = changed / max(len(out["examples"]), 1)
        return out


@register
class VHDAnalysis(_Divergence):
    name = "vhd"
    description = "Vision-aware head divergence (VHD), per-token T-VHD and VHR, on a vision-language model."
    needs_data = True
    no_pattern = "its forward feeds image features besides the token ids"
    data_help = ("a folder of images with a prompts.jsonl ({'image': file, 'prompt': ...} per line; without it "
                 "every image gets --prompt), or a .jsonl with 'image' paths (relative to the file) and 'prompt'")
    options = DIVERGENCE_OPTIONS + (
        Option("prompt", str, "Describe the image.", "prompt for images in a folder without prompts.jsonl"),
    )
    score, token_score, with_label = "vhd", "tvhd", "image"

    def examples(self, ctx):
        from headscope.probe.vlm import LoadedVLM

        if not isinstance(ctx.lm, LoadedVLM):
            raise HeadscopeError(f"vhd needs a LLaVA-family vision-language model directory (LLaVA-1.5 / LLaVA-NeXT); "
                                 f"{ctx.lm.name} is text-only: use `headscope score chd` for the text form")
        if ctx.lm.vlm_type == "gemma3":
            raise HeadscopeError("vhd: Gemma-3's image tokens attend to each other bidirectionally, which the probe's "
                                 "causal-only attention cannot express; use a LLaVA-family model")
        for rec in image_records(ctx.data_path, ctx.options["prompt"]):
            yield Example(id=rec["id"], data=rec)

    def branches(self, ctx, ex):
        from PIL import Image, UnidentifiedImageError

        from headscope.probe.vlm import encode, encoder_outputs, feed_image

        lm = ctx.lm
        try:
            with Image.open(ex.data["image"]) as im:
                image = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise HeadscopeError(f"cannot read image {ex.data['image']}: {e}") from None
        ip = encode(lm, image, ex.data["prompt"], chat=ctx.options["chat"])
        enc = encoder_outputs(lm, ip)
        T = ip.input_ids.shape[1]
        details = {"image": str(ex.data["image"]), "prompt": ex.data["prompt"], "rendered_prompt": ip.prompt,
                   "image_spans": ip.spans, "n_image_tokens": ip.n_image_tokens, "prompt_tokens": T}
        return Branches(ip.input_ids, ip.text_ids, ip.kept, with_feed=lambda: feed_image(lm, ip, enc),
                        without_feed=_position_feed(lm.model, ip.kept, T, ctx.options["positions"]),
                        details=details)


@register
class ContextDivergenceAnalysis(_Divergence):
    name = "chd"
    description = ("Context-aware head divergence: VHD's computation with a text segment (document or system "
                   "prompt) in place of the image; T-CHD per token and VHR-style amplification.")
    data_help = f"a .jsonl with 'context' and 'question' per line (default: {DEFAULT_CONTEXT_DATA.name})"
    options = DIVERGENCE_OPTIONS + (
        Option("context_in", str, "user", "where the context goes: before the question in the user turn, "
               "or as the system prompt", ("user", "system")),
    )
    score, token_score, with_label = "chd", "tchd", "context"

    def examples(self, ctx):
        path = ctx.data_path or DEFAULT_CONTEXT_DATA
        for rec in load_records(path, required=("context", "question")):
            if not all(isinstance(rec[k], str) and rec[k].strip() for k in ("context", "question")):
                raise HeadscopeError(f"{path}: record {rec['id']} needs non-empty string 'context' and 'question'")
            yield Example(id=rec["id"], data=rec)

    def branches(self, ctx, ex):
        o = ctx.options
        with_ids, without_ids, (a, b), text = context_branches(
            ctx.lm.tokenizer, ex.data["context"], ex.data["question"], chat=o["chat"], context_in=o["context_in"])
        T = with_ids.shape[1]
        kept = torch.cat([torch.arange(a), torch.arange(b, T)])
        details = {"question": ex.data["question"], "rendered_prompt": text, "context_span": [a, b],
                   "prompt_tokens": T}
        return Branches(with_ids, without_ids, kept, with_feed=contextlib.nullcontext,
                        without_feed=_position_feed(ctx.lm.model, kept, T, o["positions"]), details=details)


# --------------------------------------------------------------------------- data
def image_records(path: Path | None, default_prompt: str) -> list[dict]:
    """``[{'id', 'image' (absolute Path), 'prompt'}]`` from a folder or a JSONL (see VHDAnalysis.data_help)."""
    if path is None:
        raise HeadscopeError("vhd needs --data (a folder of images or a .jsonl)")
    path = Path(path)
    if path.is_dir():
        if (path / "prompts.jsonl").is_file():
            recs, base = load_records(path / "prompts.jsonl", required=("image", "prompt")), path
        else:
            files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise HeadscopeError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) and no prompts.jsonl")
            recs, base = [{"id": f.stem, "image": f.name, "prompt": default_prompt} for f in files], path
    elif path.suffix == ".jsonl":
        recs, base = load_records(path, required=("image", "prompt")), path.parent
    else:
        raise HeadscopeError(f"{path}: vhd data must be a folder of images or a .jsonl")
    out = []
    for r in recs:
        img = Path(r["image"]).expanduser()
        img = img if img.is_absolute() else base / img
        if not img.is_file():
            raise HeadscopeError(f"record {r['id']}: image not found: {img}")
        if not isinstance(r["prompt"], str) or not r["prompt"].strip():
            raise HeadscopeError(f"record {r['id']}: empty prompt")
        out.append({"id": str(r["id"]), "image": img, "prompt": r["prompt"]})
    return out
