"""Vision-language models: load LLaVA-family and Gemma-3 multimodal models, build image+prompt
inputs whose image span is read from the token ids, and feed them through the probe.

Supported (``VLM_MODEL_TYPES``): ``llava`` (LLaVA-1.5 style: CLIP tower + MLP projector + Llama-family
LM), ``llava_next`` (LLaVA-NeXT "anyres": the number of image tokens depends on the image size) and
``gemma3`` (Gemma-3 multimodal: SigLIP + projector, 256 soft tokens between ``<start_of_image>`` and
``<end_of_image>``). Weights come from safetensors in a local directory, ``trust_remote_code`` is
always off, and the processor (tokenizer + image processor) must be saved next to the weights.
transformers falls back to its PIL image processors when torchvision is missing, which is the case
here; nothing in this module imports torchvision.

The probe sees only the language model. ``Probe`` finds the decoder at
``model.language_model.layers`` of the ``*ForConditionalGeneration`` model, so capture and
interventions act on the LM's heads; the vision tower never runs under the "headscope" attention
(its attention is bidirectional, which the probe refuses). Instead, ``encoder_outputs`` runs the
vision tower + projector once with the model's own attention, and ``feed`` hands the result to
every prefill forward the probe makes (a forward pre-hook adds ``mm_encoder_outputs``).

The image span is never assumed (no hard-coded 576): ``image_spans`` reads the runs of the image
token id from the processor's expanded input ids, extended by Gemma-3's begin/end-of-image wrapper
tokens. The no-image branch (``ImagePrompt.text_ids``) deletes exactly those positions and keeps
every other token id, so both branches share the same text prefix token for token.

Position shift. Deleting the span moves every later token ``n`` positions earlier. Two handlings:
"contiguous" (default, what "drop the image tokens" means and what a text-only prompt would get):
the no-image branch is numbered 0..T'-1. "preserve": each remaining token keeps its with-image
position id (``ImagePrompt.kept``), leaving a gap where the image was, so RoPE sees the same
absolute and relative positions in both branches and only the image content differs.

Failure modes (``HeadscopeError``): a directory that is not a supported VLM, no processor files,
a prompt whose image tokens would be split across prefill chunks, and Gemma-3 through the probe:
its image block attends bidirectionally, which the probe's causal-only attention refuses (with its
own error naming the model type) - loading and span detection work, capture does not.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from headscope.errors import HeadscopeError

from .hook import cache_kwarg
from .loading import LoadedModel, _device, _offline_unless_opted_in, _one_line, model_info, quiet_transformers

VLM_MODEL_TYPES = {
    "llava": "LLaVA-1.5 style (vision tower + MLP projector + causal LM)",
    "llava_next": "LLaVA-NeXT (anyres: image-token count depends on the image size)",
    "gemma3": "Gemma-3 multimodal (SigLIP + projector; bidirectional image block)",
}
# processor outputs that are not inputs of the vision tower
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def vlm_model_type(path: str | Path) -> str | None:
    """The model type of a local multimodal model directory we support, else None (cheap: reads JSON)."""
    cfg = Path(path).expanduser() / "config.json"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    mt = data.get("model_type")
    return mt if mt in VLM_MODEL_TYPES and "vision_config" in data else None


@dataclass
class LoadedVLM(LoadedModel):
    """A ``LoadedModel`` whose ``model`` is a ``*ForConditionalGeneration`` VLM.

    ``info`` describes the language model (layers, heads, vocab); ``info.n_params`` counts the
    vision tower too. ``tokenizer`` is the processor's tokenizer.
    """

    processor: Any = None
    vlm_type: str = ""                        # key of VLM_MODEL_TYPES
    image_token_id: int = -1
    wrapper_token_ids: tuple[int, ...] = ()   # dropped with the span (Gemma-3 begin/end of image)

    @property
    def language_model(self):
        """The decoder (no LM head) that the probe's capture and interventions act on."""
        return self.model.model.language_model


