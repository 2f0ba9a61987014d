"""Measures of generated (or reconstructed) images that need nothing downloaded: the Fréchet distance on our own
CLIP's image features (FD-CLIP), the CLIP score of images against their captions, PSNR, and a grid of samples.

FD-CLIP is the FID formula (Heusel et al. 2017) on the image embeddings of a registered CLIP instead of
Inception-v3's pool features: Inception's weights cannot be downloaded here, and clean-fid, torch-fidelity and
torchmetrics all fetch them at first use. Its values are comparable between runs scored with the same CLIP
version, never with published FIDs.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance between Gaussians fitted to the rows of `a` and of `b` ([n, d] features):
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2).

    The trace of the matrix square root comes from the eigenvalues of the symmetric PSD product, so no
    scipy (sqrtm) is needed and the result is real even when a covariance is singular (fewer rows than d)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _psd_sqrt(s_a)
    product = root_a @ s_b @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def fd_clip(bundle: Any, real: Sequence[Any], generated: Sequence[Any]) -> float:
    """FD-CLIP between two image sets (PIL images, encoded bytes or HxWx3 arrays), on `bundle`'s (a
    `ClipBundle`) normalised image embeddings."""
    return frechet_distance(bundle.embed_images(list(real)), bundle.embed_images(list(generated)))


def clip_scores(bundle: Any, images: Sequence[Any], captions: Sequence[str]) -> np.ndarray:
    """Each image's CLIP score against its caption: 100 x the cosine of their embeddings, floored at 0
    (Hessel et al. 2021, as torchmetrics computes it)."""
    image = bundle.embed_images(list(images))
    text = bundle.embed_texts(list(captions))
    return np.maximum(100 * (image * text).sum(1), 0)


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of `other` against `reference`, both in [0, 1]: 10 log10(1 / MSE),
    over all pixels of all images."""
    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(other, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def grid(images: Sequence[Any], columns: int | None = None, pad: int = 2) -> Any:
    """The images (PIL, all one size) as one PIL image, row by row on a white background."""
    from PIL import Image

    columns = columns or max(1, math.ceil(math.sqrt(len(images))))
    rows = max(1, math.ceil(len(images) / columns))
    w, h = images[0].size if images else (1, 1)
    sheet = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, image in enumerate(images):
        sheet.paste(image.convert("RGB"), (pad + (i % columns) * (w + pad), pad + (i // columns) * (h + pad)))
    return sheet
