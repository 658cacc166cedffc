"""The engine: ``Probe`` owns the switch to headscope attention and every forward through it."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from headscope.errors import HeadscopeError
from headscope.kernels import StatsSpec, resolve_backend

from .capture import Capture, ForwardResult, run_forward
from .generate import Generation, generate
from .hook import Anatomy, AttnContext, register
from .intervene import Edits, InterventionSet, patch_sweep, sweep_heads
from .placement import layer_device


class Probe:
    """Capture, intervene and generate on one HF causal LM.

    ``lm`` is a ``LoadedModel`` (from ``load_model``) or a bare ``PreTrainedModel`` (then pass
    ``tokenizer=`` for text and stop strings). ``backend`` is the ``headscope.kernels`` backend
    ("auto": triton on CUDA, chunked elsewhere). ``check_finite``: captures raise on NaN/inf
    (default for ``capture``; override per capture).

    Failure modes (``HeadscopeError``): a model whose attention does not route through
    transformers' AttentionInterface, or which builds its own masks (named by model type); inputs
    longer than the model's context without ``allow_beyond_context``; nested captures.
    Not thread-safe per model: the attention switch is model state. Serialise probe calls on one
    model. A call that loses the switch mid-forward raises instead of returning mixed results.
    """

    def __init__(self, lm, backend: str = "auto", tokenizer=None, check_finite: bool = True):
        if isinstance(lm, nn.Module):
            self.model, self.tokenizer, self.info = lm, tokenizer, None
        else:
            self.model, self.tokenizer, self.info = lm.model, tokenizer or lm.tokenizer, lm.info
        register()
        self.anatomy = Anatomy.of(self.model)
        self.device = next(self.model.parameters()).device   # where inputs go (the embedding's device)
        # where each layer runs: several devices once placed with probe.placement (--device-map)
        self._layer_devices = [layer_device(a, b) for a, b in zip(self.anatomy.attn, self.anatomy.layers)]
        self.backend = backend
        try:
            resolve_backend(backend, self.device)
        except ValueError as e:
            raise HeadscopeError(str(e)) from None
        self.check_finite = check_finite
        self.max_context = getattr(self.info, "max_context", None) or self.anatomy.max_context
        self._capture: Capture | None = None
        self._interventions: list[InterventionSet] = []

    # -- inputs --------------------------------------------------------------------------------
    def _inputs(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalise to LongTensor [B, T] (+ mask [B, T]) on the model's device."""
        if isinstance(input_ids, str):
            if self.tokenizer is None:
                raise HeadscopeError("text input needs a tokenizer; pass token ids")
            input_ids = self.tokenizer(input_ids, return_tensors="pt").input_ids
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        ids = ids[None] if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise HeadscopeError(f"input_ids must be [batch, pos] with pos >= 1, got shape {tuple(ids.shape)}")
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask).to(self.device)
            attention_mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
            if attention_mask.shape != ids.shape:
                raise HeadscopeError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(ids.shape)}")
            if bool((attention_mask.sum(-1) == 0).any()):
                raise HeadscopeError("attention_mask has a row with no real token")
        return ids.to(self.device), attention_mask

    def _check_length(self, T: int, allow_beyond_context: bool) -> None:
        if self.max_context is None or T <= self.max_context:
            return
        if self.anatomy.pos_embed is not None:
            raise HeadscopeError(f"{T} tokens exceed the {self.max_context}-position learned position embedding "
                                 f"of {self.anatomy.model_type!r}; it cannot extrapolate")
        if not allow_beyond_context:
            raise HeadscopeError(f"{T} tokens exceed the model's context of {self.max_context}; pass "
                                 "allow_beyond_context=True to run anyway (RoPE extrapolation, quality unknown)")

    # -- sessions ------------------------------------------------------------------------------
    def capture_session(self, stats: StatsSpec | None = None, layers: Sequence[int] | None = None,
                        activations: Sequence[str] = (), positions=None, check_finite: bool | None = None) -> Capture:
        """A ``Capture`` not bound to a block (``generate`` makes one per step)."""
        return Capture(self.anatomy, stats, layers, activations, positions,
                       self.check_finite if check_finite is None else check_finite)

    @contextlib.contextmanager
    def capture(self, stats: StatsSpec | None = None, layers: Sequence[int] | None = None,
                activations: Sequence[str] = (), positions=None, check_finite: bool | None = None):
        """Within the block, ``probe.forward`` fills the yielded ``Capture`` (the last forward wins).

        ``layers`` (None = all) limits the statistics, not the activations. ``positions`` (None | slice |
        list, negative from the end) keeps query positions for row stats and activations.
        """
        if self._capture is not None:
            raise HeadscopeError("a capture block is already active on this probe; captures do not nest")
        cap = self.capture_session(stats, layers, activations, positions, check_finite)
        self._capture = cap
        try:
            yield cap
        finally:
            self._capture = None

    @contextlib.contextmanager
    def intervene(self, ops: Sequence, phase: str = "all"):
        """Apply ``ops`` (HeadAblation / KeyReweight / Patch) to every forward in the block.

        Blocks nest and compose. The yielded ``InterventionSet.records`` say, for each operator,
        where it acts, before/after RoPE, the phase, and whether the KV cache was built with it.
        Nothing is left behind after the block, also after an exception.
        """
        iv = InterventionSet(self.anatomy, list(ops), phase)
        self._interventions.append(iv)
        try:
            yield iv
        finally:
            self._interventions.remove(iv)

    # -- running -------------------------------------------------------------------------------
    def _run(self, ids: torch.Tensor, mask: torch.Tensor | None, *, cache=None, chunk_size: int | None = None,
             capture: Capture | None = None, phase: str = "prefill", row_edits=None, extra_hooks=None,
             logits_to_keep: int = 0) -> ForwardResult:
        """One forward with the active interventions of ``phase``, ``capture`` and sweep edits."""
        an = self.anatomy
        edits = Edits(an, self._interventions, phase)
        past = cache.get_seq_length() if cache is not None else 0
        T = ids.shape[1]

        def plan(call):
            spec = capture.spec_for(call) if capture is not None else None
            return spec, edits.edits_for(call, self._layer_devices[call.layer])

        def hooks(q_start):
            handles = edits.hooks(q_start)  # patches first: captures see the patched values
            if extra_hooks is not None:
                handles += extra_hooks(q_start)
            if capture is not None:
                handles += capture.hooks(q_start)
            return handles

        keep_n, on_logits = logits_to_keep, None
        if capture is not None:
            capture.begin(past, past + T)
            if capture.wants_logits:
                on_logits = lambda first, lg: capture.store("logits", first, lg)  # noqa: E731
                keep_n = 0 if keep_n == 0 else max(keep_n, capture.logits_needed(past + T))
        ctx = AttnContext(an.layer_of, self.backend, plan=plan, record=capture.record if capture is not None else None,
                          row_edits=row_edits or {}, check_finite=capture is not None and capture.check_finite)
        res = run_forward(an, ids, mask, ctx=ctx, chunk_size=chunk_size, cache=cache, hooks=hooks,
                          on_logits=on_logits, logits_to_keep=keep_n)
        if capture is not None:
            capture.finish(past + T)
        if logits_to_keep and res.logits.shape[1] > logits_to_keep:
            res.logits = res.logits[:, -logits_to_keep:]
        return res

    def forward(self, input_ids, attention_mask=None, chunk_size: int | None = None,
                allow_beyond_context: bool = False, logits_to_keep: int = 0) -> ForwardResult:
        """Run the model (phase "prefill"); fills the active capture.

        ``chunk_size``: chunked prefill through a DynamicCache (memory ~ chunk x vocab for logits).
        ``attention_mask`` [B, T]: 0 = padding (left padding: positions count real tokens only).
        ``logits_to_keep`` = k > 0 returns only the last k positions' logits. Inputs longer than the
        model's context raise unless ``allow_beyond_context=True``. That runs RoPE beyond its
        training range, and the model's outputs there are of unknown quality.
        """
        ids, mask = self._inputs(input_ids, attention_mask)
        self._check_length(ids.shape[1], allow_beyond_context)
        if chunk_size is not None and chunk_size < 1:
            raise HeadscopeError(f"chunk_size must be >= 1, got {chunk_size}")
        return self._run(ids, mask, chunk_size=chunk_size, capture=self._capture, logits_to_keep=logits_to_keep)

    def generate(self, input_ids, max_new_tokens: int = 50, stop_strings=(), do_sample: bool = False,
                 seed: int | None = 0, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, stats: StatsSpec | None = None, layers=None, activations=(),
                 capture_prefill: bool = False, chunk_size: int | None = None,
                 allow_beyond_context: bool = False) -> Generation:
        """Greedy (default) or seeded sampling with a KV cache, capturing each decode step.

        ``stats`` / ``layers`` / ``activations`` are captured at every step into
        ``step_stats`` / ``step_acts``. With ``capture_prefill``, ``prefill`` holds the capture of
        prompt[:-1] (the last prompt token is step 0). Active ``intervene`` blocks apply by phase.
        """
        if self._capture is not None:
            raise HeadscopeError("generate captures per step itself: pass stats=/activations= instead of a capture block")
        return generate(self, input_ids, max_new_tokens, stop_strings, do_sample, seed, temperature, top_k, top_p,
                        stats, layers, activations, capture_prefill, chunk_size, allow_beyond_context)

    def sweep_heads(self, input_ids, metric, kind: str = "uniform", heads=None, batch_size: int | None = None,
                    value=None, attention_mask=None, logits_to_keep: int = 0) -> torch.Tensor:
        """[L, H] metric with each single head ablated; see ``intervene.sweep_heads``."""
        self._no_capture("sweep_heads")
        return sweep_heads(self, input_ids, metric, kind, heads, batch_size, value, attention_mask, logits_to_keep)

    def patch_sweep(self, clean_ids, corrupt_ids, hook: str, metric, per: str = "head",
                    batch_size: int | None = None, attention_mask=None, logits_to_keep: int = 0) -> torch.Tensor:
        """[L, H] or [L, T] metric with one clean unit patched into the corrupted run; see ``intervene.patch_sweep``."""
        self._no_capture("patch_sweep")
        return patch_sweep(self, clean_ids, corrupt_ids, hook, metric, per, batch_size, attention_mask, logits_to_keep)

    def _no_capture(self, what: str) -> None:
        if self._capture is not None:
            raise HeadscopeError(f"{what} runs many forwards; call it outside a capture block")
