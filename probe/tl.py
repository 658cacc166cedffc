"""TransformerLens 4.x interop: wrap an already-loaded model in a ``TransformerBridge``.

The bridge exposes TransformerLens hook names (``blocks.{l}.attn.hook_pattern``,
``blocks.{l}.attn.hook_z``) around the very same HF module, so no weights are read twice.

Hazards handled here:

* TransformerLens pip-installs torchvision at boot when a multimodal AutoProcessor fails to load
  (always, offline). With PyPI reachable that replaced the CPU torch with a CUDA build. Every boot
  runs inside ``torchvision_install_blocked()``; if TransformerLens moves the function, booting
  fails loudly instead of running unguarded.
* Booting modifies the HF model in place: TransformerLens swaps its submodules for bridge
  components and switches it to eager attention. HF forward passes on ``loaded.model`` still give
  the same logits afterwards, but boot once per ``LoadedModel`` and reuse the bridge.
"""
from __future__ import annotations

import copy
import importlib
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from headscope.errors import HeadscopeError
from headscope.kernels.reference import stats_from_probs, visible_mask

from .capture import Capture, ForwardResult
from .hook import Anatomy, LayerCall
from .intervene import Edits, intervention_block, patch_fn
from .models import LoadedModel

_HELPERS = "transformer_lens.model_bridge.sources.transformers.helpers"


def _never_install_torchvision() -> bool:
    """Stand-in for TransformerLens' ``_ensure_torchvision``: report it missing, install nothing."""
    return False


@contextmanager
def torchvision_install_blocked() -> Iterator[None]:
    """Within the block, TransformerLens cannot pip-install torchvision; restored on exit."""
    helpers = importlib.import_module(_HELPERS)
    original = getattr(helpers, "_ensure_torchvision", None)
    if original is None:
        import transformer_lens

        version = getattr(transformer_lens, "__version__", "?")
        raise HeadscopeError(
            f"transformer-lens {version} has no {_HELPERS}._ensure_torchvision; headscope cannot "
            "stop it from pip-installing torchvision, so it refuses to boot (update headscope.probe.tl)"
        )
    helpers._ensure_torchvision = _never_install_torchvision
    try:
        yield
    finally:
        helpers._ensure_torchvision = original


def boot_bridge(loaded: LoadedModel, *, device: str | torch.device | None = None) -> Any:
    """A ``TransformerBridge`` around ``loaded.model`` (modified in place; see module docstring).

    ``device`` defaults to where the model's weights are. The bridge gets a copy of the tokenizer
    because TransformerLens normalises tokenizers (pad token, BOS) in place; TransformerLens may
    also reload it with ``add_bos_token=True``, so ``bridge.to_tokens`` can prepend a BOS that
    ``loaded.tokenizer`` does not. Feed the bridge token ids from ``loaded.tokenizer`` for
    identical inputs.
    """
    from transformer_lens.model_bridge import TransformerBridge

    model = loaded.model
    if device is None:
        device = next(model.parameters()).device
    with torchvision_install_blocked():
        return TransformerBridge.boot_transformers(
            loaded.info.hf_id or loaded.name,  # a label only: hf_model= means nothing is fetched
            hf_model=model,
            tokenizer=copy.deepcopy(loaded.tokenizer),
            device=device,
            dtype=model.dtype,
        )


# --------------------------------------------------------------------------------------------
# Probe-like capture and interventions on a TransformerBridge (TransformerLens hooks)


