"""Digit-scenes builder: disjoint digit pools, label rules, determinism, on-disk layout."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from prismatic_locality.demo import scenes as S


@pytest.fixture(scope="module")
def small():
    return {split: S.make_scenes(60, split, seed=3, progress=False) for split in S.SPLITS}


def test_digit_pools_are_disjoint_and_cover_all_digits():
    train, val = S.digit_pool("train"), S.digit_pool("val")
    assert len(np.intersect1d(train, val)) == 0
    assert len(train) + len(val) == 1797
    assert abs(len(val) / 1797 - S.VAL_FRACTION) < 0.01


def test_scenes_use_only_their_split_pool(small):
    for split, sc in small.items():
        used = sc.digits[sc.digits >= 0]
        assert len(used) >= len(sc)  # at least one digit per scene
        assert np.isin(used, S.digit_pool(split)).all()
    assert not np.intersect1d(small["train"].digits[small["train"].digits >= 0],
                              small["val"].digits[small["val"].digits >= 0]).size


def test_pixel_classes_match_the_pasted_digits(small):
    from sklearn.datasets import load_digits

    targets = load_digits().target
    for sc in small.values():
        for i in range(len(sc)):
            present = set(np.unique(sc.labels[i])) - {0}
            pasted = {int(targets[d]) + 1 for d in sc.digits[i] if d >= 0}
            # a digit can be fully covered by a later one, never invented
            assert present <= pasted and present, (i, present, pasted)


def test_same_seed_same_scenes_other_seed_differs(small):
    again = S.make_scenes(60, "train", seed=3, progress=False)
    assert np.array_equal(again.images, small["train"].images)
    assert np.array_equal(again.labels, small["train"].labels)
    other = S.make_scenes(60, "train", seed=4, progress=False)
    assert not np.array_equal(other.images, small["train"].images)


def test_patch_labels_follow_pixel_maps(small):
    lab = small["train"].labels
    p = 8
    pl = S.patch_labels(lab, p)
    g = lab.shape[1] // p
    assert pl.shape == (len(lab), g * g, S.NUM_CLASSES)
    for i in range(10):
        for r in range(g):
            for c in range(g):
                tile = set(np.unique(lab[i, r * p:(r + 1) * p, c * p:(c + 1) * p]).tolist())
                want = tile - {0} if tile - {0} else {0}   # background only when alone
                got = set(torch.nonzero(pl[i, r * g + c]).flatten().tolist())
                assert got == want, (i, r, c, got, want)


def test_image_labels_are_union_of_pixels_and_cover_patch_labels(small):
    lab = small["val"].labels
    il = S.image_labels(lab)
    pl = S.patch_labels(lab, 8)
    for i in range(len(lab)):
        assert set(torch.nonzero(il[i]).flatten().tolist()) == set(np.unique(lab[i]).tolist())
    # every digit in a patch is in the image label, and every digit in the image is in some patch
    assert torch.equal(pl[..., 1:].any(1), il[..., 1:])


def test_write_and_read_back_demo_layout(tmp_path, small):
    root = tmp_path / "scenes"
    S.write_scenes(root, small, {"seed": 3}, progress=False)
    assert json.loads((root / "classes.json").read_text()) == S.CLASSES
    for split in S.SPLITS:
        assert len(list((root / split / "images").glob("*.png"))) == 60
        files = sorted((root / split / "images").glob("*.png"))  # ids sorted, as written
        images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        labels = np.stack([np.asarray(Image.open(root / split / "labels" / f.name)) for f in files])
        assert np.array_equal(images, small[split].images)
        assert np.array_equal(labels, small[split].labels)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_build_dataset_reuses_matching_directory(tmp_path):
    root = tmp_path / "d"
    S.build_dataset(root, 8, 4, seed=1, progress=False)
    stamp = (root / "train" / "images" / "000000.png").stat().st_mtime_ns
    S.build_dataset(root, 8, 4, seed=1, progress=False)
    assert (root / "train" / "images" / "000000.png").stat().st_mtime_ns == stamp
    S.build_dataset(root, 8, 4, seed=2, progress=False)  # different manifest: rebuilt
    assert json.loads((root / S.MANIFEST).read_text())["seed"] == 2


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="min_scale"):
        S.SceneConfig(min_scale=30, max_scale=20)
    with pytest.raises(ValueError, match="unknown split"):
        S.digit_pool("test")
