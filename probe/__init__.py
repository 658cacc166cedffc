"""headscope.probe: capture and intervene inside HF causal LMs, at long context.

``Probe`` wraps a loaded model. Each call (forward, generate, sweep) switches the model to the
"headscope" attention implementation (``hook.py``) and restores the previous one afterwards, also
after an exception. Attention goes through ``headscope.kernels.attend``, which streams statistics
and applies head edits without materialising [heads, q, k]. See docs/PROBE_API.md for the contract.
"""
if "." not in __name__:  # imported as a top-level module, not headscope.probe: see headscope/_shadow.py
    from headscope._shadow import give_way
    give_way(__name__, __file__)
else:
    from headscope.kernels import StatsSpec

    from .capture import Capture, ForwardResult
    from .engine import Probe
    from .generate import Generation
    from .hook import ATTN_NAME
    from .intervene import (HeadAblation, KeyReweight, Patch, kl_div, logit_diff, patch_sweep, sweep_copies,
                            sweep_heads, sweep_heads_states, target_logprob)
    from .models import LoadedModel, ModelInfo, load_model

    __all__ = ["Probe", "load_model", "LoadedModel", "ModelInfo", "HeadAblation", "KeyReweight", "Patch", "Capture",
               "Generation", "ForwardResult", "sweep_heads", "sweep_heads_states", "sweep_copies", "patch_sweep",
               "logit_diff", "kl_div", "target_logprob", "ATTN_NAME", "StatsSpec"]
