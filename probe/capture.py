"""Capture: attention statistics and activations (TransformerLens names) from one forward.

A ``Capture`` is filled by the attention calls (``record``) and by module hooks (``store``). The
forward may be one pass or a chunked prefill with a KV cache. Each chunk's queries see all
previous keys. Row statistics ([B, H, Tq, ...]) are concatenated over chunks. Column statistics
(``col_mass`` [B, H, Tk], ``col_count`` [B, Tk]) are summed, zero-padded on the right as Tk grows
and shifted right by ``kv_start`` when a sliding-window cache layer dropped its oldest keys.
Key indices (``topk_idx``) and ``segments`` are absolute positions in the input sequence.

Hook sites (``Site``) map TransformerLens names onto HF modules; ``attach`` installs a function
that sees (and may replace) the activation in TL layout. Interventions reuse the same sites.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from transformers import DynamicCache

from headscope.errors import HeadscopeError
from headscope.kernels import StatsSpec

from .hook import Anatomy, LayerCall, active, cache_kwarg, installed

COL_STATS = ("col_mass", "col_count")  # summed over chunks; every other statistic is per query row

_LAYER_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "attn.hook_z", "attn.hook_result",
                "hook_attn_out", "hook_mlp_out")
_GLOBAL_HOOKS = ("hook_embed", "hook_pos_embed", "ln_final.hook_normalized", "logits")
_NAME_RE = re.compile(r"^blocks\.(\d+|\*)\.(.+)$")


# ---------------------------------------------------------------------------------------------
# Hook sites
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Site:
    """Where a TL-named activation lives in the HF model.

    ``pre``: the activation is the module's first input (else its output, first element of a
    tuple). ``heads``: the last dim is split into [n_heads, d_head] (hook_z). ``result``: the value
    is the per-head W_O product of hook_z (read-only).
    """

    name: str
    module: nn.Module | None     # None for "logits" (taken from the model output)
    pre: bool = False
    layer: int | None = None
    heads: bool = False
    result: bool = False


def expand_names(an: Anatomy, names: Sequence[str]) -> list[str]:
    """Expand ``blocks.*.xxx`` wildcards; raise HeadscopeError on unknown names."""
    out: list[str] = []
    for name in names:
        m = _NAME_RE.match(name)
        if m:
            if m.group(2) not in _LAYER_HOOKS:
                raise HeadscopeError(f"unknown hook {name!r}; per-layer hooks are blocks.{{l}}.{{{', '.join(_LAYER_HOOKS)}}}")
            layers = range(an.n_layers) if m.group(1) == "*" else [int(m.group(1))]
            for l in layers:
                if not 0 <= l < an.n_layers:
                    raise HeadscopeError(f"hook {name!r}: layer {l} out of range (model has {an.n_layers} layers)")
                out.append(f"blocks.{l}.{m.group(2)}")
        elif name in _GLOBAL_HOOKS:
            out.append(name)
        else:
            raise HeadscopeError(f"unknown hook {name!r}; known: {', '.join(_GLOBAL_HOOKS)} and blocks.{{l|*}}.<hook>")
    return list(dict.fromkeys(out))


def site(an: Anatomy, name: str) -> Site:
    """The ``Site`` of one expanded hook name."""
    if name == "hook_embed":
        return Site(name, an.embed)
    if name == "hook_pos_embed":
        if an.pos_embed is None:
            raise HeadscopeError(f"model type {an.model_type!r} has no learned position embedding (hook_pos_embed)")
        return Site(name, an.pos_embed)
    if name == "ln_final.hook_normalized":
        return Site(name, an.final_norm)
    if name == "logits":
        return Site(name, None)
    l, hook = _NAME_RE.match(name).groups()
    l = int(l)
    if hook == "hook_resid_pre":
        return Site(name, an.layers[l], pre=True, layer=l)
    if hook == "hook_resid_post":
        return Site(name, an.layers[l], layer=l)
    if hook == "hook_resid_mid":
        if an.pre_mlp_norm[l] is None:
            raise HeadscopeError(f"model type {an.model_type!r} has no hook_resid_mid (parallel attention and MLP)")
        return Site(name, an.pre_mlp_norm[l], pre=True, layer=l)
    if hook in ("attn.hook_z", "attn.hook_result"):
        return Site(name, an.out_proj[l], pre=True, layer=l, heads=True, result=hook == "attn.hook_result")
    if hook == "hook_attn_out":
        return Site(name, an.attn_out[l], layer=l)
    return Site(name, an.mlp_out[l], layer=l)  # hook_mlp_out


def attach(an: Anatomy, s: Site, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Install ``fn`` at ``s``; it gets the activation in TL layout ([B, pos, ...], hook_z as
    [B, pos, head, d_head], hook_result as [B, pos, head, d_model]). If it returns a tensor, that
    tensor replaces the activation. Returns the torch hook handle.
    """
    if s.module is None:
        raise HeadscopeError("'logits' is read from the model output; it cannot be hooked")

    def to_tl(x):
        if not s.heads:
            return x
        z = x.unflatten(-1, (an.n_heads, an.d_head))                                 # [B, T, H, D]
        return torch.einsum("bthd,mhd->bthm", z, an.w_o(s.layer)) if s.result else z  # [B, T, H, d_model]

    def from_tl(y, x):
        if s.result:
            raise HeadscopeError(f"{s.name} is derived (z @ W_O per head) and cannot be replaced; patch attn.hook_z")
        return y.flatten(-2).to(x.dtype) if s.heads else y.to(x.dtype)

    if s.pre:
        def pre_hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            y = fn(to_tl(x))
            if y is None:
                return None
            y = from_tl(y, x)
            return ((y, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})
        return s.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        y = fn(to_tl(x))
        if y is None:
            return None
        y = from_tl(y, x)
        return (y, *output[1:]) if isinstance(output, tuple) else y
    return s.module.register_forward_hook(post_hook)


