"""What every loader shares: the loaded-model record, its facts, and the loading environment.

``probe/models.py`` (registry, GGUF cache, text models) and ``probe/vlm.py`` (vision-language models)
both import this module and nothing of each other's, so ``models`` can dispatch to ``vlm`` without an
import cycle. ``HEADSCOPE_ALLOW_HUB=1`` is the one switch that lets transformers reach the hub.
"""
from __future__ import annotations

import numbers
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch

from headscope.errors import HeadscopeError

from .geometry import Geometry, text_config

ALLOW_HUB_ENV = "HEADSCOPE_ALLOW_HUB"


@dataclass
class ModelInfo:
    """Architecture facts analyses need, JSON-serialisable with ``dataclasses.asdict``.

    Head counts are explicit about GQA: ``n_heads`` query heads share ``n_kv_heads`` key/value
    heads. ``sliding_layers`` lists layers whose attention only sees ``sliding_window`` tokens back.
    """

    name: str
    model_type: str
    architectures: list[str]
    n_layers: int
    n_heads: int  # query heads per layer
    n_kv_heads: int
    d_head: int
    d_model: int
    vocab_size: int
    max_context: int | None  # config.max_position_embeddings
    sliding_window: int | None
    sliding_layers: list[int]
    bos_token_id: int | None
    adds_bos: bool  # the tokenizer prepends BOS by itself
    has_chat_template: bool
    n_params: int
    dtype: str
    source: str  # "registry" | "path" | "hub"
    path: str  # directory the weights were read from (hub: the id)
    hf_id: str | None = None  # upstream hub id, used as the TransformerLens model name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_head(self, layer: int, head: int, *, kv: bool = False) -> None:
        """Raise HeadscopeError unless ``layer``/``head`` exist (``kv=True``: a KV-head index)."""
        n = self.n_kv_heads if kv else self.n_heads
        kind = "KV" if kv else "query"
        if not (_is_int(layer) and 0 <= layer < self.n_layers):
            raise HeadscopeError(
                f"layer {layer} out of range: {self.name} has {self.n_layers} layers "
                f"(0-{self.n_layers - 1})"
            )
        if not (_is_int(head) and 0 <= head < n):
            raise HeadscopeError(
                f"head {head} out of range: {self.name} has {n} {kind} heads per layer (0-{n - 1})"
            )

    def leading_bos(self, prepend_bos: bool = False) -> int | None:
        """The BOS id a sequence starts with under headscope's one BOS policy, or None.

        The policy, for every analysis and the dashboard: a sequence starts with BOS exactly when the
        model's tokenizer puts one there by itself (``tokenizer(text)``, the call of every paper's
        reference code; SCIENCE.md: keep it, never strip it); ``prepend_bos`` (``--prepend-bos true``)
        adds the model's BOS where the tokenizer does not. Token sequences an analysis builds itself
        (random or repeated tokens, circuit tasks) follow the same rule, as if they had been tokenized.
        Without this one rule a "sink on token 0" from one analysis is not comparable with another's.
        """
        if self.bos_token_id is None or not (self.adds_bos or prepend_bos):
            return None
        return self.bos_token_id

    def check_length(self, n_tokens: int) -> None:
        """Raise HeadscopeError for an empty prompt or one longer than the model's context."""
        if n_tokens < 1:
            raise HeadscopeError("the prompt is empty (0 tokens)")
        if self.max_context is not None and n_tokens > self.max_context:
            raise HeadscopeError(
                f"{n_tokens} tokens is longer than {self.name}'s context of "
                f"{self.max_context} tokens"
            )


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass
class LoadedModel:
    """A causal LM in eval mode, its tokenizer, and its facts."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer
    name: str
    info: ModelInfo


def model_info(
    model: Any, tokenizer: Any, *, name: str, source: str, path: str, hf_id: str | None = None
) -> ModelInfo:
    """Read the facts off a loaded model's config (``Geometry``) and tokenizer."""
    geo = Geometry.of(model.config)
    bos = tokenizer.bos_token_id
    if bos is None:
        bos = getattr(text_config(model.config), "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    return ModelInfo(
        name=name,
        model_type=geo.model_type,
        architectures=list(getattr(model.config, "architectures", None) or []),
        n_layers=geo.n_layers,
        n_heads=geo.n_heads,
        n_kv_heads=geo.n_kv_heads,
        d_head=geo.d_head,
        d_model=geo.d_model,
        vocab_size=geo.vocab_size,
        max_context=geo.max_context,
        sliding_window=geo.sliding_window,
        sliding_layers=geo.sliding_layers,
        bos_token_id=None if bos is None else int(bos),
        adds_bos=bos is not None and len(ids) > 1 and ids[0] == bos,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        n_params=sum(p.numel() for p in model.parameters()),  # tied weights counted once
        dtype=str(model.dtype).removeprefix("torch."),
        source=source,
        path=path,
        hf_id=hf_id,
    )


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' per-load progress bars ("Loading weights") and info/warning logs, silenced for
    the block: a headscope run prints its own progress, and those lines are nothing the user can act
    on. Errors still raise. The previous verbosity and bar setting come back afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _hub_allowed() -> bool:
    return os.environ.get(ALLOW_HUB_ENV, "") == "1"


def _offline_unless_opted_in() -> None:
    """Keep transformers off the network unless HEADSCOPE_ALLOW_HUB=1 (explicit env values win).

    huggingface_hub reads ``HF_HUB_OFFLINE`` once, when it is imported, so setting the variable is
    not enough once anything imported it: its module constant is set too."""
    if not _hub_allowed():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None and hasattr(constants, "_is_true"):
            constants.HF_HUB_OFFLINE = constants._is_true(os.environ["HF_HUB_OFFLINE"])


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise HeadscopeError(f"bad device {device!r}: {_one_line(exc)}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HeadscopeError(f"device {device!r} requested but CUDA is not available")
    return dev
