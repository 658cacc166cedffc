"""Previous-token, duplicate-token and induction head scores on repeated random tokens.

The classic probe (Olsson et al. 2022): feed ``r r`` where ``r`` is ``n`` uniformly random token
ids, after BOS under the one BOS policy (``ModelInfo.leading_bos``: when the model's tokenizer adds
one, or with ``--prepend-bos true``), and read three diagonals of each head's attention. Default
scale (``--scale headscope``), each a mean over only the queries where the pattern can occur, so a
perfect head scores 1:

- previous-token: mean over every query ``t`` (after the first content token) of ``A[t, t-1]``;
- duplicate-token: mean over second-half queries of ``A[t, t-n]`` (the same token, earlier);
- induction: mean over second-half queries of ``A[t, t-n+1]`` (the token *after* the earlier
  copy), which is what lets the model predict the repeat.

``--scale transformerlens`` gives TransformerLens' ``detect_head`` numbers instead (its "mul"
measure, no exclusions): detection patterns from token equality (accidental repeats inside ``r``
count, and previous-token includes the query right after BOS), attention on them summed over *all*
queries and divided by the total attention. On this input that is about n / (2n + 1) of the default
for duplicate / induction (0.495 at n = 50); rankings agree up to accidental repeats. TransformerLens'
``to_tokens`` prepends BOS for every model: add ``--prepend-bos true`` to feed what it feeds.

Sequences are short by construction, so the full pattern rows are captured. The second half's
next-token accuracy is stored as a sanity check (an induction-capable model gets it high).
"""
from __future__ import annotations

import numpy as np
import torch

from headscope.errors import HeadscopeError
from headscope.heads import top_labels
from headscope.kernels import StatsSpec

from .base import (PREPEND_BOS, Analysis, Example, ExampleOutput, Finalized, Option, ScoreMeta, Work, check_memory,
                   forward_memory, register)


# a head has the role (reports, head-role map) when at least this share of its attention, over the
# queries where the pattern can occur, lands on the pattern's key; the TransformerLens scale
# divides by every query, so it gets no threshold
ROLE_THRESHOLD = 0.4


