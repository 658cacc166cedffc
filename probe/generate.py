"""Generation with a KV cache and per-decode-step capture (greedy or seeded sampling).

Step i's query is the position whose logits produce ``new_tokens[i]``: the last prompt token for
i = 0, then each generated token. Every step is therefore one attention call with Tq = 1. The
prompt without its last token is prefilled first (phase "prefill", optionally chunked), then the last
prompt token runs as step 0 (phase "decode"). Per-step statistics thus never mix in prompt queries
(column sums included). The logits and KV cache are the same as HF's prefill-then-decode up to float
reordering.

Stops on ``max_new_tokens``, on an EOS id (generation_config / tokenizer), or when the decoded new text
contains a stop string (the stop string is kept in ``text``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from headscope.errors import HeadscopeError
from headscope.kernels import StatsSpec

from .capture import Capture


@dataclass
class Generation:
    """Result of ``probe.generate``; batch 1."""

    prompt_ids: list[int]
    new_tokens: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = "max_tokens"                        # "max_tokens" | "eos" | "stop_string"
    step_stats: list[dict[int, dict[str, torch.Tensor]]] = field(default_factory=list)  # [B, H, 1, ...] per layer
    step_acts: list[dict[str, torch.Tensor]] = field(default_factory=list)             # [B, 1, ...] per hook
    prefill: Capture | None = None                         # capture of prompt[:-1] if capture_prefill
    interventions: list[dict] = field(default_factory=list)

    def stacked(self, key: str) -> torch.Tensor:
        """One statistic over steps and captured layers: [steps, L_captured, B, H, ...]. Column
        statistics grow with the sequence, so they are right-padded with zeros to the longest step."""
        if not self.step_stats:
            raise HeadscopeError("no decode steps were captured (pass stats= to generate)")
        layers = sorted(self.step_stats[0])
        if key not in self.step_stats[0][layers[0]]:
            raise HeadscopeError(f"statistic {key!r} was not captured; have {sorted(self.step_stats[0][layers[0]])}")
        ts = [torch.stack([s[l][key] for l in layers]) for s in self.step_stats]
        width = max(t.shape[-1] for t in ts)
        return torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in ts])


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    return set() if eos is None else set([eos] if isinstance(eos, int) else eos)


def _next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                top_p: float | None, gen: torch.Generator | None) -> int:
    """logits: [V] -> token id; sampling in fp32 with an explicit generator (reproducible)."""
    logits = logits.float()
    if not do_sample:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) > top_p     # keep the smallest prefix reaching top_p
        logits[order[drop]] = float("-inf")
    probs = torch.softmax(logits, -1).cpu()
    return int(torch.multinomial(probs, 1, generator=gen))


def generate(probe, input_ids, max_new_tokens: int = 50, stop_strings=(), do_sample: bool = False,
             seed: int | None = 0, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             stats: StatsSpec | None = None, layers=None, activations=(), capture_prefill: bool = False,
             chunk_size: int | None = None, allow_beyond_context: bool = False) -> Generation:
    """See ``Probe.generate``. Holds ``probe.lock`` throughout: every step sees the same interventions."""
    with probe.lock:
        return _generate(probe, input_ids, max_new_tokens=max_new_tokens, stop_strings=stop_strings,
                         do_sample=do_sample, seed=seed, temperature=temperature, top_k=top_k, top_p=top_p,
                         stats=stats, layers=layers, activations=activations, capture_prefill=capture_prefill,
                         chunk_size=chunk_size, allow_beyond_context=allow_beyond_context)


def _generate(probe, input_ids, *, max_new_tokens, stop_strings, do_sample, seed, temperature, top_k, top_p,
              stats, layers, activations, capture_prefill, chunk_size, allow_beyond_context) -> Generation:
    ids, _ = probe.prepare_inputs(input_ids)
    if ids.shape[0] != 1:
        raise HeadscopeError(f"generate takes one prompt (batch 1), got batch {ids.shape[0]}")
    if max_new_tokens < 1:
        raise HeadscopeError("max_new_tokens must be >= 1")
    if do_sample and (temperature <= 0 or (top_p is not None and not 0 < top_p <= 1)):
        raise HeadscopeError("sampling needs temperature > 0 and 0 < top_p <= 1")
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    tok = probe.tokenizer
    if stop_strings and tok is None:
        raise HeadscopeError("stop_strings need a tokenizer (load the model with load_model)")
    T = ids.shape[1]
    probe.check_length(T + max_new_tokens - 1, allow_beyond_context)
    eos = _eos_ids(probe.model, tok)
    gen = torch.Generator().manual_seed(seed) if do_sample and seed is not None else None

    out = Generation(prompt_ids=ids[0].tolist(),
                     interventions=probe.intervention_records)
    cache = DynamicCache(config=probe.model.config)
    if T > 1:
        pre = probe.capture_session(stats, layers, activations) if capture_prefill else None
        # only the cache is needed; logits_to_keep=1 avoids [T, vocab] logits (6 GB at 16k)
        probe.run(ids[:, :-1], None, cache=cache, chunk_size=chunk_size, capture=pre, phase="prefill",
                  logits_to_keep=1)
        out.prefill = pre
    step_in = ids[:, -1:]
    want_capture = (stats is not None and not stats.empty) or bool(activations)
    for _ in range(max_new_tokens):
        cap = probe.capture_session(stats, layers, activations) if want_capture else None
        logits = probe.run(step_in, None, cache=cache, capture=cap, phase="decode").logits   # [1, 1, V]
        if cap is not None:
            out.step_stats.append(cap.stats)
            out.step_acts.append(cap.acts)
        nxt = _next_token(logits[0, -1], do_sample, temperature=temperature, top_k=top_k, top_p=top_p, gen=gen)
        out.new_tokens.append(nxt)
        if nxt in eos:
            out.stop_reason = "eos"
            break
        if stop_strings and any(s in tok.decode(out.new_tokens) for s in stop_strings):
            out.stop_reason = "stop_string"
            break
        step_in = torch.tensor([[nxt]], device=ids.device)
    if tok is not None:
        out.text = tok.decode(out.new_tokens, skip_special_tokens=True)
    return out
