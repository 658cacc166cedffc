"""Shared test helpers: the tiny random-init models every test builds on, and HF eager references.

One factory per kind of model, so test modules import from here and never from each other:

- ``tiny_llama(vocab_size, ...)``: a random-init GQA Llama from explicit sizes (``as_loaded`` wraps it
  with a tokenizer as a ``LoadedModel``);
- ``tiny_model(family)``: one small model per supported family (llama, gemma3, gemma2, qwen2, gpt2)
  with sharpened q/k, cached and shared (tests must not modify it);
- ``make_tiny_model_dir(path)``: a tiny Llama (or Gemma-3-style) with a byte-level tokenizer saved
  as a model directory, for ``load_model`` and the app.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPT2Config, LlamaConfig,
                          Qwen2Config)

VOCAB = 256


@pytest.fixture(autouse=True)  # autouse in every module that imports it
def one_thread():
    """One torch thread: small models are dominated by thread synchronisation, which costs 10-100x on
    a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(vocab_size: int, *, seed: int | None = 0, layers: int = 3, heads: int = 4, kv_heads: int = 2,
               hidden: int = 64, intermediate: int = 128, max_positions: int = 512, qk_scale: float | None = None,
               **config):
    """A random-init ``LlamaForCausalLM`` in eval mode; ``config`` adds LlamaConfig fields (ids, init range).

    ``seed`` None leaves torch's RNG alone (a fresh model per call). ``qk_scale`` multiplies the q
    and k projections so attention rows are peaked (near-uniform rows make argmax ties)."""
    from transformers import LlamaForCausalLM
    if seed is not None:
        torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, **config)
    model = LlamaForCausalLM(cfg).eval()
    if qk_scale is not None:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(qk_scale)
                layer.self_attn.k_proj.weight.mul_(qk_scale)
    return model


def as_loaded(model, tokenizer, name: str, path: str = "-"):
    """``model`` and ``tokenizer`` as the ``LoadedModel`` that ``load_model`` would return."""
    from headscope.probe.models import LoadedModel, model_info
    return LoadedModel(model=model, tokenizer=tokenizer, name=name,
                       info=model_info(model, tokenizer, name=name, source="path", path=path))


@functools.lru_cache(maxsize=None)
def tiny_model(family: str):
    """A small random causal LM with eager attention (shared: tests must not modify it)."""
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=VOCAB,
                  max_position_embeddings=64)
    if family == "llama":
        cfg = LlamaConfig(num_hidden_layers=3, num_key_value_heads=2, **common)
    elif family == "gemma3":
        cfg = Gemma3TextConfig(num_hidden_layers=4, num_key_value_heads=1, head_dim=16, sliding_window=6,
                               layer_types=["sliding_attention", "full_attention"] * 2, **common)
    elif family == "gemma2":
        cfg = Gemma2Config(num_hidden_layers=2, num_key_value_heads=2, head_dim=16, sliding_window=6,
                           attn_logit_softcapping=5.0, **common)
    elif family == "qwen2":
        cfg = Qwen2Config(num_hidden_layers=3, num_key_value_heads=2, **common)
    else:
        cfg = GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=64)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in range(cfg.num_hidden_layers):
            attn = model.transformer.h[layer].attn if family == "gpt2" else model.model.layers[layer].self_attn
            if family == "gpt2":
                attn.c_attn.weight[:, :2 * 64] *= 6
            elif family == "gemma3":
                attn.q_norm.weight.fill_(2.0)  # Gemma RMSNorm scales by (1 + w)
                attn.k_norm.weight.fill_(2.0)
            else:
                attn.q_proj.weight *= 6
                attn.k_proj.weight *= 6
    return model


def eager(model, ids, mask=None, **kw):
    """HF eager forward with maps and hidden states; positions count real tokens under left padding."""
    pos = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=pos, output_attentions=True, output_hidden_states=True, **kw)


def assert_top1(idx: torch.Tensor, p: torch.Tensor) -> None:
    """idx [...] equals the argmax of p [..., Tk] wherever the maximum is not a near-tie."""
    top = p.double().topk(2, dim=-1)
    clear = (top.values[..., 0] - top.values[..., 1]) > 1e-5
    assert clear.float().mean() > 0.5, "test input has too many ties to be meaningful"
    assert torch.equal(idx[clear], top.indices[..., 0][clear])


def make_tiny_model_dir(path: Path, seed: int = 0, sliding_window: int | None = None) -> Path:
    """A random-init 2-layer Llama (4 query / 2 KV heads) with a byte-level tokenizer, as a model dir.

    ``sliding_window``: a Gemma-3-style text model instead (layer 0 sliding, layer 1 global)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    common = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=0, eos_token_id=1, tie_word_embeddings=True, initializer_range=0.3)
    torch.manual_seed(seed)
    if sliding_window is None:
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(head_dim=8, sliding_window=sliding_window, pad_token_id=1,
                                                   layer_types=["sliding_attention", "full_attention"], **common))
    model.save_pretrained(path, safe_serialization=True)
    return path
