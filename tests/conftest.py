"""Fixtures shared across the test suite (only shared ones belong here)."""
from __future__ import annotations

import os

import pytest

# Triton decides at decoration time whether kernels are compiled or interpreted, so the
# interpreter must be on before any test module imports headscope.kernels.triton_attn. On a
# machine without CUDA it is the only way Triton kernels can run at all.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def headscope_cache(tmp_path_factory):
    """The model cache root for this session, exported as ``HEADSCOPE_CACHE``.

    An existing ``HEADSCOPE_CACHE`` is reused, so a developer or CI can keep the one-time
    smollm2 conversion (about 40 s) between runs; otherwise a fresh session directory is used.
    """
    root = os.environ.get("HEADSCOPE_CACHE") or str(tmp_path_factory.mktemp("headscope-cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADSCOPE_CACHE", root)
        yield root


@pytest.fixture(scope="session")
def smollm2(headscope_cache):
    """The real SmolLM2-135M-Instruct as a ``LoadedModel`` (fp32, CPU, default attention).

    Shared by the whole session: treat it as read-only. Do not boot a TransformerLens bridge on it
    (that rewires the model in place); load a private copy with
    ``load_model("smollm2-135m")`` instead, which reads the session cache in about a second.
    """
    from headscope.probe.models import REGISTRY, load_model

    spec = REGISTRY["smollm2-135m"]
    if spec.missing_packages():
        pytest.skip(f"smollm2-135m not installed: {spec.install_command}")
    return load_model("smollm2-135m")
