"""Output heads trained on frozen features (spec §C.3).

Every head takes the backbone's whole token sequence (B, T, D) and returns logits:
(B, num_patches, C) for local probing, (B, C) for global probing.

- `TransformerHead` (default): learned pos-embed (randn * 0.02) over all tokens, a LayerNorm after
  it, 2 timm Blocks (backbone width and heads, mlp_ratio 4, qkv_bias False, exact GELU,
  LayerScale 0.01), final LayerNorm, Linear. Local: the patch positions; global: the mean of the
  prefix outputs (after the final norm), or of all outputs when the backbone has no prefix.
- `MLPHead`: Linear(D, hidden) - GELU - Linear(hidden, C) per token.
- `LinearHead`: Linear(D, C) per token.
MLP and linear heads see patch tokens only (local) or the CLS token = mean of the prefix tokens,
or the mean of all tokens without a prefix (global).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

HEADS = ("transformer", "mlp", "linear")
TASKS = ("local", "global")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


class TransformerHead(nn.Module):
    def __init__(self, num_tokens: int, num_prefix: int, dim: int, num_heads: int, num_classes: int,
                 task: str, depth: int = 2, layer_scale: float = 0.01):
        super().__init__()
        _check_task(task)
        self.task, self.num_prefix = task, num_prefix
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)
        self.norm_pre = nn.LayerNorm(dim)
        self.blocks = nn.Sequential(*[
            Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=False, init_values=layer_scale,
                  act_layer=nn.GELU, norm_layer=nn.LayerNorm)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.blocks(self.norm_pre(tokens + self.pos_embed)))
        if self.task == "local":
            return self.head(x[:, self.num_prefix:])
        pooled = x[:, : self.num_prefix].mean(1) if self.num_prefix else x.mean(1)
        return self.head(pooled)


class TokenHead(nn.Module):
    """A per-token map (MLP or linear) on patch tokens (local) or the pooled CLS (global)."""

    def __init__(self, net: nn.Module, num_prefix: int, task: str):
        super().__init__()
        _check_task(task)
        self.net, self.num_prefix, self.task = net, num_prefix, task

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.task == "local":
            return self.net(tokens[:, self.num_prefix:])
        pooled = tokens[:, : self.num_prefix].mean(1) if self.num_prefix else tokens.mean(1)
        return self.net(pooled)


def build_head(kind: str, task: str, *, num_tokens: int, num_prefix: int, dim: int, num_heads: int,
               num_classes: int, depth: int = 2, hidden: int = 1024, layer_scale: float = 0.01) -> nn.Module:
    if kind == "transformer":
        return TransformerHead(num_tokens, num_prefix, dim, num_heads, num_classes, task, depth, layer_scale)
    if kind == "mlp":
        return TokenHead(nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes)), num_prefix, task)
    if kind == "linear":
        return TokenHead(nn.Linear(dim, num_classes), num_prefix, task)
    raise ValueError(f"head must be one of {HEADS}, got {kind!r}")
