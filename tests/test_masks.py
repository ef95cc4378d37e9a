
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
