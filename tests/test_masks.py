import math

import numpy as np
import pytest
import torch

from prismatic_locality.masks import (BernoulliMaskSampler, BlockMaskSampler, UniformMaskSampler,
                                      build_mask_sampler, step_generator)


def test_uniform_layout_complement_and_null():
    m = UniformMaskSampler(16)(64, step_generator(0, 0))
    assert m.shape == (64, 3, 16) and m.dtype == torch.bool
    assert torch.equal(m[:, 1], ~m[:, 0])
    assert m[:, 2].all()


def test_uniform_cardinality_is_uniform_on_0_to_n():
    n, B = 8, 90_000
    m = UniformMaskSampler(n, complement=False, null=False)(B, step_generator(1, 0))
    counts = torch.bincount(m[:, 0].sum(1), minlength=n + 1).double()
    expected = B / (n + 1)
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert counts.numel() == n + 1 and (counts > 0).all()  # 0 and n both reachable
    assert chi2 < 30.0  # chi-square, 8 dof: p ~ 2e-4 at 30


def test_uniform_subset_is_uniform_given_size():
    # every patch equally likely to be kept: marginal keep rate 1/2 everywhere
    m = UniformMaskSampler(10, complement=False, null=False)(50_000, step_generator(2, 0))
    rate = m[:, 0].double().mean(0)
    assert torch.allclose(rate, torch.full_like(rate, 0.5), atol=0.01)


def test_seed_determinism_and_step_dependence():
    s = UniformMaskSampler(49)
    assert torch.equal(s(8, step_generator(3, 5)), s(8, step_generator(3, 5)))
    assert not torch.equal(s(8, step_generator(3, 5)), s(8, step_generator(3, 6)))
    assert not torch.equal(s(8, step_generator(3, 5)), s(8, step_generator(4, 5)))


def test_global_batch_slice_is_rank_independent():
    # each rank draws for the global batch and keeps its slice: slices tile the single-process draw
    s = UniformMaskSampler(16)
    full = s(8, step_generator(0, 3))
    halves = [s(8, step_generator(0, 3))[r * 4:(r + 1) * 4] for r in range(2)]
    assert torch.equal(torch.cat(halves), full)


def test_bernoulli_rate_and_options():
    m = BernoulliMaskSampler(100, keep_prob=0.75)(2000, step_generator(0, 0))
    assert m.shape == (2000, 1, 100)
    assert abs(m.double().mean().item() - 0.75) < 0.01
    with pytest.raises(ValueError, match="keep_prob"):
        BernoulliMaskSampler(10, keep_prob=1.5)


def test_block_reaches_target_with_rectangles():
    g = 14
    m = BlockMaskSampler(g, target_ratio=0.4)(256, step_generator(0, 0))
    frac = m[:, 0].double().mean(1)
    assert (frac >= 0.4).all() and (frac < 0.95).all()
    # visible region is a union of rectangles: a single block's bounding box is filled
    assert m.shape == (256, 1, g * g)


def test_block_null_and_complement_when_asked():
    m = BlockMaskSampler(8, complement=True, null=True)(4, step_generator(0, 0))
    assert m.shape == (4, 3, 64) and torch.equal(m[:, 1], ~m[:, 0]) and m[:, 2].all()


def test_build_rejects_unknown():
    with pytest.raises(ValueError, match="masks.kind"):
        build_mask_sampler("random", 4, True, True)


# ------------------------------------------------------------------ block masks: the reference's law


def _reference_block_masks(g, ratio, B, seed):
    """The block law written out one image at a time (numpy): areas U{16..floor(ratio*n)-1}, aspect
    U(0.3, 1/0.3), rows = floor(sqrt(area/aspect)) (first axis), cols = floor(area/rows), uniform
    position; blocks until the visible fraction reaches `ratio`."""
    rng = np.random.default_rng(seed)
    out = np.zeros((B, g, g), dtype=bool)
    for i in range(B):
        while out[i].mean() < ratio:
            area = rng.integers(16, int(ratio * g * g))
            aspect = rng.uniform(0.3, 1 / 0.3)
            rows = min(int(math.sqrt(area / aspect)), g)
            cols = min(int(area / rows), g)
            top, left = rng.integers(0, g - rows + 1), rng.integers(0, g - cols + 1)
            out[i, top:top + rows, left:left + cols] = True
    return out


def _stats(m):
    """Visible fraction, and how often a visible patch's right / lower neighbour is visible."""
    m = np.asarray(m, dtype=bool)
    right = (m[:, :, 1:] & m[:, :, :-1]).sum() / m[:, :, :-1].sum()
    down = (m[:, 1:, :] & m[:, :-1, :]).sum() / m[:, :-1, :].sum()
    return m.mean(), right, down


def test_block_shape_follows_the_reference_law_exactly():
    """(rows, cols) of one block against its exact distribution (aspect integrated on a fine grid)."""
    g, ratio = 14, 0.4
    s = BlockMaskSampler(g, ratio)
    lo, hi = s.area_range()
    assert (lo, hi) == (16, int(ratio * g * g))
    aspect = 0.3 + (np.arange(50_000) + 0.5) / 50_000 * (1 / 0.3 - 0.3)
    area = np.arange(lo, hi)[:, None]
    rows = np.minimum(np.floor(np.sqrt(area / aspect)), g)
    cols = np.minimum(np.floor(area / rows), g)
    keys, counts = np.unique((rows * 100 + cols).astype(int), return_counts=True)
    pmf = dict(zip(keys.tolist(), (counts / rows.size).tolist()))
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    rows, cols = s.block_shape(torch.rand(n, generator=gen), torch.rand(n, generator=gen))
    keys, counts = torch.unique((rows * 100 + cols).long(), return_counts=True)
    seen = dict(zip(keys.tolist(), counts.tolist()))
    assert set(seen) <= set(pmf)
    cells = [k for k in pmf if pmf[k] * n >= 20]  # chi-square on the well-populated shapes
    chi2 = sum((seen.get(k, 0) - pmf[k] * n) ** 2 / (pmf[k] * n) for k in cells)
    assert chi2 < len(cells) + 6 * math.sqrt(2 * len(cells))
    assert rows.mean() < cols.mean()  # aspect U(0.3, 3.3) has mean 1.8: blocks are wider than tall


def test_block_masks_match_the_reference_law_end_to_end():
    g, ratio, B = 14, 0.4, 3000
    ours = BlockMaskSampler(g, ratio)(B, step_generator(0, 0))[:, 0].reshape(B, g, g).numpy()
    ref = _reference_block_masks(g, ratio, B, seed=0)
    (f_o, r_o, d_o), (f_r, r_r, d_r) = _stats(ours), _stats(ref)
    assert abs(f_o - f_r) < 0.01 and abs(r_o - r_r) < 0.01 and abs(d_o - d_r) < 0.01
    assert r_r - d_r > 0.03 and r_o - d_o > 0.03  # orientation: visible runs are longer along rows
    assert (ours.reshape(B, -1).mean(1) >= ratio).all()


def test_block_masks_reach_any_target_without_a_round_cap():
    m = BlockMaskSampler(8, target_ratio=0.97)(64, step_generator(0, 1))
    assert (m[:, 0].double().mean(1) >= 0.97).all()
    small = BlockMaskSampler(4, target_ratio=0.4)  # the reference cannot sample here: areas shrink
    assert small.area_range() == (5, 6)
    frac = small(256, step_generator(0, 2))[:, 0].double().mean(1)
    assert (frac >= 0.4).all() and (frac < 1).any()
    with pytest.raises(ValueError, match="block_ratio"):
        BlockMaskSampler(8, target_ratio=1.5)
