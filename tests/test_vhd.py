"""VHD / T-VHD / VHR and the text form (chd), checked against an independent two-pass computation.

The reference never touches the probe: it runs the plain HF model twice (with and without the
image or context) with torch forward pre-hooks on every layer's ``o_proj`` (whose input is the
concatenated head outputs z), slices heads itself, projects through W_O itself for "after", and
computes distances in float64. Generation is checked against HF ``generate``. VHR is checked
against scaling the o_proj input slice of the chosen heads directly.

Fast tests use tiny random models built here (tiny byte-level BPE tokenizer, 2-layer Llama, 2-layer
CLIP). Real-model tests (``slow``) build the SmolLM2 LLaVA fixture once per session.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from headscope.analyses.base import run_analysis
from headscope.analyses.vhd import (DEFAULT_CONTEXT_DATA, context_branches, image_records, token_aggregate,
                                    vhr_select)
from headscope.errors import HeadscopeError
from headscope.probe.vlm import LoadedVLM, encode, feed_image, image_spans, load_vlm, vlm_model_type
from headscope.probe.vlm_fixture import CHATML_TEMPLATE, build_llava

from .helpers import as_loaded, tiny_llama

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# --------------------------------------------------------------------------- tiny models
def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ["What colour is the shape in the image? Describe the picture in one sentence.",
              "The red circle is on a blue background. A festival is held in the town by the lake.",
              "system user assistant You are a helpful AI assistant named SmolLM, trained by Hugging Face"] * 5
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _tiny_llama(vocab: int, seed: int):
    m = tiny_llama(vocab, seed=seed, initializer_range=0.2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    m.generation_config.eos_token_id = 2
    return m


@pytest.fixture(scope="module")
def tiny_tok():
    return _tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_text_lm(tiny_tok):
    return as_loaded(_tiny_llama(len(tiny_tok), seed=11), tiny_tok, "tiny-llama", path="tiny")


@pytest.fixture(scope="module")
def tiny_vlm_dir(tiny_tok, tiny_text_lm, tmp_path_factory):
    """A tiny LLaVA written by the fixture builder: 64 px, patch 16 -> 16 image tokens."""
    out = tmp_path_factory.mktemp("vlm") / "tiny-llava"
    return build_llava(tiny_text_lm.model, tiny_tok, out, seed=3, image_size=64, patch_size=16,
                       vision_layers=2, vision_hidden=32, vision_heads=2, vision_intermediate=64)


@pytest.fixture(scope="module")
def tiny_vlm(tiny_vlm_dir):
    return load_vlm(tiny_vlm_dir)


def _images(folder, n, seed):
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        arr = (rng.random((40 + 13 * i, 70, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")
        recs.append({"id": f"ex{i}", "image": f"img{i}.png", "prompt": ["What colour is the shape?",
                                                                        "Describe the picture."][i % 2]})
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return folder


# --------------------------------------------------------------------------- reference
def _decoder(model):
    inner = model.model
    return inner.language_model if hasattr(inner, "language_model") else inner


def _ref_outputs(model, ids, positions, where, **forward_kw):
    """Head outputs at ``positions`` of one plain HF forward, from o_proj inputs: [n, L, H, d] float64."""
    layers = _decoder(model).layers
    cfg = model.config.get_text_config()
    H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    store = {}
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda mod, args, l=l: store.__setitem__(l, args[0].detach().double())) for l, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(input_ids=ids, **forward_kw)
    finally:
        for h in handles:
            h.remove()
    out = []
    for l, layer in enumerate(layers):
        z = store[l][0, positions]                                          # [n, H * D]
        if where == "before":
            out.append(z.reshape(len(positions), H, D))
        else:
            W = layer.self_attn.o_proj.weight.detach().double()             # [d_model, H * D]
            out.append(torch.stack([z[:, h * D:(h + 1) * D] @ W[:, h * D:(h + 1) * D].T for h in range(H)], 1))
    return torch.stack(out, 1)


def _ref_distance(a, b, distance):
    if distance == "l2":
        return (a - b).norm(dim=-1)
    return 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def _ref_example(model, with_ids, without_ids, y, where, distance, positions_mode, kept, with_kw):
    """Per-token distance and both norms for one example, two plain passes -> ([n, L, H] x 3)."""
    n = len(y)
    tail = torch.tensor([y[:-1]], dtype=torch.long)
    T, T0 = with_ids.shape[1], without_ids.shape[1]
    a = _ref_outputs(model, torch.cat([with_ids, tail], 1), list(range(T - 1, T - 1 + n)), where, **with_kw)
    kw = {}
    if positions_mode == "preserve":
        kw["position_ids"] = torch.cat([kept, torch.arange(T, T + n - 1)])[None]
        kw["attention_mask"] = torch.ones(1, T0 + n - 1, dtype=torch.long)  # else HF reads the gap as packing
    b = _ref_outputs(model, torch.cat([without_ids, tail], 1), list(range(T0 - 1, T0 - 1 + n)), where, **kw)
    return _ref_distance(a, b, distance), a.norm(dim=-1), b.norm(dim=-1)


def _hf_greedy(model, ids, n, **kw):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, pad_token_id=0, **kw)
    return out[0, ids.shape[1]:].tolist()


# --------------------------------------------------------------------------- image span
def test_image_spans_hand_cases():
    I, B, E = 9, 7, 8
    assert image_spans(torch.tensor([1, I, I, I, 2, 3, I, 4]), I) == [(1, 4), (6, 7)]
    assert image_spans(torch.tensor([5, B, I, I, E, 6]), I, (B, E)) == [(1, 5)]
    assert image_spans(torch.tensor([I, I]), I) == [(0, 2)]
    assert image_spans(torch.tensor([1, 2, 3]), I) == []


@pytest.mark.parametrize("image_size, patch", [(64, 16), (32, 16)])
def test_encode_finds_the_image_span(tiny_tok, tiny_text_lm, tmp_path, image_size, patch):
    """The span length follows the vision config ((size/patch)^2, CLS dropped), never a constant, and
    the no-image ids are the with-image ids minus exactly that span."""
    d = build_llava(tiny_text_lm.model, tiny_tok, tmp_path / "m", seed=0, image_size=image_size,
                    patch_size=patch, vision_layers=1, vision_hidden=16, vision_heads=2, vision_intermediate=32)
    lm = load_vlm(d)
    img = Image.fromarray((np.random.default_rng(0).random((30, 50, 3)) * 255).astype(np.uint8))
    ip = encode(lm, img, "What colour is the shape?")
    n = (image_size // patch) ** 2
    before, after = ip.prompt.split("<image>")
    a = len(tiny_tok(before, add_special_tokens=False)["input_ids"])
    assert ip.spans == [(a, a + n)]
    ids = ip.input_ids[0]
    assert (ids[a:a + n] == lm.image_token_id).all() and (ids != lm.image_token_id).sum() == len(ids) - n
    assert ids[a + n:].tolist() == tiny_tok(after, add_special_tokens=False)["input_ids"]
    assert ip.text_ids[0].tolist() == ids[:a].tolist() + ids[a + n:].tolist()
    assert ip.kept.tolist() == list(range(a)) + list(range(a + n, len(ids)))


def _tiny_llava_next(tok, text_cfg, out):
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = copy.deepcopy(tok)
    tok.add_tokens(["<image>"], special_tokens=True)
    text_cfg.vocab_size = len(tok)
    grid = [[32, 32], [32, 64], [64, 32], [64, 64]]
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=16)
    cfg = LlavaNextConfig(vision_config=vc, text_config=text_cfg, image_token_id=tok.convert_tokens_to_ids("<image>"),
                          image_grid_pinpoints=grid, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(cfg).save_pretrained(out)
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=grid)
    LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=16, vision_feature_select_strategy="default",
                       chat_template=CHATML_TEMPLATE, num_additional_image_tokens=1).save_pretrained(out)
    return out


def _tiny_gemma3(tok, out):
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig,
                              PreTrainedTokenizerFast, SiglipVisionConfig)
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    backend = tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str())
    backend.add_special_tokens(["<start_of_image>", "<end_of_image>", "<image_soft_token>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", extra_special_tokens={
                                      "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                      "image_token": "<image_soft_token>"})
    tc = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=64,
                          layer_types=["sliding_attention", "full_attention"])
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32, patch_size=8)
    cfg = Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=4, boi_token_index=tok.boi_token_id,
                       eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"), image_token_index=tok.image_token_id)
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(cfg).save_pretrained(out)
    Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok,
                    chat_template=CHATML_TEMPLATE.replace("<image>", "<start_of_image>"),
                    image_seq_length=4).save_pretrained(out)
    return out


def test_llava_next_span_depends_on_the_image_and_probe_matches_hf(tiny_tok, tiny_text_lm, tmp_path):
    """LLaVA-NeXT ("anyres"): the image-token count varies with the aspect ratio; the probe's forward
    with the precomputed image features gives HF's logits (pixel_values path)."""
    from headscope.probe import Probe

    lm = load_vlm(_tiny_llava_next(tiny_tok, copy.deepcopy(tiny_text_lm.model.config), tmp_path / "next"))
    assert lm.vlm_type == "llava_next"
    probe, counts = Probe(lm), set()
    for shape in [(30, 60), (60, 30), (40, 40)]:
        img = Image.fromarray((np.random.default_rng(1).random((*shape, 3)) * 255).astype(np.uint8))
        ip = encode(lm, img, "What colour is the shape?")
        ids = ip.input_ids[0]
        (a, b), = ip.spans
        assert (ids[a:b] == lm.image_token_id).all() and int((ids == lm.image_token_id).sum()) == b - a
        counts.add(b - a)
        with probe.capture(activations=["logits"]), feed_image(lm, ip):
            got = probe.forward(ip.input_ids).logits
        with torch.no_grad():
            ref = lm.model(input_ids=ip.input_ids, **ip.vision_inputs).logits
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5)
    assert len(counts) > 1


