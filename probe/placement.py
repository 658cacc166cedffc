"""Models larger than one device: ``--device-map auto|balanced|<json>`` through accelerate.

Two ways in, one placement: ``load_model(..., device_map=, offload_dir=)`` loads the weights
straight onto their devices (``load_kwargs``: transformers' ``from_pretrained`` with a device map,
so a model larger than host RAM never sits whole in it; layers on ``disk`` are read from the
model's own safetensors when they run), which the CLI does; ``place`` dispatches a model that is
already loaded (the dashboard's, or one from Python). Either way accelerate (as TransformerLens,
inseq and nnsight use it) gives each placed module a hook that moves its inputs to its device (and
offloaded weights in) before it runs; the probe's attention hook makes edit tensors on the device
of each layer's queries, so they follow the placement whenever it was made.

Failure modes (one-line ``HeadscopeError`` naming ``--device-map``): JSON that is not an object of
module name -> device, a device that does not exist here, a map that leaves parameters without a
device, ``disk`` without an offload folder (naming ``--offload-dir``). What runs where is
returned (``placement_of``), for ``run.json``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from headscope.errors import HeadscopeError

FLAG = "--device-map"
OFFLOAD_FLAG = "--offload-dir"
_DEVICE = re.compile(r"cpu|disk|cuda:\d+|\d+|mps")


def parse_device_map(spec: str) -> str | dict:
    """``auto``, ``balanced``, a JSON object ``{"module.name": "cuda:0" | 0 | "cpu" | "disk"}``
    or the path of a file holding one."""
    if spec in ("auto", "balanced"):
        return spec
    text = Path(spec).read_text() if not spec.lstrip().startswith("{") and Path(spec).is_file() else spec
    try:
        dmap = json.loads(text)
    except json.JSONDecodeError:
        raise HeadscopeError(f"{FLAG}: expected auto, balanced, a JSON object or a .json file, got {spec!r}") from None
    if not isinstance(dmap, dict) or not dmap:
        raise HeadscopeError(f"{FLAG}: the JSON must be a non-empty object of module name -> device")
    for name, dev in dmap.items():
        if not _DEVICE.fullmatch(str(dev)):
            raise HeadscopeError(f"{FLAG}: module {name!r}: {dev!r} is not a device (cpu, disk, cuda:N, N, mps)")
        if str(dev).startswith("cuda") or str(dev).isdigit():
            idx = int(str(dev).split(":")[-1])
            if idx >= torch.cuda.device_count():
                raise HeadscopeError(f"{FLAG}: module {name!r}: cuda:{idx} does not exist on this machine "
                                     f"({torch.cuda.device_count()} GPUs)")
    return dmap


def _check_disk(dmap: str | dict, offload_dir) -> None:
    if isinstance(dmap, dict) and "disk" in map(str, dmap.values()) and offload_dir is None:
        raise HeadscopeError(f"{FLAG}: 'disk' needs a folder for offloaded weights ({OFFLOAD_FLAG} DIR)")


def load_kwargs(spec: str, offload_dir: str | Path | None = None) -> dict:
    """``from_pretrained`` arguments that load a model straight into the placement ``spec``."""
    dmap = parse_device_map(spec)
    _check_disk(dmap, offload_dir)
    out: dict = {"device_map": dmap}
    if offload_dir is not None:
        Path(offload_dir).mkdir(parents=True, exist_ok=True)
        out["offload_folder"] = str(offload_dir)
    return out


def placement_of(model: torch.nn.Module) -> dict[str, str]:
    """{module: device} of a model loaded with a device map (one entry ``""`` when it all fit on one)."""
    dmap = getattr(model, "hf_device_map", None)
    if dmap:
        return {name: str(dev) for name, dev in dmap.items()}
    return {"": str(next(model.parameters()).device)}


def place(model: torch.nn.Module, spec: str, *, offload_dir: str | Path | None = None) -> dict[str, str]:
    """Dispatch ``model`` by ``spec`` (see ``parse_device_map``); returns {module: device}."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory
    dmap = parse_device_map(spec)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if isinstance(dmap, str):
        max_memory = get_balanced_memory(model, no_split_module_classes=no_split) if dmap == "balanced" else None
        dmap = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    _check_disk(dmap, offload_dir)
    try:
        dispatch_model(model, device_map=dmap, offload_dir=None if offload_dir is None else str(offload_dir))
    except ValueError as e:   # accelerate: modules left without a device, unknown names
        raise HeadscopeError(f"{FLAG}: {str(e).splitlines()[0]}") from None
    return {name: str(dev) for name, dev in dmap.items()}

