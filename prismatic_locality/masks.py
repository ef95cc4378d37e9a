"""Mask samplers for MaskEmbed (paper §3.2; docs/faithfulness.md).

A sampler returns a bool tensor of shape (B, K, N): K masks for each of B images over N patches,
``True`` = patch kept (visible). Sampling is vectorised and runs on the generator's device, so
masks cost nothing next to the forward pass and are reproducible from the generator's seed.

The default is the paper's: a mask m whose number of kept patches is uniform on {0, ..., n}
(given its size, the subset is uniform), plus its complement 1 - m and the all-ones "null" mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .choices import MASK_KINDS


def _with_extras(m: torch.Tensor, complement: bool, null: bool) -> torch.Tensor:
    """(B, N) base masks -> (B, K, N) with the complement and/or all-ones mask appended."""
    masks = [m]
    if complement:
        masks.append(~m)
    if null:
        masks.append(torch.ones_like(m))
    return torch.stack(masks, dim=1)


@dataclass
class UniformMaskSampler:
    """|m| ~ Uniform{0..n}, m | |m| uniform: keep patch j iff u_j > u_0 with u ~ U(0,1)^(n+1)."""

    num_patches: int
    complement: bool = True
    null: bool = True

    @property
    def masks_per_image(self) -> int:
        return 1 + self.complement + self.null

    def __call__(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(batch_size, self.num_patches + 1, generator=generator, device=generator.device)
        return _with_extras(u[:, 1:] > u[:, :1], self.complement, self.null)


@dataclass
class BernoulliMaskSampler:
    """Each patch kept independently with probability `keep_prob` (ablation; extras off by default)."""

    num_patches: int
    keep_prob: float = 0.5
    complement: bool = False
    null: bool = False

    def __post_init__(self):
        if not 0.0 <= self.keep_prob <= 1.0:
            raise ValueError(f"masks.keep_prob must be in [0, 1], got {self.keep_prob}")

    @property
    def masks_per_image(self) -> int:
        return 1 + self.complement + self.null

    def __call__(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(batch_size, self.num_patches, generator=generator, device=generator.device)
        return _with_extras(u < self.keep_prob, self.complement, self.null)


@dataclass
class BlockMaskSampler:
    """Blockwise masks (the paper's block-masking ablation): visible rectangles are added until a
    fraction `target_ratio` of the patches is visible.

    One block, as the reference draws it: area A ~ U{min_area, ..., floor(target_ratio * n) - 1},
    aspect ratio r ~ U(0.3, 1/0.3) (uniform, not log-uniform), then
    rows = min(floor(sqrt(A / r)), g) and cols = min(floor(A / rows), g), position uniform over the
    places where it fits; blocks are added until the target is met (no cap on the number of blocks).
    Vectorised over the batch: each round proposes one block per image and only images still under
    the target accept it, so an image's sequence of blocks has the reference's law. Grids too small
    for the reference's sizes (floor(target_ratio * n) <= 16, where the reference cannot sample)
    shrink `min_area` to fit. Unlike the reference, `null` is honoured when asked.
    """

    grid: int
    target_ratio: float = 0.4
    min_area: int = 16
    complement: bool = False
    null: bool = False

    def __post_init__(self):
        if not 0.0 < self.target_ratio <= 1.0:
            raise ValueError(f"masks.block_ratio must be in (0, 1], got {self.target_ratio}")

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def masks_per_image(self) -> int:
        return 1 + self.complement + self.null

    def area_range(self) -> tuple[int, int]:
        """[lo, hi): the block areas drawn."""
        hi = max(int(self.target_ratio * self.num_patches), 2)
        return min(self.min_area, hi - 1), hi

    def block_shape(self, u_area: torch.Tensor, u_aspect: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of blocks from uniforms in [0, 1) (float64, so floor() matches integer maths)."""
        lo, hi = self.area_range()
        area = lo + (u_area.double() * (hi - lo)).floor()
        aspect = 0.3 + u_aspect.double() * (1 / 0.3 - 0.3)
        rows = torch.sqrt(area / aspect).floor().clamp(1, self.grid)
        cols = (area / rows).floor().clamp(1, self.grid)
        return rows, cols

    def __call__(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        g, dev = self.grid, generator.device
        r_idx = torch.arange(g, device=dev).view(1, g, 1)
        c_idx = torch.arange(g, device=dev).view(1, 1, g)
        m = torch.zeros(batch_size, g, g, dtype=torch.bool, device=dev)
        while True:
            active = m.flatten(1).float().mean(1) < self.target_ratio
            if not active.any():
                break
            u = torch.rand(batch_size, 4, generator=generator, device=dev)
            rows, cols = self.block_shape(u[:, 0], u[:, 1])
            top = (u[:, 2] * (g - rows + 1)).floor().view(-1, 1, 1)
            left = (u[:, 3] * (g - cols + 1)).floor().view(-1, 1, 1)
            block = ((r_idx >= top) & (r_idx < top + rows.view(-1, 1, 1))
                     & (c_idx >= left) & (c_idx < left + cols.view(-1, 1, 1)))
            m |= block & active.view(-1, 1, 1)
        return _with_extras(m.flatten(1), self.complement, self.null)


MaskSampler = UniformMaskSampler | BernoulliMaskSampler | BlockMaskSampler


def build_mask_sampler(kind: str, grid: int, complement: bool, null: bool, keep_prob: float = 0.5,
                       block_ratio: float = 0.4) -> MaskSampler:
    n = grid * grid
    if kind == "uniform":
        return UniformMaskSampler(n, complement, null)
    if kind == "bernoulli":
        return BernoulliMaskSampler(n, keep_prob, complement, null)
    if kind == "block":
        return BlockMaskSampler(grid, block_ratio, complement=complement, null=null)
    raise ValueError(f"unknown masks.kind '{kind}' ({' | '.join(MASK_KINDS)})")


def step_generator(seed: int, step: int, device: torch.device | str = "cpu", stream: int = 0) -> torch.Generator:
    """A generator for one training step: randomness is a pure function of (seed, stream, step).

    Every rank draws the masks for the whole global batch and keeps its slice, so the masks an
    image gets do not depend on the world size or on where a resumed run restarted.
    """
    # SeedSequence hashes the triple, so no two (seed, stream, step) share a generator state.
    state = np.random.SeedSequence([seed, stream, step]).generate_state(1, np.uint64)[0]
    g = torch.Generator(device=device)
    g.manual_seed(int(state) >> 1)
    return g