def test_gemma3_span_includes_wrappers_and_vhd_refuses(tiny_tok, tmp_path):
    from headscope.probe import Probe

    lm = load_vlm(_tiny_gemma3(tiny_tok, tmp_path / "gemma"))
    assert lm.vlm_type == "gemma3" and len(lm.wrapper_token_ids) == 2
    img = Image.fromarray((np.random.default_rng(2).random((30, 60, 3)) * 255).astype(np.uint8))
    ip = encode(lm, img, "What colour is the shape?")
    ids = ip.input_ids[0].tolist()
    boi, eoi = lm.wrapper_token_ids
    a, b = ids.index(boi), ids.index(eoi) + 1
    assert ip.spans == [(a, b)] and b - a == 4 + 2                       # mm_tokens_per_image + wrappers
    assert ip.text_ids[0].tolist() == ids[:a] + ids[b:]
    assert ip.token_type_ids is not None and int(ip.token_type_ids.sum()) == 4
    with pytest.raises(HeadscopeError, match="Gemma-3"):
        run_analysis("vhd", lm=lm, probe=Probe(lm), data=_images(tmp_path, 1, 0), out=tmp_path / "r", progress=False)


# --------------------------------------------------------------------------- fixture
def test_fixture_build_grafts_the_lm_and_is_deterministic(tiny_tok, tiny_text_lm, tiny_vlm_dir, tmp_path):
    from safetensors.torch import load_file

    src = tiny_text_lm.model
    lm = load_vlm(tiny_vlm_dir)
    grafted = lm.model.model.language_model.state_dict()
    n_vocab = len(tiny_tok)
    assert grafted.keys() == src.model.state_dict().keys()
    for k, v in src.model.state_dict().items():
        if k == "embed_tokens.weight":
            assert torch.equal(grafted[k][:n_vocab], v)
            assert torch.allclose(grafted[k][n_vocab], v.mean(0))        # the <image> row
        else:
            assert torch.equal(grafted[k], v), k
    assert torch.equal(lm.model.lm_head.weight[:n_vocab], src.lm_head.weight)
    # without an image the VLM is the source LM: same logits on the same ids
    sd = load_file(str(tiny_vlm_dir / "model.safetensors"))
    assert lm.vlm_type == "llava" and vlm_model_type(tiny_vlm_dir) == "llava"
    from headscope.probe import Probe
    assert Probe(lm).anatomy.layers == list(lm.language_model.layers)   # the probe hooks the grafted LM
    ids = torch.tensor([tiny_tok("The red circle is on a blue background.")["input_ids"]])
    with torch.no_grad():
        np.testing.assert_allclose(lm.model(input_ids=ids).logits[..., :n_vocab], src(ids).logits, atol=1e-5)
    # same seed -> identical weights; another seed -> another vision tower
    kw = dict(image_size=64, patch_size=16, vision_layers=2, vision_hidden=32, vision_heads=2, vision_intermediate=64)
    again = load_file(str(build_llava(src, tiny_tok, tmp_path / "again", seed=3, **kw) / "model.safetensors"))
    other = load_file(str(build_llava(src, tiny_tok, tmp_path / "other", seed=4, **kw) / "model.safetensors"))
    assert sd.keys() == again.keys() and all(torch.equal(sd[k], again[k]) for k in sd)
    vis = [k for k in sd if "vision" in k and k.endswith("q_proj.weight")]
    assert vis and not torch.equal(sd[vis[0]], other[vis[0]])
    with pytest.raises(HeadscopeError, match="not empty"):
        build_llava(src, tiny_tok, tiny_vlm_dir, seed=3, **kw)


