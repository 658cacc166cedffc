"""Model shape facts read from a HF config, in one place: loading (``ModelInfo``) and the hook
(``Anatomy``) both take them from ``Geometry.of``, so they cannot disagree.

Torch-free: it reads only the config. Multimodal configs nest the language model; its text config
is the one read (``get_text_config``).

Sliding windows: a config with ``layer_types`` names each layer ("sliding_attention" gets
``sliding_window``, anything else is global: Gemma 2/3, Qwen2). Without ``layer_types``, a
``sliding_window`` applies to every layer unless ``use_sliding_window`` is False (Mistral style).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def text_config(config: Any) -> Any:
    """The language model's config (a multimodal config nests it)."""
    if hasattr(config, "get_text_config"):
        return config.get_text_config()
    return getattr(config, "text_config", None) or config


@dataclass(frozen=True)
class Geometry:
    """Layers, heads (GQA explicit), widths, context and per-layer windows of a causal LM."""

    model_type: str
    n_layers: int
    n_heads: int                       # query heads per layer
    n_kv_heads: int
    d_head: int
    d_model: int
    vocab_size: int
    max_context: int | None            # config.max_position_embeddings
    windows: tuple[int | None, ...]    # per layer sliding window, None = global

    @classmethod
    def of(cls, config: Any) -> "Geometry":
        text = text_config(config)
        n_layers, n_heads, d_model = int(text.num_hidden_layers), int(text.num_attention_heads), int(text.hidden_size)
        window = getattr(text, "sliding_window", None)
        layer_types = getattr(text, "layer_types", None)
        if layer_types is not None:
            windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        elif window and getattr(text, "use_sliding_window", True):
            windows = (window,) * n_layers
        else:
            windows = (None,) * n_layers
        return cls(model_type=str(text.model_type), n_layers=n_layers, n_heads=n_heads,
                   n_kv_heads=int(getattr(text, "num_key_value_heads", None) or n_heads),
                   d_head=int(getattr(text, "head_dim", None) or d_model // n_heads), d_model=d_model,
                   vocab_size=int(text.vocab_size), max_context=getattr(text, "max_position_embeddings", None),
                   windows=windows)

    @property
    def sliding_layers(self) -> list[int]:
        return [l for l, w in enumerate(self.windows) if w is not None]

    @property
    def sliding_window(self) -> int | None:
        """The window of the sliding layers (None when every layer is global)."""
        return next((int(w) for w in self.windows if w is not None), None)
