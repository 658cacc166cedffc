"""Data-parallel runs (analyses/distributed.py): a torchrun run with 2 gloo ranks must equal the
single-process run of the same examples, records in the same order; a run whose rank is killed
mid-run, resumed with one process, must equal the uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from headscope.analyses.base import Aggregator, RunningMean

ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_running_mean_merge_equals_float64_over_all_parts():
    """Parts folded in separate accumulators and merged give the float64 mean/std of all rows."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    x = rng.normal(size=(23, 3, 4)) * rng.uniform(0.1, 10)
    cut = sorted(rng.choice(np.arange(1, 23), size=2, replace=False))
    parts = [RunningMean(), RunningMean(), RunningMean()]
    for part, rows in zip(parts, np.split(x, cut)):
        for row in rows:
            part.add(row)
    merged = RunningMean()
    for part in parts:
        merged.merge(part)
    assert merged.n == 23
    np.testing.assert_allclose(merged.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.std, x.std(0), rtol=1e-9, atol=1e-9)


def test_aggregator_merge_keeps_statistics_one_side_lacks():
    a, b = Aggregator(), Aggregator()
    a.add("x", np.array([1.0, 2.0]))
    b.add("x", np.array([3.0, 6.0]))
    b.add("y", np.array([5.0]))
    a.merge(b)
    np.testing.assert_allclose(a["x"].mean, [2.0, 4.0])
    assert a["y"].n == 1 and a["x"].n == 2


def _score(args, *, ranks: int = 1, cwd: Path, check: bool = True, wait: bool = True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] \
        if ranks > 1 else [sys.executable]
    cmd = launcher + ["-m", "headscope", "score", *map(str, args), "--quiet"]
    env = {**os.environ, **ENV}
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stderr[-4000:]
    return out


def _load(folder: Path):
    meta = json.loads((folder / "run.json").read_text())
    records = [json.loads(line) for line in (folder / "examples.jsonl").read_text().splitlines()]
    return meta, records