def pattern_stats(p: torch.Tensor, spec, visible: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``StatsSpec`` statistics from full attention maps, as ``headscope.kernels.spec`` defines them.

    p: [B, H, Tq, Tk] post-softmax weights of queries at key index Tk - Tq + i; visible: [B, 1, Tq, Tk]
    bool. Float64, materialised: for eager maps only. ``lse`` needs the logits and is refused.
    """
    if spec.lse:
        raise HeadscopeError("lse needs attention logits; a TransformerBridge exposes only probabilities "
                             "(use headscope.probe.Probe for lse)")
    return stats_from_probs(p.double() * visible, spec, visible)


class BridgeProbe:
    """``Probe``'s capture / intervene / forward API on a ``TransformerBridge``, through its TL hooks.

    For TransformerLens users who already hold a bridge. Hook names, ``Capture`` layout and the
    intervention operators are the same as ``Probe``'s, so results can be compared one to one.
    How it computes:
    - activations are the bridge's hooks of the same name, with two exceptions. ``attn.hook_result``
      is derived from ``hook_z`` and the bridge's ``W_O``, as in ``Probe``. ``ln_final.hook_normalized``
      reads ``ln_final.hook_out``: headscope's name means the final norm's output (what the
      unembedding reads), while an unfolded bridge's hook_normalized stops before the norm weight;
    - statistics come from the bridge's ``hook_pattern``, i.e. its eager post-softmax maps after any
      pattern edits, recomputed in float64 (``pattern_stats``). They are exact, but quadratic in
      memory like eager attention itself: use ``Probe`` at long context. ``lse`` is not available;
    - HeadAblation zero / scale / mean edit ``hook_z``; HeadAblation uniform and KeyReweight edit
      ``hook_pattern``; Patch hooks the named TL hook.

    Not covered (use ``Probe``): padding masks, chunked prefill, generation, sweeps, and
    ``phase="decode"``.
    """

    def __init__(self, bridge: Any, check_finite: bool = True):
        self.bridge = bridge
        self.anatomy = Anatomy.of(bridge.original_model)
        self.check_finite = check_finite
        self._capture = None
        self._interventions: list = []

    @contextmanager
    def capture(self, stats=None, layers=None, activations=(), positions=None, check_finite: bool | None = None):
        """As ``Probe.capture``; ``bridge_probe.forward`` fills the yielded ``Capture``."""
        if self._capture is not None:
            raise HeadscopeError("a capture block is already active on this probe; captures do not nest")
        self._capture = Capture(self.anatomy, stats, layers, activations=activations, positions=positions,
                                check_finite=self.check_finite if check_finite is None else check_finite)
        try:
            yield self._capture
        finally:
            self._capture = None

    def intervene(self, ops, phase: str = "all"):
        """As ``Probe.intervene`` (phase "all" or "prefill": a bridge forward is a prefill)."""
        if phase == "decode":
            raise HeadscopeError("BridgeProbe runs no decode steps; phase='decode' needs Probe.generate")
        return intervention_block(self._interventions, self.anatomy, ops=ops, phase=phase)

    def _pattern_hook(self, layer: int, T: int, edits, call, cap):
        """hook_pattern: uniform heads, key reweighting, then statistics of the map actually used."""
        def fn(p, hook):
            vis = visible_mask(T, T, window=self.anatomy.windows[layer], device=p.device)  # [1, 1, T, T]
            e = edits.edits_for(call, p.device)
            if e is not None and e.uniform is not None:
                u = vis.to(p.dtype) / vis.sum(-1, keepdim=True)
                p = torch.where(e.uniform[None, :, None, None], u, p)
            if e is not None and e.key_pos is not None:
                p = p * e.key_weights(p.shape[1], T, device=p.device, dtype=p.dtype)[None, :, None, :]
                p = p / p.sum(-1, keepdim=True)
            spec = cap.spec_for(call) if cap is not None else None
            if spec is not None:
                cap.record(call, pattern_stats(p, spec, vis))
            return p
        return fn

    @staticmethod
    def _z_hook(ablations):
        def fn(z, hook):                                                    # [B, T, H, D]
            z = z.clone()
            for op in ablations:
                h = slice(None) if op.head is None else op.head
                if op.kind == "zero":
                    z[:, :, h] = 0
                elif op.kind == "scale":
                    z[:, :, h] *= op.value
                elif op.kind == "mean":                                     # value [D] or [pos, D]
                    v = op.value.to(z)
                    if v.dim() == 2:
                        if v.shape[0] < z.shape[1]:
                            raise HeadscopeError(f"mean value covers {v.shape[0]} positions; the input has {z.shape[1]}")
                        v = v[: z.shape[1]] if op.head is not None else v[: z.shape[1], None]
                    z[:, :, h] = v
            return z
        return fn

    def forward(self, input_ids) -> ForwardResult:
        """Run the bridge on ``input_ids`` [B, T] with the active interventions; fills the capture."""
        an, cap = self.anatomy, self._capture
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        ids = (ids[None] if ids.dim() == 1 else ids).to(next(self.bridge.parameters()).device)
        T = ids.shape[1]
        edits = Edits(an, self._interventions, "prefill")
        hooks: list = []
        for l in range(an.n_layers):
            call = LayerCall(layer=l, q_start=0, kv_start=0, n_q=T, n_k=T, window=an.windows[l])
            z_ops = [op for op in edits.ablations.get(l, ()) if op.kind != "uniform"]
            if z_ops:
                hooks.append((f"blocks.{l}.attn.hook_z", self._z_hook(z_ops)))
            wants_stats = cap is not None and cap.spec_for(call) is not None
            if wants_stats or any(op.kind == "uniform" for op in edits.ablations.get(l, ())) or l in edits.reweights:
                fn = self._pattern_hook(l, T, edits=edits, call=call, cap=cap)
                hooks.append((f"blocks.{l}.attn.hook_pattern", fn))
        hooks += [(p.hook, lambda x, hook, f=patch_fn(p, lambda: 0): f(x)) for p in edits.patches]
        if cap is not None:
            cap.begin(0, T)
            for name in cap.names:
                if name == "logits":
                    continue
                src, derive = name, None
                if name == "ln_final.hook_normalized":   # the norm's output, weight applied (see PROBE_API.md)
                    src = "ln_final.hook_out"
                elif name.endswith("attn.hook_result"):
                    layer = int(name.split(".")[1])
                    src = f"blocks.{layer}.attn.hook_z"
                    derive = lambda z, l=layer: torch.einsum("bthd,hdm->bthm", z, self.bridge.W_O[l])  # noqa: E731
                hooks.append((src, lambda x, hook, n=name, d=derive: cap.store(n, 0, x if d is None else d(x))))
        with torch.no_grad():
            logits = self.bridge.run_with_hooks(ids, fwd_hooks=hooks)
        if cap is not None:
            if cap.wants_logits:
                cap.store("logits", 0, logits)
            cap.finish(T)
        return ForwardResult(logits, None)
