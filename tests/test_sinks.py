"""Sink rate, sink tokens, ACT, dormant heads, secondary sinks and massive activations vs independent
computations: HF eager attention / hidden states in float64 on tiny random-init GQA Llamas with fresh
random inputs, hand-computed cases, and the real default model (slow)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from headscope.analyses.base import run_analysis
from headscope.analyses.sinks import (act_detect, active_range, column_means, detect_secondary, label_sink,
                                      massive_mask, sink_fraction, sink_rate)

from .helpers import make_tiny_lm, random_texts, write_jsonl

def eager(model, ids):
    """(attentions [L, H, T, T] float64, hidden states after each layer [L, T, D] with the last one
    post-norm as HF returns it) from HF eager attention."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    A = torch.stack([a[0] for a in out.attentions]).double()
    hs = torch.stack([h[0] for h in out.hidden_states[1:]])
    return A, hs


def ref_alpha(A):
    """Gu's column mean by explicit loops over queries: sum_{t>=s} A[t,s] / (T - s)."""
    L, H, T, _ = A.shape
    out = np.zeros((L, H, T))
    for s in range(T):
        out[:, :, s] = sum(A[:, :, t, s].numpy() for t in range(s, T)) / (T - s)
    return out


def ref_secondary(hs, cands, L):
    """A transcription of the reference `hidden_state_norm_detection` + `sink_labeling_machine`
    (Secondary-Attention-Sinks 11eefcc), float64 cosines."""
    norms = torch.stack([hs[l, p].double().norm() for l in range(L) for p in cands]).reshape(L, len(cands))
    bos = cands[int(torch.argmax(norms.mean(0)))]
    n = torch.stack([hs[l, bos].double().norm() for l in range(L)])
    d = n[1:] - n[:-1]
    start = int(torch.argmax(d)) + 1
    end = int(torch.argmin(d[start:])) + start + 1
    found = {bos: list(range(start, end))}
    for l in range(start, end):
        b = hs[l, bos].double()
        for i in range(bos + 1, hs.shape[1]):
            x = hs[l, i].double()
            if abs(float(x @ b / (x.norm() * b.norm()))) > 0.9:
                found.setdefault(i, []).append(l)
    return bos, (start, end), found


# --------------------------------------------------------------------------- hand-computed
def test_column_means_and_rate_by_hand():
    A = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.8, 0.1, 0.1]])         # one head, T = 3
    col_mass = A.sum(0)[None, None]                                            # [1, 1, 3]
    alpha = column_means(col_mass, torch.tensor([[3, 2, 1]]))
    np.testing.assert_allclose(alpha[0, 0].numpy(), [2.3 / 3, 0.3, 0.1])
    assert sink_rate(torch.tensor([[0.31, 0.29], [0.5, 0.0]]), 0.3) == 50.0
    frac = sink_fraction(col_mass, [0])
    assert abs(float(frac[0, 0]) - 2.3 / 3) < 1e-6
    n, first_not_bos, where = act_detect(torch.tensor([[[0.5, 0.05, 0.2, 0.0], [0.05, 0.0, 0.3, 0.15]]]))
    assert n.tolist() == [[1, 1]] and first_not_bos.tolist() == [[False, True]]
    assert where == {2: 1, 3: 1}  # head 0 keeps key 2; head 1 drops key 2 as "BOS" and keeps key 3


def test_secondary_detection_by_hand():
    L, T, D = 30, 7, 8
    g = torch.Generator().manual_seed(0)
    resid = torch.randn(L, T, D, generator=g)
    resid[:, :, 0] = 0                                                    # direction 0 belongs to the sink
    resid[3:25, 1, 0] = 400.0                                             # primary at position 1, layers 3..24
    resid[10:18, 5, 0] = 300.0                                            # a secondary sink: layers 10..17
    resid[12:14, 3, 0] = 300.0                                            # two layers only: noise
    p, (start, end), found = detect_secondary(resid, [0, 1])
    assert p == 1 and (start, end) == (3, 25)
    assert found[5] == list(range(10, 18)) and found[3] == [12, 13] and 0 not in found
    assert label_sink(len(found[5]), L) == "secondary" and label_sink(len(found[3]), L) == "noise"
    assert label_sink(len(found[1]), L) == "primary_like"
    assert [label_sink(n, 30) for n in (4, 5, 14, 15)] == ["noise", "secondary", "secondary", "primary_like"]
    assert active_range(torch.tensor([1.0, 1, 50, 52, 51, 50, 2, 1])) == (2, 6)


