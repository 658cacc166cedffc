"""Batched examples per forward (``--batch-size``, ``Analysis.process_batch``): batched runs equal
unbatched ones and HF eager attention (float64 loops) on tiny random-init models with fresh random
inputs, variable lengths included; the auto size follows the free memory it is shown; a run
resumed with another batch size equals the uninterrupted one; bad sizes are CLI errors."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from headscope.analyses import base
from headscope.analyses.base import run_analysis
from headscope.analyses.induction import InductionAnalysis, repeated_tokens
from headscope.cli import main
from headscope.errors import HeadscopeError

from .helpers import make_tiny_lm, one_thread, random_texts, write_jsonl  # noqa: F401 (one_thread: autouse)


def _seed() -> int:
    return int.from_bytes(os.urandom(2), "little")


@pytest.fixture()
def bos_llama():
    """A random 2-layer GQA Llama whose tokenizer has a BOS (induction then starts at offset 1)."""
    lm = make_tiny_lm(_seed(), n_layers=2)
    assert lm.info.bos_token_id is not None
    return lm


def _eager_attn(model, ids: list[int]) -> torch.Tensor:
    """[L, H, T, T] float64 attention of one unpadded input, HF eager with ``output_attentions``."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True)
    return torch.stack([a[0] for a in out.attentions]).double()


def _run(lm, name, tmp, tag, **opts):
    from headscope.probe import Probe
    data = opts.pop("data", None)
    return run_analysis(name, lm=lm, probe=Probe(lm), out=tmp / tag, progress=False, log=lambda m: None,
                        options={k: str(v) for k, v in opts.items()}, data=data)


def assert_same(a, b, atol=2e-6):
    assert [r["id"] for r in a.examples()] == [r["id"] for r in b.examples()]
    for ra, rb in zip(a.examples(), b.examples()):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                assert abs(ra[k] - rb[k]) < 1e-6, k
            elif k not in ("sink_tokens", "candidates"):   # rounded floats inside: compared via the scores
                assert ra[k] == rb[k], k
    for k in a.scores():
        np.testing.assert_allclose(a.scores()[k], b.scores()[k], atol=atol, err_msg=k)


# --------------------------------------------------------------------------- equal to unbatched and to eager
def test_induction_batched_equals_unbatched_and_eager(bos_llama, tmp_path):
    """5 sequences in batches of 2 (an uneven last batch) and auto: the records and scores of one
    per forward, and the diagonal means of HF eager maps computed by loops."""
    lm, n, N, seed = bos_llama, 7, 5, _seed()
    opts = dict(n_examples=N, seq_len=n, seed=seed, prepend_bos=True)
    one = _run(lm, "induction", tmp_path, "one", batch_size=1, **opts)
    two = _run(lm, "induction", tmp_path, "two", batch_size=2, **opts)
    auto = _run(lm, "induction", tmp_path, "auto", **opts)
    assert two.meta["batching"][0]["per_forward"] == 2 and auto.meta["batching"][0]["per_forward"] == N
    assert_same(one, two)
    assert_same(one, auto)
    bos, exclude = lm.info.bos_token_id, set(lm.tokenizer.all_special_ids)
    L, H = lm.info.n_layers, lm.info.n_heads
    ref = np.zeros((L, H))
    for i in range(N):
        ids = repeated_tokens(lm.info.vocab_size, n, seed * 100_003 + i, bos, exclude)[0].tolist()
        A = _eager_attn(lm.model, ids)
        T = len(ids)
        for l in range(L):
            for h in range(H):
                ref[l, h] += np.mean([A[l, h, t, t - n + 1].item() for t in range(1 + n, T)]) / N
    np.testing.assert_allclose(two.scores()["induction"], ref, atol=2e-6)


