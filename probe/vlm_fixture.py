"""A LLaVA-architecture test model built offline: random small CLIP tower + random projector + a
real language model (default: SmolLM2-135M-Instruct, grafted with all its weights).

No VLM with real weights installs offline (docs/vhd.md), so VHD code paths are exercised on this
fixture. What it can show: that image tokens are spliced in at the detected span, that capture and
interventions act on the real LM's heads with and without the image, and that the text side
(chat format, generation, EOS) is the real model's. What it cannot show: anything about visual
grounding or hallucination. The tower never saw an image, so its features are a fixed random
function of the pixels and the LM has never been trained to read them.

Build (deterministic for a given seed and torch version)::

    python -m headscope.probe.vlm_fixture --out DIR [--seed 0] [--model smollm2-135m]

Layout: ``LlavaForConditionalGeneration`` with a 4-layer CLIP vision tower (224 px, patch 32: 7x7 = 49
image tokens after dropping CLS, ``vision_feature_layer=-2``), a GELU MLP projector, and the LM. The
tokenizer gains one special token ``<image>`` (the embedding matrix grows by one row, set to the mean
embedding; it is replaced by image features in every forward). The projector's output is rescaled
so that image tokens have the LM's mean token-embedding norm on a fixed test card (for the default
fixture the factor is about 1.4), so image tokens are neither ignorable nor overwhelming. The directory is written to a temporary sibling first
and renamed into place, so a crash leaves no half-written fixture.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from headscope.errors import HeadscopeError

IMAGE_TOKEN = "<image>"
FIXTURE_MARKER = "headscope_fixture.json"

# SmolLM2's ChatML template (same default system prompt), extended with image parts
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def reference_image(size: int):
    """A fixed RGB test card (gradients + a disc), used to calibrate the projector scale."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    img = np.stack([x, y, 1 - x * y], -1)
    img[(x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.08] = (1.0, 0.2, 0.1)
    return Image.fromarray((img * 255).astype(np.uint8))


def build_llava(text_model, tokenizer, out: str | os.PathLike, *, seed: int = 0, image_size: int = 224,
                patch_size: int = 32, vision_layers: int = 4, vision_hidden: int = 256, vision_heads: int = 4,
                vision_intermediate: int = 1024, chat_template: str = CHATML_TEMPLATE,
                match_norm: bool = True, source: str = "") -> Path:
    """Write a LLaVA model around ``text_model`` (a HF causal LM, e.g. LlamaForCausalLM) to ``out``.

    The LM's weights are copied exactly (the embedding gains the ``<image>`` row); the vision tower
    and projector are random from ``torch.manual_seed(seed)``. Returns the directory. Refuses to
    overwrite an existing non-empty ``out``.
    """
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise HeadscopeError(f"{out} exists and is not empty; choose another --out")
    if image_size % patch_size:
        raise HeadscopeError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
    tok = copy.deepcopy(tokenizer)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text_cfg = copy.deepcopy(text_model.config)
    old_vocab = text_model.get_input_embeddings().weight.shape[0]
    text_cfg.vocab_size = max(len(tok), old_vocab)
    vision_cfg = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_intermediate,
                                  num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                                  image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden)
    tied = bool(getattr(text_model.config, "tie_word_embeddings", False))
    cfg = LlavaConfig(vision_config=vision_cfg, text_config=text_cfg, image_token_id=image_id,
                      projector_hidden_act="gelu", vision_feature_layer=-2,
                      vision_feature_select_strategy="default", tie_word_embeddings=tied)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    vlm = LlavaForConditionalGeneration(cfg).eval()

    # graft the language model: every tensor copied, the embedding extended by the mean row
    sd = {k: v.detach().clone() for k, v in text_model.model.state_dict().items()}
    emb = sd["embed_tokens.weight"]
    if text_cfg.vocab_size > old_vocab:
        extra = emb.mean(0, keepdim=True).expand(text_cfg.vocab_size - old_vocab, -1)
        sd["embed_tokens.weight"] = torch.cat([emb, extra])
    missing, unexpected = vlm.model.language_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise HeadscopeError(f"grafting the LM failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        vlm.lm_head.weight = vlm.model.language_model.embed_tokens.weight
    else:
        head = text_model.get_output_embeddings().weight.detach()
        rows = torch.cat([head, head.mean(0, keepdim=True).expand(text_cfg.vocab_size - old_vocab, -1)])
        vlm.lm_head.weight.data.copy_(rows)

    image_proc = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                       crop_size={"height": image_size, "width": image_size},
                                       image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy="default", chat_template=chat_template,
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    scale = 1.0
    if match_norm:
        with torch.no_grad():
            pix = image_proc(images=reference_image(image_size), return_tensors="pt")["pixel_values"]
            feats = torch.cat(list(vlm.model.get_image_features(pixel_values=pix).pooler_output))
            target = emb.norm(dim=-1).mean()
            scale = float(target / feats.norm(dim=-1).mean())
            proj = vlm.model.multi_modal_projector.linear_2
            proj.weight.mul_(scale)
            proj.bias.mul_(scale)
    gen_cfg = getattr(text_model, "generation_config", None)
    if gen_cfg is not None:
        vlm.generation_config = copy.deepcopy(gen_cfg)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        vlm.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        meta = {"kind": "headscope VLM test fixture (random vision tower; scores exercise code paths only)",
                "seed": seed, "source_lm": source, "image_token": IMAGE_TOKEN, "image_token_id": image_id,
                "image_size": image_size, "patch_size": patch_size, "vision_layers": vision_layers,
                "vision_hidden": vision_hidden, "n_image_tokens": (image_size // patch_size) ** 2,
                "projector_scale": scale, "torch": torch.__version__}
        (tmp / FIXTURE_MARKER).write_text(json.dumps(meta, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def build_fixture(out: str | os.PathLike, *, seed: int = 0, model: str = "smollm2-135m") -> Path:
    """The standard fixture: ``build_llava`` around a registry (or local) text model, default SmolLM2."""
    from .models import load_model

    lm = load_model(model)
    return build_llava(lm.model, lm.tokenizer, out, seed=seed, source=lm.name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m headscope.probe.vlm_fixture",
                                description="Write the LLaVA test fixture (random CLIP tower + projector + real LM).")
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--seed", type=int, default=0, help="seed of the random vision tower and projector")
    p.add_argument("--model", default="smollm2-135m", help="language model: registry name or local directory")
    args = p.parse_args(argv)
    try:
        path = build_fixture(args.out, seed=args.seed, model=args.model)
    except HeadscopeError as e:
        print(f"headscope: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