def test_massive_mask_by_hand():
    resid = torch.full((2, 4, 5), 0.05)
    resid[0, 0, 3] = -150.0       # > 100 and > 1000 x median 0.05
    resid[1, 2, 1] = 40.0         # > 1000 x median but not > 100
    mask, med = massive_mask(resid)
    assert mask.nonzero().tolist() == [[0, 0, 3]]
    np.testing.assert_allclose(med.numpy(), [0.05, 0.05], rtol=1e-6)


# --------------------------------------------------------------------------- vs HF eager, tiny models
def test_sinks_matches_eager(tmp_path, n_layers=4):
    from headscope.probe import Probe
    seed = int(torch.randint(0, 10_000, ()).item())
    rng = np.random.default_rng(seed)
    lm = make_tiny_lm(seed, n_layers=n_layers)
    T, k = 24, int(rng.integers(0, 3))
    texts = random_texts(rng, 4, T, T + 12) + random_texts(rng, 1, 5, 10)  # the last is too short: skipped
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    tok = lm.tokenizer
    refs = []
    for t in texts[:4]:
        ids = tok(t).input_ids[:T]
        A, hs = eager(lm.model, ids)
        refs.append((ids, A, hs, ref_alpha(A)))
    all_alpha_k = np.stack([a[..., k] for *_, a in refs])
    eps = float(np.quantile(all_alpha_k, 0.5))                  # about half the heads sink: the test can fail
    eps += 1e-4 if np.abs(all_alpha_k - eps).min() < 1e-5 else 0.0
    opts = {"T": T, "k": k, "eps": eps, "sink_threshold": 0.15, "min_queries": 4, "seed": seed}
    run = run_analysis("sinks", lm=lm, probe=Probe(lm), data=data, out=tmp_path / "run", progress=False,
                       options=opts)
    assert run.meta["status"] == "complete" and run.meta["n_used"] == 4
    recs = run.examples()
    assert recs[4]["skip"] and "< T" in recs[4]["skip_reason"]
    s = run.scores()
    np.testing.assert_allclose(s["alpha_k"], all_alpha_k.mean(0), atol=2e-6)
    np.testing.assert_allclose(s["sink_frequency"], (all_alpha_k > eps).mean(0))
    rates = [(a > eps).mean() * 100 for a in all_alpha_k]
    assert abs(run.meta["summary"]["sink_rate"] - np.mean(rates)) < 1e-9
    L = n_layers
    frac, n_act = [], []
    for (ids, A, hs, alpha), rec in zip(refs, recs):
        sinks = [p for p in range(T) if alpha[..., p].mean() > 0.15 and T - p >= 4]
        assert [x["pos"] for x in rec["sink_tokens"]] == sinks
        # share of each head's attention (summed over all queries, T rows of mass 1) on the sinks
        frac.append(A[..., sinks].sum((-1, -2)).numpy() / T)
        n_act.append(np.array([[max(int((alpha[l, h] > 0.1).sum()) - 1, 0) for h in range(4)] for l in range(L)]))
        bos, rng_, found = ref_secondary(hs, [0, 1], L)
        assert rec["primary"] == {"pos": bos, "active_range": list(rng_)}
        got = {c["pos"]: c["layers"] for c in rec["candidates"]}
        want = {p: ls for p, ls in found.items() if p == bos or label_sink(len(ls), L) != "noise"}
        assert got == want
        prim = next(c for c in rec["candidates"] if c["primary"])
        np.testing.assert_allclose(prim["score_by_layer"], alpha[:, :, bos].mean(1), atol=1e-4)
    np.testing.assert_allclose(s["sink_fraction"], np.mean(frac, 0), atol=2e-6)
    np.testing.assert_allclose(s["act_sinks"], np.mean(n_act, 0))
    assert set(run.arrays()) >= {"alpha_by_position", "sink_rate_by_position", "primary_score_by_layer"}


