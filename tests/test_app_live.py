"""The dashboard's model work (headscope.app.live, headscope.app.jobs) against HF eager attention
and hand-written references, on the tiny local model of test_app."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from headscope.app import jobs, live
from headscope.errors import HeadscopeError
from tests.helpers import make_tiny_model_dir

PROMPT = "Alice met Bob. Then Alice met Bob again, and Alice"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("live") / "tiny")


@pytest.fixture(scope="module")
def lm(model_dir):
    from headscope.probe import load_model
    return load_model(str(model_dir))


@pytest.fixture(scope="module")
def probe(lm):
    from headscope.probe import Probe
    return Probe(lm)


@pytest.fixture(scope="module")
def eager(model_dir):
    """An independent copy of the model with HF's eager attention (returns attention maps)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()


def eager_maps(eager, ids):
    with torch.no_grad():
        out = eager(torch.tensor([ids]), output_attentions=True)
    return np.stack([a[0].double().numpy() for a in out.attentions]), out.logits[0, -1].double()  # [L, H, T, T]


def test_capture_prompt_matches_eager_attention(lm, probe, eager):
    ids = live.encode(lm, PROMPT)
    assert ids == lm.tokenizer(PROMPT).input_ids   # the one BOS policy: as the tokenizer does (adds none)
    assert live.encode(lm, PROMPT, prepend_bos=True) == [lm.tokenizer.bos_token_id] + ids
    A, logits = eager_maps(eager, ids)
    T = len(ids)
    cap = live.capture_prompt(probe, lm, ids, [(0, 1), (1, 3)], rows=(5, T), topk=3)
    for l, h in [(0, 1), (1, 3)]:
        np.testing.assert_allclose(cap.patterns[(l, h)], A[l, h, 5:], atol=1e-5)
    # reference statistics by explicit loops over queries and keys
    t_idx = np.arange(T)
    alpha = np.stack([[[A[l, h, s:, s].mean() for s in range(T)] for h in range(4)] for l in range(2)])
    dist = t_idx[:, None] - t_idx[None, :]
    mean_dist = (A * np.clip(dist, 0, None)).sum(-1)
    np.testing.assert_allclose(cap.alpha, alpha, atol=1e-5)
    np.testing.assert_allclose(cap.mean_dist, mean_dist, atol=1e-4)
    np.testing.assert_array_equal(cap.topk_idx[..., 0], A.argmax(-1))
    np.testing.assert_allclose(cap.next_probs, torch.softmax(logits, -1).numpy(), atol=1e-5)
    assert "".join(cap.tokens) == PROMPT


def test_fai_waad_series_from_mean_maps(lm, probe, eager):
    """The Inspect page's FAI/WAAD (the fai analysis with its defaults) vs Li et al.'s formulas on
    eager maps: heads split by mean span, WAAD from the local heads' mean map, FAI from the global
    heads' mean map over the band t - s >= H_lo."""
    fai = pytest.importorskip("headscope.analyses.fai")
    o = {opt.name: opt.default for opt in fai.FAIAnalysis.options}
    ids = live.encode(lm, PROMPT)
    A, _ = eager_maps(eager, ids)
    T = len(ids)
    res = live.fai_waad_series(probe, lm, ids)
    assert res["options"]["W"] == o["W"]
    dist = np.arange(T)[:, None] - np.arange(T)[None, :]
    span = (A * np.clip(dist, 0, None)).sum(-1).mean(-1)  # [L, H]
    n = max(1, round(o["local_frac"] * span.size))
    order = np.argsort(span, axis=None, kind="stable")
    loc = [divmod(int(i), 4) for i in order[:n]]
    glob = [divmod(int(i), 4) for i in np.argsort(-span, axis=None, kind="stable")[:n]]
    assert sorted(res["local"]) == sorted(loc) and sorted(res["global"]) == sorted(glob)
    A_loc = np.mean([A[l, h] for l, h in loc], 0)
    A_glob = np.mean([A[l, h] for l, h in glob], 0)
    W, lo, hi = o["W"], o["H_lo"], o["H_hi"]
    waad = [sum(A_loc[t, s] * min(t - s, W) for s in range(t + 1)) for t in range(T)]
    band = [range(s + lo, T if hi is None else min(T, s + hi + 1)) for s in range(T)]
    fai_ref = [np.mean([A_glob[t, s] for t in band[s]]) if len(band[s]) else np.nan for s in range(T)]
    np.testing.assert_allclose(res["series"]["WAAD (local heads)"], waad, atol=1e-4)
    np.testing.assert_allclose(res["series"]["FAI (global heads)"], fai_ref, atol=1e-5)


