"""The "headscope" attention implementation that HF models call for every attention layer.

How it plugs in. transformers 5 looks attention up by name, ``config._attn_implementation``, in
two registries:

- ``AttentionInterface`` (modeling_utils): ``fn(module, q, k, v, attention_mask, scaling=,
  dropout=, sliding_window=, softcap=, ...)`` gets post-RoPE (and post-QK-norm) queries
  ``[B, H, Tq, D]`` and the cache-extended keys/values ``[B, H_kv, Tk, D]``. It returns
  ``(out [B, Tq, H, D], weights | None)``.
- ``AttentionMaskInterface`` (masking_utils) turns the user's 2-D padding mask into whatever the
  attention function wants as ``attention_mask``. Ours returns a ``KVMask``: the key-validity
  vector ``kv_valid [B, Tk]``, the absolute offsets of the call's queries and keys, and the
  sliding window. It does not return a ``[B, 1, Tq, Tk]`` float mask, which is quadratic in memory.

Attention itself goes to ``headscope.kernels.attend`` with causal / window / padding / softcap /
scaling, plus whatever the active ``AttnContext`` asks for: statistics, ``HeadEdits``, and
per-batch-element ``RowEdit``s (for batched sweeps). Calls that request nothing go to torch SDPA
when the mask is plain causal.

Window semantics are HF's: ``sliding_window_overlay`` keeps key s for query t iff
``s > t - W``, i.e. ``t - s < W``. This is also the kernel contract.

Failure modes, each a ``HeadscopeError`` naming the model type:
- a mask not built by masking_utils (the model builds its own 4-D mask), or a 4-D mask from the user;
- a mask pattern other than causal (+ window): bidirectional image tokens, blockwise or packed sequences;
- a static cache (keys are not "the queries are the last Tq keys");
- attention dropout in training mode, non-causal modules, learned attention sinks (``s_aux``);
- a layer that never reaches the registry. ``Anatomy.check_routed`` checks this after every forward.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from headscope.errors import HeadscopeError
from headscope.kernels import HeadEdits, StatsSpec, attend

from .geometry import Geometry, text_config

ATTN_NAME = "headscope"


# ---------------------------------------------------------------------------------------------
# Mask: what the mask interface hands to the attention function
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KVMask:
    """Returned by the mask interface in place of a 4-D mask.

    The call's queries sit at absolute positions ``q_offset .. q_offset + Tq - 1``. Its keys sit
    at ``kv_offset .. kv_offset + Tk - 1``. ``kv_offset > 0`` only for sliding-window cache
    layers, which drop keys that have left the window.
    """

    q_offset: int
    kv_offset: int
    kv_length: int
    kv_valid: torch.Tensor | None   # [B, Tk] bool, None = no padding
    window: int | None              # sliding window W (keys with t - s < W), None = full


def _causal_check(mask_function: Callable, batch_size: int, q_length: int, q_offset: int,
                  kv_length: int, kv_offset: int, window: int | None, device) -> bool:
    """Does ``mask_function`` equal causal (+ window) on a sample of rows?

    HF encodes the mask pattern as an index function. The kernels only know causal + window, so
    any other pattern must fail loudly. Examples: Gemma 3 bidirectional image blocks, packed
    sequences, chunked (Llama 4) attention. Up to 32 evenly spaced query rows are checked against
    every key, for every batch element.
    """
    rows = torch.linspace(0, q_length - 1, min(q_length, 32), device=device).round().long().unique()
    b = torch.arange(batch_size, device=device)[:, None, None, None]
    h = torch.zeros(1, dtype=torch.long, device=device)[None, :, None, None]
    q = (rows + q_offset)[None, None, :, None]
    kv = (torch.arange(kv_length, device=device) + kv_offset)[None, None, None, :]
    try:
        got = torch.as_tensor(mask_function(b, h, q, kv), device=device).bool()
    except Exception:  # a vmap-only mask function: certainly not plain causal
        return False
    want = kv <= q
    if window is not None:
        want = want & (q - kv < window)
    return bool((got.expand(batch_size, 1, len(rows), kv_length) == want).all())


def headscope_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                   mask_function: Callable | None = None, attention_mask: torch.Tensor | None = None,
                   local_size: int | None = None, config=None, device="cpu", **kwargs) -> KVMask:
    """``AttentionMaskInterface`` entry. It returns a ``KVMask`` and never materialises [Tq, Tk].

    ``local_size`` is the sliding window when HF builds a sliding-window mask
    (``create_sliding_window_causal_mask``), else None.
    """
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    if mask_function is not None and not _causal_check(
            mask_function, batch_size=batch_size, q_length=q_length, q_offset=q_offset, kv_length=kv_length,
            kv_offset=kv_offset, window=local_size, device=device):
        raise HeadscopeError(
            f"model type {getattr(config, 'model_type', '?')!r} asks for an attention mask other than causal"
            f"{' + sliding window' if local_size else ''} (bidirectional/blockwise/packed); headscope cannot express it")
    kv_valid = None
    if attention_mask is not None:
        am = attention_mask.bool()
        if am.shape[-1] < kv_offset + kv_length:  # static-cache style masks are shorter: pad (as HF)
            am = F.pad(am, (0, kv_offset + kv_length - am.shape[-1]))
        am = am[:, kv_offset:kv_offset + kv_length]
        if not bool(am.all()):
            kv_valid = am
    return KVMask(q_offset=q_offset, kv_offset=kv_offset, kv_length=kv_length, kv_valid=kv_valid, window=local_size)


# ---------------------------------------------------------------------------------------------
# Context: what the probe wants from the attention calls of the current forward
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerCall:
    """One attention call, in absolute positions of the current sequence."""

    layer: int
    q_start: int            # absolute index of the first query
    kv_start: int           # absolute index of the first key
    n_q: int
    n_k: int
    window: int | None

    @property
    def q_positions(self) -> range:
        return range(self.q_start, self.q_start + self.n_q)


@dataclass(frozen=True)
class RowEdit:
    """An edit of one head in one batch element, for batched sweeps (copy b ablates head h).

    ``HeadEdits`` acts per head on all batch elements, so these edits are applied to the kernel's
    output afterwards. kind: "zero" | "scale" (value = alpha) | "mean" (value [D]) | "uniform" (exact
    prefix mean of v over the visible keys).
    """

    batch: int
    head: int
    kind: str
    value: float | torch.Tensor | None = None


@dataclass
class AttnContext:
    """Per-forward state read by ``headscope_attention``; the probe sets it for each forward.

    ``plan(call, device) -> (StatsSpec | None, HeadEdits | None)`` decides what to compute; edit
    tensors are made on ``device``, where the layer's queries are (a placed layer's execution device).
    ``record(call, stats)`` receives the statistics. ``row_edits[layer]`` holds sweep edits.
    ``seen`` collects the layers that went through the registry (see ``Anatomy.check_routed``).
    ``check_finite``: raise when a call that computes statistics gets non-finite q or k. The
    kernels clamp masked logits to a finite value, so NaN logits can come out as finite, wrong
    statistics.
    """

    layer_of: dict[int, int]                     # id(attention module) -> layer index
    backend: str = "auto"
    plan: Callable[[LayerCall, torch.device], tuple[StatsSpec | None, HeadEdits | None]] | None = None
    record: Callable[[LayerCall, dict], None] | None = None
    row_edits: dict[int, list[RowEdit]] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)
    check_finite: bool = False


_ACTIVE: contextvars.ContextVar[AttnContext | None] = contextvars.ContextVar("headscope_attn", default=None)


@contextlib.contextmanager
def active(ctx: AttnContext):
    """Make ``ctx`` the context of attention calls in this thread for the duration of the block."""
    token = _ACTIVE.set(ctx)
    try:
        yield ctx
    finally:
        _ACTIVE.reset(token)


# ---------------------------------------------------------------------------------------------
# The attention implementation
# ---------------------------------------------------------------------------------------------

def uniform_output(v: torch.Tensor, n_q: int, window: int | None, kv_valid: torch.Tensor | None) -> torch.Tensor:
    """Exact output of uniform attention over each query's visible keys.

    v: [B, Tk, D] (one KV head), kv_valid [B, Tk] or None -> [B, Tq, D]. Prefix sums in float64,
    so 16k-long prefixes keep fp32 accuracy. A query with no visible key gets 0, as in the kernels.
    """
    B, Tk, D = v.shape
    valid = torch.ones(B, Tk, dtype=torch.float64, device=v.device) if kv_valid is None else kv_valid.double()
    S = F.pad(torch.cumsum(v.double() * valid[..., None], 1), (0, 0, 1, 0))  # [B, Tk + 1, D]
    C = F.pad(torch.cumsum(valid, 1), (1, 0))                                 # [B, Tk + 1]
    hi = torch.arange(Tk - n_q, Tk, device=v.device) + 1                      # [Tq] exclusive end
    lo = (hi - window).clamp_min(0) if window is not None else torch.zeros_like(hi)
    total = S[:, hi] - S[:, lo]                                               # [B, Tq, D]
    count = (C[:, hi] - C[:, lo])[..., None]
    return (total / count.clamp_min(1)).to(v.dtype)


def _apply_row_edits(out, value, edits: list[RowEdit], call: LayerCall, kv_valid) -> torch.Tensor:
    """out: [B, H, Tq, D], value: [B, H_kv, Tk, D]."""
    out = out.clone()
    G = out.shape[1] // value.shape[1]
    for e in edits:
        if e.kind == "zero":
            out[e.batch, e.head] = 0
        elif e.kind == "scale":
            out[e.batch, e.head] *= e.value
        elif e.kind == "mean":
            out[e.batch, e.head] = e.value.to(out)
        elif e.kind == "uniform":
            kv = None if kv_valid is None else kv_valid[e.batch:e.batch + 1]
            v = value[e.batch:e.batch + 1, e.head // G]                         # [1, Tk, D]
            out[e.batch, e.head] = uniform_output(v, n_q=call.n_q, window=call.window, kv_valid=kv)[0]
        else:
            raise HeadscopeError(f"unknown row edit kind {e.kind!r}")
    return out


def _sdpa_plain(q, k, v, scaling) -> torch.Tensor:
    """Attention with a plain causal mask (Tq == Tk) or none (one query), for calls that want
    neither statistics nor edits: torch's fused kernel, no [Tq, Tk] mask."""
    Tq, Tk = q.shape[2], k.shape[2]
    return F.scaled_dot_product_attention(q, k, v, is_causal=Tq == Tk and Tq > 1, scale=scaling,
                                          enable_gqa=q.shape[1] != k.shape[1])


