"""Image sources, seeded transforms, skip handling and the global-batch order (CPU, fixtures in tmp_path)."""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from prismatic_locality.data import (
    RKRC, EvalTransform, GlobalBatchOrder, ImageFolderSource, SeededImages, TarShardSource, UnreadableImage,
    collate, open_source,
)
from prismatic_locality.data import transforms as T
from prismatic_locality.data.dataset import sample_rng
from prismatic_locality.data.sources import expand_shards

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _img(seed: int, size=(20, 14)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_image_folder_lists_every_image_recursively_in_sorted_order(tmp_path):
    root = tmp_path / "in1k" / "train"
    for cls in ("n02", "n01"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            _img(i).save(root / cls / f"{i}.JPEG")
    (root / "n01" / "readme.txt").write_text("not an image")
    (root / "n01" / ".hidden.jpg").write_bytes(b"")
    src = open_source(str(tmp_path / "in1k"), "train")
    assert isinstance(src, ImageFolderSource)
    assert [os.path.relpath(src.name(i), root) for i in range(len(src))] == ["n01/0.JPEG", "n01/1.JPEG", "n02/0.JPEG", "n02/1.JPEG"]
    assert src.load(0).mode == "RGB" and src.load(0).size == (20, 14)


def test_missing_or_empty_split_fails_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        open_source(str(tmp_path), "nope")
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        open_source(str(tmp_path), "val")


def test_corrupt_images_are_skipped_counted_and_replaced_deterministically(tmp_path):
    d = tmp_path / "train" / "images"
    d.mkdir(parents=True)
    for i in range(4):
        _img(i).save(d / f"{i}.png")
    good = _encode(_img(9), "JPEG")
    (d / "1.png").write_bytes(b"this is not an image")      # a non-image with an image name
    (d / "2.png").unlink()
    (d / "2.jpg").write_bytes(good[: len(good) // 2])         # a truncated JPEG
    src = open_source(str(tmp_path), "train")
    with pytest.raises(UnreadableImage, match="1.png"):
        src.load(1)
    ds = SeededImages(src, EvalTransform(8, MEAN, STD), seed=0)
    x, notes = ds[(0, 1)]                                     # 1.png and 2.jpg bad -> 3.png
    assert [(kind, os.path.basename(name)) for kind, name, _ in notes] == [("unreadable", "1.png"), ("unreadable", "2.jpg")]
    assert "1.png" in notes[0][2] and "not identify" in notes[0][2]     # the message says why
    assert torch.equal(x, ds[(0, 3)][0])
    images, notes = collate([ds[(0, i)] for i in range(4)])
    assert images.shape == (4, 3, 8, 8) and len(notes) == 3   # 1.png, 2.jpg (for slot 1) + 2.jpg (slot 2)
    assert len({name for _, name, _ in notes}) == 2          # two files: what the trainer counts


def test_tar_shards_read_by_offset_match_the_written_images(tmp_path):
    split = tmp_path / "train"
    split.mkdir()
    imgs = [_img(i) for i in range(5)]
    _write_tar(split / "shard-000000.tar", [
        ("s0.jpg", _encode(imgs[0], "JPEG")), ("s0.cls", b"3"),
        ("s1.png", _encode(imgs[1], "PNG")), ("s1.json", b"{}"),
        ("sub/s2.webp", _encode(imgs[2], "WEBP")),
    ])
    _write_tar(split / "shard-000001.tar", [
        ("s3.png", _encode(imgs[3], "PNG")), ("s3.jpg", _encode(imgs[3], "JPEG")),  # jpg preferred
        ("s4.png", _encode(imgs[4], "PNG")),
    ])
    src = open_source(str(tmp_path), "train")
    assert isinstance(src, TarShardSource) and len(src) == 5
    assert src.name(3).endswith("shard-000001.tar:s3.jpg")
    assert np.array_equal(np.asarray(src.load(1)), np.asarray(imgs[1]))   # png: lossless
    assert np.array_equal(np.asarray(src.load(4)), np.asarray(imgs[4]))
    assert src.load(0).size == (20, 14)
    # a brace pattern relative to the root names the same shards
    pat = open_source(str(tmp_path), "train/shard-{000000..000001}.tar")
    assert [pat.name(i) for i in range(5)] == [src.name(i) for i in range(5)]
    assert expand_shards(str(split / "shard-*.tar")) == src.shards


def test_damaged_shard_keeps_what_precedes_the_damage_and_corrupt_members_skip(tmp_path):
    split = tmp_path / "val"
    split.mkdir()
    members = [(f"k{i}.png", _encode(_img(i), "PNG")) for i in range(3)] + [("k3.jpg", b"garbage")]
    _write_tar(split / "a.tar", members)
    raw = (split / "a.tar").read_bytes()
    (split / "b.tar").write_bytes(raw[:700])                   # cut inside the first member
    src = open_source(str(tmp_path), "val", format="wds")
    assert src.damaged_shards == 1
    assert len(src) >= 4                                       # a.tar's four members at least
    ds = SeededImages(src, EvalTransform(8, MEAN, STD), seed=0)
    _, notes = ds[(0, 3)]
    assert notes and notes[0][1].endswith("a.tar:k3.jpg")


def test_rkrc_is_a_pure_function_of_its_generator():
    t = RKRC(16, MEAN, STD)
    img = _img(0, size=(40, 20))
    a = t(img, np.random.default_rng([0, 1, 2]))
    b = t(img, np.random.default_rng([0, 1, 2]))
    outs = [t(img, np.random.default_rng([0, 1, i])) for i in range(8)]
    assert a.shape == (3, 16, 16) and torch.equal(a, b)
    assert len({o.sum().item() for o in outs}) > 4             # different seeds, different crops
    # no zoom, no aspect, no flip: the shorter side is resized to the target and centre-cropped
    plain = RKRC(16, MEAN, STD, scale_prob=0.0, aspect_prob=0.0, hflip=0.0, interpolation="bilinear")
    ev = EvalTransform(16, MEAN, STD, crop_pct=1.0, interpolation="bilinear")
    assert torch.allclose(plain(img, np.random.default_rng(0)), ev(img), atol=1e-6)


def test_rkrc_reflect_pads_when_the_aspect_distortion_shrinks_a_side():
    t = RKRC(16, MEAN, STD, scale_prob=0.0, aspect_prob=1.0, ratio=(0.5, 0.5), hflip=0.0)
    x = t(_img(1, size=(16, 16)), np.random.default_rng(0))  # width x sqrt(0.5) -> 11 px, padded to 16
    assert x.shape == (3, 16, 16)
    assert torch.equal(x[:, :, 1], x[:, :, 3]) and torch.equal(x[:, :, 13], x[:, :, 11])  # mirrored columns


def test_center_crop_or_pad_matches_timm_where_timm_supports_it():
    from timm.data import transforms as T

    from prismatic_locality.data.transforms import center_crop_or_pad

    img = _img(2, size=(9, 30))
    ours = np.asarray(center_crop_or_pad(img, 16))
    if "padding_mode" in T.center_crop_or_pad.__code__.co_varnames:   # timm >= 1.0
        assert np.array_equal(ours, np.asarray(T.center_crop_or_pad(img, [16, 16], padding_mode="reflect")))
    assert ours.shape == (16, 16, 3) and np.array_equal(ours[:, 3], np.asarray(img)[7:23, 0])


def test_global_batch_order_is_world_size_independent():
    one = GlobalBatchOrder(40, global_batch=8, micro_batch=4, world_size=1, rank=0, seed=3)
    assert (one.accum_steps, one.steps_per_epoch) == (2, 5)
    ranks = [GlobalBatchOrder(40, 8, 4, world_size=2, rank=r, seed=3) for r in range(2)]
    single = list(one.micro_batches(0, 7))
    per_rank = [list(o.micro_batches(0, 7)) for o in ranks]
    for step in range(7):
        assert single[2 * step] + single[2 * step + 1] == per_rank[0][step] + per_rank[1][step]
    # an epoch visits every image once; epochs are permuted differently
    epoch0 = [i for mb in single[:10] for _, i in mb]
    assert sorted(epoch0) == list(range(40))
    assert single[10][0][0] == 1 and [i for _, i in single[10]] != epoch0[:4]
    # resuming mid-run yields exactly the remaining micro-batches
    assert list(one.micro_batches(3, 7)) == single[6:]


def test_global_batch_order_rejects_indivisible_batches():
    with pytest.raises(ValueError, match="global_batch"):
        GlobalBatchOrder(100, global_batch=10, micro_batch=4, world_size=1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchOrder(6, global_batch=8, micro_batch=4)


@pytest.mark.parametrize("transform", [RKRC(16, MEAN, STD, scale=(0.08, 0.08)), EvalTransform(16, MEAN, STD)])
def test_extreme_aspect_ratios_are_cropped_before_resizing_and_reported(tmp_path, monkeypatch, transform):
    """A 1 x 4000 px image would be resized to 16 x 64000+ px (the short side goes to the model's
    resolution); it is centre-cropped to MAX_ASPECT first, and the dataset reports the file."""
    d = tmp_path / "train"
    d.mkdir()
    _img(0, size=(4000, 1)).save(d / "strip.png")
    _img(1, size=(30, 20)).save(d / "ok.png")
    resized = []
    real = T.TF.resize

    def spy(img, *a, **k):
        out = real(img, *a, **k)
        resized.append(out.size[0] * out.size[1])
        return out

    monkeypatch.setattr(T.TF, "resize", spy)
    ds = SeededImages(open_source(str(tmp_path), "train"), transform, seed=0)
    x, notes = ds[(0, 1)]
    assert x.shape == (3, 16, 16) and torch.isfinite(x).all()
    bound = (16 * 4) ** 2 * T.MAX_ASPECT                      # zoom <= 1/sqrt(0.08) x aspect <= 1.16
    assert max(resized) <= bound, (max(resized), bound)
    assert [(k, os.path.basename(n)) for k, n, _ in notes] == [("cropped", "strip.png")] and "4000x1" in notes[0][2]
    resized.clear()
    y, notes = ds[(0, 0)]                                     # an ordinary image: untouched, not reported
    assert notes == [] and torch.equal(y, transform(Image.open(d / "ok.png").convert("RGB"), sample_rng(0, 0, 0)))


def test_a_garbled_member_header_mid_shard_is_detected_counted_and_the_rest_indexed(tmp_path, caplog):
    """tarfile stops quietly at a garbled header; the index must not silently lose the rest of the shard."""
    split = tmp_path / "train"
    split.mkdir()
    members = []
    for i in range(64):
        members += [(f"s{i:03d}.png", _encode(_img(i, size=(6, 5)), "PNG")), (f"s{i:03d}.cls", b"1")]
    _write_tar(split / "a.tar", members)
    raw = bytearray((split / "a.tar").read_bytes())
    with tarfile.open(split / "a.tar") as tar:
        victim = next(m for m in tar if m.name == "s010.png")
    raw[victim.offset: victim.offset + 100] = b"\xff" * 100     # the name field: checksum now wrong
    (split / "a.tar").write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        src = open_source(str(tmp_path), "train", format="wds")
    assert src.damaged_shards == 1
    assert len(src) == 63 and not any("s010" in src.name(i) for i in range(len(src)))
    assert np.array_equal(np.asarray(src.load(62)), np.asarray(_img(63, size=(6, 5))))   # after the damage
    warning = [r.getMessage() for r in caplog.records if "a.tar" in r.getMessage()]
    assert len(warning) == 1 and "1 sample" in warning[0] and str(victim.offset) in warning[0], warning


def test_a_healthy_shard_is_not_reported_damaged(tmp_path, caplog):
    split = tmp_path / "train"
    split.mkdir()
    _write_tar(split / "a.tar", [(f"s{i}.png", _encode(_img(i), "PNG")) for i in range(3)])
    with open(split / "b.tar", "wb") as f:   # two archives back to back (cat a.tar a.tar): zero blocks between
        f.write((split / "a.tar").read_bytes() * 2)
    with caplog.at_level("WARNING"):
        src = open_source(str(tmp_path), "train", format="wds")
    assert src.damaged_shards == 0 and len(src) == 6 and not caplog.records


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        raise ValueError(f"image {i} is unreadable")


def test_a_worker_error_stops_the_workers_at_once():
    """Workers ignore SIGTERM (the trainer saves before it stops), so one left running after an error
    is terminated in vain at exit and joined forever: the error must stop them itself."""
    import multiprocessing

    from prismatic_locality.align.train import _ignore_stop_signals
    from prismatic_locality.data import surface_worker_errors

    loader = torch.utils.data.DataLoader(_Unreadable(), batch_size=2, num_workers=2, worker_init_fn=_ignore_stop_signals)
    with pytest.raises(ValueError, match="unreadable") as excinfo:
        for _ in surface_worker_errors(loader):
            pass
    assert excinfo.value is not None and not multiprocessing.active_children()
