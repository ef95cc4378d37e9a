"""`--objective maskembed|mim|clipself`: each loss against a per-sample computation written here
from the definitions (timm's own forward, plain indexing), clipself's crop windows and pooling,
the trainer end to end with resume, checkpoints without a decoder, an aligned checkpoint as teacher."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import prismatic_locality.align.train as TR
from prismatic_locality import objectives as O
from prismatic_locality import vit as V
from prismatic_locality.align.config import get_recipe, parse_config, validate
from prismatic_locality.checkpoint import CheckpointError, load_aligned, read_config
from prismatic_locality.masks import UniformMaskSampler

from conftest import tiny_vit
from test_align_train import tiny_args, write_tree


def images(n=3, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def randomize_head(encoder, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        encoder.head.weight.copy_(torch.randn(encoder.head.weight.shape, generator=g) * 0.1)
        encoder.head.bias.copy_(torch.randn(encoder.head.bias.shape, generator=g) * 0.1)


# --------------------------------------------------------------------------------------------
# mim
# --------------------------------------------------------------------------------------------


def test_mim_student_sees_masked_pixels_and_regresses_the_unmasked_teacher(one_thread):
    vit = tiny_vit("clip")
    student, teacher = O.build_pair("mim", copy.deepcopy(vit), vit, loss="mse", softcap=30.0)
    randomize_head(student.encoder)
    teacher.scale.fill_(0.5)
    x = images()
    masks = UniformMaskSampler(16)(3, torch.Generator().manual_seed(0))  # (3, 3, 16): m, 1 - m, ones
    K, ps = masks.shape[1], 8

    seen = []
    hook = student.encoder.patch_embed.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    target = teacher(x, masks)
    loss = student(x, masks, target)
    hook.remove()

    per_sample = []
    for i in range(3):
        h = vit.forward_features(x[i:i + 1]) * 0.5                      # unmasked final layer, scaled
        for k in range(K):
            m = masks[i, k].float().reshape(4, 4)
            pix = m.repeat_interleave(ps, 0).repeat_interleave(ps, 1)   # (32, 32) pixel mask
            xm = x[i:i + 1] * pix
            assert torch.equal(seen[0][i * K + k], xm[0]), "the student's input is not x ⊙ m"
            assert torch.allclose(target[i * K + k], h[0], atol=1e-6), "the target is not h_L(x), unmasked"
            pred = student.encoder.head(student.encoder.forward_features(xm))
            per_sample.append(((pred - h) ** 2).mean())
    assert torch.allclose(loss, torch.stack(per_sample).mean(), rtol=1e-5, atol=1e-7)
    assert V.softcap_of(student.encoder) == 30.0 and student.encoder.head.out_features == 48


# --------------------------------------------------------------------------------------------
# clipself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid, lo", [(14, 3), (6, 2), (4, 1)])
def test_crop_windows_are_grid_rectangles_with_sides_in_range(grid, lo):
    assert O.min_crop_side(grid) == lo
    w = O.CropSampler(grid)(2000, torch.Generator().manual_seed(0))
    assert w.shape == (2000, 1, grid * grid) and w.dtype == torch.bool
    heights, widths = set(), set()
    for m in w[:, 0]:
        idx = m.nonzero().flatten()
        rows, cols = idx // grid, idx % grid
        t, b, l, r = rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()
        h, wd = b - t + 1, r - l + 1
        assert len(idx) == h * wd, "window is not a filled rectangle"
        assert lo <= h <= grid and lo <= wd <= grid
        heights.add(h), widths.add(wd)
    assert heights == widths == set(range(lo, grid + 1))  # every side length is drawn


def hand_bounds(window, grid):
    idx = window.nonzero().flatten()
    rows, cols = idx // grid, idx % grid
    return rows.min().item(), cols.min().item(), rows.max().item() + 1, cols.max().item() + 1


def test_clipself_pools_exactly_the_window_and_the_teacher_sees_the_resized_crop(one_thread):
    vit = tiny_vit("in1k")  # [CLS]-pooled timm ViT: pre-logits = norm(x)[:, 0]
    student, teacher = O.build_pair("clipself", copy.deepcopy(vit), vit, loss="cosine", softcap=30.0)
    x = images()
    window = O.CropSampler(4)(3, torch.Generator().manual_seed(3))
    seen = []
    hook = teacher.vit.patch_embed.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    target = teacher(x, window)
    hook.remove()
    loss = student(x, window, target)

    enc = student.encoder
    per_sample = []
    for i in range(3):
        t, l, b, r = hand_bounds(window[i, 0], 4)
        crop = F.interpolate(x[i:i + 1, :, 8 * t:8 * b, 8 * l:8 * r], size=(32, 32), mode="bilinear", align_corners=False)
        assert torch.allclose(seen[0][i], crop[0], atol=1e-6), "teacher input is not the resized crop"
        h = vit.forward_head(vit.forward_features(crop), pre_logits=True)[0]
        assert torch.allclose(target[i, 0], h, atol=1e-5)
        feats = enc.forward_features(x[i:i + 1])[0, enc.num_prefix_tokens:]          # (16, 48)
        inside = [rr * 4 + cc for rr in range(t, b) for cc in range(l, r)]
        pooled = feats[inside].mean(0)
        assert torch.allclose(O.window_pool(enc, x[i:i + 1], window[i:i + 1])[0, 0], pooled, atol=1e-5)
        per_sample.append(1 - F.cosine_similarity(pooled, h, dim=0))
    assert torch.allclose(loss, torch.stack(per_sample).mean(), atol=1e-6)
    # the student keeps the pretrained final norm (its features live in the teacher's space); head frozen identity
    assert torch.equal(enc.norm.weight, vit.norm.weight)
    assert not enc.head.weight.requires_grad and torch.equal(enc.head.weight, torch.eye(48))


# --------------------------------------------------------------------------------------------
# The trainer end to end
# --------------------------------------------------------------------------------------------


@pytest.fixture
def data(tmp_path):
    return write_tree(tmp_path / "data")


def run_args(tmp_path, objective, *extra):
    return [*tiny_args(tmp_path, "--objective", objective, "--max_steps", "3", "--save_every", "2"), *extra]


class Crash(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["maskembed", "mim", "clipself"])
def test_three_steps_resume_bit_identically_and_record_the_objective(tmp_path, data, monkeypatch, objective, one_thread):
    ref = TR.train(parse_config(run_args(tmp_path, objective, "--run_name", "ref")))

    real, calls = TR.train_step, {"n": 0}

    def crashing(*a, **k):  # a kill during step 3; the state of step 2 is saved
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(TR, "train_step", crashing)
    with pytest.raises(Crash):
        TR.train(parse_config(run_args(tmp_path, objective, "--run_name", "crash")))
    monkeypatch.setattr(TR, "train_step", real)
    out = TR.train(parse_config(run_args(tmp_path, objective, "--run_name", "crash")))

    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = read_config(out)
    assert cfg["objective"] == objective
    # the recorded target is what the student was trained on: mim the last layer, clipself the pooled output
    want = {"mim": "last", "clipself": "cls"}.get(objective, cfg["align_config"]["teacher"]["target"])
    assert cfg["target"] == cfg["teacher"]["target"] == want
    model = load_aligned(out)
    has_decoder = objective == "maskembed"
    assert (model.decoder is not None) == has_decoder and any(k.startswith("decoder.") for k in a) == has_decoder
    assert torch.isfinite(model.encoder.forward_features(torch.zeros(1, 3, 32, 32))).all()
    if not has_decoder:
        from prismatic_locality.prismatic.projector import projector_init
        with pytest.raises(CheckpointError, match=f"objective '{objective}'"):
            projector_init(model)
    losses = [json.loads(r)["loss"] for r in (ref.parent / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
    assert len(losses) == 3 and all(map(lambda v: v == v, losses))


@pytest.mark.slow
def test_an_aligned_checkpoint_is_the_teacher_exactly(tmp_path, data, one_thread):
    mim = TR.train(parse_config(run_args(tmp_path, "mim", "--run_name", "mim")))
    cfg = parse_config(run_args(tmp_path, "maskembed", "--teacher.aligned", str(mim), "--teacher.target", "last"))
    student, teacher = TR.build_model(validate(cfg), torch.device("cpu"))
    x = images(2)
    ref = load_aligned(mim).encoder.forward_features(x)
    assert torch.equal(teacher(x, torch.ones(2, 1, 16, dtype=torch.bool)), ref)
    assert V.softcap_of(teacher.vit) == 30.0
    # the student still starts from the original teacher ViT, not from the MIM encoder
    original = TR.build_model(validate(parse_config(run_args(tmp_path, "maskembed"))), torch.device("cpu"))[0]
    assert all(torch.equal(p, q) for p, q in zip(student.encoder.blocks.parameters(), original.encoder.blocks.parameters()))
    # a MIM run whose teacher is the MIM checkpoint (the reference's MIM-of-aligned chain) builds too
    cfg = validate(parse_config(run_args(tmp_path, "mim", "--teacher.aligned", str(mim))))
    assert isinstance(TR.build_model(cfg, torch.device("cpu"))[1], O.MIMTeacher)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def test_config_errors_are_one_line_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="config field 'objective': 'foo' is not one of maskembed | mim | clipself"):
        validate(parse_config(run_args(tmp_path, "foo")))
    with pytest.raises(FileNotFoundError, match="config field 'teacher.aligned'"):
        validate(parse_config(run_args(tmp_path, "maskembed", "--teacher.aligned", str(tmp_path / "none"))))
    with pytest.raises(ValueError, match="config field 'teacher.aligned'.*'clipself'"):
        validate(parse_config(run_args(tmp_path, "clipself", "--teacher.aligned", str(tmp_path))))
    assert parse_config([]).objective == "maskembed"


def test_objective_recipes():
    for name, objective, loss in [("clip-b-224-mim", "mim", "mse"), ("clip-b-224-clipself", "clipself", "cosine"),
                                  ("demo-mim", "mim", "mse"), ("demo-clipself", "clipself", "cosine")]:
        cfg, base = get_recipe(name), get_recipe("demo" if name.startswith("demo") else "clip-b-224")
        assert (cfg.recipe, cfg.objective, cfg.loss) == (name, objective, loss)
        assert (cfg.teacher, cfg.optim, cfg.global_batch, cfg.precision) == (base.teacher, base.optim, base.global_batch,
                                                                             base.precision)