def test_repeated_and_random_inputs(tmp_path):
    """input=repeated is one token T times (no BOS) and input=random T random ids; alpha_k vs eager."""
    from headscope.probe import Probe
    seed = int(torch.randint(0, 10_000, ()).item())
    lm = make_tiny_lm(seed)
    for kind in ("repeated", "random"):
        run = run_analysis("sinks", lm=lm, probe=Probe(lm), out=tmp_path / kind, progress=False,
                           options={"input": kind, "n_examples": 2, "T": 16, "seed": seed})
        assert run.meta["n_used"] == 2
        ids_list = []
        special = set(lm.tokenizer.all_special_ids)
        allowed = torch.tensor(sorted(set(range(lm.info.vocab_size)) - special))
        for i in range(2):
            g = torch.Generator().manual_seed(seed * 100_003 + i)
            ids = ([int(allowed[torch.randint(len(allowed), (1,), generator=g)])] * 16 if kind == "repeated"
                   else allowed[torch.randint(len(allowed), (16,), generator=g)].tolist())
            ids_list.append(ids)
        if kind == "repeated":
            assert all(len(set(ids)) == 1 for ids in ids_list)
        ref = np.mean([ref_alpha(eager(lm.model, ids)[0])[..., 0] for ids in ids_list], 0)
        np.testing.assert_allclose(run.scores()["alpha_k"], ref, atol=2e-6)


def test_massive_matches_reference(tmp_path):
    """Massive activations against a float64 loop over HF hidden states; thresholds scaled to the tiny model."""
    from headscope.probe import Probe
    seed = int(torch.randint(0, 10_000, ()).item())
    rng = np.random.default_rng(seed)
    lm = make_tiny_lm(seed)
    texts = random_texts(rng, 3, 10, 20)
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    hs_all = [resid_post_hf(lm.model, lm.tokenizer(t).input_ids) for t in texts]
    absthr = float(np.quantile(np.concatenate([h.abs().flatten().numpy() for h in hs_all]), 0.995))
    ratio = 3.0
    run = run_analysis("massive", lm=lm, probe=Probe(lm), data=data, out=tmp_path / "run", progress=False,
                       options={"abs_threshold": absthr, "ratio": ratio})
    counts, dims = [], set()
    for hs, rec in zip(hs_all, run.examples()):
        L, T, D = hs.shape
        c = np.zeros(L)
        flagged = set()
        for l in range(L):
            flat = sorted(hs[l].abs().flatten().tolist())
            med = flat[(len(flat) - 1) // 2]                      # lower median (torch's convention)
            for p in range(T):
                for d in range(D):
                    v = abs(float(hs[l, p, d]))
                    if v > absthr and v > ratio * med:
                        c[l] += 1
                        flagged.add(d)
        counts.append(c)
        assert rec["dims"] == sorted(flagged)
        dims |= flagged
    assert dims, "thresholds flagged nothing: the test would be vacuous"
    np.testing.assert_allclose(run.arrays()["count_by_layer"], np.mean(counts, 0))


# --------------------------------------------------------------------------- the real default model
@pytest.mark.slow
def test_sinks_default_model(smollm2, tmp_path):
    """SmolLM2 (RoPE): a strong first-token sink on natural text (alpha_0 checked against eager), and
    no sink on a repeated single token (Gu et al.: 0% for RoPE models)."""
    from headscope.probe import Probe
    probe = Probe(smollm2)
    run = run_analysis("sinks", lm=smollm2, probe=probe, out=tmp_path / "nat", progress=False, options={"limit": 4})
    assert run.meta["status"] == "complete" and run.meta["n_used"] == 4
    from headscope.analyses.datasets import load_span_records, shipped_data
    texts = [r["text"] for r in load_span_records(shipped_data("natural_texts.jsonl"))[:4]]
    model = smollm2.model
    prev = model.config._attn_implementation
    try:
        ref = np.mean([eager_alpha0(model, smollm2.tokenizer(t).input_ids[:64]) for t in texts], 0)
    finally:
        model.set_attn_implementation(prev)
    np.testing.assert_allclose(run.scores()["alpha_k"], ref, atol=1e-4)
    assert run.meta["summary"]["sink_rate"] > 50
    rep = run_analysis("sinks", lm=smollm2, probe=probe, out=tmp_path / "rep", progress=False,
                       options={"input": "repeated", "n_examples": 4})
    assert rep.meta["summary"]["sink_rate"] < 1.0


def resid_post_hf(model, ids):
    """[L, T, D] float64 residual after each layer from HF ``hidden_states``; the last entry there is
    post-norm, so the last layer's pre-norm residual is read from the final norm's input instead."""
    got = {}
    h = model.model.norm.register_forward_hook(lambda m, a, o: got.__setitem__("x", a[0][0]))
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
    finally:
        h.remove()
    return torch.stack([x[0] for x in out.hidden_states[1:-1]] + [got["x"]]).double()


def eager_alpha0(model, ids):
    """alpha at key 0 per head from HF eager attention, float64: mean over all T queries of A[t, 0]."""
    A, _ = eager(model, ids)
    return A[..., 0].mean(-1).numpy()