# --------------------------------------------------------------------------- VHD vs reference
@pytest.mark.parametrize("distance, where, positions", [("l2", "before", "contiguous"),
                                                        ("cosine", "after", "preserve")])
def test_vhd_matches_two_pass_reference(tiny_vlm, tmp_path, distance, where, positions):
    from headscope.probe import Probe

    lm = tiny_vlm
    data = _images(tmp_path, 2, seed=int(torch.randint(0, 10_000, ())))
    k = 5
    run = run_analysis("vhd", lm=lm, probe=Probe(lm), data=data, out=tmp_path / "run", progress=False,
                       options={"max_new_tokens": 5, "distance": distance, "where": where, "positions": positions,
                                "tvhd_k": k, "vhr": False})
    assert run.meta["status"] == "complete"
    recs = {r["id"]: r for r in run.examples()}
    acc = {"d": [], "a": [], "b": []}
    tv_ref = []
    for rec in image_records(data, ""):
        with Image.open(rec["image"]) as im:
            ip = encode(lm, im.convert("RGB"), rec["prompt"])
        ids = ip.input_ids
        keep = ids[0] != lm.image_token_id                                  # the reference's own span removal
        without = ids[:, keep]
        kept = torch.nonzero(keep).flatten()
        y = recs[rec["id"]]["new_tokens"]
        assert y == _hf_greedy(lm.model, ids, len(y), pixel_values=ip.vision_inputs["pixel_values"])
        d, a, b = _ref_example(lm.model, ids, without, y, where, distance, positions, kept,
                               {"pixel_values": ip.vision_inputs["pixel_values"]})
        acc["d"].append(d.mean(0)), acc["a"].append(a.mean(0)), acc["b"].append(b.mean(0))
        tv_ref.append(d.flatten(1).topk(k, dim=-1).values.mean(-1))
        np.testing.assert_allclose(recs[rec["id"]]["tvhd"], tv_ref[-1].numpy(), rtol=1e-4, atol=1e-5)
    s = run.scores()
    np.testing.assert_allclose(s["vhd"], torch.stack(acc["d"]).mean(0).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s["norm_image"], torch.stack(acc["a"]).mean(0).numpy(), rtol=1e-4)
    np.testing.assert_allclose(s["norm_noimage"], torch.stack(acc["b"]).mean(0).numpy(), rtol=1e-4)
    assert s["vhd"].max() > 1e-3                                           # the image does change heads
    arr = run.arrays()
    np.testing.assert_allclose(arr["tvhd"], torch.cat(tv_ref).numpy(), rtol=1e-4, atol=1e-5)
    assert arr["tvhd_offsets"].tolist() == [0, len(tv_ref[0]), len(tv_ref[0]) + len(tv_ref[1])]


