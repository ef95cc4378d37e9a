"""Image transforms with explicit randomness.

Every random choice is drawn from a `numpy.random.Generator` passed in by the caller, which the
dataset seeds from (seed, epoch, sample index). An image's augmentation therefore does not depend
on the DataLoader worker that happens to load it, the world size, or where a resumed run restarted.

- `RKRC`: the reference's ``rkrc`` train crop (timm ``ResizeKeepRatio`` with random zoom/aspect +
  ``CenterCropOrPad(padding_mode='reflect')``; docs/align.md, Data), written with torchvision ops because
  timm 0.9.10 has neither the random zoom/aspect nor reflect padding, and timm draws from the
  global `random` module.
- `EvalTransform`: resize the shorter side to size / crop_pct, centre crop (timm's eval transform).

Both first centre-crop an image whose long side exceeds `MAX_ASPECT` x its short side
(`crop_extreme_aspect`): resizing the short side to the model's resolution would otherwise blow the
long side up with it (a 1 x 400000 px image became a 224 x 90M px intermediate). Both transforms keep
only a central square of about the short side, so the crop changes no output content beyond
resampling detail; ordinary images are untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

_INTERP = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
MAX_ASPECT = 10.0  # long side / short side beyond which an image is centre-cropped before resizing


def is_extreme_aspect(img: Image.Image, max_aspect: float = MAX_ASPECT) -> bool:
    w, h = img.size
    return max(w, h) > max_aspect * min(w, h)


def crop_extreme_aspect(img: Image.Image, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Centre-crop the long side to `max_aspect` x the short side (a no-op for ordinary images)."""
    if not is_extreme_aspect(img, max_aspect):
        return img
    w, h = img.size
    if w > h:
        keep = math.floor(max_aspect * h)
        return img.crop(((w - keep) // 2, 0, (w - keep) // 2 + keep, h))
    keep = math.floor(max_aspect * w)
    return img.crop((0, (h - keep) // 2, w, (h - keep) // 2 + keep))


def to_normalized_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    return TF.normalize(TF.to_tensor(img), list(mean), list(std))


def center_crop_or_pad(img: Image.Image, size: int) -> Image.Image:
    """Reflect-pad to at least size x size (split evenly, extra pixel right/bottom), then centre crop."""
    w, h = img.size
    pw, ph = max(size - w, 0), max(size - h, 0)
    if pw or ph:
        img = TF.pad(img, [pw // 2, ph // 2, (pw + 1) // 2, (ph + 1) // 2], padding_mode="reflect")
    return TF.center_crop(img, [size, size])


@dataclass
class RKRC:
    """Resize keeping the ratio (shorter side = size), then with p=0.5 zoom in by 1/sqrt(U(scale))
    and with p=0.5 distort the aspect by sqrt(exp(U(log ratio))) split over H and W; random
    bilinear/bicubic; centre crop (reflect-pad if smaller); horizontal flip; normalise."""

    size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (0.75, 4.0 / 3.0)
    hflip: float = 0.5
    interpolation: str = "random"
    scale_prob: float = 0.5
    aspect_prob: float = 0.5

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        return to_normalized_tensor(self.crop(img, rng), self.mean, self.std)

    def crop(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """The geometric part (zoom, aspect, crop or pad, flip) as a PIL image, before normalising."""
        # Draw every number unconditionally: a fixed number of draws per image keeps it easy to reason about.
        u = rng.random(7)
        img = crop_extreme_aspect(img)
        w, h = img.size
        base = min(h, w) / self.size
        fh = fw = 1.0
        if u[0] < self.scale_prob:
            fh = fw = 1.0 / math.sqrt(self.scale[0] + u[1] * (self.scale[1] - self.scale[0]))
        if u[2] < self.aspect_prob:
            lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
            a = math.sqrt(math.exp(lo + u[3] * (hi - lo)))
            fh, fw = fh / a, fw * a
        new_hw = [max(1, round(h * fh / base)), max(1, round(w * fw / base))]
        mode = self.interpolation if self.interpolation != "random" else ("bilinear" if u[4] < 0.5 else "bicubic")
        img = TF.resize(img, new_hw, interpolation=_INTERP[mode])
        img = center_crop_or_pad(img, self.size)
        if u[5] < self.hflip:
            img = TF.hflip(img)
        return img


@dataclass
class EvalTransform:
    """timm's eval transform: shorter side to floor(size / crop_pct), centre crop, normalise."""

    size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    crop_pct: float = 1.0
    interpolation: str = "bicubic"

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        return to_normalized_tensor(self.crop(img), self.mean, self.std)

    def crop(self, img: Image.Image, rng: np.random.Generator | None = None) -> Image.Image:
        """The resize and centre crop as a PIL image, before normalising."""
        resize = math.floor(self.size / self.crop_pct)
        img = crop_extreme_aspect(img)
        img = TF.resize(img, resize, interpolation=_INTERP.get(self.interpolation, InterpolationMode.BICUBIC))
        return TF.center_crop(img, [self.size, self.size])


__all__ = ["RKRC", "EvalTransform", "to_normalized_tensor", "crop_extreme_aspect", "is_extreme_aspect", "MAX_ASPECT"]
