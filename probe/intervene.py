"""Interventions: head ablations and key reweighting inside the attention call, activation patching
at TransformerLens hook sites, and batched sweeps over heads or positions.

Where each operator acts (SCIENCE.md section 9), also reported by ``describe``:

| operator | acts on | RoPE |
|---|---|---|
| HeadAblation zero / scale / mean | head output z (``HeadEdits.out_scale`` / ``replace_*``) | n/a |
| HeadAblation uniform | probabilities: uniform over visible keys (the same as q -> 0) | q.k unused |
| KeyReweight | probabilities of listed keys x beta, renormalised (``HeadEdits.key_*``) | after RoPE |
| Patch | the hooked activation (module hook) | residual sites: before RoPE |

Ablations and reweights travel as ``HeadEdits`` into the attention kernel, so at long context they
cost no more than capture does. ``phase`` picks the forwards an operator applies to: "prefill" is
``probe.forward`` and generation's prompt prefill; "decode" is every generation step, the query of
the last prompt token included (see ``generate``). "all" is both. ``kv_cache_built_with`` is
True when the cached keys/values of later layers were computed under the operator (phase "all" or
"prefill"). Decode-only operators see a clean prefill cache.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from headscope.errors import HeadscopeError
from headscope.kernels import HeadEdits

from .capture import _NAME_RE, attach, expand_names, site
from .hook import Anatomy, KVMask, LayerCall, RowEdit

PHASES = ("all", "prefill", "decode")
ABLATIONS = ("zero", "scale", "mean", "uniform")
FINAL_STATE = "ln_final.hook_normalized"  # what sweep_heads_states returns


@dataclass(frozen=True, eq=False)
class HeadAblation:
    """Ablate query head ``head`` of ``layer`` (None = every head of the layer).

    kind "zero": z = 0. "scale": z = value * z. "mean": z = value ([d_head], or [pos, d_head] indexed
    by absolute position). "uniform": the head attends uniformly to its visible keys.
    """

    layer: int
    head: int | None
    kind: str = "zero"
    value: float | torch.Tensor | None = None

    def __post_init__(self):
        if self.kind not in ABLATIONS:
            raise HeadscopeError(f"HeadAblation kind must be one of {ABLATIONS}, got {self.kind!r}")
        if self.kind == "scale" and not isinstance(self.value, (int, float)):
            raise HeadscopeError("HeadAblation(kind='scale') needs value=<float>")
        if self.kind == "mean" and (not isinstance(self.value, torch.Tensor) or self.value.dim() not in (1, 2)):
            raise HeadscopeError("HeadAblation(kind='mean') needs value=<tensor [d_head] or [pos, d_head]>")


@dataclass(frozen=True, eq=False)
class KeyReweight:
    """Multiply head ``head``'s probabilities on key ``positions`` by ``beta``, then renormalise (ACT/VAR).

    All reweights of one layer must share one position set (the kernel takes one key list per call).
    """

    layer: int
    head: int | None
    positions: Sequence[int]
    beta: float

    def __post_init__(self):
        if self.beta < 0 or not math.isfinite(self.beta):
            raise HeadscopeError(f"KeyReweight beta must be finite and >= 0, got {self.beta}")
        if len(self.positions) == 0 or min(self.positions) < 0:
            raise HeadscopeError("KeyReweight positions must be a non-empty list of absolute key indices >= 0")


@dataclass(frozen=True, eq=False)
class Patch:
    """Replace the activation at ``hook`` (one site, e.g. ``blocks.3.attn.hook_z``) by ``value``.

    ``value`` is in TL layout over a whole sequence, e.g. ``cap.acts[hook]`` of another run:
    [1 or B, T_value, ...], hook_z [.., T_value, head, d_head]. At each forward, the listed absolute
    ``positions`` (None = all < T_value) inside the forward get ``value[:, p]``. ``heads`` (None =
    all) restricts head sites.
    """

    hook: str
    positions: Sequence[int] | None = None
    heads: Sequence[int] | None = None
    value: torch.Tensor | None = None

    def __post_init__(self):
        if not isinstance(self.value, torch.Tensor):
            raise HeadscopeError(f"Patch({self.hook!r}) needs value=<tensor from another run>")
        if "*" in self.hook:
            raise HeadscopeError(f"Patch takes one hook site, not a wildcard: {self.hook!r} (one Patch per layer)")


Operator = HeadAblation | KeyReweight | Patch


def _kv_from_layer(an: Anatomy, op: Operator) -> int:
    """First layer whose keys/values the operator can change."""
    if isinstance(op, Patch):
        m = _NAME_RE.match(op.hook)
        if m is None:
            return 0 if op.hook in ("hook_embed", "hook_pos_embed") else an.n_layers
        return int(m.group(1)) + (0 if m.group(2) == "hook_resid_pre" else 1)
    return op.layer + 1


def describe(an: Anatomy, op: Operator, phase: str) -> dict:
    """The SCIENCE.md section 9 record of one operator: site, RoPE, phase, KV cache."""
    if isinstance(op, HeadAblation):
        if op.kind == "uniform":
            where, rope = "attention probabilities: uniform over visible keys (= q -> 0)", "independent (q.k unused)"
        else:
            where, rope = f"head output z ({op.kind}), inside the attention call", "n/a (after attention)"
        name = f"HeadAblation(L{op.layer}, H{'*' if op.head is None else op.head}, {op.kind})"
    elif isinstance(op, KeyReweight):
        where, rope = f"attention probabilities on keys {list(op.positions)} x {op.beta}, renormalised", "after RoPE"
        name = f"KeyReweight(L{op.layer}, H{'*' if op.head is None else op.head})"
    else:
        where = f"activation {op.hook} (module hook)"
        rope = "n/a (after attention)" if "attn" in op.hook or "out" in op.hook else "before RoPE (residual stream)"
        name = f"Patch({op.hook})"
    first = _kv_from_layer(an, op)
    return {"operator": name, "site": where, "rope": rope, "phase": phase,
            "kv_cache_built_with": phase in ("all", "prefill") and first < an.n_layers,
            "kv_layers_affected_from": first}


@dataclass(eq=False)
class InterventionSet:
    """Validated operators of one ``probe.intervene`` block; ``records`` describe them."""

    an: Anatomy
    ops: list[Operator]
    phase: str
    records: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.phase not in PHASES:
            raise HeadscopeError(f"phase must be one of {PHASES}, got {self.phase!r}")
        an = self.an
        for op in self.ops:
            if isinstance(op, (HeadAblation, KeyReweight)):
                if not 0 <= op.layer < an.n_layers:
                    raise HeadscopeError(f"{op}: layer out of range (model has {an.n_layers} layers)")
                if op.head is not None and not 0 <= op.head < an.n_heads:
                    raise HeadscopeError(f"{op}: head out of range (model has {an.n_heads} query heads)")
                if isinstance(op, HeadAblation) and op.kind == "mean" and op.value.shape[-1] != an.d_head:
                    raise HeadscopeError(f"mean value has last dim {op.value.shape[-1]}, d_head is {an.d_head}")
            elif isinstance(op, Patch):
                (name,) = expand_names(an, [op.hook])
                s = site(an, name)
                if s.module is None or s.result:
                    raise HeadscopeError(f"{op.hook} is read-only (logits, or hook_result = z @ W_O per head); "
                                         "patch attn.hook_z or a residual hook")
                if op.heads is not None and not s.heads:
                    raise HeadscopeError(f"Patch({op.hook!r}) has no head axis; drop heads=")
            else:
                raise HeadscopeError(f"not an intervention: {op!r}")
        self.records = [describe(an, op, self.phase) for op in self.ops]


@contextlib.contextmanager
def intervention_block(active: list[InterventionSet], an: Anatomy, *, ops: Sequence, phase: str):
    """Push the validated ``ops`` onto ``active`` for the block; removed also after an exception.

    The body of ``Probe.intervene`` and ``BridgeProbe.intervene``: blocks nest and compose."""
    iv = InterventionSet(an, list(ops), phase)
    active.append(iv)
    try:
        yield iv
    finally:
        active.remove(iv)


class Edits:
    """The interventions active in one forward of a given phase, compiled per layer."""

    def __init__(self, an: Anatomy, sets: Sequence[InterventionSet], phase: str):
        ops = [op for s in sets if s.phase in ("all", phase) for op in s.ops]
        self.an = an
        self.ablations: dict[int, list[HeadAblation]] = {}
        self.reweights: dict[int, list[KeyReweight]] = {}
        for op in ops:
            if isinstance(op, HeadAblation):
                self.ablations.setdefault(op.layer, []).append(op)
            elif isinstance(op, KeyReweight):
                self.reweights.setdefault(op.layer, []).append(op)
        for l, rws in self.reweights.items():
            if len({tuple(sorted(r.positions)) for r in rws}) > 1:
                raise HeadscopeError(f"KeyReweights on layer {l} use different key positions; the kernel takes one key set per layer")
        self.patches = [op for op in ops if isinstance(op, Patch)]

    def edits_for(self, call: LayerCall, device) -> HeadEdits | None:
        """The ``HeadEdits`` of one attention call (positions made call-relative)."""
        abl, rws = self.ablations.get(call.layer, ()), self.reweights.get(call.layer, ())
        if not abl and not rws:
            return None
        H, D = self.an.n_heads, self.an.d_head
        e = HeadEdits()
        for op in abl:
            heads = slice(None) if op.head is None else op.head
            if op.kind == "uniform":
                e.uniform = torch.zeros(H, dtype=torch.bool, device=device) if e.uniform is None else e.uniform
                e.uniform[heads] = True
            elif op.kind in ("zero", "scale"):
                e.out_scale = torch.ones(H, device=device) if e.out_scale is None else e.out_scale
                e.out_scale[heads] *= 0.0 if op.kind == "zero" else float(op.value)
            else:  # mean: [1, H, Tq, D] so per-position values fit
                if e.replace_mask is None:
                    e.replace_mask = torch.zeros(H, dtype=torch.bool, device=device)
                    e.replace_value = torch.zeros(1, H, call.n_q, D, device=device)
                v = op.value.to(device, torch.float32)
                if v.dim() == 2:
                    if v.shape[0] < call.q_start + call.n_q:
                        raise HeadscopeError(f"mean value covers {v.shape[0]} positions; the input needs {call.q_start + call.n_q}")
                    v = v[call.q_start:call.q_start + call.n_q]
                e.replace_mask[heads] = True
                e.replace_value[0, heads] = v
        if rws:
            pos = torch.tensor(sorted(rws[0].positions), device=device) - call.kv_start
            pos = pos[(pos >= 0) & (pos < call.n_k)]
            if len(pos):
                e.key_pos, e.key_scale = pos, torch.ones(H, device=device)
                for r in rws:
                    e.key_scale[slice(None) if r.head is None else r.head] *= r.beta
        return e

    def hooks(self, q_start: Callable[[], int]) -> list:
        """Install the Patch hooks; ``q_start()`` gives the current chunk's first absolute position."""
        return [attach(self.an, site(self.an, p.hook), patch_fn(p, q_start)) for p in self.patches]