def test_token_aggregate_rules():
    d = torch.rand(3, 4, 5)
    flat = d.reshape(3, 20).numpy()
    np.testing.assert_allclose(token_aggregate(d, "global_mean", 4).numpy(), np.sort(flat, 1)[:, -4:].mean(1), rtol=1e-6)
    per_layer = np.sort(d.numpy(), -1)[..., -2:].sum((-1, -2))
    np.testing.assert_allclose(token_aggregate(d, "layer_sum", 2).numpy(), per_layer, rtol=1e-6)
    np.testing.assert_allclose(token_aggregate(d, "layer_sum", 99).numpy(), d.sum((-1, -2)).numpy(), rtol=1e-6)


# --------------------------------------------------------------------------- VHR
def test_vhr_select_hand_case():
    # layer 0: head 0 is an outlier in both VHD and norm -> dropped even though its VHD is largest;
    # head 1 has a high VHD but an ordinary norm -> kept and selected. The rest's VHD median is 0.3.
    vhd = np.array([[5.0, 0.9, 0.3, 0.2, 0.4, 0.1], [1, 2, 3, 4, 5, 6]], dtype=float)
    norm = np.array([[9.0, 1.0, 1.0, 1.0, 1.0, 1.0], [1, 1, 1, 1, 1, 1]], dtype=float)
    m = vhr_select(vhd, norm)
    assert m[0].tolist() == [False, True, False, False, True, False]
    assert m[1].tolist() == [False, False, False, True, True, True]
    assert not vhr_select(vhd, norm, last_layers=1)[0].any()
    assert vhr_select(vhd, norm, last_layers=1)[1].tolist() == m[1].tolist()


