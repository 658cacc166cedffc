"""Attention statistics and in-attention interventions without the [heads, q, k] matrix.

``attend`` is the one entry point. Backends:
- ``triton``: fused CUDA kernels (also runs under ``TRITON_INTERPRET=1`` on CPU, for tests);
- ``chunked``: pure torch over query blocks, any device, the CPU default;
- ``reference``: naive float64 full matrices, tests only.
"""
from __future__ import annotations

if "." not in __name__:  # imported as a top-level module, not headscope.kernels: see headscope/_shadow.py
    from headscope._shadow import give_way
    give_way(__name__, __file__)
else:
    from .dispatch import BACKENDS, attend, resolve_backend
    from .spec import STAT_KEYS, AttnResult, HeadEdits, StatsSpec, check_inputs

    __all__ = ["attend", "resolve_backend", "AttnResult", "HeadEdits", "StatsSpec", "STAT_KEYS",
               "BACKENDS", "check_inputs"]
