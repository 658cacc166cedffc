"""Models larger than one device: ``--device-map auto|balanced|<json>`` through accelerate.

``place`` dispatches a loaded model's modules across GPUs, CPU and disk with accelerate (as
TransformerLens, inseq and nnsight do): each placed module gets a hook that moves its inputs to
its device (and offloaded weights in) before it runs. Build the ``Probe`` after ``place``: it
reads the input device from the first parameter, and ``layer_device`` tells it where each
layer executes, so edit tensors are made there.

Failure modes (one-line ``HeadscopeError`` naming ``--device-map``): JSON that is not an object of
module name -> device, a device that does not exist here, a map that leaves parameters without a
device, ``disk`` without an offload folder. What runs where is returned, for ``run.json``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from headscope.errors import HeadscopeError

FLAG = "--device-map"
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


def place(model: torch.nn.Module, spec: str, *, offload_dir: str | Path | None = None) -> dict[str, str]:
    """Dispatch ``model`` by ``spec`` (see ``parse_device_map``); returns {module: device}."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory
    dmap = parse_device_map(spec)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if isinstance(dmap, str):
        max_memory = get_balanced_memory(model, no_split_module_classes=no_split) if dmap == "balanced" else None
        dmap = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if "disk" in map(str, dmap.values()) and offload_dir is None:
        raise HeadscopeError(f"{FLAG}: 'disk' needs an offload folder (probe.placement.place(offload_dir=...))")
    try:
        dispatch_model(model, device_map=dmap, offload_dir=None if offload_dir is None else str(offload_dir))
    except ValueError as e:   # accelerate: modules left without a device, unknown names
        raise HeadscopeError(f"{FLAG}: {str(e).splitlines()[0]}") from None
    return {name: str(dev) for name, dev in dmap.items()}


def layer_device(*modules: torch.nn.Module) -> torch.device:
    """Where a layer runs: the execution device of the first accelerate hook among ``modules``
    (its attention module, then the block; offloaded weights sit on ``meta`` between calls),
    else the device of the first module's first parameter."""
    for m in modules:
        dev = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    return next(modules[0].parameters()).device