def assert_same_run(a: Path, b: Path):
    ma, ra = _load(a)
    mb, rb = _load(b)
    assert ma["status"] == mb["status"] == "complete"
    assert [r["id"] for r in ra] == [r["id"] for r in rb]
    assert ra == rb   # same example records in the same order
    assert ma["scores"].keys() == mb["scores"].keys()
    for k in ma["scores"]:
        np.testing.assert_allclose(np.asarray(ma["scores"][k]), np.asarray(mb["scores"][k]), rtol=1e-5, atol=1e-6,
                                   err_msg=k)
    assert ma["n_used"] == mb["n_used"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from .test_app import make_tiny_model_dir
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", seed=3)


def test_two_ranks_equal_one_process_tiny_model(tiny, tmp_path):
    """5 examples over 2 ranks (an uneven last round), one and two examples per forward: scores,
    records and order as one process with one per forward."""
    args = ["induction", "--model", tiny, "--n-examples", 5, "--seq-len", 6, "--seed", 11]
    _score(args + ["--out", tmp_path / "one", "--batch-size", 1], cwd=tmp_path)
    for b in (1, 2):
        _score(args + ["--out", tmp_path / f"two{b}", "--batch-size", b], ranks=2, cwd=tmp_path)
        assert_same_run(tmp_path / "one", tmp_path / f"two{b}")
        meta = json.loads((tmp_path / f"two{b}" / "run.json").read_text())
        assert meta["shards"][0]["world_size"] == 2 and meta["shards"][0]["start"] == 0
        assert meta["batching"][0]["per_forward"] == b
    assert not (tmp_path / "one" / "shards").exists()


def test_sequential_analysis_refuses_ranks(tmp_path):
    """sahara's steps build on each other: with ranks it refuses before loading anything."""
    from headscope.analyses.base import run_analysis
    from headscope.analyses.distributed import Ranks
    from headscope.errors import HeadscopeError
    with pytest.raises(HeadscopeError, match="sahara cannot be split across processes"):
        run_analysis("sahara", "no-such-model", out=tmp_path / "s", ranks=Ranks(0, 2, 0, "gloo"))
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------ the default model
SMALL = {
    "sinks": ["--limit", 4, "--T", 24],
    "induction": ["--n-examples", 4, "--seq-len", 12],
    "retrieval": ["--lengths", "300", "--depths", "1", "--max-new-tokens", 12, "--rouge-threshold", 0.2],
}


def _reference(analysis: str, args: list, lm, out: Path):
    """The single-process run, in this process on the session's model (the same run loop)."""
    from headscope.analyses.base import run_analysis
    from headscope.probe import Probe
    flags = dict(zip(args[::2], args[1::2]))
    options = {k.lstrip("-").replace("-", "_"): str(v) for k, v in flags.items()}
    run_analysis(analysis, lm=lm, probe=Probe(lm), options=options, out=out, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("analysis", sorted(SMALL))
def test_two_ranks_equal_one_process_smollm2(analysis, smollm2, tmp_path):
    _reference(analysis, SMALL[analysis], smollm2, tmp_path / "one")
    _score([analysis, "--model", "smollm2-135m", *SMALL[analysis], "--out", tmp_path / "two"], ranks=2, cwd=tmp_path)
    assert_same_run(tmp_path / "one", tmp_path / "two")


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _rank_pid(launcher: int, rank: int) -> int | None:
    for pid in _children(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


@pytest.mark.slow
def test_killed_rank_resumed_with_one_process_equals_uninterrupted(smollm2, tmp_path):
    """SIGKILL rank 1 once a few examples are written (2 per rank per round); --resume with 1
    process (auto batch size) completes the run and it equals the uninterrupted single-process run
    (no example lost, none counted twice)."""
    flags = ["--n-examples", 12, "--seq-len", 12, "--seed", 5]
    _reference("induction", flags, smollm2, tmp_path / "ref")
    args = ["induction", "--model", "smollm2-135m", *flags]
    out = tmp_path / "cut"
    proc = _score(args + ["--out", out, "--batch-size", 2], ranks=2, cwd=tmp_path, wait=False)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "examples.jsonl").exists() and len((out / "examples.jsonl").read_text().splitlines()) >= 2:
                break
            time.sleep(0.02)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None and proc.poll() is None, "the run ended before a rank could be killed"
        os.kill(victim, signal.SIGKILL)
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    meta, records = _load(out)
    assert meta["status"] != "complete" and 2 <= len(records) < 12
    _score(args + ["--out", out, "--resume"], cwd=tmp_path)
    assert_same_run(tmp_path / "ref", out)
    meta, _ = _load(out)
    assert [s["world_size"] for s in meta["shards"]] == [2, 1]
    assert meta["batching"][0]["per_forward"] == 2 and meta["batching"][1]["requested"] == "auto"


# ------------------------------------------------------------------------ --device-map (probe/placement.py)
def _placed_pair(tiny, dmap: dict, offload_dir=None):
    """The tiny model twice: as loaded (one device), and placed by ``dmap``."""
    from headscope.probe import Probe, load_model
    from headscope.probe.placement import place
    ref, placed = load_model(str(tiny)), load_model(str(tiny))
    record = place(placed.model, json.dumps(dmap), offload_dir=offload_dir)
    return Probe(ref), Probe(placed), record


def _capture_and_ablate(probe, ids, mask):
    """Per-layer attention patterns and logits, clean and with heads ablated in both layers."""
    import torch

    from headscope.kernels import StatsSpec
    from headscope.probe import HeadAblation
    T = ids.shape[1]
    with probe.capture(stats=StatsSpec(pattern_rows=(0, T)), activations=["blocks.1.hook_resid_post"]) as cap:
        logits = probe.forward(ids, attention_mask=mask).logits
    pats = torch.stack([cap.stats[l]["pattern"][0] for l in range(2)])   # [L, H, T, T], on the CPU
    ops = [HeadAblation(layer=0, head=1, kind="zero"), HeadAblation(layer=1, head=2, kind="uniform")]
    with probe.intervene(ops):
        ablated = probe.forward(ids, attention_mask=mask).logits
    return pats, cap.acts["blocks.1.hook_resid_post"], logits.cpu(), ablated.cpu()


def _assert_same_under_placement(ref, placed):
    import torch
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    ids = torch.randint(2, 200, (2, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0   # left padding: the key mask is made on the input device, used on each layer's
    a, b = _capture_and_ablate(ref, ids, mask), _capture_and_ablate(placed, ids, mask)
    for x, y, what in zip(a, b, ("patterns", "resid_post", "logits", "ablated logits")):
        torch.testing.assert_close(y.cpu(), x.cpu(), rtol=1e-5, atol=1e-5, msg=what)
    assert not torch.allclose(a[2], a[3])   # the ablation changes the output


def test_disk_offloaded_layer_captures_and_ablates_as_one_device(tiny, tmp_path):
    """CPU only: layer 1 and the final norm offloaded to disk, so accelerate's hooks load their
    weights in and move activations at every call, wrapped around headscope's attention switch,
    capture and edits. Patterns, activations, logits and an ablation equal the plain model's."""
    dmap = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": "disk", "model.norm": "disk", "lm_head": "cpu"}
    ref, placed, record = _placed_pair(tiny, dmap, offload_dir=tmp_path / "offload")
    assert record["model.layers.1"] == "disk"
    assert str(next(placed.model.model.layers[1].parameters()).device) == "meta"   # really offloaded
    _assert_same_under_placement(ref, placed)


DISK_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}


def test_model_loads_straight_into_a_device_map(tiny, tmp_path):
    """load_model(device_map=...): the weights go straight to their devices (a model larger than host
    RAM never sits whole in it): the disk layer's parameters are never materialised (meta) and the
    model still captures and ablates as the plain one."""
    from headscope.probe import Probe, load_model
    from headscope.probe.placement import placement_of
    placed = load_model(str(tiny), device_map=json.dumps(DISK_MAP), offload_dir=tmp_path / "off")
    assert {str(p.device) for p in placed.model.model.layers[1].parameters()} == {"meta"}
    assert placement_of(placed.model)["model.layers.1"] == "disk"
    _assert_same_under_placement(Probe(load_model(str(tiny))), Probe(placed))


def test_generation_sweeps_and_patching_under_a_device_map(tiny, tmp_path):
    """The rest of the probe across placed layers (disk offload, straight from loading): greedy
    generation with per-step capture, the batched single-head sweep and head patching give what the
    plain model gives."""
    import torch

    from headscope.kernels import StatsSpec
    from headscope.probe import Probe, kl_div, load_model
    ref = Probe(load_model(str(tiny)))
    placed = Probe(load_model(str(tiny), device_map=json.dumps(DISK_MAP), offload_dir=tmp_path / "off"))
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    ids, other = torch.randint(2, 200, (1, 12), generator=g), torch.randint(2, 200, (1, 12), generator=g)
    gens = [p.generate(ids, max_new_tokens=6, stats=StatsSpec(topk=1)) for p in (ref, placed)]
    assert gens[0].new_tokens == gens[1].new_tokens
    torch.testing.assert_close(gens[1].stacked("topk_prob"), gens[0].stacked("topk_prob"), rtol=1e-5, atol=1e-5)
    clean = ref.forward(ids).logits
    sweeps = [torch.as_tensor(p.sweep_heads(ids, metric=kl_div(clean), kind="uniform")) for p in (ref, placed)]
    torch.testing.assert_close(sweeps[1], sweeps[0], rtol=1e-4, atol=1e-6)
    patches = [torch.as_tensor(p.patch_sweep(ids, other, hook="blocks.*.attn.hook_z", metric=kl_div(clean)))
               for p in (ref, placed)]
    torch.testing.assert_close(patches[1], patches[0], rtol=1e-4, atol=1e-6)
    assert sweeps[0].abs().max() > 0 and patches[0].abs().max() > 0


def test_cli_device_map_with_disk_layers(tiny, tmp_path, capsys):
    """--device-map with a disk layer needs --offload-dir (exit 2 naming it); with it the run equals
    a plain run and records the placement."""
    from headscope.cli import main
    args = ["score", "induction", "--model", str(tiny), "--n-examples", "2", "--seq-len", "5", "--quiet"]
    assert main(args + ["--device-map", json.dumps(DISK_MAP), "--out", str(tmp_path / "x")]) == 2
    assert "--offload-dir" in capsys.readouterr().err
    assert main(args + ["--device-map", json.dumps(DISK_MAP), "--offload-dir", str(tmp_path / "off"),
                        "--out", str(tmp_path / "placed")]) == 0
    assert main(args + ["--out", str(tmp_path / "plain")]) == 0
    placed, plain = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("placed", "plain"))
    assert placed["placement"]["model.layers.1"] == "disk" and plain["placement"] is None
    for name, v in plain["scores"].items():
        np.testing.assert_allclose(placed["scores"][name], v, atol=1e-5)


def test_device_map_errors_name_the_flag():
    from headscope.errors import HeadscopeError
    from headscope.probe.placement import parse_device_map
    with pytest.raises(HeadscopeError, match="--device-map"):
        parse_device_map("{not json")
    with pytest.raises(HeadscopeError, match="--device-map: module 'x': 'gpu0' is not a device"):
        parse_device_map('{"x": "gpu0"}')
    with pytest.raises(HeadscopeError, match="does not exist on this machine"):
        parse_device_map('{"x": "cuda:64"}')


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU: cpu + cuda:0 split")
def test_layers_split_across_cpu_and_cuda_capture_and_ablate_as_one_device(tiny):
    """First layer (and the embedding) on the CPU, the rest on cuda:0: tensors cross devices."""
    dmap = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": "cuda:0", "model.norm": "cuda:0", "lm_head": "cpu"}
    ref, placed, _ = _placed_pair(tiny, dmap)
    assert placed.model.model.layers[1].self_attn.q_proj.weight.device.type == "cuda"
    _assert_same_under_placement(ref, placed)


def test_run_records_placement_and_refuses_it_under_ranks(tiny, tmp_path):
    """--device-map reaches the model and run.json records the placement (a JSON map onto the
    CPU here; disk: test_cli_device_map_with_disk_layers); torchrun ranks refuse it."""
    from headscope.analyses.base import run_analysis
    from headscope.analyses.distributed import Ranks
    from headscope.errors import HeadscopeError
    opts = {"n_examples": "2", "seq_len": "5", "device_map": '{"": "cpu"}'}
    run = run_analysis("induction", str(tiny), options=opts, out=tmp_path / "r", progress=False)
    assert run.meta["placement"] == {"": "cpu"} and run.meta["status"] == "complete"
    with pytest.raises(HeadscopeError, match="--device-map places one model copy"):
        run_analysis("induction", str(tiny), options=opts, out=tmp_path / "x", ranks=Ranks(0, 2, 0, "gloo"))