def _scale_hooks(model, mask, alpha):
    """Reference VHR: multiply the chosen heads' slices of each o_proj input by alpha."""
    cfg = model.config.get_text_config()
    D = cfg.hidden_size // cfg.num_attention_heads
    handles = []
    for l, layer in enumerate(_decoder(model).layers):
        heads = np.nonzero(mask[l])[0].tolist()
        if not heads:
            continue

        def pre(mod, args, heads=heads):
            z = args[0].clone()
            for h in heads:
                z[..., h * D:(h + 1) * D] *= alpha
            return (z, *args[1:])
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(pre))
    return handles


def test_vhr_scales_exactly_the_chosen_heads(tiny_text_lm, tmp_path):
    """probe.intervene(HeadAblation scale) == editing the o_proj input slice, for logits and for the
    analysis's VHR generation; a different head set gives different logits (the check can fail)."""
    from headscope.analyses.base import RunContext
    from headscope.analyses.vhd import ContextDivergenceAnalysis
    from headscope.probe import HeadAblation, Probe

    lm, model = tiny_text_lm, tiny_text_lm.model
    rng = np.random.default_rng(int(torch.randint(0, 10_000, ())))
    mask = vhr_select(rng.random((3, 4)), rng.random((3, 4)), last_layers=2)
    assert mask.any() and not mask[0].any()
    alpha = 2.0
    probe = Probe(lm)
    ids = torch.tensor([lm.tokenizer("A festival is held in the town by the lake.")["input_ids"]])
    ops = [HeadAblation(layer=int(l), head=int(h), kind="scale", value=alpha) for l, h in zip(*np.nonzero(mask))]
    with probe.intervene(ops, phase="all"):
        got = probe.forward(ids).logits
    handles = _scale_hooks(model, mask, alpha)
    try:
        with torch.no_grad():
            ref = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5)
    other = mask.copy()
    l, h = np.argwhere(mask)[0]
    other[l, h], other[l, (h + 1) % 4] = False, True
    with probe.intervene([HeadAblation(layer=int(l), head=int(h), kind="scale", value=alpha)
                          for l, h in zip(*np.nonzero(other))]):
        assert (probe.forward(ids).logits - ref).abs().max() > 1e-3
    # the analysis's VHR generation == HF greedy generation under the reference hooks
    opts = ContextDivergenceAnalysis.parse_options({"max_new_tokens": 6})
    ctx = RunContext(lm=lm, probe=probe, options=opts, data_path=None)
    an = ContextDivergenceAnalysis()
    br = an.branches(ctx, next(iter(an.examples(ctx))))
    gen = an.generate(ctx, br, heads=mask)
    handles = _scale_hooks(model, mask, alpha)
    try:
        assert gen.new_tokens == _hf_greedy(model, br.with_ids, len(gen.new_tokens))
    finally:
        for h in handles:
            h.remove()


