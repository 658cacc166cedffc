"""How many threads torch uses, chosen once per process before the first model call.

torch's default is one thread per core. On a box where another process already keeps cores busy,
OpenMP threads then wait on each other and forwards run 5-20x slower than with one thread (measured
on the 2-core development machine: induction 28 s -> 17 s with ``OMP_NUM_THREADS=1``). headscope
therefore takes the cores that are free right now: the CPUs this process may use minus the
one-minute load average, at least one. An explicit ``HEADSCOPE_THREADS`` or ``OMP_NUM_THREADS``
always wins.
"""
from __future__ import annotations

import os

ENV = "HEADSCOPE_THREADS"


def choose_threads() -> int:
    """The thread count for this process (see the module docstring)."""
    for name in (ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def configure_threads() -> int:
    """Set torch's intra-op thread count to ``choose_threads()``; returns it."""
    import torch

    n = choose_threads()
    torch.set_num_threads(n)
    return n