# ---------------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------------

def _check_finite(t: torch.Tensor, what: str, allow_neg_inf: bool = False) -> None:
    bad = torch.isnan(t) | (t == float("inf")) if allow_neg_inf else ~torch.isfinite(t)
    if bool(bad.any()):
        raise HeadscopeError(f"non-finite values (NaN/inf) in {what}: {int(bad.sum())} entries; the model overflowed "
                             "(fp16? massive activations?) - run in fp32 (--dtype float32), or from Python pass check_finite=False to keep them")


class Capture:
    """What one ``probe.capture(...)`` block collects; the last forward in the block wins.

    stats[l][key]: CPU fp32 (int64 for topk_idx / col_count), shapes as ``headscope.kernels.spec``
    with Tq = the kept query positions and Tk = the full sequence. acts[name]: CPU fp32 in TL layout,
    [B, pos, ...] over the kept positions. positions: the kept absolute positions (LongTensor).

    ``spec.segments`` are absolute key ranges and ``spec.pattern_rows`` absolute query ranges of the
    input. ``positions`` (None | slice | list[int], negative = from the end) selects the query
    positions kept for row statistics and activations. Column statistics always use all queries.
    """

    def __init__(self, an: Anatomy, stats: StatsSpec | None = None, layers: Sequence[int] | None = None,
                 activations: Sequence[str] = (), positions: slice | Sequence[int] | None = None,
                 check_finite: bool = True):
        self.spec = stats if stats is not None and not stats.empty else None
        self.layers = set(range(an.n_layers)) if layers is None else {int(l) for l in layers}
        if not self.layers <= set(range(an.n_layers)):
            raise HeadscopeError(f"capture layers {sorted(self.layers)} out of range (model has {an.n_layers} layers)")
        self.names = expand_names(an, activations)
        self.sites = [site(an, n) for n in self.names]
        self.check_finite = check_finite
        self._positions_arg = positions
        self.stats: dict[int, dict[str, torch.Tensor]] = {}
        self.acts: dict[str, torch.Tensor] = {}
        self.positions: torch.Tensor | None = None
        self._an = an

    # -- engine side ---------------------------------------------------------------------------
    def begin(self, q_start: int, q_end: int) -> None:
        """Start a forward whose queries are absolute positions [q_start, q_end) (all chunks).

        Explicit ``positions`` are absolute; negative ones count back from ``q_end``.
        """
        p = self._positions_arg
        if p is None:
            pos = torch.arange(q_start, q_end)
        elif isinstance(p, slice):
            pos = torch.arange(q_end)[p]
            pos = pos[pos >= q_start]
        else:
            pos = torch.as_tensor(list(p), dtype=torch.long)
            pos = torch.where(pos < 0, pos + q_end, pos)
            if len(pos) and (pos.min() < q_start or pos.max() >= q_end):
                raise HeadscopeError(f"capture positions {list(p)} outside the forward's positions [{q_start}, {q_end})")
            pos = pos.unique()
        self.positions = pos
        self._all = p is None
        self._rows: dict[int, dict[str, list[torch.Tensor]]] = {}
        self._cols: dict[int, dict[str, torch.Tensor]] = {}
        self._pattern: dict[int, list[torch.Tensor]] = {}
        self._acts: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        self.stats, self.acts = {}, {}

    def logits_needed(self, q_end: int) -> int:
        """How many final positions' logits cover every kept position (for ``logits_to_keep``)."""
        return q_end - int(self.positions.min()) if len(self.positions) else 0

    def keep(self, q_start: int, n_q: int) -> torch.Tensor | None:
        """Indices (relative to a call's queries) of kept positions; None = keep all."""
        if self._all:
            return None
        p = self.positions
        return p[(p >= q_start) & (p < q_start + n_q)] - q_start

    def spec_for(self, call: LayerCall) -> StatsSpec | None:
        """The kernel spec for one call: segments and pattern rows made relative to it."""
        if self.spec is None or call.layer not in self.layers:
            return None
        spec, changes = self.spec, {}
        if spec.segments and call.kv_start:
            changes["segments"] = tuple((max(a - call.kv_start, 0), max(b - call.kv_start, 0)) for a, b in spec.segments)
        if spec.pattern_rows is not None:
            a = max(spec.pattern_rows[0], call.q_start) - call.q_start
            b = min(spec.pattern_rows[1], call.q_start + call.n_q) - call.q_start
            changes["pattern_rows"] = (a, b) if b > a else None
        return dataclasses.replace(spec, **changes) if changes else spec

    def record(self, call: LayerCall, stats: dict[str, torch.Tensor]) -> None:
        """Receive one call's statistics (kernel layout, call-relative key indices)."""
        l, off = call.layer, call.kv_start
        keep = self.keep(call.q_start, call.n_q)
        rows = self._rows.setdefault(l, {})
        for key, t in stats.items():
            t = t.detach().cpu()
            if self.check_finite:
                _check_finite(t.float(), f"attention statistic {key!r} of layer {l}", allow_neg_inf=key == "lse")
            if key in COL_STATS:
                t = F.pad(t, (off, 0))                                       # absolute key positions
                acc = self._cols.setdefault(l, {}).get(key)
                if acc is not None and acc.shape[-1] < t.shape[-1]:
                    acc = F.pad(acc, (0, t.shape[-1] - acc.shape[-1]))
                elif acc is not None:
                    t = F.pad(t, (0, acc.shape[-1] - t.shape[-1]))
                self._cols[l][key] = t if acc is None else acc + t
            elif key == "pattern":
                self._pattern.setdefault(l, []).append(F.pad(t.float(), (off, 0)))  # [B, H, R, kv_start + Tk]
            else:
                if keep is not None:
                    t = t.index_select(2, keep)
                if key == "topk_idx":
                    t = t + off
                if key in ("topk_idx", "topk_prob") and t.shape[-1] < self.spec.topk:  # fewer keys than k so far
                    fill = -1 if key == "topk_idx" else 0.0
                    t = F.pad(t, (0, self.spec.topk - t.shape[-1]), value=fill)
                rows.setdefault(key, []).append(t if key == "topk_idx" else t.float())

    def store(self, name: str, q_start: int, x: torch.Tensor) -> None:
        """Receive one call's activation [B, Tq, ...] in TL layout."""
        x = x.detach()
        keep = self.keep(q_start, x.shape[1])
        x = x if keep is None else x.index_select(1, keep.to(x.device))
        x = x.to("cpu", torch.float32, copy=True)
        if self.check_finite:
            _check_finite(x, f"activation {name!r}")
        self._acts[name].append(x)

    def finish(self, total_keys: int) -> None:
        """Assemble the results; column arrays are padded to ``total_keys``."""
        for l in sorted(set(self._rows) | set(self._cols) | set(self._pattern)):
            out = {k: torch.cat(v, dim=2) for k, v in self._rows.get(l, {}).items()}
            for k, v in self._cols.get(l, {}).items():
                out[k] = F.pad(v, (0, total_keys - v.shape[-1]))
            if l in self._pattern:
                out["pattern"] = torch.cat([F.pad(p, (0, total_keys - p.shape[-1])) for p in self._pattern[l]], dim=2)
            self.stats[l] = out
        self.acts = {n: torch.cat(v, dim=1) for n, v in self._acts.items() if v}
        del self._rows, self._cols, self._pattern, self._acts

    def hooks(self, q_start: Callable[[], int]) -> list:
        """Install the activation hooks (not 'logits'); ``q_start()`` gives the current chunk start."""
        return [attach(self._an, s, lambda x, n=s.name: self.store(n, q_start(), x))
                for s in self.sites if s.module is not None]

    @property
    def wants_logits(self) -> bool:
        return "logits" in self.names