def test_vhr_in_a_run_reports_both_texts(tiny_vlm, tmp_path):
    from headscope.probe import Probe

    data = _images(tmp_path, 2, seed=5)
    run = run_analysis("vhd", lm=tiny_vlm, probe=Probe(tiny_vlm), data=data, out=tmp_path / "run", progress=False,
                       options={"max_new_tokens": 4, "vhr_last_layers": 0, "vhr_alpha": 3.0})
    s, arr, vhr = run.scores(), run.arrays(), run.meta["summary"]["vhr"]
    np.testing.assert_array_equal(arr["vhr_heads"].astype(bool), vhr_select(s["vhd"], s["norm_noimage"], 0))
    assert vhr["n_heads"] == int(arr["vhr_heads"].sum()) > 0 and vhr["alpha"] == 3.0
    texts = {r["id"]: r["text"] for r in run.examples()}
    assert [e["id"] for e in vhr["examples"]] == list(texts)
    assert all(e["text"] == texts[e["id"]] and isinstance(e["text_vhr"], str) for e in vhr["examples"])


# --------------------------------------------------------------------------- text form
def test_context_branches_splice_the_segment(tiny_tok):
    ctx_text, q = "The red circle is on a blue background.", "What colour is the shape?"
    for where in ("user", "system"):
        w, wo, (a, b), text = context_branches(tiny_tok, ctx_text, q, chat=True, context_in=where)
        assert w[0, :a].tolist() + w[0, b:].tolist() == wo[0].tolist()
        assert tiny_tok.decode(w[0, a:b]).strip() == ctx_text
        assert ctx_text in text and tiny_tok.decode(w[0]) == text
    w, wo, (a, b), text = context_branches(tiny_tok, ctx_text, q, chat=False, context_in="user")
    assert text.startswith(ctx_text) and text.endswith("Answer:")


def _splice(tok, rendered, segment):
    """The reference's own with/without-context ids: text before the segment, the segment and the
    text after, each tokenised separately -> (with [1, T], without [1, T'], (a, b))."""
    before, after = rendered.split(segment)
    p, s, q = (tok(x, add_special_tokens=False)["input_ids"] for x in (before, segment, after))
    return torch.tensor([p + s + q]), torch.tensor([p + q]), (len(p), len(p) + len(s))


@pytest.mark.parametrize("positions", ["contiguous", "preserve"])
def test_chd_matches_two_pass_reference(tiny_text_lm, tmp_path, positions):
    from headscope.probe import Probe

    lm = tiny_text_lm
    data = tmp_path / "ctx.jsonl"
    data.write_text(json.dumps({"id": "a", "context": "The festival is held in the town by the lake.",
                                "question": "Where is the festival held?"}) + "\n"
                    + json.dumps({"id": "b", "context": "You are a helpful AI assistant.",
                                  "question": "Describe the picture."}) + "\n")
    run = run_analysis("chd", lm=lm, probe=Probe(lm), data=data, out=tmp_path / "run", progress=False,
                       options={"max_new_tokens": 4, "positions": positions, "vhr": False})
    contexts = {json.loads(l)["id"]: json.loads(l)["context"] for l in data.read_text().splitlines()}
    ds = []
    for r in run.examples():
        w, wo, (a, b) = _splice(lm.tokenizer, r["rendered_prompt"], contexts[r["id"]] + "\n\n")
        assert [a, b] == r["context_span"]
        kept = torch.cat([torch.arange(a), torch.arange(b, w.shape[1])])
        assert r["new_tokens"] == _hf_greedy(lm.model, w, len(r["new_tokens"]))
        d, _, _ = _ref_example(lm.model, w, wo, r["new_tokens"], "before", "l2", positions, kept, {})
        ds.append(d.mean(0))
    np.testing.assert_allclose(run.scores()["chd"], torch.stack(ds).mean(0).numpy(), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- errors
def test_bad_inputs_are_one_line_errors(tiny_text_lm, tiny_vlm, tmp_path):
    from headscope.probe import Probe

    with pytest.raises(HeadscopeError, match="text-only"):
        run_analysis("vhd", lm=tiny_text_lm, probe=Probe(tiny_text_lm), data=_images(tmp_path, 1, 0),
                     out=tmp_path / "r1", progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "prompts.jsonl").write_text(json.dumps({"image": "missing.png", "prompt": "x"}) + "\n")
    with pytest.raises(HeadscopeError, match="image not found"):
        image_records(tmp_path / "bad", "")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "c"}) + "\n")
    with pytest.raises(HeadscopeError, match="missing field"):
        run_analysis("chd", lm=tiny_text_lm, probe=Probe(tiny_text_lm), data=bad, out=tmp_path / "r2",
                     progress=False)
    with pytest.raises(HeadscopeError, match="not a supported vision-language"):
        load_vlm(tmp_path)
    assert isinstance(tiny_vlm, LoadedVLM)


