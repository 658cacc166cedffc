"""FAI / WAAD / head span vs an independent float64 computation from HF eager attention maps (the
set-mean maps are formed explicitly here, unlike in the analysis), hand-computed cases, and the real
default model (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from headscope.analyses.base import run_analysis
from headscope.analyses.datasets import encode_record
from headscope.analyses.fai import band_count, find_peaks, parse_layers, split_heads

from .helpers import make_tiny_lm, random_texts, write_jsonl


def reference(A, logits, start, *, layers, W, H_lo, H_hi, local_frac, global_frac, exclude_bos):
    """Paper definitions on full maps A [L, H, N, N] (float64), loops over the span."""
    L, H, N, _ = A.shape
    R = list(range(start, N))
    span = np.zeros((L, H))
    for l in range(L):
        for h in range(H):
            vals = []
            for t in R:
                row = A[l, h, t, : t + 1].numpy()
                dist = t - np.arange(t + 1)
                if exclude_bos:
                    rest = 1 - row[0]
                    vals.append((row[1:] * dist[1:]).sum() / rest if rest > 1e-6 else 0.0)
                else:
                    vals.append((row * dist).sum())
            span[l, h] = np.mean(vals)
    cand = sorted(((span[l, h], l * H + h, (l, h)) for l in layers for h in range(H)))
    n_loc = max(1, round(local_frac * len(cand)))
    n_glob = max(1, round(global_frac * len(cand)))
    loc = [c[2] for c in cand[:n_loc]]
    glob = [c[2] for c in sorted(cand, key=lambda c: (-c[0], c[1]))[:n_glob]]
    A_loc = torch.stack([A[l, h] for l, h in loc]).mean(0).numpy()      # the set-mean maps themselves
    A_glob = torch.stack([A[l, h] for l, h in glob]).mean(0).numpy()
    waad = np.array([sum(A_loc[t, s] * min(t - s, W) for s in range(t + 1)) for t in R])
    fai, cnt = [], []
    for s in R:
        Ts = [t for t in R if s + H_lo <= t <= min(N - 1, s + (H_hi if H_hi is not None else N))]
        cnt.append(len(Ts))
        fai.append(np.mean([A_glob[t, s] for t in Ts]) if Ts else np.nan)
    lp = torch.log_softmax(logits.double(), -1)
    ent = (-(lp.exp() * lp).sum(-1)).numpy()                            # [N]: distribution at each position
    entropy = np.array([ent[t - 1] if t >= 1 else np.nan for t in R])
    return span, loc, glob, waad, np.array(fai), np.array(cnt), entropy


def eager_maps(model, ids):
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True)
    return torch.stack([a[0] for a in out.attentions]).double(), out.logits[0]


# --------------------------------------------------------------------------- hand-computed
def test_peaks_band_layers_split_by_hand():
    x = np.array([0.0, 3.0, 1.0, 2.0, 2.0, 0.5, 5.0])
    assert find_peaks(x, np.ones(7, bool), 0.0).nonzero()[0].tolist() == [1, 3, 6]    # plateau: first element
    assert find_peaks(x, np.ones(7, bool), 0.7).nonzero()[0].tolist() == [1, 6]     # q0.7 of x is 2.2
    valid = np.array([1, 1, 1, 1, 1, 1, 0], bool)                                     # 5.0 invalid: not a peak
    assert find_peaks(x, valid, 0.0).nonzero()[0].tolist() == [1, 3]
    assert find_peaks(np.array([np.nan, 1.0, 0.0]), np.ones(3, bool), 0.0).nonzero()[0].tolist() == [1]
    # N = 6, span from 2: s = 2..5; H_lo = 1, H_hi = 2 -> t in [s+1, min(5, s+2)]
    assert band_count(6, 2, 1, 2).tolist() == [2, 2, 1, 0]
    assert band_count(6, 2, 0, None).tolist() == [4, 3, 2, 1]
    assert parse_layers("rl", 30) == [10, 12, 15, 18, 20] and parse_layers("all", 3) == [0, 1, 2]
    span = torch.tensor([[3.0, 1.0], [1.0, 9.0]])
    loc, glob = split_heads(span, [0, 1], 0.5, 0.25)
    assert loc == [(0, 1), (1, 0)] and glob == [(1, 1)]                                # tie 1.0: lower index first


def test_chat_rendering_span():
    lm = make_tiny_lm(0, n_layers=1)
    tok = lm.tokenizer
    rec = {"prompt": "two and two", "response": "four . it is four"}
    enc = encode_record(rec, tok, bos_id=1)
    rendered = tok.apply_chat_template([{"role": "user", "content": "two and two"}], tokenize=False,
                                       add_generation_prompt=True)
    assert enc.rendered_prompt == rendered and enc.kind == "chat"
    p_ids = tok(rendered, add_special_tokens=False).input_ids
    assert enc.ids[: enc.start] == p_ids and tok.decode(enc.ids[enc.start:]) == "four . it is four"
    plain = encode_record({"text": "the cat sat"}, tok, prepend_bos=True, bos_id=1)
    assert plain.ids[0] == 1 and plain.start == 1 and plain.kind == "text"


# --------------------------------------------------------------------------- vs HF eager, tiny model
@pytest.mark.parametrize("opts", [
    {},
    {"W": 3, "H_lo": 2, "H_hi": 5, "exclude_bos": True, "layers": "1,2", "local_frac": 0.25, "global_frac": 0.5},
])
def test_fai_matches_eager(tmp_path, opts):
    from headscope.probe import Probe
    seed = int(torch.randint(0, 10_000, ()).item())
    rng = np.random.default_rng(seed)
    lm = make_tiny_lm(seed)
    tok = lm.tokenizer
    prompts, responses = random_texts(rng, 2, 4, 9), random_texts(rng, 2, 12, 20)
    recs = [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]
    recs.append({"text": random_texts(rng, 1, 15, 25)[0]})
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    run = run_analysis("fai", lm=lm, probe=Probe(lm), data=data, out=tmp_path / "run", progress=False,
                       options={**opts, "seed": seed})
    assert run.meta["status"] == "complete" and run.meta["n_used"] == 3
    o = {"W": 10, "H_lo": 1, "H_hi": None, "exclude_bos": False, "local_frac": 0.3, "global_frac": 0.3, **opts}
    layers = [int(x) for x in opts["layers"].split(",")] if "layers" in opts else [0, 1, 2]
    arr, exs = run.arrays(), run.examples()
    spans = []
    for i, rec in enumerate(recs):
        if "prompt" in rec:  # built here by hand: rendered prompt + response, tokenized separately
            rendered = tok.apply_chat_template([{"role": "user", "content": rec["prompt"]}], tokenize=False,
                                               add_generation_prompt=True)
            p_ids = tok(rendered, add_special_tokens=False).input_ids
            ids, start = p_ids + tok(rec["response"], add_special_tokens=False).input_ids, len(p_ids)
            assert exs[i]["rendered_prompt"] == rendered
        else:
            ids, start = tok(rec["text"]).input_ids, 0
        assert exs[i]["span"] == [start, len(ids)]
        A, logits = eager_maps(lm.model, ids)
        span, loc, glob, waad, fai, cnt, ent = reference(A, logits, start, layers=layers, W=o["W"], H_lo=o["H_lo"],
                                                         H_hi=o["H_hi"], local_frac=o["local_frac"],
                                                         global_frac=o["global_frac"], exclude_bos=o["exclude_bos"])
        spans.append(span)
        assert exs[i]["local_heads"] == [f"L{l}H{h}" for l, h in loc]
        assert exs[i]["global_heads"] == [f"L{l}H{h}" for l, h in glob]
        a, b = arr["offsets"][i], arr["offsets"][i + 1]
        np.testing.assert_array_equal(arr["token_ids"][a:b], ids[start:])
        np.testing.assert_array_equal(arr["position"][a:b], np.arange(start, len(ids)))
        np.testing.assert_allclose(arr["waad"][a:b], waad, atol=2e-5)
        np.testing.assert_allclose(arr["fai"][a:b], fai, atol=2e-6)
        np.testing.assert_array_equal(arr["fai_count"][a:b], cnt)
        np.testing.assert_allclose(arr["entropy"][a:b], ent, atol=1e-4)
        assert np.isnan(fai).any() == (o["H_lo"] > 0)  # the last keys have no query in the band
    # exclude_bos subtracts t A[t,0] from fp32 mean_dist and divides by 1 - A[t,0]: relative tolerance
    np.testing.assert_allclose(run.scores()["head_span"], np.mean(spans, 0), rtol=2e-4, atol=1e-4)


# --------------------------------------------------------------------------- the real default model
@pytest.mark.slow
def test_fai_default_model(smollm2, tmp_path):
    """Shipped chat transcripts on SmolLM2: one transcript's series against eager attention."""
    from headscope.analyses.datasets import load_span_records, shipped_data
    from headscope.probe import Probe
    run = run_analysis("fai", lm=smollm2, probe=Probe(smollm2), out=tmp_path / "run", progress=False,
                       options={"limit": 2})
    assert run.meta["status"] == "complete" and run.meta["n_used"] == 2
    ex = run.examples()[0]
    assert ex["rendered_prompt"].startswith("<|im_start|>system")
    rec = load_span_records(shipped_data("chat_transcripts.jsonl"))[0]
    enc = encode_record(rec, smollm2.tokenizer, bos_id=smollm2.info.bos_token_id)
    model = smollm2.model
    prev = model.config._attn_implementation
    try:
        A, logits = eager_maps(model, enc.ids)
    finally:
        model.set_attn_implementation(prev)
    span, loc, glob, waad, fai, cnt, ent = reference(A, logits, enc.start, layers=list(range(30)), W=10, H_lo=1,
                                                     H_hi=None, local_frac=0.3, global_frac=0.3, exclude_bos=False)
    arr = run.arrays()
    n = arr["offsets"][1]
    np.testing.assert_allclose(arr["waad"][:n], waad, atol=1e-3)
    np.testing.assert_allclose(arr["fai"][:n], fai, atol=1e-4)
    assert ex["global_heads"][:5] == [f"L{l}H{h}" for l, h in glob[:5]]
