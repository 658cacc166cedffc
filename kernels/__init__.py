"""Attention statistics and in-attention interventions without the [heads, q, k] matrix.

``attend`` is the one entry point. Backends:
- ``triton``: the CUDA default: output + LSE from torch's flash kernel, then one Triton pass for
  every statistic from the known LSE (``triton_stats``; runs under ``TRITON_INTERPRET=1`` on
  CPU, for tests);
- ``triton-fused``: the one-pass Triton forward with running statistics (``triton_attn``), which
  ``triton`` uses for probability edits and where flash does not apply;
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