def load_vlm(path: str | Path, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> LoadedVLM:
    """Load a supported VLM and its processor from a local directory (safetensors, no remote code)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _offline_unless_opted_in()
    path = Path(path).expanduser()
    mt = vlm_model_type(path)
    if mt is None:
        raise HeadscopeError(f"{path} is not a supported vision-language model directory "
                             f"(model types: {', '.join(VLM_MODEL_TYPES)})")
    if not any(path.glob("*.safetensors")):
        raise HeadscopeError(f"{path}: no safetensors weights (headscope does not read pickled weights)")
    dev = _device(device)
    kw = dict(trust_remote_code=False, local_files_only=True)
    try:
        with quiet_transformers():
            processor = AutoProcessor.from_pretrained(str(path), **kw)
    except (OSError, ValueError, TypeError) as exc:
        raise HeadscopeError(f"{path}: cannot load the processor (tokenizer + image processor): "
                             f"{_one_line(exc)}") from None
    try:
        with quiet_transformers():
            model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, use_safetensors=True, **kw)
    except (OSError, ValueError) as exc:
        raise HeadscopeError(f"could not load {path}: {_one_line(exc)}") from None
    model = model.to(dev).eval()
    cfg = model.config
    image_id = getattr(cfg, "image_token_id", None)
    if image_id is None:
        image_id = getattr(cfg, "image_token_index")
    wrappers = tuple(int(i) for i in (getattr(cfg, "boi_token_index", None), getattr(cfg, "eoi_token_index", None))
                     if i is not None)
    tok = processor.tokenizer
    info = model_info(model, tok, name=str(path), source="path", path=str(path.resolve()))
    return LoadedVLM(model=model, tokenizer=tok, name=str(path), info=info, processor=processor,
                     vlm_type=mt, image_token_id=int(image_id), wrapper_token_ids=wrappers)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def image_spans(ids: torch.Tensor, image_token_id: int, wrapper_ids=()) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of ``image_token_id`` in 1-D ``ids``, widened by one position on
    each side whose token is a wrapper id (Gemma-3 ``<start_of_image>`` / ``<end_of_image>``)."""
    ids = torch.as_tensor(ids).flatten().tolist()
    spans, i, n = [], 0, len(ids)
    while i < n:
        if ids[i] != image_token_id:
            i += 1
            continue
        j = i
        while j < n and ids[j] == image_token_id:
            j += 1
        a = i - 1 if i > 0 and ids[i - 1] in wrapper_ids else i
        b = j + 1 if j < n and ids[j] in wrapper_ids else j
        spans.append((a, b))
        i = j
    return spans


@dataclass
class ImagePrompt:
    """One image + prompt tokenised with the image, and the same ids with the image span removed."""

    input_ids: torch.Tensor               # [1, T] with the expanded image placeholder tokens
    spans: list[tuple[int, int]]          # dropped blocks [start, end), sorted
    text_ids: torch.Tensor                # [1, T - dropped]: the no-image branch
    kept: torch.Tensor                    # [T - dropped] with-image position of each text_ids token
    vision_inputs: dict = field(default_factory=dict)   # pixel_values (+ image_sizes ...)
    token_type_ids: torch.Tensor | None = None          # Gemma-3: marks the bidirectional image block
    prompt: str = ""                      # rendered prompt, one placeholder per image

    @property
    def n_image_tokens(self) -> int:
        return sum(b - a for a, b in self.spans)


def render_prompt(lm: LoadedVLM, prompt: str, *, chat: bool = True) -> str:
    """The prompt text with one image placeholder: the processor's chat template when it has one
    (user turn = image, then the prompt; generation prompt added), else ``"<image>\\n" + prompt``."""
    proc = lm.processor
    if chat and getattr(proc, "chat_template", None):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    token = getattr(proc, "boi_token", None) or proc.image_token
    return f"{token}\n{prompt}"


def encode(lm: LoadedVLM, image, prompt: str, *, chat: bool = True) -> ImagePrompt:
    """Tokenise ``image`` (a PIL image) + ``prompt`` with the model's processor; find the span."""
    text = render_prompt(lm, prompt, chat=chat)
    try:
        enc = lm.processor(images=[image], text=[text], return_tensors="pt")
    except (ValueError, TypeError, OSError) as exc:
        raise HeadscopeError(f"the processor could not encode the image + prompt: {_one_line(exc)}") from None
    ids = enc["input_ids"][:1].cpu()
    spans = image_spans(ids[0], lm.image_token_id, lm.wrapper_token_ids)
    if not spans:
        raise HeadscopeError("the encoded prompt holds no image tokens (does the chat template place the image?)")
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    for a, b in spans:
        keep[a:b] = False
    kept = torch.nonzero(keep).flatten()
    vision = {k: v for k, v in enc.items() if k not in _TEXT_KEYS}
    tt = enc.get("token_type_ids") if lm.vlm_type == "gemma3" else None
    return ImagePrompt(input_ids=ids, spans=spans, text_ids=ids[:, kept], kept=kept, vision_inputs=vision,
                       token_type_ids=None if tt is None else tt[:1].cpu(), prompt=text)


@torch.no_grad()
def encoder_outputs(lm: LoadedVLM, ip: ImagePrompt):
    """Vision tower + projector output for ``ip``'s image, computed once with the model's own
    (vision) attention. Pass it to ``feed``; the LM forwards then never run the vision tower."""
    dev, dtype = next(lm.model.parameters()).device, lm.model.dtype
    kw = {k: (v.to(dev, dtype) if k == "pixel_values" else v.to(dev)) if torch.is_tensor(v) else v
          for k, v in ip.vision_inputs.items()}
    return lm.model.model.get_image_features(**kw)


@contextlib.contextmanager
def feed(model, *, image_token_id: int | None = None, encoder_out=None, n_image_tokens: int = 0,
         position_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None):
    """Within the block, every forward of ``model`` (a ``*ForConditionalGeneration``) gets:

    - ``mm_encoder_outputs={"image": encoder_out}`` when it starts the sequence (no cached
      positions) and its ids hold the ``n_image_tokens`` image tokens; later (decode) steps get
      nothing, as in HF generation;
    - ``position_ids[:, past:past + T]`` instead of the caller's, when given ("preserve" positions),
      plus an all-ones 2-D attention mask if the caller passed none (see the comment inside);
    - ``token_type_ids`` at the prefill (Gemma-3's bidirectional image block).

    Calls whose ids hold only part of the image tokens (a chunked prefill splitting the image)
    raise ``HeadscopeError``. The hook is removed on exit, also after an exception.
    """

    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if args or ids is None:
            raise HeadscopeError("headscope.probe.vlm.feed expects keyword input_ids (as the probe passes them)")
        cache = kwargs.get(cache_kwarg(module))
        past = cache.get_seq_length() if cache is not None else 0
        T = ids.shape[1]
        if position_ids is not None:
            if past + T > position_ids.shape[-1]:
                raise HeadscopeError(f"preserved position ids cover {position_ids.shape[-1]} tokens, "
                                     f"the forward reaches {past + T}")
            kwargs["position_ids"] = position_ids[..., past:past + T].reshape(1, T).to(ids.device)
            if kwargs.get("attention_mask") is None:
                # without a 2-D mask, transformers reads a jump in position ids as the start of a
                # packed sequence and blocks attention across it; an all-ones mask keeps it causal
                kwargs["attention_mask"] = torch.ones(1, past + T, dtype=torch.long, device=ids.device)
        if encoder_out is not None and past == 0:
            n = int((ids == image_token_id).sum())
            if n and n != n_image_tokens:
                raise HeadscopeError(f"a forward holds {n} of the prompt's {n_image_tokens} image tokens "
                                     "(chunked prefill across the image is not supported)")
            if n:
                kwargs["mm_encoder_outputs"] = {"image": encoder_out}
                if token_type_ids is not None:
                    kwargs["token_type_ids"] = token_type_ids[:, :T].to(ids.device)
        return args, kwargs

    handle = model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def feed_image(lm: LoadedVLM, ip: ImagePrompt, encoder_out=None):
    """``feed`` for the with-image branch of ``ip`` (computes the encoder output if not given)."""
    if encoder_out is None:
        encoder_out = encoder_outputs(lm, ip)
    return feed(lm.model, image_token_id=lm.image_token_id, encoder_out=encoder_out,
                n_image_tokens=int((ip.input_ids == lm.image_token_id).sum()), token_type_ids=ip.token_type_ids)
