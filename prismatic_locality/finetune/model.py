"""The classifier that is fine-tuned: backbone features -> pooling -> a new Linear head.

The backbone is whatever the probe loads (`probe.backbone.load_backbone`: a timm name, a local weights
file, or an aligned checkpoint directory), made trainable. Its features are the same for both kinds:
the whole token sequence after the last block and the final norm (``forward_features``); any MAP
head, classifier or MaskEmbed head after them is removed. So a stock and an aligned backbone get the
same head on the same kind of features, a fair comparison:

- ``transformer`` (the reference's ``output_head: transformer``): learned position embedding over all
  T tokens (prefix included), one timm Block (width D, the backbone's head count, MLP ratio 4, no qkv
  bias, GELU, LayerNorm), LayerNorm, mean over the tokens;
- ``mean``: mean over the patch tokens (timm's ``global_pool='avg'``);
- ``cls``: the first prefix token.

then ``Linear(D, classes)`` initialised as timm's ViT head (truncated normal, std 0.02; zero bias).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from .. import vit as V
from ..probe.backbone import Backbone, BackboneConfig, load_backbone
from .config import ModelConfig


class TransformerPooling(nn.Module):
    """Position embedding + `depth` transformer blocks + LayerNorm over all tokens, then their mean."""

    def __init__(self, dim: int, num_heads: int, num_tokens: int, depth: int = 1):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim=dim, num_heads=num_heads, mlp_ratio=4.0, qkv_bias=False,
                                            act_layer=nn.GELU, norm_layer=nn.LayerNorm) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(tokens + self.pos_embed)).mean(dim=1)


class MeanPooling(nn.Module):
    def __init__(self, num_prefix_tokens: int):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, self.num_prefix_tokens:].mean(dim=1)


class ClsPooling(nn.Module):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]


class Classifier(nn.Module):
    """``head(pool(features(x)))``; parameters ``backbone.*``, ``pool.*``, ``head.*``."""

    def __init__(self, backbone: Backbone, pool: nn.Module, num_classes: int):
        super().__init__()
        self.kind, self.spec = backbone.kind, backbone.spec
        self._features = backbone.tokens
        self.backbone = backbone.model
        self.pool = pool
        self.head = nn.Linear(backbone.spec.embed_dim, num_classes)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self._features(images)))

    # timm's layer-wise lr decay (optim.param_groups_layer_decay) asks the model for these two
    def group_matcher(self, coarse: bool = False) -> dict:
        """The backbone's own timm matcher with its names under ``backbone.``: stem, blocks, final norm;
        the new pool and head match nothing, so timm puts them in the last group, as in the reference
        (where they are parts of the timm model that its matcher does not know)."""
        def under_backbone(regex: str) -> str:
            return r"^backbone\.(?:" + regex.lstrip("^") + ")"

        out = {}
        for group, spec in self.backbone.group_matcher(coarse=coarse).items():
            if isinstance(spec, (list, tuple)):
                out[group] = [(under_backbone(regex), suffix) for regex, suffix in spec]
            else:
                out[group] = None if spec is None else under_backbone(spec)
        return out

    def no_weight_decay(self) -> set:
        inner = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {f"backbone.{n}" for n in inner}


def build_classifier(cfg: ModelConfig, num_classes: int, device: torch.device) -> Classifier:
    """Load the backbone as the probe does, make it trainable with stochastic depth, add the head (seeded)."""
    backbone = load_backbone(BackboneConfig(name=cfg.backbone, weights=cfg.weights, pretrained=cfg.pretrained,
                                            timm_kwargs=dict(cfg.timm_kwargs), init_seed=cfg.init_seed))
    V.drop_pooling(backbone.model)
    V.set_drop_path(backbone.model, cfg.drop_path)
    backbone.model.requires_grad_(True)
    spec = backbone.spec
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        if cfg.head == "transformer":
            pool: nn.Module = TransformerPooling(spec.embed_dim, spec.num_heads, spec.num_tokens, cfg.head_depth)
        elif cfg.head == "mean":
            pool = MeanPooling(spec.num_prefix_tokens)
        else:
            if spec.num_prefix_tokens == 0:
                raise ValueError(f"config field 'model.head': {cfg.backbone} has no CLS token; use mean or transformer")
            pool = ClsPooling()
        model = Classifier(backbone, pool, num_classes)
    return model.to(device)


def build_optimizer(model: Classifier, lr: float, weight_decay: float, layer_decay: Optional[float],
                    betas, eps: float) -> torch.optim.Optimizer:
    """timm's AdamW factory. Without layer decay it gets the trainable parameters (as the reference
    passes them: weight decay on every parameter); with it, the model, so timm builds its per-layer
    groups (``lr_scale``) and exempts 1-D parameters and position / class tokens from weight decay."""
    from timm.optim import create_optimizer_v2

    params = model if layer_decay is not None else [p for p in model.parameters() if p.requires_grad]
    return create_optimizer_v2(params, opt="adamw", lr=lr, weight_decay=weight_decay, layer_decay=layer_decay,
                               betas=tuple(betas), eps=eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled lr, times each group's layer-decay scale (as timm's schedulers apply it)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
