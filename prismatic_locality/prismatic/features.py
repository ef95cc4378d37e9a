"""The aligned backbone's feature module and image transform (no Prismatic import).

Features are what MaskEmbed trained the encoder to produce and what the paper's VLMs use: the last
block's output after the (re-trained) final norm, prefix tokens kept, with the soft-capped
attention the encoder was trained with. That is 577 x 1024 for CLIP-L/14@336 (CLS + 24²) and
729 x 1152 for SigLIP-SO400M/14@384 (27², no CLS). Stock Prismatic backbones instead take the
second-to-last block without norm and drop the prefix tokens (`load_stock_featurizer`, for the
baselines Prismatic lacks). The transforms reproduce Prismatic's own, pixel for pixel.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import timm
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


def load_stock_featurizer(timm_name: str, image_size: int, pretrained: bool = True, **timm_kwargs) -> nn.Module:
    """An un-aligned timm ViT as a featurizer with Prismatic's stock features (for `stock.StockViTBackbone`).

    Prismatic's `TimmViTBackbone` takes the second-to-last block's output, without the final norm,
    patch tokens only (``get_intermediate_layers(n={depth - 2})``). This is the same through timm's
    ``forward_intermediates`` (timm >= 1.0), which every timm ViT family has, Eva included. The
    forward is re-bound on the instance, as Prismatic does, for FSDP.
    """
    model = timm.create_model(timm_name, pretrained=pretrained, num_classes=0, img_size=image_size, **timm_kwargs)
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "blocks"):
        raise ValueError(f"timm model '{timm_name}' has no forward_intermediates/blocks (timm {timm.__version__}; needs timm>=1.0)")
    index = len(model.blocks) - 2

    def second_to_last_block(pixel_values):
        return model.forward_intermediates(pixel_values, indices=[index], norm=False, stop_early=True,
                                           output_fmt="NLC", intermediates_only=True)[0]

    model.forward = second_to_last_block
    return model.eval()


@dataclass
class LetterboxPad:
    """Pad a PIL image towards a square with a constant fill (the backbone's mean colour).

    Exactly Prismatic's own padding: ``(max - side) // 2`` pixels on *both* sides, so an odd difference
    leaves the image one pixel short of square (40 x 19 -> 40 x 39); the resize and centre crop that
    follow in `image_transform` make it S x S.
    """

    fill: tuple[int, int, int]

    def __call__(self, image: Image.Image) -> Image.Image:
        (w, h), side = image.size, max(image.size)
        pad_w, pad_h = (side - w) // 2, (side - h) // 2
        return TVF.pad(image, [pad_w, pad_h, pad_w, pad_h], fill=self.fill, padding_mode="constant")


def prismatic_crop_pct(timm_name: str, default: float = 1.0) -> float:
    """The crop fraction Prismatic's ``resize-crop``/``letterbox`` transforms use for a timm model.

    Prismatic takes timm's eval transform (resize the short side to ``floor(S / crop_pct)``, centre-crop
    S), except that it resizes SigLIP and IN1k models straight to S. `timm_name` is the full name with
    its pretrained tag (crop_pct is per tag: 0.9 for CLIP-B/16 ``.openai``, 1.0 for CLIP-L/14@336);
    `default` is used for a name timm does not know.
    """
    if "siglip" in timm_name or "in1k" in timm_name:
        return 1.0
    cfg = timm.models.get_pretrained_cfg(timm_name)
    return float(cfg.crop_pct) if cfg is not None and cfg.crop_pct else default


def image_transform(image_size: int, mean: Sequence[float], std: Sequence[float], strategy: str,
                    interpolation: str = "bicubic", crop_pct: float = 1.0) -> Compose:
    """PIL image -> normalised (3, S, S) tensor: Prismatic's resize strategies, pixel for pixel.

    A torchvision ``Compose`` (vlm-evaluation checks for one). ``resize-naive`` squashes to S x S;
    ``resize-crop`` resizes the short side to ``floor(S / crop_pct)`` and centre-crops S (timm's eval
    transform; see `prismatic_crop_pct`); ``letterbox`` pads with the mean colour first (`LetterboxPad`),
    then does the same.
    """
    interp = InterpolationMode(interpolation)
    size = (image_size, image_size)
    tail = [ToTensor(), Normalize(mean=list(mean), std=list(std))]
    crop = [Resize(math.floor(image_size / crop_pct), interpolation=interp), CenterCrop(size)]
    if strategy == "resize-naive":
        return Compose([Resize(size, interpolation=interp), *tail])
    if strategy == "resize-crop":
        return Compose([*crop, *tail])
    if strategy == "letterbox":
        fill = tuple(int(m * 255) for m in mean)
        return Compose([LetterboxPad(fill), *crop, *tail])
    raise ValueError(f"image_resize_strategy '{strategy}' is not supported ({' | '.join(RESIZE_STRATEGIES)})")
