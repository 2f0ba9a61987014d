"""CLIP-style image-text models: built from a config (transformers' CLIP classes, no weights downloaded),
kept as Hugging Face folders (model, tokenizer, image processor), and used to embed images and captions.

This is the shared core: training (`pipelines/train/clip.py`), the curation steps that score or dedupe
with a CLIP model, and serving all load a model with `load_clip` and embed with its `ClipBundle`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from pipelines.errors import PipelineError
from pipelines.train.clip_config import ClipModelConfig

# CLIP's normalisation of pixel values (OpenAI's; open_clip and DataComp use the same).
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

# Tower sizes by preset: (hidden, layers, heads, mlp) for the vision and the text tower, and the shared
# embedding size. `base` is ViT-B/16's shape.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"vision": (64, 2, 2, 256), "text": (64, 2, 2, 256), "projection_dim": 64},
    "small": {"vision": (256, 4, 4, 1024), "text": (256, 4, 4, 1024), "projection_dim": 256},
    "base": {"vision": (768, 12, 12, 3072), "text": (512, 12, 8, 2048), "projection_dim": 512},
}


def clip_config(config: ClipModelConfig, vocab_size: int, eos_token_id: int, pad_token_id: int) -> Any:
    """transformers' CLIPConfig for `config` and a tokenizer of `vocab_size` tokens."""
    from transformers import CLIPConfig

    if config.image_size % config.patch_size:
        raise PipelineError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
    preset = PRESETS[config.preset]
    (vh, vl, va, vm), (th, tl, ta, tm) = preset["vision"], preset["text"]
    return CLIPConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": th, "num_hidden_layers": tl, "num_attention_heads": ta,
                     "intermediate_size": tm, "max_position_embeddings": config.max_text_len,
                     # pooled at the first eos of each caption (pad is eos too, so that is the caption's end)
                     "eos_token_id": eos_token_id, "bos_token_id": eos_token_id, "pad_token_id": pad_token_id},
        vision_config={"hidden_size": vh, "num_hidden_layers": vl, "num_attention_heads": va, "intermediate_size": vm,
                       "image_size": config.image_size, "patch_size": config.patch_size},
        projection_dim=preset["projection_dim"])


def build_clip(config: ClipModelConfig, tokenizer: Any, seed: int = 0) -> Any:
    """A freshly initialised CLIPModel for `config`, sized to `tokenizer`."""
    import torch
    from transformers import CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(clip_config(config, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id))


def image_processor(image_size: int) -> Any:
    """transformers' CLIPImageProcessor for square `image_size` inputs (shorter side resized, centre crop)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              image_mean=IMAGE_MEAN, image_std=IMAGE_STD, do_convert_rgb=True)


def as_image(image: Any) -> Any:
    """A PIL RGB image from a PIL image, encoded bytes or an HxWx3 array."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(image)))
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return image.convert("RGB")


@dataclass
class ClipBundle:
    """A CLIP model with what it needs to embed: its caption tokenizer and image processor."""

    model: Any  # transformers CLIPModel
    tokenizer: Any  # PreTrainedTokenizerFast
    processor: Any  # CLIPImageProcessor
    max_text_len: int

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> dict[str, Any]:
        """Captions as input_ids/attention_mask, each ending in eos (where the text tower pools)."""
        eos = self.tokenizer.eos_token
        return self.tokenizer([t + eos for t in texts], padding="max_length", truncation=True,
                              max_length=self.max_text_len, return_tensors="pt")

    def pixels(self, images: Iterable[Any]) -> Any:
        return self.processor(images=[as_image(i) for i in images], return_tensors="pt")["pixel_values"]

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """L2-normalised caption embeddings, one row per text."""
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = {k: v.to(self.device) for k, v in self.tokenize(texts[start:start + batch_size]).items()}
                features = _unwrap(self.model.get_text_features(**batch))
                out.append(torch.nn.functional.normalize(features, dim=-1).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.config.projection_dim), np.float32)

    def embed_images(self, images: Sequence[Any], batch_size: int = 256) -> np.ndarray:
        """L2-normalised image embeddings, one row per image (PIL images, encoded bytes or arrays)."""
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                pixels = self.pixels(images[start:start + batch_size]).to(self.device)
                features = _unwrap(self.model.get_image_features(pixel_values=pixels))
                out.append(torch.nn.functional.normalize(features, dim=-1).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.config.projection_dim), np.float32)

    def save(self, folder: str | Path) -> None:
        """As a Hugging Face folder: config + safetensors, tokenizer, preprocessor_config.json."""
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        self.processor.save_pretrained(folder)


def _unwrap(output: Any) -> Any:
    """transformers 5 returns model outputs from get_*_features; older versions a tensor."""
    return getattr(output, "pooler_output", output)


def load_clip(source: str, device: str | None = None) -> ClipBundle:
    """The CLIP model at `source`: a Hugging Face folder, or a registered `models:/NAME@ALIAS` (or `/VERSION`)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    folder = source
    if source.startswith("models:/"):
        from pipelines.train.registry import clip_folder

        folder = clip_folder(source)
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise PipelineError(f"{source}: not a CLIP model folder (no config.json)")
    model = CLIPModel.from_pretrained(path)
    if model.config.model_type != "clip":
        raise PipelineError(f"{source}: a {model.config.model_type} model, not CLIP")
    model.eval().to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return ClipBundle(model=model, tokenizer=PreTrainedTokenizerFast.from_pretrained(path),
                      processor=CLIPImageProcessor.from_pretrained(path),
                      max_text_len=model.config.text_config.max_position_embeddings)
