"""A tiny CLIP trained here in seconds on drawn shapes ("a red circle"), for the curation and serving tests.

Nothing comes from the Hugging Face hub: a word-level tokenizer of the caption words, the `tiny` preset of
`pipelines.train.clip_model`, and a plain contrastive loop (CLIP's symmetric InfoNCE).
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")
PAIRS = list(itertools.product(COLOURS, SHAPES))  # 12 captions
EOS = "</s>"


def draw(colour: str, shape: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One shape of one colour on a light grey background, at a random place and size."""
    image = Image.new("RGB", (size, size), (235, 235, 235))
    pen = ImageDraw.Draw(image)
    r = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return image


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def samples(n: int, seed: int) -> list[tuple[Image.Image, str]]:
    """n (image, caption) pairs cycling through every colour and shape."""
    rng = np.random.default_rng(seed)
    return [(draw(c, s, rng), f"a {c} {s}") for c, s in (PAIRS[i % len(PAIRS)] for i in range(n))]


def tokenizer() -> object:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["a", *COLOURS, *SHAPES, "photo", "of", "dog", "cat"]
    vocab = {EOS: 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(EOS, "isolated"), pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token="[UNK]")


def train_tiny_clip(folder: Path, steps: int = 500, batch: int = 32, seed: int = 0) -> Path:
    """Train the tiny CLIP on drawn shapes and save it to `folder` (ClipBundle.save); return the folder."""
    import torch

    from pipelines.train.clip_model import ClipBundle, ClipModelConfig, build_clip, image_processor

    config = ClipModelConfig(preset="tiny", image_size=32, patch_size=8, max_text_len=8)
    tok = tokenizer()
    bundle = ClipBundle(build_clip(config, tok, seed), tok, image_processor(config.image_size), config.max_text_len)
    data = samples(480, seed)
    pixels = bundle.pixels([im for im, _ in data])
    text = bundle.tokenize([c for _, c in data])
    labels = torch.tensor([PAIRS.index(tuple(c.split()[1:])) for _, c in data])
    model = bundle.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only waits on a second thread, more so on a busy machine
    try:
        for _ in range(steps):
            idx = torch.randperm(len(labels), generator=gen)[:batch]
            logits = model(input_ids=text["input_ids"][idx], attention_mask=text["attention_mask"][idx],
                           pixel_values=pixels[idx]).logits_per_image
            # Several rows of a batch share a caption: every row with the same caption is a positive.
            same = (labels[idx][:, None] == labels[idx][None, :]).float()
            target = same / same.sum(1, keepdim=True)
            per_image, per_text = (target * logits.log_softmax(1)).sum(1), (target * logits.T.log_softmax(1)).sum(1)
            loss = -(per_image.mean() + per_text.mean()) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    bundle.save(folder)
    return folder
