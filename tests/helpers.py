"""Shared test helpers: the tiny random-init models every test builds on, and HF eager references.

One factory per kind of model, so test modules import from here and never from each other:

- ``tiny_llama(vocab_size, ...)``: a random-init GQA Llama from explicit sizes (``as_loaded`` wraps it
  with a tokenizer as a ``LoadedModel``);
- ``tiny_model(family)``: one small model per supported family (llama, gemma3, gemma2, qwen2, gpt2)
  with sharpened q/k, cached and shared (tests must not modify it);
- ``make_tiny_model_dir(path)``: a tiny Llama (or Gemma-3-style) with a byte-level tokenizer saved
  as a model directory, for ``load_model`` and the app;
- ``make_tiny_lm(seed)``: a word-level chat Llama as a ``LoadedModel`` (sinks, FAI);
- ``write_tiny_llama_gguf(path)``: a tiny Llama as a GGUF file (model loading, induction);
- ``write_run`` / ``make_runs``: run folders with synthetic scores (app, reports).
"""
from __future__ import annotations

import base64
import functools
import json
from pathlib import Path

import numpy as np

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPT2Config, LlamaConfig,
                          Qwen2Config)

from headscope.analyses.store import atomic_write_npz, create_run

VOCAB = 256
VOCAB_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1 (BOS), 2 (EOS)
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a"]
SYNTH_MODEL = {"id": "synth-model", "name": "synth-model", "n_layers": 4, "n_heads": 6, "n_kv_heads": 2}


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


# --------------------------------------------------------------------------- word-level chat Llama
WORDS = ("the a cat dog sat on mat ran to house of and is was it he she they we you red blue green big small "
         "old new one two three four five six seven eight nine ten water fire tree sky sun moon star road "
         "car book pen cup door window city river hill stone bird fish user assistant system : . , ?").split()


def make_tiny_lm(seed: int, n_layers: int = 3, std: float = 0.25):
    """A random-init Llama (4 query / 2 KV heads) with a word-level tokenizer (no BOS added, like
    SmolLM2's) and a small chat template; ``std`` large enough for peaked, non-uniform attention."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = ("<s> system : be brief </s> {% for m in messages %}"
                         "<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}<s> assistant : {% endif %}")
    model = tiny_llama(len(vocab), seed=seed, layers=n_layers, intermediate=96, initializer_range=std,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return as_loaded(model, tok, "tiny", path="tiny")


def random_texts(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[str]:
    words = [w for w in WORDS if w.isalpha()]
    return [" ".join(rng.choice(words, size=int(rng.integers(lo, hi)))) for _ in range(n)]


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


# --------------------------------------------------------------------------- GGUF
def write_tiny_llama_gguf(path: Path, *, add_bos: bool = False, seed: int = 0):
    """Write a tiny fp32 Llama GGUF with a byte-level BPE tokenizer; return the source model."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = VOCAB_SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]
    cfg = LlamaConfig(
        vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    ref = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)

    def permute(a, n_head):  # llama.cpp's rotary layout for q/k rows
        return a.reshape(n_head, 2, a.shape[0] // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    for hf_name, t in ref.state_dict().items():
        a = t.numpy().astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            a = permute(a, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            a = permute(a, cfg.num_key_value_heads)
        w.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


# --------------------------------------------------------------------------- run folders
def write_run(root: Path, rid: str, *, analysis: str = "induction", scores: dict | None = None,
              score_meta: dict | None = None, status: str = "complete", created: str = "2025-01-01T00:00:00",
              model: dict | None = None, records: list | None = None, extra: dict | None = None,
              arrays: dict | None = None):
    """A run folder as ``run_analysis`` leaves it, with the given scores (and ``arrays.npz``)."""
    meta = {"analysis": analysis, "created": created, "model": dict(model or SYNTH_MODEL),
            "config": {"seed": 0, "limit": None}, "versions": {"python": "3"}}
    run, _ = create_run(Path(root) / rid, meta)
    scores = scores or {}
    run.meta["scores"] = {k: np.asarray(v).tolist() for k, v in scores.items()}
    run.meta["score_meta"] = score_meta or {k: {"description": f"{k} score", "index": "query_head",
                                                "higher_is": k, "threshold": None} for k in scores}
    run.meta["summary"] = {"accuracy": 0.5}
    run.meta.update({"status": status, "n_examples": len(records or []), "n_used": len(records or []),
                     "error": "boom" if status == "failed" else None, "timings": {"run_s": 1.0}})
    run.meta.update(extra or {})
    if arrays:
        atomic_write_npz(run.path / "arrays.npz", arrays)
        run.meta["arrays"] = "arrays.npz"
        run.meta["array_shapes"] = {k: list(np.shape(v)) for k, v in arrays.items()}
    for r in records or []:
        run.append_example(r)
    run.save_meta()
    return run


def make_runs(root: Path, seed: int = 0) -> dict:
    """Two induction runs of one model (one with per-example scores), a KV-head run, a failed run."""
    rng = np.random.default_rng(seed)
    L, H = SYNTH_MODEL["n_layers"], SYNTH_MODEL["n_heads"]
    ind_a = {"induction": rng.random((L, H)), "previous_token": rng.random((L, H))}
    ind_b = {k: v + rng.normal(0, 0.2, v.shape) for k, v in ind_a.items()}
    per = rng.random((3, L, H))
    ind_meta = {"induction": {"description": "induction score", "index": "query_head", "higher_is": "induction head",
                              "threshold": 0.8},
                "previous_token": {"description": "prev", "index": "query_head", "higher_is": "previous-token head",
                                   "threshold": None}}
    runs = {
        "ind-a": write_run(root, "ind-a", scores=ind_a, score_meta=ind_meta, created="2025-01-01T00:00:00",
                           records=[{"id": f"seq{i}", "skip": False, "induction": per[i].tolist()} for i in range(3)],
                           arrays={"series": rng.random(50), "induction_std": rng.random((L, H))}),
        "ind-b": write_run(root, "ind-b", scores=ind_b, score_meta=ind_meta, created="2025-01-02T00:00:00"),
        "kv": write_run(root, "kv", analysis="duo", scores={"gate": rng.random((L, 2))}, created="2025-01-03T00:00:00",
                        score_meta={"gate": {"description": "gate", "index": "kv_head", "higher_is": "full",
                                             "threshold": None}}),
        "bad": write_run(root, "bad", analysis="sinks", status="failed", created="2024-12-31T00:00:00"),
    }
    return {"runs": runs, "ind_a": ind_a, "ind_b": ind_b, "per": per}


# --------------------------------------------------------------------------- fixtures


def arr(x) -> np.ndarray:
    """A plotly JSON array: plain lists, or the typed-array form plotly >= 6 writes for numpy data."""
    if isinstance(x, dict) and "bdata" in x:
        a = np.frombuffer(base64.b64decode(x["bdata"]), dtype=np.dtype(x["dtype"]))
        return a.reshape([int(n) for n in str(x.get("shape", len(a))).split(",")])
    return np.asarray(x, dtype=float)


def hook_counts(model) -> list[tuple[int, int]]:
    """Forward (pre-)hooks per module; HF installs some of its own, so tests compare snapshots."""
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