def patch_fn(p: Patch, q_start: Callable[[], int]):
    """The hook function of one Patch: x [B, Tq, ...] (TL layout) -> patched copy, or None."""
    def fn(x):  # x: [B, Tq, ...] TL layout
        q0, n = q_start(), x.shape[1]
        T_v = p.value.shape[1]
        pos = torch.arange(T_v) if p.positions is None else torch.as_tensor(list(p.positions))
        pos = pos[(pos >= q0) & (pos < q0 + n) & (pos < T_v)]
        if not len(pos):
            return None
        if p.value.shape[0] not in (1, x.shape[0]):
            raise HeadscopeError(f"Patch({p.hook!r}) value batch {p.value.shape[0]} != run batch {x.shape[0]}")
        src = p.value.to(x.device, x.dtype)[:, pos]                # [Bv, P, ...]
        x = x.clone()
        rel = (pos - q0).to(x.device)
        if p.heads is None:
            x[:, rel] = src
        else:
            hs = torch.as_tensor(list(p.heads), device=x.device)
            x[:, rel[:, None], hs[None, :]] = src[:, :, hs]
        return x
    return fn


# ---------------------------------------------------------------------------------------------
# Metrics for sweeps: metric(logits [n, pos, vocab]) -> float (averaged over the n prompts)
# ---------------------------------------------------------------------------------------------