def repeated_tokens(vocab_size: int, n: int, seed: int, bos: int | None, exclude: set[int]) -> torch.Tensor:
    """``[1, (bos) + 2n]`` ids: BOS (if any) + r + r, r drawn without special tokens."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor(sorted(set(range(vocab_size)) - exclude))
    r = allowed[torch.randint(len(allowed), (n,), generator=g)]
    head = [bos] if bos is not None else []
    return torch.tensor(head + r.tolist() + r.tolist())[None]


def diagonal_scores(pattern: torch.Tensor, n: int, offset: int) -> dict[str, np.ndarray]:
    """Scores from patterns ``[L, H, T, T]`` of one sequence whose content starts at ``offset``."""
    T = pattern.shape[-1]
    t_all = torch.arange(offset + 1, T)
    t_second = torch.arange(offset + n, T)

    def diag(t: torch.Tensor, d: int) -> np.ndarray:  # mean of A[t, t-d] over queries t -> [L, H]
        return pattern[:, :, t, t - d].mean(-1).numpy()

    return {"previous_token": diag(t_all, 1), "duplicate_token": diag(t_second, n),
            "induction": diag(t_second, n - 1)}


def tl_detection_scores(pattern: torch.Tensor, ids: torch.Tensor) -> dict[str, np.ndarray]:
    """TransformerLens ``detect_head`` ("mul", no exclusions) scores from patterns ``[L, H, T, T]``
    of the sequence ``ids`` [1, T]: sum of attention on the detection pattern / sum of attention."""
    t = ids[0]
    T = len(t)
    lower = torch.ones(T, T).tril(-1)                                          # keys strictly before the query
    duplicate = (t[:, None] == t[None, :]).float() * lower                     # [T, T] same token earlier
    induction = torch.zeros(T, T)
    induction[:, 1:] = duplicate[:, :-1]                                       # one to the right of a duplicate
    previous = torch.diag(torch.ones(T - 1), -1)
    total = pattern.sum((-1, -2))                                              # [L, H]
    score = lambda det: ((pattern * det.tril()).sum((-1, -2)) / total).numpy()  # noqa: E731
    return {"previous_token": score(previous), "duplicate_token": score(duplicate), "induction": score(induction)}


@register
class InductionAnalysis(Analysis):
    name = "induction"
    length_flag = "--seq-len"
    description = "Previous-token, duplicate-token and induction heads on repeated random tokens."
    takes_data = False
    headline_score = "induction"
    data_help = "it makes its own repeated random token sequences (--n-examples, --seq-len, --seed)"
    options = (
        Option("n_examples", int, 20, "number of random sequences", min=1, max=1_000_000),
        Option("seq_len", int, 50, "length n of the random block (the sequence is 2n tokens, after BOS if any)", min=2),
        PREPEND_BOS,
        Option("scale", str, "headscope", "headscope = diagonal means over the queries where the pattern can "
               "occur (1 = perfect head); transformerlens = TransformerLens detect_head's 'mul' score",
               choices=("headscope", "transformerlens")),
    )

    @staticmethod
    def n_tokens(opts, info) -> int:
        """Tokens of every sequence: (BOS) + 2 x seq_len."""
        return 2 * opts["seq_len"] + (info.leading_bos(opts["prepend_bos"]) is not None)

    def check(self, opts, info):
        T = self.n_tokens(opts, info)
        if info.max_context is not None and T > info.max_context:
            raise HeadscopeError(f"--seq-len {opts['seq_len']}: the sequence ({T} tokens, 2 x seq-len and BOS if any) "
                                 f"exceeds the model's context of {info.max_context}")
        # the captured pattern: [L, H, T, T] float32 per example
        check_memory(4 * info.n_layers * info.n_heads * T * T, "--seq-len")

    def examples(self, ctx):
        for i in range(ctx.options["n_examples"]):
            yield Example(id=f"seq{i:04d}", data=ctx.seed * 100_003 + i)

    def inputs(self, ctx, ex) -> torch.Tensor:
        """[1, T] ids of ``ex``: (BOS) + r + r, built directly (the default would replay ``process``
        up to its forward, and batching and memory planning ask for them per example)."""
        bos = ctx.info.leading_bos(ctx.options["prepend_bos"])
        exclude = set(getattr(ctx.lm.tokenizer, "all_special_ids", []) or [])
        return repeated_tokens(ctx.info.vocab_size, ctx.options["seq_len"], ex.data, bos, exclude)

    def process(self, ctx, ex):
        return self._scored(ctx, self.inputs(ctx, ex))[0]

    def process_batch(self, ctx, examples):
        """One forward for all ``examples``: every sequence is (BOS) + 2n tokens, so they stack
        without padding."""
        return self._scored(ctx, torch.cat([self.inputs(ctx, ex) for ex in examples]))

    def example_memory(self, ctx, ex):
        """The captured pattern dominates: [L, H, T, T] float32 three times (the kernel's rows,
        the capture's concatenation, the stacked copy), plus full logits [T, vocab] and the
        forward's activations (``forward_memory``)."""
        T = self.n_tokens(ctx.options, ctx.info)
        return 3 * 4 * ctx.info.n_layers * ctx.info.n_heads * T * T + forward_memory(ctx, T, logits=T)

    def example_work(self, ctx, ex):
        """One forward of one sequence (the same length for every example: no ids are built)."""
        return Work.forward(1, self.n_tokens(ctx.options, ctx.info))

    def _scored(self, ctx, ids: torch.Tensor) -> list[ExampleOutput]:
        """Outputs of the rows of ``ids`` [B, T] (each (BOS) + r + r), from one captured forward."""
        n = ctx.options["seq_len"]
        T = ids.shape[1]
        offset = T - 2 * n                                       # 1 with BOS, else 0
        with ctx.probe.capture(stats=StatsSpec(pattern_rows=(0, T)), activations=["logits"]) as cap:
            ctx.probe.forward(ids)
        outs = []
        for b in range(ids.shape[0]):
            pattern = torch.stack([cap.stats[l]["pattern"][b] for l in range(ctx.info.n_layers)])  # [L, H, T, T]
            scores = (tl_detection_scores(pattern, ids[b:b + 1]) if ctx.options["scale"] == "transformerlens"
                      else diagonal_scores(pattern, n, offset))
            logits = cap.acts["logits"][b]  # [T, vocab]
            pred = logits[offset + n - 1: T - 1].argmax(-1)
            acc = float((pred == ids[b, offset + n:]).float().mean())
            outs.append(ExampleOutput(arrays=scores, details={"second_half_accuracy": acc}))
        return outs

    def finalize(self, ctx, agg, records):
        scores = {k: agg[k].mean for k in ("previous_token", "duplicate_token", "induction")}
        tl = ctx.options["scale"] == "transformerlens"
        how = " (TransformerLens detect_head 'mul' scale: share of all attention)" if tl else ""
        thr = None if tl else ROLE_THRESHOLD
        meta = {
            "previous_token": ScoreMeta("mean attention from token t to t-1" + how, higher_is="previous-token head",
                                        threshold=thr),
            "duplicate_token": ScoreMeta("mean attention from a repeated token to its earlier copy" + how,
                                         higher_is="duplicate-token head", threshold=thr),
            "induction": ScoreMeta("mean attention from a repeated token to the token after its earlier copy" + how,
                                   higher_is="induction head", threshold=thr),
        }
        acc = [r["second_half_accuracy"] for r in records if not r.get("skip")]
        summary = {"second_half_accuracy": float(np.mean(acc)) if acc else None}
        for k, v in scores.items():
            summary[f"top_{k}"] = top_labels(v, 5)
        std = {f"{k}_std": agg[k].std for k in scores}
        return Finalized(scores=scores, score_meta=meta, summary=summary, arrays=std)
