"""Output heads trained on frozen features (paper App. B; docs/probe.md).

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

Interventions (paper B.2, Fig. 9 right; transformer head, local task): how much of the probe's
success depends on each patch embedding knowing its own contents? `view` decides what the head sees.
- `full` (default): the token sequence plus the head's pos-embed, predictions at the patch tokens.
- `cls`: only the CLS token (the mean of the prefix tokens; of all tokens without a prefix).
- `anonymous`: every token, but without the pos-embed, so the head cannot tell which token came
  from where; predictions come from separate query tokens (the pos-embed of the patch positions).
In both interventions the sequence is [what is seen] + [one query per patch].
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

HEADS = ("transformer", "mlp", "linear")
TASKS = ("local", "global")
VIEWS = ("full", "cls", "anonymous")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def check_view(view: str, kind: str, task: str) -> None:
    """The interventions exist for the transformer head's local probing only."""
    if view not in VIEWS:
        raise ValueError(f"head view must be one of {VIEWS}, got {view!r}")
    if view != "full" and (kind != "transformer" or task != "local"):
        raise ValueError(f"head view {view!r} is an intervention on local probing and needs the transformer head "
                         f"(got {kind!r}, task {task!r}): use --task local --head.kind transformer")


def pool_prefix(tokens: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """(B, D): the CLS token (mean of the prefix tokens), or the mean of all tokens without a prefix."""
    return tokens[:, :num_prefix].mean(1) if num_prefix else tokens.mean(1)


class TransformerHead(nn.Module):
    def __init__(self, num_tokens: int, num_prefix: int, dim: int, num_heads: int, num_classes: int,
                 task: str, depth: int = 2, layer_scale: float = 0.01, view: str = "full"):
        super().__init__()
        _check_task(task)
        check_view(view, "transformer", task)
        self.task, self.num_prefix, self.view = task, num_prefix, view
        # full: added to every token; interventions: the patch positions' prediction queries
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens if view == "full" else num_tokens - num_prefix, dim) * 0.02)
        self.norm_pre = nn.LayerNorm(dim)
        self.blocks = nn.Sequential(*[
            Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=False, init_values=layer_scale,
                  act_layer=nn.GELU, norm_layer=nn.LayerNorm)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.view == "full":
            x = tokens + self.pos_embed
        else:
            seen = pool_prefix(tokens, self.num_prefix)[:, None] if self.view == "cls" else tokens
            x = torch.cat([seen, self.pos_embed.expand(len(tokens), -1, -1)], 1)
        x = self.norm(self.blocks(self.norm_pre(x)))
        if self.task == "local":  # the patch positions come last in every view
            return self.head(x[:, -(tokens.shape[1] - self.num_prefix):])
        return self.head(pool_prefix(x, self.num_prefix))


class TokenHead(nn.Module):
    """A per-token map (MLP or linear) on patch tokens (local) or the pooled CLS (global)."""

    def __init__(self, net: nn.Module, num_prefix: int, task: str):
        super().__init__()
        _check_task(task)
        self.net, self.num_prefix, self.task = net, num_prefix, task

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.task == "local":
            return self.net(tokens[:, self.num_prefix:])
        return self.net(pool_prefix(tokens, self.num_prefix))


def build_head(kind: str, task: str, *, num_tokens: int, num_prefix: int, dim: int, num_heads: int,
               num_classes: int, depth: int = 2, hidden: int = 1024, layer_scale: float = 0.01,
               view: str = "full") -> nn.Module:
    if kind == "transformer":
        return TransformerHead(num_tokens, num_prefix, dim, num_heads, num_classes, task, depth, layer_scale, view)
    check_view(view, kind, task)
    if kind == "mlp":
        return TokenHead(nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes)), num_prefix, task)
    if kind == "linear":
        return TokenHead(nn.Linear(dim, num_classes), num_prefix, task)
    raise ValueError(f"head must be one of {HEADS}, got {kind!r}")