# ---------------------------------------------------------------------------------------------
# Forward, optionally as a chunked prefill
# ---------------------------------------------------------------------------------------------

@dataclass
class ForwardResult:
    logits: torch.Tensor             # [B, T, V] (or the last ``logits_to_keep`` positions), model dtype
    past_key_values: object | None   # the DynamicCache when one was used (chunked prefill, generation)


def position_ids_for(attention_mask: torch.Tensor | None, past: int, T: int, device) -> torch.Tensor:
    """Positions of the new tokens [B or 1, T]. With a padding mask they count only real tokens,
    so a left-padded row is numbered as its unpadded version (as HF ``generate`` does)."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device)[None]
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)[:, past:past + T]


def run_forward(an: Anatomy, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                ctx, chunk_size: int | None = None, cache=None, hooks: Callable | None = None,
                on_logits: Callable[[int, torch.Tensor], None] | None = None,
                logits_to_keep: int = 0) -> ForwardResult:
    """One forward of ``input_ids`` [B, T] with the headscope attention, ``ctx`` active.

    ``cache``: a DynamicCache holding earlier positions (generation). ``attention_mask`` then spans
    past + T, as in HF. ``chunk_size``: prefill in chunks of that many tokens through a
    DynamicCache; each chunk's queries see every earlier key. ``hooks(q_start) -> handles``
    installs module hooks; ``q_start()`` is the absolute position of the current chunk's first
    token. ``on_logits(first_position, logits)`` sees each chunk's computed logits.
    ``logits_to_keep`` = k > 0 keeps only the last k positions' logits, which saves [T, vocab]
    memory at long context.
    """
    model = an.model
    B, T = input_ids.shape
    if cache is None and chunk_size is not None and chunk_size < T:
        cache = DynamicCache(config=model.config)
    past = cache.get_seq_length() if cache is not None else 0
    if attention_mask is not None and attention_mask.shape != (B, past + T):
        raise HeadscopeError(f"attention_mask must be [batch, past + new] = [{B}, {past + T}], got {tuple(attention_mask.shape)}")
    pos = position_ids_for(attention_mask, past=past, T=T, device=input_ids.device)
    step = T if cache is None or chunk_size is None else chunk_size
    cache_kw = {cache_kwarg(model): cache}
    state = {"q": past}
    handles = hooks(lambda: state["q"]) if hooks is not None else []
    logits = []
    try:
        with installed(model), active(ctx), torch.no_grad():
            for a in range(0, T, step):
                b = min(a + step, T)
                state["q"] = past + a
                need = b - a if logits_to_keep <= 0 else max(0, b - max(a, T - logits_to_keep))
                out = model(input_ids=input_ids[:, a:b],
                            attention_mask=None if attention_mask is None else attention_mask[:, :past + b],
                            position_ids=pos[:, a:b], use_cache=cache is not None, **cache_kw,
                            logits_to_keep=max(need, 1))
                if on_logits is not None:  # out.logits covers the chunk's last positions
                    on_logits(past + b - out.logits.shape[1], out.logits)
                if need:
                    logits.append(out.logits[:, -need:])
    finally:
        for h in handles:
            h.remove()
    an.check_routed(ctx.seen)
    return ForwardResult(torch.cat(logits, dim=1), cache)
