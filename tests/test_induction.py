"""Induction / previous-token / duplicate-token scores vs HF eager attention, computed independently."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from headscope.analyses.base import run_analysis
from headscope.analyses.induction import repeated_tokens

from .helpers import as_loaded, tiny_llama as llama_model, write_tiny_llama_gguf


@pytest.fixture()
def tiny_llama(tmp_path):
    """A random 3-layer GQA Llama (6 query / 2 KV heads) with a tiny byte-level tokenizer, as a LoadedModel."""
    from transformers import AutoTokenizer

    write_tiny_llama_gguf(tmp_path / "tok.gguf")
    tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    model = llama_model(len(tok), seed=None, heads=6, hidden=48, intermediate=96, max_positions=128,
                       bos_token_id=1, eos_token_id=2)
    return as_loaded(model, tok, "tiny-llama", path=str(tmp_path))


def _eager_scores(model, ids_list, n, offset):
    """Loop-based diagonal means from HF eager `output_attentions`, float64."""
    L = model.config.num_hidden_layers
    H = model.config.num_attention_heads
    acc = {k: np.zeros((L, H)) for k in ("previous_token", "duplicate_token", "induction")}
    for ids in ids_list:
        with torch.no_grad():
            att = model(ids, output_attentions=True).attentions  # L x [1, H, T, T]
        T = ids.shape[1]
        for l in range(L):
            a = att[l][0].double()
            for h in range(H):
                acc["previous_token"][l, h] += np.mean([a[h, t, t - 1].item() for t in range(offset + 1, T)])
                acc["duplicate_token"][l, h] += np.mean([a[h, t, t - n].item() for t in range(offset + n, T)])
                acc["induction"][l, h] += np.mean([a[h, t, t - n + 1].item() for t in range(offset + n, T)])
    return {k: v / len(ids_list) for k, v in acc.items()}


@pytest.mark.parametrize("prepend_bos", [False, True])
def test_induction_matches_eager(tiny_llama, tmp_path, prepend_bos):
    """The BOS policy: the sequence starts with BOS when the tokenizer adds one (this one does not) or
    when asked; the eager reference is fed exactly that."""
    lm = tiny_llama
    from headscope.probe import Probe
    n, N, seed = 9, 3, int(torch.randint(0, 10_000, ()).item())
    run = run_analysis("induction", lm=lm, probe=Probe(lm), out=tmp_path / "run", progress=False,
                       options={"n_examples": N, "seq_len": n, "seed": seed, "prepend_bos": prepend_bos})
    assert run.meta["status"] == "complete"
    tokenizer_adds = lm.tokenizer("a b").input_ids[0] == 1
    assert not tokenizer_adds
    bos = 1 if prepend_bos else None
    exclude = set(lm.tokenizer.all_special_ids)
    ids_list = [repeated_tokens(lm.info.vocab_size, n, seed * 100_003 + i, bos, exclude) for i in range(N)]
    assert all(ids.shape[1] == 2 * n + (bos is not None) for ids in ids_list)
    lm.model.set_attn_implementation("eager")
    ref = _eager_scores(lm.model, ids_list, n, offset=int(bos is not None))
    for k, v in ref.items():
        np.testing.assert_allclose(run.scores()[k], v, atol=2e-6, err_msg=k)


def test_transformerlens_scale_matches_transformerlens_detect_head(tiny_llama, tmp_path):
    """--scale transformerlens equals TransformerLens' own head_detector functions ("mul", no exclusions)
    on HF eager maps, averaged over the examples."""
    import transformer_lens.head_detector as hd

    from headscope.probe import Probe
    lm = tiny_llama
    n, N, seed = 7, 3, int(torch.randint(0, 10_000, ()).item())
    run = run_analysis("induction", lm=lm, probe=Probe(lm), out=tmp_path / "run", progress=False,
                       options={"n_examples": N, "seq_len": n, "seed": seed, "scale": "transformerlens",
                                "prepend_bos": True})   # TransformerLens' to_tokens prepends BOS
    bos, exclude = lm.info.bos_token_id, set(lm.tokenizer.all_special_ids)
    lm.model.set_attn_implementation("eager")
    L, H = lm.info.n_layers, lm.info.n_heads
    ref = {k: np.zeros((L, H)) for k in ("previous_token", "duplicate_token", "induction")}
    detect = {"previous_token": hd.get_previous_token_head_detection_pattern,
              "duplicate_token": hd.get_duplicate_token_head_detection_pattern,
              "induction": hd.get_induction_head_detection_pattern}
    for i in range(N):
        ids = repeated_tokens(lm.info.vocab_size, n, seed * 100_003 + i, bos, exclude)
        with torch.no_grad():
            att = lm.model(ids, output_attentions=True).attentions
        for k, fn in detect.items():
            det = fn(ids)
            for l in range(L):
                for h in range(H):
                    ref[k][l, h] += hd.compute_head_attention_similarity_score(
                        att[l][0, h].double(), det.double(), exclude_bos=False, exclude_current_token=False,
                        error_measure="mul") / N
    for k in ref:
        np.testing.assert_allclose(run.scores()[k], ref[k], atol=2e-6, err_msg=k)


@pytest.mark.slow
def test_induction_default_model(smollm2, tmp_path):
    """SmolLM2 has induction heads: MODELS.md reports L18H6 as its top one and ~0.75 copy accuracy."""
    from headscope.probe import Probe
    run = run_analysis("induction", lm=smollm2, probe=Probe(smollm2), out=tmp_path / "run", progress=False,
                       options={"n_examples": 4, "seq_len": 40})
    s = run.scores()["induction"]
    assert s.shape == (30, 9)
    assert run.meta["summary"]["second_half_accuracy"] > 0.5
    assert s.max() > 0.4 and np.median(s) < 0.1  # a few strong induction heads, most heads not
