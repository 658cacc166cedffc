"""Direct logit attribution per head: what each head's output pushes up or down at one position.

A head's direct effect is its own write to the residual stream (``z_h @ W_O[h]``, the TL
``attn.hook_result``) carried straight to the logits through the final norm and the unembedding,
with every norm's scale frozen at its value on the clean run. With the scale frozen the path is
linear, so the head effects add up: the sum over heads, MLPs and embeddings of the direct effects
(plus the norm's bias) is the clean logits. This is the same quantity as the logit change from
removing only that head's direct path (downstream layers still read it) with the final norm's scale
held fixed -- the test checks exactly that on real forwards.

Sandwich-norm models (Gemma 2/3) normalise the attention output before the residual add; there the
post-attention norm's scale is frozen too (at the layer's summed head output). Gemma 2's final logit
soft-capping is not linear; the attribution is to the logits before the cap.

Failure modes: a final norm that is neither LayerNorm-like (``bias``) nor RMSNorm-like raises;
positions outside the input raise (``HeadscopeError``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from headscope.errors import HeadscopeError


@dataclass
class DirectLogits:
    """Direct effects of every head at one position (fp32, CPU)."""

    effects: torch.Tensor   # [L, H, n_tokens] logit change each head's direct path causes
    tokens: torch.Tensor    # [n_tokens] the vocabulary ids of the last dim
    position: int           # absolute query position in the input
    logits: torch.Tensor    # [n_tokens] the clean logits at ``position`` for ``tokens``


def frozen_norm(norm: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``norm`` applied to contributions ``c`` [..., N, d] with its scale taken from ``x`` [..., 1, d].

    Linear in ``c`` and without the norm's bias: the part of ``norm(x)`` that ``c`` accounts for when
    x is a sum of such parts. RMSNorm: w * c / rms(x); LayerNorm: w * (c - mean c) / std(x). Written
    as a rescaling of ``norm(c)`` so that each family's weight convention (Gemma's 1 + w) is the
    module's own.
    """
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
    if eps is None:
        raise HeadscopeError(f"direct logit attribution does not know the norm {type(norm).__name__}")
    c, x = c.float(), x.float()
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):   # LayerNorm: centre, scale by the clean std
        y = norm(c).float() - bias.float()
        return y * torch.sqrt(c.var(-1, unbiased=False, keepdim=True) + eps) \
            / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    y = norm(c).float()                   # RMSNorm
    return y * torch.sqrt(c.pow(2).mean(-1, keepdim=True) + eps) / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def direct_logit_attribution(probe, input_ids, *, position: int = -1, tokens=None,
                             attention_mask=None) -> DirectLogits:
    """[L, H, n_tokens] direct effect of each head on the logits at ``position`` (default: last).

    ``tokens``: vocabulary ids to attribute (default: all, [L, H, V] -- 270 heads x 49k tokens is
    53 MB for SmolLM2). One forward with capture; nothing is ablated. ``input_ids`` is one sequence.
    """
    an = probe.anatomy
    L = an.n_layers
    names = [f"blocks.{l}.attn.hook_result" for l in range(L)] + [f"blocks.{L - 1}.hook_resid_post", "logits"]
    with probe.capture(activations=names, positions=[position]) as cap:
        probe.forward(input_ids, attention_mask=attention_mask)
    if cap.acts[names[-2]].shape[0] != 1:
        raise HeadscopeError("direct logit attribution takes one sequence (batch of 1)")
    pos = int(cap.positions[0])
    lm_head = probe.model.get_output_embeddings()
    w_u = lm_head.weight.float()                                               # [V, d_model]
    ids = torch.arange(w_u.shape[0]) if tokens is None else torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    w_u = w_u[ids.to(w_u.device)]                                              # [n, d_model]
    resid = cap.acts[names[-2]][0, 0]                                          # [d_model] final norm input
    with torch.no_grad():
        effects = []
        for l in range(L):
            res = cap.acts[names[l]][0, 0].to(w_u.device)                      # [H, d_model] per-head writes
            if an.attn_out[l] is not an.attn[l]:                               # sandwich norm before the add
                res = frozen_norm(an.attn_out[l], res.sum(0, keepdim=True), res)
            direct = frozen_norm(an.final_norm, resid.to(w_u.device)[None], res)  # [H, d_model]
            effects.append(direct @ w_u.T)                                     # [H, n]
    logits = cap.acts["logits"][0, 0].float()[ids]
    return DirectLogits(effects=torch.stack(effects).cpu(), tokens=ids, position=pos, logits=logits)
