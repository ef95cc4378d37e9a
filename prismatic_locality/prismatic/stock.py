"""`StockViTBackbone`: un-aligned baselines Prismatic does not ship (SigLIP 2, PE-Core) as Prismatic
`VisionBackbone`s (imports Prismatic).

Prismatic's own `TimmViTBackbone` cannot build them: their timm tags need timm >= 1.0.15/1.0.16,
where its ``get_intermediate_layers`` call returns a list it does not unpack
(TRI-ML/prismatic-vlms#34), and PE-Core is timm's ``Eva`` class, which it rejects. This class keeps
its contract, its features (second-to-last block, no final norm, patch tokens only; see
`features.load_stock_featurizer`) and its image transforms, so a ``baseline-<family>+7b`` run differs
from Prismatic's stock baselines only in the teacher.
"""
from __future__ import annotations

import torch

from .. import vit as V
from .backbone import TimmFeaturizerBackbone
from .features import image_transform, load_stock_featurizer, prismatic_crop_pct
from .weights import STOCK_BACKBONES, require_timm


class StockViTBackbone(TimmFeaturizerBackbone):
    """A pretrained timm ViT from `weights.STOCK_BACKBONES`, used as Prismatic uses its own."""

    def __init__(self, vision_backbone_id: str, image_resize_strategy: str, default_image_size: int = 224) -> None:
        super().__init__(vision_backbone_id, image_resize_strategy, default_image_size=default_image_size)
        require_timm(vision_backbone_id)
        self.timm_name = STOCK_BACKBONES[vision_backbone_id].timm_name
        self.dtype = torch.bfloat16
        self.featurizer = load_stock_featurizer(self.timm_name, default_image_size)
        self.spec = V.vit_spec(self.featurizer, strict=False)  # grid and prefix tokens of any timm ViT family
        cfg = self.featurizer.pretrained_cfg
        self.image_transform = image_transform(
            default_image_size, cfg["mean"], cfg["std"], image_resize_strategy,
            interpolation=cfg.get("interpolation") or "bicubic",
            crop_pct=prismatic_crop_pct(self.timm_name, cfg.get("crop_pct") or 1.0),
        )
