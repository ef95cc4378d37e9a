"""Optimiser and learning-rate schedule, as the reference (paper App. C; docs/faithfulness.md).

- AdamW, betas (0.9, 0.95), eps 1e-8, weight decay 0.01 on *every* parameter: the reference passes
  a parameter iterator to timm's factory, which skips timm's norm/bias exclusion. Exempting
  norms, biases and pos/cls tokens is an option, off by default.
- Per-update cosine from lr to min_lr over the whole run (timm CosineLRScheduler, t_in_epochs=False,
  one cycle); an optional linear warmup from warmup_lr counts *inside* the horizon
  (warmup_prefix=False): lr(t) = warmup_lr + t (lr - warmup_lr) / warmup for t < warmup.
- On GPU the update runs as torch's fused AdamW kernel (same maths, one launch instead of a
  dozen per parameter group); the benchmark's steps use it too.
"""
from __future__ import annotations

import math
from typing import Iterable, Tuple

import torch
import torch.nn as nn


def lr_at(step: int, total_steps: int, lr: float, min_lr: float, warmup_steps: int = 0,
          warmup_lr: float = 0.0) -> float:
    """The learning rate of optimiser update `step` (0-based)."""
    if step < warmup_steps:
        return warmup_lr + step * (lr - warmup_lr) / warmup_steps
    t = min(step, total_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t / total_steps))


def _no_decay(name: str, p: nn.Parameter, skip: set) -> bool:
    return p.ndim <= 1 or name.split(".")[-1] in skip


def build_optimizer(named_params: Iterable[Tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                    betas: Tuple[float, float], eps: float, exclude_norm_bias: bool = False,
                    fused: bool = False) -> torch.optim.AdamW:
    params = [(n, p) for n, p in named_params if p.requires_grad]
    if exclude_norm_bias:
        skip = {"pos_embed", "cls_token", "reg_token", "dist_token"}
        groups = [
            {"params": [p for n, p in params if not _no_decay(n, p, skip)], "weight_decay": weight_decay},
            {"params": [p for n, p in params if _no_decay(n, p, skip)], "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


# How the update is computed, not what it computes: these follow the device of the run that
# loads a state, not the one that saved it (a GPU state resumed on CPU must not ask for CUDA's
# fused kernel). They are set before loading because they also decide where `step` lives.
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)`, keeping this optimiser's implementation flags."""
    if len(state.get("param_groups", ())) != len(optimizer.param_groups):
        raise ValueError(f"{len(state.get('param_groups', ()))} parameter groups saved, "
                         f"{len(optimizer.param_groups)} expected")
    groups = []
    for saved, own in zip(state["param_groups"], optimizer.param_groups):
        g = {k: v for k, v in saved.items() if k not in IMPLEMENTATION_FLAGS}
        g.update({k: own[k] for k in IMPLEMENTATION_FLAGS if k in own})
        groups.append(g)
    optimizer.load_state_dict({**state, "param_groups": groups})


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
