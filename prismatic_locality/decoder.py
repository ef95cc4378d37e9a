"""The MaskEmbed decoder g_psi (paper §3.2, App. C; docs/faithfulness.md).

A shallow, weakly initialised transformer: masked embeddings (prefix tokens always zeroed) plus a
learned position embedding, two pre-norm timm ``Block``s with LayerScale 1e-6, a final norm and a
linear map to the teacher's width. Its shallowness and LayerScale init are what keep the encoder
from collapsing to the identity (the decoder cannot just re-do the teacher's work).

The same module, minus its head, is the VLM adapter (`prismatic_locality.prismatic.DecoderProjector`):
`forward_features` runs it with no patch mask.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Mlp
from timm.models.vision_transformer import Block

from .activations import resolve_act_layer


@dataclass
class DecoderConfig:
    num_tokens: int          # prefix + patch tokens
    num_prefix_tokens: int
    width: int               # decoder width (= teacher width by default, as the reference)
    out_dim: int             # teacher width: what is reconstructed
    num_heads: int           # = the encoder's heads
    depth: int = 2
    mlp_ratio: float = 4.0   # the timm Block default, not the backbone's own ratio, as the reference
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: float = 1e-6
    act: str = "gelu"        # "gelu" | "quick_gelu" | "gelu_tanh": matches the backbone's MLP
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"decoder width {self.width} is not divisible by its {self.num_heads} heads")

    def to_dict(self) -> dict:
        return asdict(self)


class MaskEmbedDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.num_prefix_tokens = cfg.num_prefix_tokens
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_tokens, cfg.width) * 0.02)
        self.blocks = nn.Sequential(*[
            Block(
                cfg.width, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                qk_norm=cfg.qk_norm, init_values=cfg.init_values, norm_layer=norm_layer,
                act_layer=resolve_act_layer(cfg.act), mlp_layer=Mlp,
            )
            for _ in range(cfg.depth)
        ])
        self.norm = norm_layer(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.out_dim)

    def visible(self, z: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """z ⊙ m: zero masked patch embeddings and, always, the prefix tokens."""
        M, T, _ = z.shape
        keep = torch.zeros(M, T, dtype=z.dtype, device=z.device)
        keep[:, self.num_prefix_tokens:] = 1.0 if mask is None else mask.to(z.dtype)
        return z * keep.unsqueeze(-1)

    def forward_features(self, z: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.visible(z, mask) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, z: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(M, T, width) embeddings and (M, N) keep-masks -> (M, T, out_dim) reconstructions."""
        return self.head(self.forward_features(z, mask))