def _o_proj_hook(eager, layer, fn):
    """Pre-hook on o_proj: its input [B, T, H * d_head] is the concatenated head outputs z."""
    d = eager.config.hidden_size // eager.config.num_attention_heads
    def hook(mod, args):
        x = args[0].clone()
        return (fn(x.view(*x.shape[:2], -1, d)).reshape(x.shape),)
    return eager.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(hook)


def _probs(eager, ids):
    with torch.no_grad():
        return torch.softmax(eager(torch.tensor([ids])).logits[0, -1].double(), -1).numpy()


def test_zero_and_scale_ablation_match_a_hooked_eager_model(lm, probe, eager):
    ids = live.encode(lm, PROMPT)
    for kind, factor in (("zero", 0.0), ("scale", 2.5)):
        ops = live.make_ops(probe, ids, [(0, 1), (1, 2)], kind, scale=factor)
        eff = live.intervention_effect(probe, lm, ids, ops, max_new_tokens=3, target=" Bob")
        def scale_head(h):
            def fn(z):
                z[:, :, h] *= factor
                return z
            return fn
        hs = [_o_proj_hook(eager, 0, scale_head(1)), _o_proj_hook(eager, 1, scale_head(2))]
        try:
            ref = _probs(eager, ids)
        finally:
            for h in hs:
                h.remove()
        base = _probs(eager, ids)
        np.testing.assert_allclose(eff["p_after"], ref, atol=1e-5)
        np.testing.assert_allclose(eff["p_before"], base, atol=1e-5)
        kl = float((base * np.log((base + 1e-12) / (ref + 1e-12))).sum())
        assert eff["metrics"]["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-7)
        bob = lm.tokenizer(" Bob", add_special_tokens=False)["input_ids"][0]
        assert eff["metrics"]["logp_target_after"] == pytest.approx(np.log(ref[bob]), abs=1e-4)
        assert isinstance(eff["text_after"], str)


def test_patch_and_mean_match_a_hooked_eager_model(lm, probe, eager):
    ids = live.encode(lm, PROMPT)
    src = live.encode(lm, "Carol met Dan. Then Carol")  # shorter: positions both have are patched
    n = min(len(ids), len(src))
    saved = {}
    def grab(z):
        saved["z"] = z.clone()
        return z
    h = _o_proj_hook(eager, 1, grab)
    _probs(eager, src)
    h.remove()
    def patch(z):
        z[:, :n, 3] = saved["z"][:, :n, 3]
        return z
    h = _o_proj_hook(eager, 1, patch)
    ref = _probs(eager, ids)
    h.remove()
    eff = live.intervention_effect(probe, lm, ids, live.make_ops(probe, ids, [(1, 3)], "patch", source_ids=src))
    np.testing.assert_allclose(eff["p_after"], ref, atol=1e-5)

    h = _o_proj_hook(eager, 0, grab)
    _probs(eager, ids)
    h.remove()
    def mean(z):
        z[:, :, 2] = saved["z"][:, :, 2].mean(1, keepdim=True)
        return z
    h = _o_proj_hook(eager, 0, mean)
    ref = _probs(eager, ids)
    h.remove()
    eff = live.intervention_effect(probe, lm, ids, live.make_ops(probe, ids, [(0, 2)], "mean"))
    np.testing.assert_allclose(eff["p_after"], ref, atol=1e-5)


def test_bad_intervention_input(lm, probe):
    ids = live.encode(lm, PROMPT)
    with pytest.raises(HeadscopeError, match="at least one head"):
        live.make_ops(probe, ids, [], "zero")
    with pytest.raises(HeadscopeError, match="source prompt"):
        live.make_ops(probe, ids, [(0, 0)], "patch")
    with pytest.raises(HeadscopeError, match="out of range"):
        live.parse_heads(["L9H0"], lm.info)
    with pytest.raises(HeadscopeError, match="empty"):
        live.encode(lm, "  ")


def test_example_inputs_and_per_example_arrays_of_a_stored_run(lm, probe, tmp_path):
    from headscope.analyses.base import run_analysis
    from headscope.analyses.induction import repeated_tokens
    run = run_analysis("induction", lm=lm, probe=probe, out=tmp_path / "run", progress=False,
                       options={"n_examples": 3, "seq_len": 6, "seed": 7})
    assert live.example_ids(run, lm, probe) == ["seq0000", "seq0001", "seq0002"]
    ids = live.example_input_ids(run, "seq0002", lm, probe)
    ref = repeated_tokens(lm.info.vocab_size, 6, 7 * 100_003 + 2, None,   # this tokenizer adds no BOS
                          set(lm.tokenizer.all_special_ids))
    assert ids == ref[0].tolist()
    per = live.per_example_arrays(run, lm, probe, 3)
    assert [i for i, _ in per["induction"]] == ["seq0000", "seq0001", "seq0002"]
    np.testing.assert_allclose(np.mean([a for _, a in per["induction"]], 0), run.scores()["induction"], atol=1e-6)
    with pytest.raises(HeadscopeError, match="no example"):
        live.example_input_ids(run, "nope", lm, probe)


def test_save_intervention_makes_a_run(lm, tmp_path):
    from headscope.analyses.store import load_run
    rec = {"heads": ["L0H1"], "kind": "zero", "prompt": "x", "metrics": {"kl": 0.1}}
    a = live.save_intervention(tmp_path, lm, rec)
    b = live.save_intervention(tmp_path, lm, rec)  # same second: a fresh folder, never an overwrite
    assert a.path != b.path
    r = load_run(a.path)
    assert r.status == "complete" and r.meta["interventions"] == [rec]


# --------------------------------------------------------------------------- jobs
def test_probe_lock_serialises_threads(lm):
    """Two threads capturing on one probe: without the lock the second would hit 'captures do not nest'."""
    from headscope.probe import Probe
    p = Probe(lm)
    ids = live.encode(lm, PROMPT)
    errors, results = [], []

    def work():
        try:
            for _ in range(5):
                results.append(live.capture_prompt(p, lm, ids, [(0, 0)]).alpha)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    ts = [threading.Thread(target=work) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors and len(results) == 10
    assert all(np.array_equal(r, results[0]) for r in results)


def test_job_manager_runs_in_background(model_dir, tmp_path):
    pool = jobs.ModelPool()
    jm = jobs.JobManager(tmp_path, pool)
    with pytest.raises(HeadscopeError, match="^seq len: "):   # the form's label, not a CLI flag
        jm.submit("induction", str(model_dir), {"seq_len": "long"})
    assert not [p for p in tmp_path.iterdir() if p.name != jobs.JOBS_DIR]  # nothing written for bad input
    job = jm.submit("induction", str(model_dir), {"n_examples": 3, "seq_len": 5})
    done = jm.wait(job.run_id, timeout=120)
    assert done.state == "complete" and done.done == done.total == 3
    from headscope.analyses.store import load_run
    assert load_run(tmp_path / job.run_id).status == "complete"
    # the job file lets another JobManager (a restarted app) see the finished job
    other = jobs.JobManager(tmp_path, pool).get(job.run_id)
    assert other.state == "complete" and not jobs.JobManager(tmp_path, pool).orphaned(other)


def test_model_pool_reports_load_errors(tmp_path):
    pool = jobs.ModelPool()
    pool.start(str(tmp_path / "missing-model")).wait(60)
    assert pool.status(str(tmp_path / "missing-model")).startswith("error: ")
    with pytest.raises(HeadscopeError, match="could not load"):
        pool.get(str(tmp_path / "missing-model"), timeout=60)


def test_live_sink_alpha_on_a_sliding_window_model_matches_eager_and_sinks(tmp_path):
    """Gemma-3-style model (layer 0 window 4, layer 1 global), prompt far longer than the window:
    the Inspect page's alpha must divide each layer by its own query count. Reference: HF eager
    maps, alpha[l, h, s] = mean of A[l, h, t, s] over the queries t that see s in that layer."""
    from transformers import AutoModelForCausalLM

    from headscope.analyses.sinks import sink_rates
    from headscope.app import views
    from headscope.probe import Probe, load_model
    d = make_tiny_model_dir(tmp_path / "gemma3", seed=3, sliding_window=4)
    lm = load_model(str(d))
    assert lm.info.model_type == "gemma3_text"
    ids = live.encode(lm, PROMPT)
    T, w = len(ids), 4
    assert T > 4 * w
    cap = live.capture_prompt(Probe(lm), lm, ids, [(1, 0)])
    ref = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    A, _ = eager_maps(ref, ids)                                                 # [L, H, T, T]
    seen = [lambda t, s: t >= s and t - s < w, lambda t, s: t >= s]             # layer 0 sliding, 1 global
    alpha = np.stack([[[np.mean([A[l, h, t, s] for t in range(T) if seen[l](t, s)]) for s in range(T)]
                       for h in range(4)] for l in range(2)])
    np.testing.assert_allclose(cap.alpha, alpha, atol=1e-5)
    np.testing.assert_array_equal(cap.count, np.arange(T, 0, -1))               # full causal count
    rate = 100.0 * np.array([[(alpha[..., s] > eps).mean() for s in range(T)] for eps in (0.1, 0.3)])
    np.testing.assert_allclose([views.sink_rate(cap.alpha, eps) for eps in (0.1, 0.3)], rate)
    np.testing.assert_allclose(sink_rates(torch.from_numpy(alpha), 0.3), rate[1])


def test_head_overview_matches_eager_maps(lm, probe, eager):
    """Every all-heads grid statistic of the Inspect page vs explicit formulas on eager maps."""
    ids = live.encode(lm, PROMPT)
    A, _ = eager_maps(eager, ids)                                             # [L, H, T, T]
    T = len(ids)
    cap = live.capture_prompt(probe, lm, ids, [])
    t = np.arange(T)
    a, b = sorted(np.random.default_rng().choice(T + 1, 2, replace=False))
    ref = {
        "entropy": -(A * np.log(np.where(A > 0, A, 1.0))).sum(-1).mean(-1),
        "sink mass (token 0)": A[..., 0].mean(-1),
        "top-1 distance": (t - A.argmax(-1)).mean(-1),
        "mean span": (A * np.clip(t[:, None] - t[None, :], 0, None)).sum(-1).mean(-1),
        "mass on token span": A[..., a:b].sum(-1).mean(-1),
    }
    assert set(ref) == set(live.OVERVIEW_STATS)
    for stat, want in ref.items():
        got = live.head_overview(cap, stat, (a, b))
        assert got.shape == (2, 4)
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=stat)
    with pytest.raises(HeadscopeError, match="token span"):
        live.head_overview(cap, "mass on token span", (3, 3))


def test_ablation_sweep_matches_one_hooked_eager_forward_per_head(lm, probe, eager):
    ids = live.encode(lm, PROMPT)
    bob = lm.tokenizer(" Bob", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        base = eager(torch.tensor([ids])).logits[0, -1].double()
    got_logit, tok = live.ablation_sweep(probe, lm, ids, "zero", live.SWEEP_METRICS[2], " Bob")
    got_kl, _ = live.ablation_sweep(probe, lm, ids, "zero", live.SWEEP_METRICS[0])
    assert tok == lm.tokenizer.decode([bob]) and got_logit.shape == (2, 4)

    def zero(h):
        def fn(z):
            z[:, :, h] = 0
            return z
        return fn
    for l in range(2):
        for h in range(4):
            hook = _o_proj_hook(eager, l, zero(h))
            try:
                with torch.no_grad():
                    after = eager(torch.tensor([ids])).logits[0, -1].double()
            finally:
                hook.remove()
            assert got_logit[l, h] == pytest.approx(float(after[bob] - base[bob]), abs=1e-4)
            p, q = torch.softmax(base, -1), torch.softmax(after, -1)
            assert got_kl[l, h] == pytest.approx(float((p * (p / q).log()).sum()), abs=1e-5)
    with pytest.raises(HeadscopeError, match="sweeps zero, uniform or scale"):
        live.ablation_sweep(probe, lm, ids, "patch", live.SWEEP_METRICS[0])


def test_direct_logits_match_direct_path_removal(lm, probe, eager):
    from tests.test_dla import _reference
    ids = live.encode(lm, PROMPT)
    d = live.direct_logits(probe, lm, ids, " Bob", k=5)
    bob = lm.tokenizer(" Bob", add_special_tokens=False)["input_ids"][0]
    assert d["id"] == bob
    for l, h in ((0, 1), (1, 3)):
        want = _reference(eager, "llama", torch.tensor([ids]), l, h, len(ids) - 1)    # [V] float64
        assert d["effects"][l, h] == pytest.approx(float(want[bob]), abs=1e-5)
        np.testing.assert_array_equal(d["up_ids"][l, h], torch.topk(want, 5).indices.numpy())
        np.testing.assert_array_equal(d["down_ids"][l, h], torch.topk(-want, 5).indices.numpy())
        np.testing.assert_allclose(d["down"][l, h], torch.topk(-want, 5).values.neg().numpy(), atol=1e-5)


@pytest.mark.parametrize("analysis", ["gships", "sahara", "ships", "induction"])
def test_every_form_validates_with_gui_labels(tmp_path, analysis):
    """The New run form's validation (gui wording) works for every analysis, overrides included
    (gships once took no ``gui`` and failed with a TypeError); a bad value names the form label."""
    jm = jobs.JobManager(tmp_path, jobs.ModelPool())
    assert jm._validated(analysis, {}, None)["limit"] is None
    with pytest.raises(HeadscopeError, match="batch size"):
        jm._validated(analysis, {"batch_size": 0}, None)
