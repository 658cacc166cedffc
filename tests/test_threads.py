"""The thread count headscope picks: explicit settings win, otherwise the cores free right now."""
from __future__ import annotations

import os

import pytest

from headscope.threads import choose_threads


@pytest.fixture()
def machine(monkeypatch):
    """A fake machine: ``set(cpus, load)``; the environment variables cleared."""
    for name in ("HEADSCOPE_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)

    def set_(cpus: int, load: float):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    return set_


@pytest.mark.parametrize("cpus, load, want", [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 7.0, 1), (16, 3.2, 13),
                                              (1, 0.0, 1)])
def test_free_cores(machine, cpus, load, want):
    machine(cpus, load)
    assert choose_threads() == want


def test_explicit_settings_win(machine, monkeypatch):
    machine(2, 9.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads() == 2
    monkeypatch.setenv("HEADSCOPE_THREADS", "3")
    assert choose_threads() == 3
    monkeypatch.setenv("HEADSCOPE_THREADS", "zero")   # not a count: ignored, OMP_NUM_THREADS next
    assert choose_threads() == 2
