"""The aligned backbone's feature module and image transform (no Prismatic import).

Features are what MaskEmbed trained the encoder to produce and what the paper's VLMs use: the last
block's output after the (re-trained) final norm, prefix tokens kept, with the soft-capped
attention the encoder was trained with. That is 577 x 1024 for CLIP-L/14@336 (CLS + 24²) and
729 x 1152 for SigLIP-SO400M/14@384 (27², no CLS). Stock Prismatic backbones instead take the
second-to-last block without norm and drop the prefix tokens.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch.nn as nn
import torchvision.transforms.functional as TVF
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from ..checkpoint import CheckpointError, load_aligned
from .projector import ProjectorInit, projector_init

RESIZE_STRATEGIES = ("resize-naive", "resize-crop", "letterbox")


def load_featurizer(checkpoint_dir: str | os.PathLike, image_size: int | None = None,
                    attn_impl: str = "math") -> tuple[nn.Module, ProjectorInit, dict]:
    """The aligned encoder as a frozen featurizer, plus what the DecoderProjector is built from.

    ``featurizer(x)`` runs ``forward_features``: the forward is re-bound on the instance (as Prismatic
    does) because FSDP only gathers a wrapped module's parameters when its ``__call__`` runs.
    The encoder's head (and fc_norm) move to the projector; the featurizer keeps none of them.
    `attn_impl` "math" is the reference's exact, compile-free soft-capped attention.
    """
    aligned = load_aligned(checkpoint_dir, attn_impl=attn_impl)
    spec = aligned.spec
    if image_size is not None and spec.img_size != image_size:
        raise CheckpointError(
            f"{checkpoint_dir}/config.json: encoder.img_size is {spec.img_size}, but this backbone id expects {image_size}"
        )
    init = projector_init(aligned)
    featurizer = aligned.encoder
    featurizer.head = nn.Identity()
    featurizer.fc_norm = nn.Identity()
    featurizer.forward = featurizer.forward_features
    featurizer.requires_grad_(False).eval()
    return featurizer, init, aligned.config


@dataclass
class LetterboxPad:
    """Pad a PIL image to a square with a constant fill (the backbone's mean colour)."""

    fill: tuple[int, int, int]

    def __call__(self, image: Image.Image) -> Image.Image:
        (w, h), side = image.size, max(image.size)
        left, top = (side - w) // 2, (side - h) // 2
        return TVF.pad(image, [left, top, side - w - left, side - h - top], fill=self.fill, padding_mode="constant")


def image_transform(image_size: int, mean: Sequence[float], std: Sequence[float], strategy: str,
                    interpolation: str = "bicubic") -> Compose:
    """PIL image -> normalised (3, S, S) tensor, honouring Prismatic's resize strategies.

    A torchvision ``Compose`` (vlm-evaluation checks for one). Every strategy ends at exactly S x S:
    ``resize-naive`` squashes, ``resize-crop`` resizes the short side and centre-crops,
    ``letterbox`` pads to a square with the mean colour first.
    """
    interp = InterpolationMode(interpolation)
    size = (image_size, image_size)
    tail = [ToTensor(), Normalize(mean=list(mean), std=list(std))]
    if strategy == "resize-naive":
        return Compose([Resize(size, interpolation=interp), *tail])
    if strategy == "resize-crop":
        return Compose([Resize(image_size, interpolation=interp), CenterCrop(size), *tail])
    if strategy == "letterbox":
        fill = tuple(int(m * 255) for m in mean)
        return Compose([LetterboxPad(fill), Resize(size, interpolation=interp), *tail])
    raise ValueError(f"image_resize_strategy '{strategy}' is not supported ({' | '.join(RESIZE_STRATEGIES)})")