def test_sinks_variable_lengths_batched_equal_eager(tmp_path):
    """--T 0 keeps whole inputs of different lengths (two share one): batches of 4 give the records
    of one per forward, and alpha_k equals Gu's column mean from each input's own eager map."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    lm = make_tiny_lm(seed)
    texts = random_texts(rng, 5, 6, 20)
    texts.insert(2, " ".join(texts[0].split()[::-1]))   # the same length as the first, other tokens
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    k = int(rng.integers(0, 3))
    opts = dict(T=0, k=k, min_queries=2, seed=seed, data=data)
    one = _run(lm, "sinks", tmp_path, "one", batch_size=1, **opts)
    four = _run(lm, "sinks", tmp_path, "four", batch_size=4, **opts)
    assert len({r["n_tokens"] for r in four.examples()}) > 2
    assert_same(one, four)
    ref = []
    for t in texts:
        A = _eager_attn(lm.model, lm.tokenizer(t).input_ids)     # [L, H, T, T]
        T = A.shape[-1]
        ref.append(sum(A[:, :, q, k].numpy() for q in range(k, T)) / (T - k))
    np.testing.assert_allclose(four.scores()["alpha_k"], np.mean(ref, 0), atol=2e-6)


def test_sinks_random_inputs_batched_equal_eager(tmp_path):
    """input=random (all T long): one forward of 3 rows, alpha at key 0 vs eager per input."""
    seed = _seed()
    lm = make_tiny_lm(seed)
    run = _run(lm, "sinks", tmp_path, "r", input="random", n_examples=3, T=12, seed=seed, batch_size=3)
    special = set(lm.tokenizer.all_special_ids)
    allowed = torch.tensor(sorted(set(range(lm.info.vocab_size)) - special))
    ref = []
    for i in range(3):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        A = _eager_attn(lm.model, allowed[torch.randint(len(allowed), (12,), generator=g)].tolist())
        ref.append(A[:, :, :, 0].mean(-1).numpy())
    np.testing.assert_allclose(run.scores()["alpha_k"], np.mean(ref, 0), atol=2e-6)


# --------------------------------------------------------------------------- the auto size
@pytest.mark.parametrize("free, want", [(10**12, 6), (70_000, 3), (19_999, 1), (None, 1)])
def test_auto_batch_size_follows_available_memory(free, want, bos_llama, tmp_path, monkeypatch):
    """auto = floor(half the free memory / the largest example's bytes), within 1..examples."""
    monkeypatch.setattr(base, "available_memory", lambda device: free)
    monkeypatch.setattr(InductionAnalysis, "example_memory", lambda self, ctx, ex: 10_000)
    monkeypatch.setattr(base, "CPU_TOKENS_PER_FORWARD", 10**9)
    run = _run(bos_llama, "induction", tmp_path, "r", n_examples=6, seq_len=3)
    plan = run.meta["batching"][0]
    assert plan["batch_size"] == plan["per_forward"] == run.meta["config"]["batch_size"] == want
    assert plan["requested"] == "auto"


def test_a_given_batch_size_over_the_memory_estimate_is_kept_with_a_warning(bos_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(base, "available_memory", lambda device: 60_000)
    monkeypatch.setattr(InductionAnalysis, "example_memory", lambda self, ctx, ex: 10_000)
    said = []
    for size, warns in ((3, False), (4, True)):   # 3 x 10 kB <= half of 60 kB < 4 x 10 kB
        run = base.run_analysis("induction", lm=bos_llama, out=tmp_path / f"b{size}", progress=False, log=said.append,
                                options={"n_examples": 4, "seq_len": 3, "batch_size": size})
        assert run.meta["batching"][0]["batch_size"] == size
        assert any(f"--batch-size {size} needs about" in m for m in said) == warns


@pytest.mark.parametrize("n, size, ways, want", [(24, 7, 1, 6), (24, 7, 2, 6), (24, 12, 2, 12), (5, 4, 1, 3),
                                                  (5, 5, 2, 3), (1, 8, 2, 1), (10, 3, 1, 3)])
def test_evened_batch_sizes_by_hand(n, size, ways, want):
    """Rounds of ``ways`` batches: as few rounds as ``size`` needs, the batches as even as they go."""
    assert base.evened(n, size, ways) == want


def test_auto_batch_size_on_cpu_caps_tokens_per_forward(bos_llama, tmp_path, monkeypatch):
    """Plenty of memory, a cap of 20 tokens per forward: sequences of BOS + 2 x 3 = 7 tokens go 2 at a time."""
    monkeypatch.setattr(base, "available_memory", lambda device: 10**12)
    monkeypatch.setattr(base, "CPU_TOKENS_PER_FORWARD", 20)
    run = _run(bos_llama, "induction", tmp_path, "r", n_examples=5, seq_len=3, prepend_bos=True)
    assert run.meta["batching"][0]["per_forward"] == 2
    assert len(run.examples()) == 5


@pytest.mark.parametrize("name, opts", [("induction", {"n_examples": 1, "seq_len": 5}),
                                        ("sinks", {"input": "random", "n_examples": 1, "T": 10})])
def test_example_memory_covers_what_is_captured(name, opts, bos_llama):
    """The estimate is at least the bytes the example's capture holds (its patterns / activations)."""
    from headscope.analyses.base import _prepared, get_analysis
    from headscope.probe import Probe
    probe = Probe(bos_llama)
    cls = get_analysis(name)
    analysis, ctx, examples, _ = _prepared(cls, cls.parse_options({**opts, "batch_size": 1}), bos_llama, probe,
                                           None, log=lambda m: None)
    held = []
    real = probe.capture

    def spy(*a, **kw):
        cm = real(*a, **kw)
        cap = cm.__enter__()
        held.append(cap)

        class Block:
            def __enter__(self):
                return cap

            def __exit__(self, *exc):
                return cm.__exit__(*exc)
        return Block()

    probe.capture = spy
    analysis.process(ctx, examples[0])
    (cap,) = held
    nbytes = sum(t.nbytes for s in cap.stats.values() for t in s.values()) + sum(t.nbytes for t in cap.acts.values())
    assert analysis.example_memory(ctx, examples[0]) >= nbytes > 0


def test_available_memory_reads_cuda_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (123_456, 999_999))
    assert base.available_memory("cuda:0") == 123_456
    assert base.available_memory("mps") is None


# --------------------------------------------------------------------------- resume, options
def test_resume_with_another_batch_size_equals_uninterrupted(bos_llama, tmp_path, monkeypatch):
    """Batches of 2, stopped in the second batch; resumed with batches of 3: the uninterrupted run."""
    lm, seed = bos_llama, _seed()
    opts = dict(n_examples=7, seq_len=5, seed=seed)
    whole = _run(lm, "induction", tmp_path, "whole", batch_size=1, **opts)
    real, calls = InductionAnalysis.process_batch, []

    def stop_second(self, ctx, examples):
        calls.append(len(examples))
        if len(calls) == 2:
            raise HeadscopeError("stop")
        return real(self, ctx, examples)

    monkeypatch.setattr(InductionAnalysis, "process_batch", stop_second)
    with pytest.raises(HeadscopeError, match="2 finished examples are kept"):
        _run(lm, "induction", tmp_path, "cut", batch_size=2, **opts)
    monkeypatch.setattr(InductionAnalysis, "process_batch", real)
    from headscope.probe import Probe
    resumed = run_analysis("induction", lm=lm, probe=Probe(lm), out=tmp_path / "cut", resume=True, progress=False,
                           log=lambda m: None, options={**{k: str(v) for k, v in opts.items()}, "batch_size": "3"})
    assert [(b["start"], b["per_forward"]) for b in resumed.meta["batching"]] == [(0, 2), (2, 3)]
    assert_same(whole, resumed)


def test_batch_size_option_parsing_and_cli(tmp_path, monkeypatch, capsys):
    import headscope.probe

    def no_load(*a, **k):
        raise AssertionError("the model must not load for a bad option")

    assert InductionAnalysis.parse_options({"batch_size": "auto"})["batch_size"] is None
    assert InductionAnalysis.parse_options({"batch_size": "4"})["batch_size"] == 4
    monkeypatch.setattr(headscope.probe, "load_model", no_load)
    for bad in ("0", "1025", "many"):
        assert main(["score", "induction", "--batch-size", bad, "--out", str(tmp_path / "r"), "--quiet"]) == 2
        assert "--batch-size" in capsys.readouterr().err