def logit_diff(correct, incorrect, position: int = -1) -> Callable[[torch.Tensor], float]:
    """Mean over prompts of logit[correct] - logit[incorrect] at ``position`` (token ids; one or one per prompt)."""
    def metric(logits):
        lg = logits[:, position].float()                                  # [n, V]
        c = torch.as_tensor(correct, device=lg.device).view(-1, 1).expand(lg.shape[0], 1)
        i = torch.as_tensor(incorrect, device=lg.device).view(-1, 1).expand(lg.shape[0], 1)
        return float((lg.gather(1, c) - lg.gather(1, i)).mean())
    return metric


def target_logprob(targets, positions) -> Callable[[torch.Tensor], float]:
    """Mean over prompts of sum_j log p(targets[j] | logits at positions[j]) (fp32 log-softmax)."""
    def metric(logits):
        pos = torch.as_tensor(positions, device=logits.device).view(-1)
        tgt = torch.as_tensor(targets, device=logits.device)
        tgt = tgt.view(1, -1).expand(logits.shape[0], -1) if tgt.dim() <= 1 else tgt
        lp = torch.log_softmax(logits[:, pos].float(), -1)                # [n, P, V]
        return float(lp.gather(-1, tgt[..., None]).squeeze(-1).sum(-1).mean())
    return metric


