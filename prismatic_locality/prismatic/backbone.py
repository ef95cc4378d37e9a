"""`AlignedViTBackbone`: an aligned checkpoint as a Prismatic `VisionBackbone` (imports Prismatic)."""
from __future__ import annotations

from functools import partial
from typing import Callable, Tuple

import torch
from prismatic.models.backbones.vision import VisionBackbone
from timm.models.vision_transformer import Block
from torch.distributed.fsdp.wrap import _module_wrap_policy, _or_policy, transformer_auto_wrap_policy

from .. import vit as V
from .features import image_transform, load_featurizer, prismatic_crop_pct
from .projector import DecoderProjector
from .weights import require_timm, resolve_checkpoint


class TimmFeaturizerBackbone(VisionBackbone):
    """What our Prismatic backbones share: a timm featurizer (any family `vit.py` handles) whose
    forward is the features, its facts from `vit_spec`, and the FSDP policy (each block, the whole
    featurizer, and the given adapter classes). Subclasses set ``featurizer``, ``spec`` and ``dtype``."""

    def fsdp_policy(self, *module_classes: type) -> Callable:
        vit = partial(_module_wrap_policy, module_classes={type(self.featurizer), *module_classes})
        blocks = partial(transformer_auto_wrap_policy, transformer_layer_cls={Block, *V.block_classes(self.featurizer)})
        return partial(_or_policy, policies=[vit, blocks])

    def get_fsdp_wrapping_policy(self) -> Callable:
        return self.fsdp_policy()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.featurizer(pixel_values)

    @property
    def default_image_resolution(self) -> Tuple[int, int, int]:
        return (3, self.default_image_size, self.default_image_size)

    @property
    def embed_dim(self) -> int:
        return self.featurizer.embed_dim

    @property
    def num_patches(self) -> int:
        return self.spec.num_patches

    @property
    def half_precision_dtype(self) -> torch.dtype:
        return self.dtype


class AlignedViTBackbone(TimmFeaturizerBackbone):
    """Frozen aligned ViT: last block, final norm, prefix tokens kept (see `features.py`).

    Weights come from the id alone (`weights.resolve_checkpoint`), so `prismatic.load()` rebuilds it
    from a run's config.json. ``projector_init`` holds the trained decoder for the DecoderProjector.
    """

    def __init__(self, vision_backbone_id: str, image_resize_strategy: str, default_image_size: int = 224) -> None:
        super().__init__(vision_backbone_id, image_resize_strategy, default_image_size=default_image_size)
        self.dtype = torch.bfloat16  # Prismatic casts the frozen backbone to this; "full-finetune" resets it to fp32
        require_timm(vision_backbone_id)  # SigLIP 2 / PE-Core need a newer timm than Prismatic's pin
        self.checkpoint_dir = resolve_checkpoint(vision_backbone_id)
        self.featurizer, self.projector_init, self.aligned_config = load_featurizer(self.checkpoint_dir, default_image_size)
        self.spec = V.vit_spec(self.featurizer)  # any family the adapter supports (VisionTransformer, Eva, NaFlexVit)
        cfg = self.featurizer.pretrained_cfg  # the checkpoint's mean/std on top of timm's defaults for the arch
        crop_pct = prismatic_crop_pct(self.aligned_config["encoder"]["pretrained_tag"], cfg.get("crop_pct") or 1.0)
        self.image_transform = image_transform(default_image_size, cfg["mean"], cfg["std"], image_resize_strategy,
                                               interpolation=cfg.get("interpolation") or "bicubic", crop_pct=crop_pct)

    def get_fsdp_wrapping_policy(self) -> Callable:
        """Wrap each ViT block (the featurizer's own block class: timm Block, EvaBlock, ...), the whole
        featurizer, and the DecoderProjector.

        PrismaticVLM applies the union of all policies to every module of the VLM, and its own
        projector policy only knows the stock projectors, so the DecoderProjector is named here
        (its timm Blocks are caught by the Block rule, too).
        """
        return self.fsdp_policy(DecoderProjector)

    @property
    def num_prefix_tokens(self) -> int:
        return self.spec.num_prefix_tokens

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def num_heads(self) -> int:
        return self.spec.num_heads
