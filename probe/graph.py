"""The computational graph over heads, and exact patching of any set of its edges.

Nodes (the names of EAP-IG and the MIB circuit track):

- ``input``: the token embeddings;
- ``a{L}.h{H}``: query head H of layer L; its output is the head's share of ``o_proj``
  (``hook_result``: z_h @ W_O[:, h]), the o_proj bias excluded;
- ``m{L}``: the MLP of layer L (output ``hook_mlp_out``);
- ``logits``: the unembedding (reads the final norm of its input).

Edges run from every upstream node to every downstream node's *input*. A head has three inputs,
``a{L}.h{H}<q>``, ``<k>`` and ``<v>``: the residual streams its query, key and value projections
read. ``m{L}`` reads the heads of its own layer and everything below; a head reads everything
below its layer; ``logits`` reads everything.

GQA: edges are per *query* head. Query head h of a layer with G query heads per KV head uses KV
head h // G; its ``<k>`` / ``<v>`` inputs are its own copies of the stream, projected by that KV
head's W_K / W_V. With every edge present all copies are equal, so this is the model. Patching
the k-input of one query head leaves the keys the other heads of its group see unchanged.

Patching (the reference, after Wang et al. 2022 path patching and EAP-IG's implementation): the
input of a downstream node d is

    in_d = sum over upstream u of  ( mask[u, d] * out_u(this run) + (1 - mask[u, d]) * out_u(corrupted run) )

so an edge outside the circuit carries the corrupted activation and an edge inside it carries
the activation of the patched run itself. The empty circuit reproduces the corrupted run exactly,
the full one the clean run (``tests/test_circuit_graph.py`` checks both, and a hand-written
forward with a path swapped).

Which attention runs: this module is its own forward over the HF weights (``q/k/v/o_proj``, the
norms, the rotary embedding and the MLP modules of the model). Attention is torch's
``scaled_dot_product_attention`` with ``is_causal``: its flash kernel on CPU,
its memory-efficient kernel for float32 on CUDA, forward and backward, so no [B, H, T, T] matrix is
formed and memory stays linear in T.
Autograd flows through it, so EAP / EAP-IG gradients come from the same code that patches. It does
not switch the model's attention implementation and does not touch the probe's kernels, so
``Probe.capture`` / ``intervene`` keep working on the same model between calls. What grows with
the context is the node outputs, n_nodes * B * T * d_model floats, when they are kept, and the
checkpointed autograd graph (``attribution_bytes``).

Precision: float32 models (what ``--dtype float32`` loads); others are refused, since attribution
sums many small products (and HF's norms compute in float32 whatever the model's dtype).

Families: Llama, Mistral, Qwen2 and Qwen3 (pre-norm, RoPE, separate q/k/v projections; Qwen3's
q/k norms are applied per head). Other families (GPT-2's fused c_attn and learned positions,
Gemma's sandwich norms / embedding scale / softcaps) and sliding-window layers (as ``Geometry``
reads them) raise ``HeadscopeError``, except Mistral's window on every layer: there only prompts
longer than the window raise (within it, attention is full causal, which is what this forward does).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from headscope.errors import HeadscopeError

from .geometry import Geometry

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
QKV = ("q", "k", "v")


def _model_of(obj) -> nn.Module:
    """A bare HF model from a model, a ``LoadedModel`` or a ``Probe``."""
    return obj if isinstance(obj, nn.Module) else obj.model


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class GraphLayout:
    """Node and edge names of the graph of an ``n_layers`` x ``n_heads`` model, without the model.

    ``upstream``: names of nodes with an output (``input``, heads, MLPs) in forward order.
    ``targets``: names of node inputs (``a{L}.h{H}<q|k|v>``, ``m{L}``, ``logits``) in forward order.
    ``node_of_target``: the upstream index of each target's node (None for ``logits``).
    ``valid``: [n_up, n_targets] bool, True where an edge exists. Edge masks and scores are
    [n_up, n_targets] tensors; entries outside ``valid`` are ignored (and kept 0). The index layout
    is EAP-IG's (forward / backward indices), so matrices carry over unchanged.
    """

    def __init__(self, n_layers: int, n_heads: int, n_kv_heads: int | None = None):
        self.n_layers, self.n_heads, self.n_kv_heads = n_layers, n_heads, n_kv_heads or n_heads
        L, H = n_layers, n_heads
        self.upstream = ["input"] + [n for l in range(L) for n in [f"a{l}.h{h}" for h in range(H)] + [f"m{l}"]]
        self.targets = [n for l in range(L) for n in
                        [f"a{l}.h{h}<{c}>" for c in QKV for h in range(H)] + [f"m{l}"]] + ["logits"]
        self.up_index = {n: i for i, n in enumerate(self.upstream)}
        self.target_index = {n: i for i, n in enumerate(self.targets)}
        self.node_of_target = [self.up_index.get(t.split("<")[0]) for t in self.targets]  # None for logits
        valid = torch.zeros(len(self.upstream), len(self.targets), dtype=torch.bool)
        for l in range(L):
            a0 = self.target_index[f"a{l}.h0<q>"]
            valid[:self.up_index[f"a{l}.h0"], a0:a0 + 3 * H] = True       # heads read everything below
            valid[:self.up_index[f"m{l}"], self.target_index[f"m{l}"]] = True  # MLP also reads its layer's heads
        valid[:, -1] = True
        self.valid = valid

    # -- names ---------------------------------------------------------------------------------
    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    def split_target(self, d: int) -> tuple[str, str]:
        """(node, input) of target d: ``a1.h0<k>`` -> ("a1.h0", "k"); ``m0`` -> ("m0", "")."""
        node, _, qkv = self.targets[d].partition("<")
        return node, qkv.rstrip(">")

    def edge_name(self, u: int, d: int) -> str:
        """EAP-IG's edge name: ``a0.h1->a1.h0<k>``, ``m0->logits``."""
        return f"{self.upstream[u]}->{self.targets[d]}"

    def edges(self) -> list[tuple[int, int]]:
        """Every (upstream index, target index) pair of the graph, row-major."""
        return [tuple(x) for x in self.valid.nonzero().tolist()]

    def full_mask(self) -> torch.Tensor:
        return self.valid.float()

    def empty_mask(self) -> torch.Tensor:
        return torch.zeros(self.valid.shape)

    def mask_from_edges(self, edges) -> torch.Tensor:
        """[n_up, n_targets] 0/1 mask from (u, d) pairs or edge names; unknown names raise."""
        m = self.empty_mask()
        for e in edges:
            u, d = self.parse_edge(e) if isinstance(e, str) else e
            if not self.valid[u, d]:
                raise HeadscopeError(f"{self.edge_name(u, d)} is not an edge of this graph")
            m[u, d] = 1.0
        return m

    def parse_edge(self, name: str) -> tuple[int, int]:
        try:
            up, down = name.split("->")
            u, d = self.up_index[up], self.target_index[down]
            if not self.valid[u, d]:
                raise KeyError(name)
            return u, d
        except (ValueError, KeyError):
            raise HeadscopeError(f"{name!r} is not an edge name of this {self.n_layers}-layer, "
                                 f"{self.n_heads}-head graph (e.g. 'a0.h1->a1.h0<k>')") from None

