"""Probe targets and metric on hand-built inputs with exact expected values."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from prismatic_locality.probe import labels as L
from prismatic_locality.probe.heads import build_head
from prismatic_locality.probe.metrics import Confusion, best_epoch, macro_recall, size_stratified_recall


def _map_10x10():
    # 10 x 10 px, 4 px patches -> 2 x 2 grid; rows/cols 8-9 are the tail and are dropped.
    m = torch.zeros(10, 10, dtype=torch.long)
    m[0, 4] = 2                 # patch 1: {0, 2} -> class 0 dropped (not alone)
    m[4:8, 0:4] = 1             # patch 2: {1}
    m[4:8, 4:8] = 1
    m[7, 7] = 3                 # patch 3: {1, 3}
    m[8:, :] = 4                # class 4 only in the tail: absent everywhere
    m[:, 8:] = 4
    return m


def test_patch_union_class0_rule_and_tail_trimming():
    patch, image, fractions = L.reduce_labels(_map_10x10(), patch_size=4, num_classes=5)
    expected = torch.tensor([
        [1, 0, 0, 0, 0],   # patch 0: only class 0 -> class 0 positive
        [0, 0, 1, 0, 0],   # patch 1: class 0 with class 2 -> only class 2
        [0, 1, 0, 0, 0],
        [0, 1, 0, 1, 0],
    ], dtype=torch.bool)
    assert torch.equal(patch, expected)
    assert torch.equal(image, torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool))
    # fractions over the trimmed 8 x 8 = 64 pixels
    assert torch.allclose(fractions, torch.tensor([31, 31, 1, 1, 0]) / 64.0)


def test_global_keeps_class0_when_only_mixed():
    m = torch.ones(8, 8, dtype=torch.long)
    m[0, 0] = 0  # class 0 only shares a patch with class 1
    patch, image, _ = L.reduce_labels(m, patch_size=4, num_classes=3)
    assert not patch[:, 0].any()          # never alone in a patch -> never a patch positive
    assert image.tolist() == [True, True, False]  # but positive for the image


def test_384px_14px_patches_give_27x27():
    m = torch.zeros(384, 384, dtype=torch.long)
    m[378:, :] = 2  # only in the 6 px tail
    patch, image, _ = L.reduce_labels(m, patch_size=14, num_classes=3)
    assert patch.shape == (27 * 27, 3)
    assert not image[2] and patch[:, 0].all()


def test_pack_roundtrip():
    bits = torch.rand(7, 183) > 0.7
    assert torch.equal(L.unpack(torch.from_numpy(L.pack(bits)), 183), bits)


def test_center_crop_and_nearest_resize():
    # 12 wide x 8 high: the centred 8 x 8 square drops 2 columns each side
    a = np.zeros((8, 12), dtype=np.uint8)
    a[:, :2] = 7
    a[:, 2:6] = 1
    a[:, 6:10] = 2
    a[:, 10:] = 9
    out = np.array(L.prepare_label(Image.fromarray(a), 4))
    assert out.tolist() == [[1, 1, 2, 2]] * 4
    img = L.prepare_image(Image.fromarray(np.stack([a * 20] * 3, -1)), 4)
    assert img.size == (4, 4) and img.mode == "RGB"


def test_coco_label_mapping():
    from prismatic_locality.probe.datasets import _coco_label

    assert _coco_label(np.array([255, 0, 90, 181])).tolist() == [0, 1, 91, 182]
    assert L.COCO_STUFF_CLASSES[1] == "person" and L.COCO_STUFF_CLASSES[92] == "banner"
    assert L.COCO_STUFF_CLASSES[182] == "wood" and L.ADE20K_CLASSES[150] == "flag"


# -------------------------------------------------------------------------- metric


def test_macro_recall_excludes_classes_without_positives():
    target = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=torch.bool)
    pred = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    c = Confusion(3)
    c.update(pred, target)
    s = c.summary()
    # class 0: 1 of 2 positives found; class 1: 4 of 4; class 2: no positives -> excluded
    assert s["macro_recall"] == pytest.approx(0.75)
    assert s["num_classes_evaluated"] == 2
    assert c.recall() == [0.5, 1.0, None]
    assert c.tp.tolist() == [1, 4, 0] and c.fp.tolist() == [1, 0, 2]
    assert s["macro_precision"] == pytest.approx((0.5 + 1.0) / 2)
    assert macro_recall(pred.unsqueeze(0), target.unsqueeze(0)) == pytest.approx(0.75)  # (B, P, C) too


def test_metric_without_positives_is_an_error():
    with pytest.raises(ValueError, match="no class has a positive"):
        macro_recall(torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool))


def test_best_epoch_first_of_ties():
    assert best_epoch([0.1, 0.3, 0.3, 0.2]) == 1
    assert best_epoch([0.5]) == 0
    with pytest.raises(ValueError):
        best_epoch([])


def test_size_stratified_recall():
    # 4 images x 3 classes; objects are (image, class>0) with positives
    fr = np.array([[0.5, 0.1, 0.4], [0.2, 0.8, 0.0], [0.7, 0.3, 0.0], [0.1, 0.0, 0.9]])
    pos = np.array([[3, 1, 2], [1, 4, 0], [2, 2, 0], [1, 0, 5]])
    tp = np.array([[1, 0, 2], [0, 4, 0], [0, 1, 0], [0, 0, 5]])
    bins = size_stratified_recall(fr, pos, tp, num_bins=2)
    # objects sizes: 0.1, 0.4, 0.8, 0.3, 0.9 -> median 0.4; bin 0 = [0.1, 0.4), bin 1 = [0.4, 0.9]
    assert [b["objects"] for b in bins] == [2, 3]
    assert bins[0]["micro_recall"] == pytest.approx((0 + 1) / (1 + 2))       # class 1 objects 0.1, 0.3
    assert bins[0]["macro_recall"] == pytest.approx(1 / 3)
    # bin 1: class 2 (0.4: 2/2, 0.9: 5/5) and class 1 (0.8: 4/4)
    assert bins[1]["macro_recall"] == pytest.approx(1.0)
    assert bins[1]["size_lo"] == pytest.approx(0.4) and bins[1]["size_hi"] == pytest.approx(0.9)


# -------------------------------------------------------------------------- heads


@pytest.mark.parametrize("prefix", [1, 0])
@pytest.mark.parametrize("kind", ["transformer", "mlp", "linear"])
def test_head_shapes(kind, prefix):
    T = prefix + 16
    x = torch.randn(2, T, 48)
    local = build_head(kind, "local", num_tokens=T, num_prefix=prefix, dim=48, num_heads=3, num_classes=5, hidden=32)
    glob = build_head(kind, "global", num_tokens=T, num_prefix=prefix, dim=48, num_heads=3, num_classes=5, hidden=32)
    assert local(x).shape == (2, 16, 5)
    assert glob(x).shape == (2, 5)


@pytest.mark.parametrize("prefix", [1, 0])
def test_intervention_views_see_only_what_they_should(prefix):
    """Paper Fig. 9 (right): `cls` sees the CLS token (mean without a prefix), `anonymous` every token
    without positions; both predict from per-patch queries. `full` is position-aware."""
    torch.manual_seed(0)
    T, P = prefix + 16, 16
    kw = dict(num_tokens=T, num_prefix=prefix, dim=48, num_heads=3, num_classes=5)
    heads = {v: build_head("transformer", "local", view=v, **kw).eval() for v in ("full", "cls", "anonymous")}
    x = torch.randn(2, T, 48)
    perm = torch.cat([torch.arange(prefix), prefix + torch.randperm(P)])  # shuffle the patch tokens
    with torch.no_grad():
        y = {v: h(x) for v, h in heads.items()}
        assert all(out.shape == (2, P, 5) for out in y.values())
        assert torch.allclose(heads["anonymous"](x[:, perm]), y["anonymous"], atol=1e-5)
        assert torch.allclose(heads["cls"](x[:, perm]), y["cls"], atol=1e-5)
        assert not torch.allclose(heads["full"](x[:, perm]), y["full"], atol=1e-3)
        if prefix:  # the patch tokens are invisible to the cls view, and only to it
            x2 = x.clone()
            x2[:, prefix:] = torch.randn(2, P, 48)
            assert torch.allclose(heads["cls"](x2), y["cls"], atol=1e-6)
            assert not torch.allclose(heads["anonymous"](x2), y["anonymous"], atol=1e-3)
    assert heads["cls"].pos_embed.shape == (1, P, 48)  # one query per patch
    with pytest.raises(ValueError, match="local probing"):
        build_head("transformer", "global", view="cls", **kw)
    with pytest.raises(ValueError, match="needs the transformer head"):
        build_head("mlp", "local", view="anonymous", **kw)
    with pytest.raises(ValueError, match="head view must be one of"):
        build_head("transformer", "local", view="blind", **kw)


def test_transformer_head_matches_reference_recipe():
    h = build_head("transformer", "local", num_tokens=17, num_prefix=1, dim=48, num_heads=3, num_classes=5)
    assert len(h.blocks) == 2
    blk = h.blocks[0]
    assert blk.attn.qkv.bias is None
    assert torch.allclose(blk.ls1.gamma, torch.full((48,), 0.01))
    assert isinstance(blk.mlp.act, torch.nn.GELU) and blk.mlp.act.approximate == "none"
    assert blk.mlp.fc1.out_features == 192
    assert 0.01 < h.pos_embed.std().item() < 0.03
    # global without prefix pools every output: permuting tokens and pos-embeds together is invariant
    g = build_head("transformer", "global", num_tokens=16, num_prefix=0, dim=48, num_heads=3, num_classes=5).eval()
    x = torch.randn(1, 16, 48)
    perm = torch.randperm(16)
    y = g(x)
    with torch.no_grad():
        g.pos_embed.copy_(g.pos_embed[:, perm])
    assert torch.allclose(g(x[:, perm]), y, atol=1e-5)
    assert not math.isnan(y.sum().item())
