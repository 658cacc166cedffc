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
