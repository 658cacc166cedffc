"""The engine: ``Probe`` owns the switch to headscope attention and every forward through it."""
from __future__ import annotations

import contextlib
import threading
from typing import Sequence

import torch
from torch import nn

from headscope.errors import ContextTooLong, HeadscopeError
from headscope.kernels import StatsSpec, resolve_backend

from .capture import Capture, ForwardResult, run_forward
from .generate import Generation, generate
from .hook import Anatomy, AttnContext, register
from .intervene import Edits, InterventionSet, intervention_block, patch_sweep, sweep_heads


class Probe:
    """Capture, intervene and generate on one HF causal LM.

    ``lm`` is a ``LoadedModel`` (from ``load_model``) or a bare ``PreTrainedModel`` (then pass
    ``tokenizer=`` for text and stop strings). ``backend`` is the ``headscope.kernels`` backend
    ("auto": triton on CUDA, chunked elsewhere). ``check_finite``: captures raise on NaN/inf
    (default for ``capture``; override per capture).

    Failure modes (``HeadscopeError``): a model whose attention does not route through
    transformers' AttentionInterface, or which builds its own masks (named by model type); inputs
    longer than the model's context without ``allow_beyond_context``; nested captures.
    A model rewired by another tool after the probe was made (TransformerLens' bridge boot swaps
    its attention modules) is refused with a ``HeadscopeError`` before the forward.

    Threads: the attention switch, the active capture and the interventions are model state, so
    ``lock`` (re-entrant) is held by every forward (``run``) and for the whole of each ``capture`` /
    ``intervene`` block, sweep and generation. Another thread's forward waits for the block to end
    and so never picks up its interventions or fills its capture; between blocks it may run (the
    dashboard's Inspect page between the examples of a background run). A call that loses the
    switch mid-forward raises instead of returning mixed results.
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
        self.backend = backend
        try:
            resolve_backend(backend, self.device)
        except ValueError as e:
            raise HeadscopeError(str(e)) from None
        self.check_finite = check_finite
        self.max_context = getattr(self.info, "max_context", None) or self.anatomy.max_context
        self.lock = threading.RLock()
        self._capture: Capture | None = None
        self._interventions: list[InterventionSet] = []

    # -- state others may read -----------------------------------------------------------------
    @property
    def capturing(self) -> bool:
        """True inside a ``capture`` block."""
        return self._capture is not None

    @property
    def intervention_records(self) -> list[dict]:
        """``InterventionSet.records`` of every active ``intervene`` block, outermost first."""
        return [r for iv in self._interventions for r in iv.records]

    def require_no_capture(self, what: str) -> None:
        """Raise if a capture block is active: ``what`` runs many forwards and would fill it with the last one."""
        if self._capture is not None:
            raise HeadscopeError(f"{what} runs many forwards; call it outside a capture block")

    # -- inputs --------------------------------------------------------------------------------
    def prepare_inputs(self, input_ids, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalise text / ids to LongTensor [B, T] (+ mask [B, T]) on the model's device; what ``run`` takes.

        Raises on text without a tokenizer, an empty or 3-D input, a mask of another shape or a row
        with no real token."""
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

    def check_length(self, T: int, allow_beyond_context: bool = False) -> None:
        """Raise if ``T`` tokens exceed the context (always for learned positions, else unless allowed)."""
        if self.max_context is None or T <= self.max_context:
            return
        if self.anatomy.pos_embed is not None:
            raise ContextTooLong(f"{T} tokens exceed the {self.max_context}-position learned position embedding "
                                 f"of {self.anatomy.model_type!r}; it cannot extrapolate: use shorter inputs",
                                 T, self.max_context)
        if not allow_beyond_context:
            raise ContextTooLong(f"{T} tokens exceed the model's context of {self.max_context}; use shorter inputs, "
                                 "or from Python pass allow_beyond_context=True to run anyway (RoPE extrapolation, "
                                 "quality unknown)", T, self.max_context)

    # -- sessions ------------------------------------------------------------------------------
    def capture_session(self, stats: StatsSpec | None = None, layers: Sequence[int] | None = None,
                        activations: Sequence[str] = (), positions=None, check_finite: bool | None = None) -> Capture:
        """A ``Capture`` not bound to a block (``generate`` makes one per step)."""
        return Capture(self.anatomy, stats, layers, activations=activations, positions=positions,
                       check_finite=self.check_finite if check_finite is None else check_finite)

    @contextlib.contextmanager
    def capture(self, stats: StatsSpec | None = None, layers: Sequence[int] | None = None,
                activations: Sequence[str] = (), positions=None, check_finite: bool | None = None):
        """Within the block, ``probe.forward`` fills the yielded ``Capture`` (the last forward wins).

        ``layers`` (None = all) limits the statistics, not the activations. ``positions`` (None | slice |
        list, negative from the end) keeps query positions for row stats and activations.
        """
        with self.lock:
            if self._capture is not None:
                raise HeadscopeError("a capture block is already active on this probe; captures do not nest")
            cap = self.capture_session(stats, layers, activations=activations, positions=positions,
                                       check_finite=check_finite)
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
        with self.lock, intervention_block(self._interventions, self.anatomy, ops=ops, phase=phase) as iv:
            yield iv

    # -- running -------------------------------------------------------------------------------
    def run(self, ids: torch.Tensor, mask: torch.Tensor | None = None, *, cache=None, chunk_size: int | None = None,
            capture: Capture | None = None, phase: str = "prefill", row_edits=None, extra_hooks=None,
            logits_to_keep: int = 0) -> ForwardResult:
        """The one forward primitive: the active interventions of ``phase``, ``capture`` and per-row edits.

        Everything that runs the model (``forward``, ``generate``, the sweeps, patching, the
        analyses' batched helpers) comes through here, under ``lock``. ``ids`` / ``mask`` as
        ``prepare_inputs`` returns them (no length check here: callers check the total they run).
        ``capture``: a ``capture_session`` to fill, or None (``forward`` passes the block's).
        ``row_edits`` {layer: [RowEdit]}: per-row head edits (sweeps). ``extra_hooks(q_start) ->
        handles``: module hooks installed after the patches, before the capture's. ``cache``: a
        DynamicCache to extend (generation). Raises if the model was rewired since the probe was made.
        """
        with self.lock:
            self.anatomy.check_unchanged()
            an = self.anatomy
            edits = Edits(an, self._interventions, phase)
            past = cache.get_seq_length() if cache is not None else 0
            T = ids.shape[1]

            def plan(call, device):
                spec = capture.spec_for(call) if capture is not None else None
                return spec, edits.edits_for(call, device)

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
            ctx = AttnContext(an.layer_of, self.backend, plan=plan,
                              record=capture.record if capture is not None else None, row_edits=row_edits or {},
                              check_finite=capture is not None and capture.check_finite)
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
        ids, mask = self.prepare_inputs(input_ids, attention_mask)
        self.check_length(ids.shape[1], allow_beyond_context)
        if chunk_size is not None and chunk_size < 1:
            raise HeadscopeError(f"chunk_size must be >= 1, got {chunk_size}")
        with self.lock:
            return self.run(ids, mask, chunk_size=chunk_size, capture=self._capture, logits_to_keep=logits_to_keep)

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
        with self.lock:  # a capture block of another thread must not count as this one's
            if self._capture is not None:
                raise HeadscopeError("generate captures per step itself: pass stats=/activations= instead of a "
                                     "capture block")
            return generate(self, input_ids, max_new_tokens=max_new_tokens, stop_strings=stop_strings,
                            do_sample=do_sample, seed=seed, temperature=temperature, top_k=top_k, top_p=top_p,
                            stats=stats, layers=layers, activations=activations, capture_prefill=capture_prefill,
                            chunk_size=chunk_size, allow_beyond_context=allow_beyond_context)

    def sweep_heads(self, input_ids, metric, kind: str = "uniform", heads=None, batch_size: int | None = None,
                    value=None, attention_mask=None, logits_to_keep: int = 0) -> torch.Tensor:
        """[L, H] metric with each single head ablated; see ``intervene.sweep_heads``."""
        return sweep_heads(self, input_ids, metric, kind=kind, heads=heads, batch_size=batch_size, value=value,
                           attention_mask=attention_mask, logits_to_keep=logits_to_keep)

    def patch_sweep(self, clean_ids, corrupt_ids, hook: str, metric, per: str = "head",
                    batch_size: int | None = None, attention_mask=None, logits_to_keep: int = 0) -> torch.Tensor:
        """[L, H] or [L, T] metric with one clean unit patched into the corrupted run; see ``intervene.patch_sweep``."""
        return patch_sweep(self, clean_ids, corrupt_ids, hook=hook, metric=metric, per=per, batch_size=batch_size,
                           attention_mask=attention_mask, logits_to_keep=logits_to_keep)