class CircuitGraph(GraphLayout):
    """The graph of one HF model, with the patched forward (see the module docstring).

    Failure modes (``HeadscopeError``): a model family outside ``SUPPORTED``, sliding-window
    layers, a model not in float32.
    """

    def __init__(self, model):
        model = _model_of(model)
        geo = Geometry.of(model.config)
        if geo.model_type not in SUPPORTED:
            raise HeadscopeError(f"circuit graphs support model types {', '.join(SUPPORTED)}; "
                                 f"{geo.model_type!r} is not one of them")
        if geo.sliding_layers and geo.model_type != "mistral":
            raise HeadscopeError(f"{geo.model_type!r} with sliding-window layers is not supported by circuit graphs")
        if next(model.parameters()).dtype != torch.float32:
            raise HeadscopeError("circuit graphs need a float32 model (--dtype float32): attribution sums many "
                                 "small products")
        self.window = geo.sliding_window  # Mistral: every layer's window; ``forward`` refuses longer prompts
        self.model = model
        self.base = model.model
        self.layers = list(self.base.layers)
        super().__init__(geo.n_layers, geo.n_heads, geo.n_kv_heads)
        self.d_head, self.d_model, self.model_type = geo.d_head, geo.d_model, geo.model_type

    # -- the forward ---------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor | None = None, *, embeds: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, corrupt: torch.Tensor | None = None,
                on_input: Callable[[int, torch.Tensor, Callable], None] | None = None,
                keep_outputs: bool = True, subtract_from: torch.Tensor | None = None,
                last: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the graph; returns (logits [B, T, V] fp32, node outputs [n_up, B, T, D] or None).

        ``last`` [B]: the logits of one position per row only, [B, 1, V] (attribution reads no
        other; on SmolLM2 the full logits with their gradient cost about as much per token as the
        rest of the autograd graph, and more with larger vocabularies).

        ``mask`` [n_up, n_targets] (None = every edge): edges with mask 1 carry this run's
        activations, the rest ``corrupt``'s (node outputs [n_up, B, T, D] of the corrupted run,
        required when ``mask`` is not None). Fractional masks interpolate. ``embeds`` replaces the
        embedding of ``ids`` (EAP-IG interpolates it). ``subtract_from`` (unpatched, without grad):
        node outputs [n_up, B, T, D] of another run, from which this run's are subtracted in place
        as they are computed, returned instead of the outputs (attribution's clean-minus-corrupted
        difference without a second buffer).

        Attribution (``on_input``, grad enabled, ``mask`` None): per target group the forward calls
        ``on_input(first_target, t, to_input)`` with a tensor ``t`` of its autograd graph and a map
        from d metric / d t to d metric / d (the group's inputs) [B, T, n, D]; the caller hooks
        ``t`` (``Tensor.register_hook``) and uses each gradient as backward produces it, so none is
        kept. A head's q/k/v group tensors are its projections' outputs [B, H, T, d_head] (the map
        goes back through W^T and the RMSNorm's Jacobian, written out); an MLP's or ``logits``'
        is its input [B, T, D]. Each layer's attention and MLP run under activation checkpointing,
        so the autograd graph keeps ~10 d_model floats per token and layer (``attribution_bytes``).
        """
        if embeds is None:
            embeds = self.base.embed_tokens(ids)
        if mask is not None and corrupt is None:
            raise HeadscopeError("a masked graph forward needs the corrupted run's node outputs")
        if mask is not None and on_input is not None:
            raise HeadscopeError("attribution hooks (on_input) need the unpatched forward (mask=None)")
        B, T, D = embeds.shape
        if self.window is not None and T > self.window:
            raise HeadscopeError(f"{T} tokens exceed the {self.window}-token sliding window of this "
                                 f"{self.model_type!r} model; circuit graphs attend over the full prefix")
        H, G = self.n_heads, self.n_heads // self.n_kv_heads
        dev = embeds.device
        if subtract_from is not None and (torch.is_grad_enabled() or mask is not None):
            raise HeadscopeError("subtract_from needs an unpatched forward without grad")
        lean = on_input is not None and torch.is_grad_enabled()
        # node outputs in upstream order, each [B, T, D]; written into one buffer when returned without grad
        buf = torch.empty(len(self.upstream), B, T, D, device=dev) if keep_outputs and not torch.is_grad_enabled() \
            else None
        outs: list[torch.Tensor] = []
        # per-node outputs are needed when returned, subtracted, or read by a patched forward
        track = keep_outputs or mask is not None or subtract_from is not None

        def emit(t: torch.Tensor) -> None:
            if subtract_from is not None:
                subtract_from[len(outs)] -= t
                outs.append(subtract_from[len(outs)])  # len(outs) indexes the next node
                return
            if buf is not None:
                buf[len(outs)] = t
                t = buf[len(outs)]
            if track:
                outs.append(t)

        emit(embeds)
        resid = embeds  # sum of outs: every target's input when no edge is patched
        positions = torch.arange(T, device=dev)[None].expand(B, T)
        cos, sin = self.base.rotary_emb(embeds, positions)
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, dh]
        if mask is not None:
            valid = self.valid.to(dev).float()
            mask = mask.to(dev) * valid
            corrupt_resid = corrupt.cumsum(0)  # [n_up, B, T, D]: corrupted input seen through the first n nodes
        kv = torch.arange(H, device=dev) // G  # query head -> its KV head
        bias = torch.zeros(D, device=dev)  # o_proj biases so far: constant, the same in every run

        def inputs(d0: int, n: int) -> torch.Tensor:
            """[B, T, n, D] inputs of targets d0..d0+n-1 from the outputs so far.

            Patched: corrupted residual + the clean-minus-corrupted outputs of the kept edges, or the
            clean residual minus those of the cut edges, whichever touches fewer upstream nodes.
            """
            if mask is None:
                x = resid[:, :, None].expand(B, T, n, D)
            else:
                n_up = len(outs)
                keep = mask[:n_up, d0:d0 + n]  # [n_up, n]
                cut = valid[:n_up, d0:d0 + n] - keep
                rows_k, rows_c = keep.any(1).nonzero()[:, 0], cut.any(1).nonzero()[:, 0]
                w, rows, base, sign = ((keep, rows_k, corrupt_resid[n_up - 1], 1.0) if len(rows_k) <= len(rows_c)
                                       else (cut, rows_c, resid, -1.0))
                x = base[:, :, None].expand(B, T, n, D)
                if len(rows):
                    diff = torch.stack([outs[i] for i in rows.tolist()]) - corrupt[rows]  # [r, B, T, D]
                    x = x + sign * torch.einsum("rn,rbtd->btnd", w[rows], diff)
            x = x + bias
            if lean and n == 1:
                on_input(d0, x, lambda g: g)
            return x

        def run(fn, *args):
            return checkpoint(fn, *args, use_reentrant=False) if lean else fn(*args)

        for l, layer in enumerate(self.layers):
            at = layer.self_attn
            heads = (torch.arange(H, device=dev), kv, kv)
            projs = (at.q_proj, at.k_proj, at.v_proj)
            d0 = self.target_index[f"a{l}.h0<q>"]
            if mask is None:  # every target reads resid: one norm; attribution's hooks sit after the projections
                x_in = resid + bias  # [B, T, D]
                xn = layer.input_layernorm(x_in)  # [B, T, D], shared by every head
                q, k, v = (self._project(p, xn, hs) for p, hs in zip(projs, heads))  # [B, H, T, dh] each
                if lean:
                    for i, (t, p, hs) in enumerate(zip((q, k, v), projs, heads)):
                        on_input(d0 + i * H, t, functools.partial(self._input_grads, layer.input_layernorm,
                                                                  x_in.detach(), p, hs))
            else:
                x = layer.input_layernorm(inputs(d0, 3 * H))
                q, k, v = (self._project(p, x[:, :, i * H:(i + 1) * H], hs)  # [B, H, T, dh] each
                           for i, (p, hs) in enumerate(zip(projs, heads)))
            z = run(functools.partial(self._attend, at), q, k, v, cos, sin)  # [B, H, T, dh]
            w_o = at.o_proj.weight.view(D, H, self.d_head)  # [D, H, dh]
            if track:
                result = torch.einsum("bhte,dhe->hbtd", z, w_o)  # [H, B, T, D]
                for r in result:
                    emit(r)
                resid = resid + result.sum(0)
            else:
                resid = resid + torch.einsum("bhte,dhe->btd", z, w_o)
            if at.o_proj.bias is not None:
                bias = bias + at.o_proj.bias
            xm = inputs(self.target_index[f"m{l}"], 1)[:, :, 0]  # [B, T, D]
            out_m = run(lambda x, layer=layer: layer.mlp(layer.post_attention_layernorm(x)), xm)
            emit(out_m)
            resid = resid + out_m
        xf = inputs(len(self.targets) - 1, 1)[:, :, 0]  # [B, T, D]
        if last is not None:
            xf = xf[torch.arange(B, device=dev), last.to(dev)][:, None]  # [B, 1, D]
        logits = self.model.lm_head(self.base.norm(xf))
        if subtract_from is not None:
            return logits, subtract_from
        if not keep_outputs:
            return logits, None
        return logits, (buf if buf is not None else torch.stack(outs))

    def _attend(self, at: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """Causal attention of q, k, v [B, H, T, dh] (q/k norms, RoPE) -> z [B, H, T, dh]."""
        if getattr(at, "q_norm", None) is not None:
            q, k = at.q_norm(q), at.k_norm(k)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=at.scaling)

    def attribution_bytes(self, B: int, T: int) -> int:
        """Estimated peak bytes of ``attribute`` on a [B, T] batch above the loaded model.

        Counted: the clean-minus-corrupted node outputs (n_up floats per token and d_model), the
        checkpointed autograd graph (~10 d_model floats per token and layer), the last position's
        logits with their gradient, one layer's MLP recomputed in backward, and one hook's map;
        flash attention adds no [T, T] term. Fit to the peaks measured on SmolLM2 at 256-2048
        tokens (benchmarks/README.md, "circuit discovery"): 1.56x the counted bytes (backward's
        transients, the allocator) plus about the model's own size (weights touched through the
        memory map, per-layer weight copies of the head-wise einsums). Other models and thread
        counts will differ: a guard for batches far too large, not a promise.
        """
        D, L, H = self.d_model, self.n_layers, self.n_heads
        d_ff = getattr(self.layers[0].mlp, "intermediate_size", 4 * D)
        floats = (len(self.upstream) * B * T * D + 10 * L * B * T * D + 3 * B * self.model.lm_head.out_features
                  + 4 * B * T * d_ff + 2 * B * T * H * D)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return int(1.56 * 4 * floats + weights)

    def _input_grads(self, norm: nn.Module, x: torch.Tensor, proj: nn.Linear, heads: torch.Tensor,
                     grad: torch.Tensor) -> torch.Tensor:
        """d metric / d (each head's input of one projection) [B, T, H, D] from d metric / d its
        output [B, H, T, dh].

        Through W^T, then the RMSNorm y = w x r, r = (mean(x^2) + eps)^(-1/2), whose Jacobian
        transposed is dx = r (w g) - r^3 / D x sum(x w g).
        """
        w = proj.weight.view(-1, self.d_head, self.d_model)[heads]  # [H, dh, D]
        gy = torch.einsum("bhte,hed->bthd", grad, w) * norm.weight  # [B, T, H, D]
        x = x[:, :, None]  # [B, T, 1, D]
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return r * gy - r.pow(3) / self.d_model * x * (x * gy).sum(-1, keepdim=True)

    def _project(self, proj: nn.Linear, x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Head-wise projection: x [B, T, H, D] (or [B, T, D] shared) through rows of ``heads`` -> [B, H, T, dh]."""
        w = proj.weight.view(-1, self.d_head, self.d_model)[heads]  # [H, dh, D]
        y = torch.einsum("bthd,hed->bhte" if x.dim() == 4 else "btd,hed->bhte", x, w)
        if proj.bias is not None:
            y = y + proj.bias.view(-1, self.d_head)[heads][None, :, None]
        return y


@dataclass
class Batch:
    """Clean/corrupted token pairs of equal length per row, right-padded, and the metric's tokens.

    ``clean``, ``corrupt``: [B, T] LongTensor; ``last``: [B] index of each row's last real token
    (the position whose next-token logits the metric reads); ``answer`` / ``wrong``: [B] token ids.
    """

    clean: torch.Tensor
    corrupt: torch.Tensor
    last: torch.Tensor
    answer: torch.Tensor
    wrong: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.clean, self.corrupt, self.last, self.answer, self.wrong)))

    def at_last(self) -> "Batch":
        """This batch for logits of the last real tokens only ([B, 1, V], ``forward(last=...)``)."""
        return Batch(self.clean, self.corrupt, torch.zeros_like(self.last), self.answer, self.wrong)


def logit_diff_metric(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean over rows of logit[answer] - logit[wrong] at each row's last real token (a 0-d tensor)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    last = logits[rows, batch.last]  # [B, V]
    return (last[rows, batch.answer] - last[rows, batch.wrong]).mean()