def kl_div(ref_logits: torch.Tensor, position: int | slice = -1) -> Callable[[torch.Tensor], float]:
    """Mean KL(ref || run) in nats at ``position`` (int or slice), ref from e.g. the clean forward."""
    def metric(logits):
        p = torch.log_softmax(ref_logits[:, position].float().to(logits.device), -1)
        q = torch.log_softmax(logits[:, position].float(), -1)
        kl = (p.exp() * (p - q)).sum(-1)
        return float(kl.mean())
    return metric


# ---------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------

def _layer_groups(units: list[tuple[int, int]], per_batch: int):
    """Group (layer, j) units by layer, at most ``per_batch`` per group: [(layer, [j, ...]), ...]."""
    by_layer: dict[int, list[int]] = {}
    for l, j in units:
        by_layer.setdefault(l, []).append(j)
    for l, js in sorted(by_layer.items()):
        for i in range(0, len(js), per_batch):
            yield l, js[i:i + per_batch]


def sweep_copies(n_tokens: int, n_heads: int) -> int:
    """Copies per forward of a single-head sweep: one layer's heads, fewer when that exceeds ~8k
    tokens a batch (public so that cost estimates count the sweeps' forwards as they run)."""
    return max(1, min(n_heads, 8192 // max(n_tokens, 1)))


def _sweep_units(an: Anatomy, kind: str, value, heads) -> list[tuple[int, int]]:
    """The (layer, head) list of a single-head sweep, after checking ``kind`` / ``value`` / ranges."""
    if kind not in ABLATIONS:
        raise HeadscopeError(f"sweep kind must be one of {ABLATIONS}, got {kind!r}")
    if kind == "mean" and (not isinstance(value, torch.Tensor) or tuple(value.shape) != (an.n_layers, an.n_heads, an.d_head)):
        raise HeadscopeError(f"kind='mean' needs value [L, H, d_head] = [{an.n_layers}, {an.n_heads}, {an.d_head}]")
    if kind == "scale" and not isinstance(value, (int, float)):
        raise HeadscopeError("kind='scale' needs value=<float>")
    units = list(heads) if heads is not None else [(l, h) for l in range(an.n_layers) for h in range(an.n_heads)]
    for l, h in units:
        if not (0 <= l < an.n_layers and 0 <= h < an.n_heads):
            raise HeadscopeError(f"head ({l}, {h}) out of range ({an.n_layers} layers x {an.n_heads} heads)")
    return units


def sweep_heads(probe, input_ids: torch.Tensor, metric: Callable[[torch.Tensor], float], kind: str = "uniform",
                heads: Sequence[tuple[int, int]] | None = None, batch_size: int | None = None,
                value: float | torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
    """metric under single-head ablation for every (layer, head) -> [L, H] (NaN where not swept).

    Batched per layer: one forward runs the [n, T] input once up to layer l, then ``batch_size``
    copies (default: all heads of the layer), copy i ablating its own head. ``HeadEdits`` act per
    head on the whole batch, so the per-copy ablation is a ``RowEdit`` of the attention output;
    "uniform" is the exact prefix mean of v. kind "scale" takes ``value`` (float), "mean" takes
    ``value`` [L, H, d_head]. ``logits_to_keep`` = k > 0 hands the metric only the last k
    positions' logits (saves the unembedding of every position). Interventions active around the
    call apply to every copy.
    """
    an = probe.anatomy
    units = _sweep_units(an, kind=kind, value=value, heads=heads)
    ids, mask = probe.prepare_inputs(input_ids, attention_mask)
    scores = torch.full((an.n_layers, an.n_heads), float("nan"))
    with probe.lock:
        probe.require_no_capture("sweep_heads")
        for (l, h), logits in _single_head_forks(probe, ids, mask, units=units, kind=kind, value=value,
                                                 batch_size=batch_size, logits_to_keep=logits_to_keep):
            scores[l, h] = float(metric(logits))
    return scores


def _single_head_forks(probe, ids: torch.Tensor, mask: torch.Tensor | None, *, units, kind: str, value,
                       batch_size: int | None, states: bool = False, logits_to_keep: int = 0):
    """The batched single-head sweep shared by ``sweep_heads`` and ``sweep_heads_states``.

    Per group of one layer's heads, one ``_fork_run``: copy c ablates head hs[c] with a
    ``RowEdit`` on its n rows. Yields ((layer, head), that copy's rows): logits [n, pos, vocab],
    or with ``states`` the final-norm last-token states [n, d_model].
    """
    an = probe.anatomy
    n, T = ids.shape
    for l, hs in _layer_groups(units, batch_size or sweep_copies(n * T, an.n_heads)):
        v = lambda h: value if kind == "scale" else value[l, h] if kind == "mean" else None  # noqa: E731
        edits = [RowEdit(c * n + i, h, kind, value=v(h)) for c, h in enumerate(hs) for i in range(n)]
        cap = probe.capture_session(activations=[FINAL_STATE], positions=[-1]) if states else None
        res = _fork_run(probe, ids, mask, layer=l, k=len(hs), row_edits={l: edits}, capture=cap,
                        logits_to_keep=1 if states else logits_to_keep)
        rows = cap.acts[FINAL_STATE][:, -1] if states else res.logits           # [k * n, ...]
        for c, h in enumerate(hs):
            yield (l, h), rows[c * n:(c + 1) * n]


def _repeat_rows(x, n: int, k: int):
    """``k`` copies of every per-row input in ``x`` (args / kwargs of a decoder block): tensors of
    2+ dims with ``n`` rows (hidden states, position ids, RoPE tables, 4-D masks) and the padding
    mask's ``kv_valid``. Copy c = rows c*n .. c*n+n-1. 1-D tensors (cache
    positions) and batch-1 broadcast tensors are left alone."""
    if isinstance(x, torch.Tensor):
        return x.repeat(k, *([1] * (x.dim() - 1))) if x.dim() >= 2 and x.shape[0] == n else x
    if isinstance(x, KVMask):
        if x.kv_valid is None or x.kv_valid.shape[0] != n:
            return x
        return replace(x, kv_valid=x.kv_valid.repeat(k, 1))
    if isinstance(x, (tuple, list)):
        return type(x)(_repeat_rows(v, n, k) for v in x)
    if isinstance(x, dict):
        return {key: _repeat_rows(v, n, k) for key, v in x.items()}
    return x


def _fork_run(probe, ids: torch.Tensor, mask: torch.Tensor | None, *, layer: int, k: int, row_edits=None,
              hooks=None, capture=None, logits_to_keep: int = 0):
    """Forward of ``k`` copies of ``ids`` [n, T] that may differ from ``layer`` on; layers below
    run once, also for left-padded multi-prompt batches.

    A pre-hook on every block from ``layer`` on repeats each per-row input with n rows
    (``_repeat_rows``): on block ``layer`` the hidden states too, on later blocks they already have
    k*n rows; positions, RoPE tables and the padding mask, which the model hands to every block as
    [n, ...], are repeated on each. Each copy so keeps its rows' positions and padded keys. It
    would wrongly repeat a block input with n leading rows that is not per-row (none in the Llama /
    Qwen2 / Gemma / GPT-2 blocks) and needs a single forward (no chunked prefill, no cache).
    """
    n = ids.shape[0]

    def fork(module, args, kwargs):
        return _repeat_rows(args, n, k), _repeat_rows(kwargs, n, k)

    def all_hooks(q_start):
        forks = [b.register_forward_pre_hook(fork, with_kwargs=True) for b in probe.anatomy.layers[layer:]]
        return forks + (hooks(q_start) if hooks else [])
    return probe.run(ids, mask, capture=capture, row_edits=row_edits, extra_hooks=all_hooks,
                     logits_to_keep=logits_to_keep)


def sweep_heads_states(probe, input_ids: torch.Tensor, kind: str = "uniform",
                       heads: Sequence[tuple[int, int]] | None = None, batch_size: int | None = None,
                       value: float | torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None) -> dict[tuple[int, int], torch.Tensor]:
    """Final-norm state at the last position (``ln_final.hook_normalized``, CPU fp32 [n, d_model])
    under single-head ablation, for every (layer, head) or ``heads``.

    The state-valued twin of ``sweep_heads``, for metrics that need the states of all prompts
    together (generalized Ships takes an SVD over the n prompts). Batched per layer with
    ``_fork_run``: the input runs once up to layer l, then ``batch_size`` copies (default: one
    layer's heads, fewer above ~8k tokens a batch), copy i ablating its own head by ``RowEdit``.
    Padding must be on the left (the last position is every row's last token); positions then count
    real tokens only, as in ``probe.forward``. Interventions active around the call apply to every
    copy. kind / value as ``sweep_heads``.
    """
    units = _sweep_units(probe.anatomy, kind=kind, value=value, heads=heads)
    ids, mask = probe.prepare_inputs(input_ids, attention_mask)
    if mask is not None and not bool(mask[:, -1].all()):
        raise HeadscopeError("sweep_heads_states needs left padding: every row's last position must be a real token")
    with probe.lock:
        probe.require_no_capture("sweep_heads_states")
        return dict(_single_head_forks(probe, ids, mask, units=units, kind=kind, value=value, batch_size=batch_size,
                                       states=True))


def patch_sweep(probe, clean_ids: torch.Tensor, corrupt_ids: torch.Tensor, hook: str,
                metric: Callable[[torch.Tensor], float], per: str = "head", batch_size: int | None = None,
                attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
    """Activation patching clean -> corrupted: metric of the corrupted run with one unit patched.

    ``hook`` is a per-layer wildcard such as ``blocks.*.attn.hook_z`` or ``blocks.*.hook_resid_pre``.
    per="head" patches one (layer, head) at every position -> [L, H] (head sites only).
    per="position" patches one (layer, position), all heads -> [L, T]. Clean and corrupted inputs
    must have the same shape (and share ``attention_mask``). Batched per layer as ``sweep_heads``.
    """
    an = probe.anatomy
    if per not in ("head", "position"):
        raise HeadscopeError(f"per must be 'head' or 'position', got {per!r}")
    m = _NAME_RE.match(hook)
    if m is None or m.group(1) != "*":
        raise HeadscopeError(f"patch_sweep hook must be a per-layer wildcard like 'blocks.*.attn.hook_z', got {hook!r}")
    names = expand_names(an, [hook])
    sites = [site(an, nm) for nm in names]
    if sites[0].result:
        raise HeadscopeError("attn.hook_result is derived and cannot be patched; use blocks.*.attn.hook_z")
    if per == "head" and not sites[0].heads:
        raise HeadscopeError(f"per='head' needs a head site (blocks.*.attn.hook_z), got {hook!r}")
    clean, mask = probe.prepare_inputs(clean_ids, attention_mask)
    corrupt, _ = probe.prepare_inputs(corrupt_ids, attention_mask)
    if clean.shape != corrupt.shape:
        raise HeadscopeError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupt.shape)} inputs differ in shape")
    with probe.lock:
        probe.require_no_capture("patch_sweep")
        return _patch_sweep(probe, clean, corrupt, mask=mask, names=names, sites=sites, metric=metric, per=per,
                            batch_size=batch_size, logits_to_keep=logits_to_keep)


def _patch_sweep(probe, clean: torch.Tensor, corrupt: torch.Tensor, *, mask: torch.Tensor | None, names, sites,
                 metric, per: str, batch_size: int | None, logits_to_keep: int) -> torch.Tensor:
    """``patch_sweep`` on checked inputs, under the probe's lock."""
    an = probe.anatomy
    n, T = clean.shape
    with probe.capture(activations=names, check_finite=False) as cap:
        probe.forward(clean, attention_mask=mask)
    width = an.n_heads if per == "head" else T
    units = [(l, j) for l in range(an.n_layers) for j in range(width)]
    scores = torch.full((an.n_layers, width), float("nan"))
    for l, js in _layer_groups(units, batch_size or sweep_copies(n * T, an.n_heads)):
        src = cap.acts[names[l]]                                     # [n, T, ...] clean

        def patch(x, js=js, src=src):                                # x: [k * n, T, ...] corrupted copies
            x = x.clone()
            v = src.to(x.device, x.dtype)
            for c, j in enumerate(js):
                if per == "head":
                    x[c * n:(c + 1) * n, :, j] = v[:, :, j]
                else:
                    x[c * n:(c + 1) * n, j] = v[:, j]
            return x

        hooks = lambda q_start, l=l, patch=patch: [attach(an, sites[l], patch)]  # noqa: E731
        logits = _fork_run(probe, corrupt, mask, layer=l, k=len(js), hooks=hooks, logits_to_keep=logits_to_keep).logits
        for c, j in enumerate(js):
            scores[l, j] = float(metric(logits[c * n:(c + 1) * n]))
    return scores