def headscope_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask, scaling: float | None = None, dropout: float = 0.0,
                        sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """``AttentionInterface`` entry: q [B, H, Tq, D], k/v [B, H_kv, Tk, D] -> ([B, Tq, H, D], None)."""
    model_type = getattr(getattr(module, "config", None), "model_type", "?")
    if not isinstance(attention_mask, KVMask):
        what = "a 4-D attention mask" if isinstance(attention_mask, torch.Tensor) else "no attention mask"
        raise HeadscopeError(f"model type {model_type!r} passed {what} to the 'headscope' attention; it must come "
                             "from transformers' masking_utils (pass a 2-D padding mask, not a 4-D one)")
    if dropout:
        raise HeadscopeError(f"attention dropout {dropout} is active ({model_type!r} in training mode): call model.eval()")
    if not getattr(module, "is_causal", True):
        raise HeadscopeError(f"model type {model_type!r}: non-causal attention is not supported")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise HeadscopeError(f"model type {model_type!r}: learned attention sinks (s_aux) are not supported")
    mask = attention_mask
    window = mask.window
    if sliding_window is not None and window is not None and sliding_window != window:
        raise HeadscopeError(f"model type {model_type!r}: layer window {sliding_window} != mask window {window}")
    B, Tq, Tk = query.shape[0], query.shape[2], key.shape[2]
    if Tk != mask.kv_length or mask.q_offset - mask.kv_offset != Tk - Tq:
        raise HeadscopeError(f"model type {model_type!r}: keys [{mask.kv_offset}, +{Tk}) do not end at the queries "
                             f"[{mask.q_offset}, +{Tq}) (static or offloaded caches are not supported; use DynamicCache)")

    kv_valid = mask.kv_valid   # made on the input's device; a placed model runs layers elsewhere
    kv_valid = kv_valid.to(query.device) if kv_valid is not None else None
    if kv_valid is not None and kv_valid.shape[0] != B:  # batch forked inside the forward (sweeps)
        kv_valid = kv_valid.expand(B, -1)

    ctx = _ACTIVE.get()
    layer = ctx.layer_of.get(id(module)) if ctx is not None else None
    spec = edits = None
    call = LayerCall(layer=layer if layer is not None else getattr(module, "layer_idx", -1),
                     q_start=mask.q_offset, kv_start=mask.kv_offset, n_q=Tq, n_k=Tk, window=window)
    if layer is not None:
        ctx.seen.add(layer)
        if ctx.plan is not None:
            spec, edits = ctx.plan(call, query.device)
        # only this call's keys: cached ones were checked when new (or show up as NaN statistics,
        # which the capture rejects); the whole cache each decode step doubled its cost
        if spec is not None and ctx.check_finite and not (torch.isfinite(query).all()
                                                          and torch.isfinite(key[:, :, Tk - Tq:]).all()):
            raise HeadscopeError(f"non-finite values (NaN/inf) in the queries/keys of layer {layer}: the model overflowed "
                                 "upstream (fp16? massive activations?) - run in fp32 (--dtype float32), or from Python pass check_finite=False")
    row_edits = ctx.row_edits.get(layer) if layer is not None else None

    plain = (spec is None and edits is None and softcap is None and kv_valid is None
             and (window is None or window >= Tk) and (Tq == Tk or Tq == 1))
    if plain:
        out = _sdpa_plain(query, key, value, scaling=scaling)                  # [B, H, Tq, D]
    else:
        res = attend(query, key, value, spec=spec, edits=edits, scale=scaling, causal=True, window=window,
                     softcap=softcap, kv_valid=kv_valid, backend=ctx.backend if ctx else "auto")
        out = res.out
        if spec is not None and ctx.record is not None:
            ctx.record(call, res.stats)
    if row_edits:
        out = _apply_row_edits(out, value, edits=row_edits, call=call, kv_valid=kv_valid)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the implementation and its mask under ``ATTN_NAME`` (idempotent, process-wide)."""
    AttentionInterface.register(ATTN_NAME, headscope_attention)
    AttentionMaskInterface.register(ATTN_NAME, headscope_mask)


# ---------------------------------------------------------------------------------------------
# Anatomy: where the layers, attention modules and hook sites of a HF causal LM live
# ---------------------------------------------------------------------------------------------

def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _first(obj, paths: tuple[str, ...]):
    for p in paths:
        if (m := _get(obj, p)) is not None:
            return m
    return None


_LAYERS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers")
_FINAL_NORM = ("model.norm", "model.language_model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm")
_POS_EMBED = ("transformer.wpe",)
_ATTN = ("self_attn", "attn", "attention")
_OUT_PROJ = ("o_proj", "c_proj", "dense", "out_proj")


@dataclass
class Anatomy:
    """Module handles of a decoder-only HF model, and its attention geometry.

    Sandwich-norm models (Gemma 2/3) normalise the attention and MLP outputs before the residual
    add. There ``attn_out`` / ``mlp_out`` are the normalised outputs, so ``resid_mid = resid_pre +
    attn_out`` holds for every family. ``pre_mlp_norm`` is the module whose input is ``resid_mid``;
    it is None for parallel-residual models, where resid_mid does not exist.
    """

    model: nn.Module
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    max_context: int | None
    windows: list[int | None]          # per layer sliding window, None = global
    layers: list[nn.Module]
    attn: list[nn.Module]
    out_proj: list[nn.Module]          # input is hook_z (flattened heads)
    attn_out: list[nn.Module]          # output is hook_attn_out
    mlp_out: list[nn.Module]           # output is hook_mlp_out
    pre_mlp_norm: list[nn.Module | None]
    embed: nn.Module
    pos_embed: nn.Module | None        # learned absolute positions (GPT-2): no extrapolation possible
    final_norm: nn.Module

    @classmethod
    def of(cls, model: nn.Module) -> "Anatomy":
        cfg, geo = text_config(model.config), Geometry.of(model.config)
        mt = geo.model_type
        layers = _first(model, _LAYERS)
        final_norm = _first(model, _FINAL_NORM)
        if layers is None or final_norm is None:
            raise HeadscopeError(f"headscope does not know the module layout of model type {mt!r}")
        layers = list(layers)
        attn = [_first(l, _ATTN) for l in layers]
        out_proj = [_first(a, _OUT_PROJ) if a is not None else None for a in attn]
        if any(a is None for a in attn) or any(o is None for o in out_proj):
            raise HeadscopeError(f"headscope does not know the attention layout of model type {mt!r}")
        sandwich = all(hasattr(l, "pre_feedforward_layernorm") for l in layers)
        parallel = bool(getattr(cfg, "use_parallel_residual", False))
        if sandwich:
            attn_out = [l.post_attention_layernorm for l in layers]
            mlp_out = [l.post_feedforward_layernorm for l in layers]
            pre_mlp = [l.pre_feedforward_layernorm for l in layers]
        else:
            attn_out = list(attn)
            mlp_out = [l.mlp for l in layers]
            pre_mlp = [None if parallel else _first(l, ("post_attention_layernorm", "ln_2")) for l in layers]
        return cls(model=model, model_type=mt, n_layers=len(layers), n_heads=geo.n_heads, n_kv_heads=geo.n_kv_heads,
                   d_head=geo.d_head, d_model=geo.d_model, max_context=geo.max_context, windows=list(geo.windows),
                   layers=layers, attn=attn, out_proj=out_proj, attn_out=attn_out, mlp_out=mlp_out,
                   pre_mlp_norm=pre_mlp, embed=model.get_input_embeddings(), pos_embed=_first(model, _POS_EMBED),
                   final_norm=final_norm)

    @property
    def layer_of(self) -> dict[int, int]:
        return {id(a): i for i, a in enumerate(self.attn)}

    def w_o(self, layer: int) -> torch.Tensor:
        """W_O of one layer as [d_model, H, d_head] (nn.Linear stores [out, in], GPT-2's Conv1D [in, out])."""
        w = self.out_proj[layer].weight
        if type(self.out_proj[layer]).__name__ == "Conv1D":
            w = w.T
        return w.reshape(self.d_model, self.n_heads, self.d_head)

    def check_unchanged(self) -> None:
        """Raise if the model's layers or attention modules are no longer the ones found at ``of``.

        Another tool rewired the model in place: TransformerLens' bridge boot replaces the layer list
        with its own components, whose attention then receives headscope's ``KVMask`` and crashes
        (``'KVMask' object has no attribute 'ndim'``), or silently runs outside the hooks."""
        layers = _first(self.model, _LAYERS)
        same = layers is not None and len(layers) == self.n_layers and all(
            l is mine and _first(l, _ATTN) is a for l, mine, a in zip(layers, self.layers, self.attn))
        if not same:
            raise HeadscopeError(
                f"the {self.model_type!r} model was rewired after this Probe was made (its layer or attention "
                "modules were replaced, e.g. by booting a TransformerLens bridge on it); headscope's hooks no "
                "longer reach its attention. Load a fresh copy (load_model) for the Probe and boot bridges on "
                "another copy, or use headscope.probe.tl.BridgeProbe on the bridge")

    def check_routed(self, seen: set[int]) -> None:
        """Raise if some layer's attention did not reach the registry during the last forward."""
        missing = sorted(set(range(self.n_layers)) - seen)
        if missing:
            raise HeadscopeError(f"model type {self.model_type!r} did not route attention of layer(s) {missing} "
                                 "through transformers' AttentionInterface; headscope cannot see those heads")


def _configs(model: nn.Module) -> list:
    """Every config whose ``_attn_implementation`` the model reads (sub-configs included)."""
    found, todo = {}, [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "sub_configs")]
    while todo:
        cfg = todo.pop()
        if id(cfg) in found:
            continue
        found[id(cfg)] = cfg
        todo += [c for k in cfg.sub_configs if (c := getattr(cfg, k, None)) is not None]
    return list(found.values())


@contextlib.contextmanager
def installed(model: nn.Module):
    """Switch ``model`` to the headscope attention for the block, then restore its implementation.

    The switch goes through ``model.set_attn_implementation``, which also sets every sub-config
    (e.g. a multimodal model's text config). Restoring writes back each config's previous value,
    so mixed settings (vision sdpa, text eager) survive. It also happens after exceptions.
    """
    register()
    if model.config._attn_implementation == ATTN_NAME:  # nested use (e.g. a sweep's forwards)
        yield model
        return
    if not model._can_set_attn_implementation():
        raise HeadscopeError(f"model type {model.config.model_type!r} does not call attention through "
                             "transformers' AttentionInterface; headscope cannot hook it")
    previous = [(cfg, cfg._attn_implementation_internal) for cfg in _configs(model)]
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield model
    finally:
        for cfg, impl in previous:
            cfg._attn_implementation_internal = impl


def cache_kwarg(model: nn.Module) -> str:
    """The keyword under which ``model.forward`` takes its KV cache, as the installed transformers
    expects it: ``cache`` in recent releases (``past_key_values`` there only warns, and goes in
    5.40), ``past_key_values`` in older ones. Read from the signature, so no version table to keep."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