# --------------------------------------------------------------------------- real model
@pytest.fixture(scope="session")
def smol_fixture(smollm2, tmp_path_factory):
    """The SmolLM2 LLaVA fixture (random 4-layer CLIP, 49 image tokens), built once per session."""
    return build_llava(smollm2.model, smollm2.tokenizer, tmp_path_factory.mktemp("fixture") / "smol-llava",
                       seed=0, source="smollm2-135m")


@pytest.mark.slow
def test_cli_vhd_on_the_smollm2_fixture(smol_fixture, tmp_path, capsys):
    """`headscope score vhd --model DIR --data data/vhd` writes a complete run; its VHD equals the
    two-pass reference on the real LM."""
    from pathlib import Path

    from headscope.analyses.store import load_run
    from headscope.cli import main

    data = Path(__file__).resolve().parent.parent / "data" / "vhd"
    out = tmp_path / "run"
    rc = main(["score", "vhd", "--model", str(smol_fixture), "--data", str(data), "--out", str(out), "--quiet",
               "--limit", "1", "--max-new-tokens", "3", "--vhr-last-layers", "4"])
    assert rc == 0, capsys.readouterr().err
    run = load_run(out)
    assert run.status == "complete" and run.scores()["vhd"].shape == (30, 9)
    rec = run.examples()[0]
    assert rec["n_image_tokens"] == 49 and rec["image_spans"][0][1] - rec["image_spans"][0][0] == 49
    lm = load_vlm(smol_fixture)
    with Image.open(data / "red_circle.png") as im:
        ip = encode(lm, im.convert("RGB"), rec["prompt"])
    keep = ip.input_ids[0] != lm.image_token_id
    d, _, _ = _ref_example(lm.model, ip.input_ids, ip.input_ids[:, keep], rec["new_tokens"], "before", "l2",
                           "contiguous", None, {"pixel_values": ip.vision_inputs["pixel_values"]})
    np.testing.assert_allclose(run.scores()["vhd"], d.mean(0).numpy(), rtol=1e-3, atol=1e-4)
    assert len(run.meta["summary"]["vhr"]["examples"]) == 1


@pytest.mark.slow
def test_chd_on_smollm2(smollm2, tmp_path):
    from headscope.probe import Probe

    run = run_analysis("chd", lm=smollm2, probe=Probe(smollm2), out=tmp_path / "run", progress=False,
                       options={"limit": 1, "max_new_tokens": 3, "vhr": False})
    r = run.examples()[0]
    context = json.loads(DEFAULT_CONTEXT_DATA.read_text().splitlines()[0])["context"]
    w, wo, (a, b) = _splice(smollm2.tokenizer, r["rendered_prompt"], context + "\n\n")
    assert [a, b] == r["context_span"]
    d, _, _ = _ref_example(smollm2.model, w, wo, r["new_tokens"], "before", "l2", "contiguous", None, {})
    s = run.scores()["chd"]
    assert s.shape == (30, 9)
    np.testing.assert_allclose(s, d.mean(0).numpy(), rtol=1e-3, atol=1e-4)
