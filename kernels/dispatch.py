"""Backend choice and the one entry point ``attend`` (re-exported by ``headscope.kernels``)."""
from __future__ import annotations

from .spec import AttnResult, HeadEdits, StatsSpec

BACKENDS = ("auto", "triton", "triton-fused", "chunked", "reference")


def resolve_backend(backend: str, device) -> str:
    """``auto`` picks triton on CUDA and chunked elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "triton" if getattr(device, "type", str(device)) == "cuda" else "chunked"


def attend(q, k, v, spec: StatsSpec | None = None, edits: HeadEdits | None = None, *,
           scale: float | None = None, causal: bool = True, window: int | None = None,
           softcap: float | None = None, kv_valid=None, backend: str = "auto", output: bool = True,
           **opts) -> AttnResult:
    """Attention output plus the statistics named in ``spec``, with ``edits`` applied.

    See ``headscope.kernels.spec`` for shapes, position conventions and masking rules.
    ``output=False`` computes the statistics only (``out`` is None), skipping the ``p @ v``
    product that costs as much as the logits.
    ``opts`` go to the backend (e.g. ``block_q`` for chunked). ``triton`` takes output and LSE
    from torch's flash kernel where it can and the statistics from one Triton pass over the
    known LSE (``triton_stats``); ``triton-fused`` is the one-pass Triton forward that keeps
    running statistics (``triton_attn``), which ``triton`` itself uses under probability edits.
    """
    name = resolve_backend(backend, q.device)
    if name == "reference":
        from .reference import attend_reference as fn
    elif name == "chunked":
        from .chunked import attend_chunked as fn
    elif name == "triton-fused":
        from .triton_attn import attend_triton as fn
    else:
        from .triton_stats import attend_triton_lse as fn
    return fn(q, k, v, spec, edits, scale=scale, causal=causal, window=window, softcap=softcap,
              kv_valid=kv_valid, output=output, **opts)
