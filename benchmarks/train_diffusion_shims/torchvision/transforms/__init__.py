"""The transforms diffusers' train_text_to_image.py uses, on PIL images, as torchvision 0.2x computes them
(torchvision/transforms/transforms.py, functional.py and _functional_pil.py): Compose, Lambda, Resize,
CenterCrop, RandomCrop, RandomHorizontalFlip, ToTensor, Normalize, InterpolationMode. Tensors as inputs to
the geometric transforms are not supported (the script only passes PIL images)."""

from __future__ import annotations

import numbers
from enum import Enum
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps


class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_PIL_FILTERS = {
    InterpolationMode.NEAREST: Image.NEAREST,
    InterpolationMode.BILINEAR: Image.BILINEAR,
    InterpolationMode.BICUBIC: Image.BICUBIC,
    InterpolationMode.BOX: Image.BOX,
    InterpolationMode.HAMMING: Image.HAMMING,
    InterpolationMode.LANCZOS: Image.LANCZOS,
}


def _pil(img: Any) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise TypeError(f"this torchvision shim only transforms PIL images, got {type(img).__name__}")
    return img


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of a crop size given as an int or a 1- or 2-sequence."""
    if isinstance(size, numbers.Number):
        return int(size), int(size)
    if len(size) == 1:
        return int(size[0]), int(size[0])
    return int(size[0]), int(size[1])


class Compose:
    def __init__(self, transforms: Sequence[Callable[[Any], Any]]):
        self.transforms = list(transforms)

    def __call__(self, img: Any) -> Any:
        for t in self.transforms:
            img = t(img)
        return img


class Lambda:
    def __init__(self, lambd: Callable[[Any], Any]):
        if not callable(lambd):
            raise TypeError(f"Argument lambd should be callable, got {type(lambd).__name__}")
        self.lambd = lambd

    def __call__(self, img: Any) -> Any:
        return self.lambd(img)


class Resize:
    """An int size resizes the shorter side to it (the longer one to int(size * long / short)); a pair is
    (height, width). As torchvision: an image already of the output size is returned as is."""

    def __init__(self, size: int | Sequence[int], interpolation: InterpolationMode = InterpolationMode.BILINEAR,
                 max_size: int | None = None, antialias: bool | None = True):
        if isinstance(interpolation, int):
            interpolation = {v: k for k, v in _PIL_FILTERS.items()}[interpolation]
        if interpolation not in _PIL_FILTERS:
            raise ValueError(f"{interpolation} is not supported for PIL images")
        self.size, self.interpolation, self.max_size = size, interpolation, max_size

    def __call__(self, img: Any) -> Any:
        img = _pil(img)
        w, h = img.size
        if isinstance(self.size, int) or len(self.size) == 1:
            requested = self.size if isinstance(self.size, int) else self.size[0]
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = requested, int(requested * long / short)
            if self.max_size is not None and new_long > self.max_size:
                new_short, new_long = int(self.max_size * new_short / new_long), self.max_size
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            new_h, new_w = int(self.size[0]), int(self.size[1])
        if (new_h, new_w) == (h, w):
            return img
        return img.resize((new_w, new_h), _PIL_FILTERS[self.interpolation])


def _pad(img: Image.Image, left: int, top: int, right: int, bottom: int) -> Image.Image:
    """Zero padding of a PIL image (torchvision's constant fill 0)."""
    if left == top == right == bottom == 0:
        return img
    return ImageOps.expand(img, border=(left, top, right, bottom), fill=0)


class CenterCrop:
    def __init__(self, size: int | Sequence[int]):
        self.size = _pair(size)

    def __call__(self, img: Any) -> Any:
        img = _pil(img)
        crop_h, crop_w = self.size
        w, h = img.size
        if crop_w > w or crop_h > h:  # torchvision pads symmetrically with zeros, then crops
            pad_l, pad_t = (crop_w - w) // 2 if crop_w > w else 0, (crop_h - h) // 2 if crop_h > h else 0
            pad_r, pad_b = (crop_w - w + 1) // 2 if crop_w > w else 0, (crop_h - h + 1) // 2 if crop_h > h else 0
            img = _pad(img, pad_l, pad_t, pad_r, pad_b)
            w, h = img.size
            if (crop_h, crop_w) == (h, w):
                return img
        top, left = int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0))
        return img.crop((left, top, left + crop_w, top + crop_h))


class RandomCrop:
    """Without padding (the script gives none): the offsets drawn with torch.randint, as torchvision."""

    def __init__(self, size: int | Sequence[int], padding: Any = None, pad_if_needed: bool = False, fill: int = 0,
                 padding_mode: str = "constant"):
        if padding is not None or pad_if_needed:
            raise NotImplementedError("this torchvision shim's RandomCrop does not pad")
        self.size = _pair(size)

    def __call__(self, img: Any) -> Any:
        img = _pil(img)
        th, tw = self.size
        w, h = img.size
        if h < th or w < tw:
            raise ValueError(f"Required crop size {(th, tw)} is larger than input image size {(h, w)}")
        if (h, w) == (th, tw):
            return img
        i = torch.randint(0, h - th + 1, size=(1,)).item()
        j = torch.randint(0, w - tw + 1, size=(1,)).item()
        return img.crop((j, i, j + tw, i + th))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img: Any) -> Any:
        if torch.rand(1) < self.p:
            return _pil(img).transpose(Image.FLIP_LEFT_RIGHT)
        return img


class ToTensor:
    """A PIL image of 8-bit channels as a float [C, H, W] tensor in [0, 1]."""

    def __call__(self, pic: Any) -> torch.Tensor:
        pic = _pil(pic)
        if pic.mode == "1":
            array = 255 * np.array(pic, np.uint8, copy=True)
        elif pic.mode in ("L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LA", "LAB", "HSV"):
            array = np.array(pic, np.uint8, copy=True)
        else:
            raise NotImplementedError(f"this torchvision shim's ToTensor does not take {pic.mode} images")
        img = torch.from_numpy(array).view(pic.size[1], pic.size[0], len(pic.getbands()))
        return img.permute((2, 0, 1)).contiguous().to(dtype=torch.get_default_dtype()).div(255)


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float], inplace: bool = False):
        self.mean, self.std, self.inplace = mean, std, inplace

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.inplace:
            tensor = tensor.clone()
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype, device=tensor.device)
        std = torch.as_tensor(self.std, dtype=tensor.dtype, device=tensor.device)
        if (std == 0).any():
            raise ValueError(f"std evaluated to zero after conversion to {tensor.dtype}, leading to division by zero.")
        if mean.ndim == 1:
            mean = mean.view(-1, 1, 1)
        if std.ndim == 1:
            std = std.view(-1, 1, 1)
        return tensor.sub_(mean).div_(std)


__all__ = ["CenterCrop", "Compose", "InterpolationMode", "Lambda", "Normalize", "RandomCrop", "RandomHorizontalFlip",
           "Resize", "ToTensor"]
