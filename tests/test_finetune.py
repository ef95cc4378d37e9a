"""`locality finetune`: tiny random ViTs on an ImageFolder of coloured squares written here."""
import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from prismatic_locality import checkpoint as C
from prismatic_locality import cli
from prismatic_locality import vit as V
from prismatic_locality.align.train import Stopped
from prismatic_locality.decoder import MaskEmbedDecoder
from prismatic_locality.finetune import config as FC
from prismatic_locality.finetune import train as FT
from prismatic_locality.finetune.model import build_classifier, build_optimizer
from prismatic_locality.maskembed import default_decoder_config, make_encoder

from conftest import TINY, tiny_vit

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def write_folder(root: Path, per_class=(8, 4), size=32, seed=0, classes=COLOURS) -> Path:
    """{root}/{train,val}/<colour>/*.png: a coloured square on grey noise, placed at random."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for name, colour in classes.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(90, 160, size=(size, size, 3), dtype=np.uint8)
                s = int(rng.integers(12, 20))
                y, x = rng.integers(0, size - s, size=2)
                img[y:y + s, x:x + s] = colour
                Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def squares(tmp_path):
    return write_folder(tmp_path / "data")


def tiny_cfg(root, out, backbone="vit_base_patch16_clip_quickgelu_224", **over) -> FC.FinetuneConfig:
    cfg = FC.get_recipe("demo")
    cfg.model.backbone = backbone
    cfg.model.pretrained = False
    cfg.model.timm_kwargs = {} if backbone.startswith(("/", ".")) or os.path.isdir(backbone) else dict(TINY["clip"][1])
    cfg.data.root, cfg.output_dir, cfg.run_name = str(root), str(out), "ft"
    cfg.global_batch, cfg.micro_batch, cfg.epochs = 8, 4, 2.0
    for k, v in over.items():
        obj = cfg
        *path, leaf = k.split(".")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, leaf, v)
    return cfg


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def test_topk_matches_a_hand_count():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4, 0.5],    # target 1: top-1 hit
                           [0.9, 0.1, 0.8, 0.7, 0.6, 0.5, 0.0],    # target 6: lowest, no hit
                           [0.0, 0.5, 0.9, 0.1, 0.2, 0.3, 0.4],    # target 6: rank 2, top-5 hit only
                           [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])   # target 4: rank 5, top-5 hit only
    targets = torch.tensor([1, 6, 6, 4])
    assert FT.topk_correct(logits, targets) == [1, 3]
    # fewer classes than k: top-5 counts every row
    assert FT.topk_correct(logits[:, :3], torch.tensor([0, 0, 1, 2])) == [1, 4]


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_learns_the_squares_and_reports_top1_top5(squares, tmp_path, one_thread):
    cfg = tiny_cfg(squares, tmp_path / "runs", epochs=8.0, **{"optim.lr": 2e-3, "optim.warmup_epochs": 0.0})
    run_dir = FT.finetune(cfg)
    res = json.loads((run_dir / "results.json").read_text())
    recs = read_jsonl(run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[-1] < losses[0]
    assert len(res["epochs"]) == 8 and res["classes"] == ["blue", "green", "red"]
    assert res["best"]["top1"] == max(e["top1"] for e in res["epochs"])
    assert res["best"]["top1"] > 100 / 3 + 20      # well above chance on an easy task
    assert all(e["top5"] == 100.0 for e in res["epochs"])  # 3 classes: top-5 is every image
    assert any("img_per_s" in r for r in recs) and any("top1" in r for r in recs)


def test_reference_recipe_runs_a_step_with_mixup_randaugment_erasing(squares, tmp_path, one_thread):
    cfg = FC.get_recipe("clip-b-224")
    cfg.model.backbone, cfg.model.pretrained = TINY["clip"][0], False
    cfg.model.timm_kwargs = dict(TINY["clip"][1])
    cfg.data.root, cfg.data.workers, cfg.data.val_batch_size = str(squares), 0, 12
    cfg.output_dir, cfg.run_name, cfg.device = str(tmp_path / "runs"), "ref", "cpu"
    cfg.global_batch, cfg.micro_batch, cfg.max_steps = 8, 4, 2
    run_dir = FT.finetune(cfg)
    recs = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in recs if "loss" in r] == [2] and np.isfinite(recs[0]["loss"])
    assert [r["step"] for r in recs if "top1" in r] == [2]


def test_killed_run_resumes_bit_identically(squares, tmp_path, monkeypatch, one_thread):
    # 24 train images / 8 = 3 steps per epoch: the state is saved at step 3 (epoch end), the crash is in step 5
    over = {"save_every": 100, "max_steps": 5, "mix.mixup": 0.8, "mix.cutmix": 1.0,
            "data.randaugment": "rand-m9-mstd0.5-inc1", "data.reprob": 0.25, "model.drop_path": 0.1}
    ref_dir = FT.finetune(tiny_cfg(squares, tmp_path / "a", **over))
    ref = load_file(str(ref_dir / "state" / "model.safetensors"))

    real, calls = FT.train_step, {"n": 0}

    def crash_at_step_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("killed")
        return real(*a, **k)
    monkeypatch.setattr(FT, "train_step", crash_at_step_5)
    cfg = tiny_cfg(squares, tmp_path / "b", **over)
    with pytest.raises(RuntimeError, match="killed"):
        FT.finetune(cfg)
    assert json.loads((tmp_path / "b" / "ft" / "state" / "state.json").read_text())["step"] == 3
    monkeypatch.setattr(FT, "train_step", real)
    out = FT.finetune(tiny_cfg(squares, tmp_path / "b", **over))
    got = load_file(str(out / "state" / "model.safetensors"))
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert steps == [r["step"] for r in read_jsonl(ref_dir / "metrics.jsonl") if "loss" in r]


def test_sigterm_saves_and_stops(squares, tmp_path, monkeypatch, one_thread):
    real = FT.train_step

    def signalled(*a, **k):
        out = real(*a, **k)
        os.kill(os.getpid(), __import__("signal").SIGTERM)
        return out
    monkeypatch.setattr(FT, "train_step", signalled)
    cfg = tiny_cfg(squares, tmp_path / "r", max_steps=4, save_every=100)
    with pytest.raises(Stopped, match="after step 1 of 4"):
        FT.finetune(cfg)
    assert json.loads((tmp_path / "r" / "ft" / "state" / "state.json").read_text())["step"] == 1


def aligned_dir(tmp_path) -> Path:
    name, kw = TINY["clip"]
    vit = tiny_vit("clip")
    enc = make_encoder(copy.deepcopy(vit), 24)
    dec = MaskEmbedDecoder(default_decoder_config(V.vit_spec(vit), V.vit_spec(enc), width=24))
    return C.save_aligned(tmp_path / "aligned", enc, dec, model_name=name, softcap=30.0, timm_kwargs=kw)


def test_aligned_checkpoint_backbone_gets_the_same_head(squares, tmp_path, one_thread):
    ckpt = aligned_dir(tmp_path)
    cfg = tiny_cfg(squares, tmp_path / "runs", backbone=str(ckpt), max_steps=2)
    model = build_classifier(cfg.model, 3, torch.device("cpu"))
    assert model.kind == "aligned"
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"backbone", "pool", "head"}
    assert not any(n.startswith("backbone.head") for n, _ in model.named_parameters())  # MaskEmbed head dropped
    # the backbone's weights are the checkpoint's encoder
    enc = load_file(str(ckpt / "model.safetensors"))
    assert torch.equal(model.backbone.blocks[0].mlp.fc1.weight, enc["encoder.blocks.0.mlp.fc1.weight"])
    stock = build_classifier(tiny_cfg(squares, tmp_path / "s").model, 3, torch.device("cpu"))
    assert type(model.pool) is type(stock.pool) and model.pool.pos_embed.shape == stock.pool.pos_embed.shape
    out = FT.finetune(cfg)
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "aligned" and res["final"]["images"] == 12


def test_layer_decay_uses_timm_groups(squares, tmp_path):
    cfg = tiny_cfg(squares, tmp_path)
    model = build_classifier(cfg.model, 3, torch.device("cpu"))
    opt = build_optimizer(model, 1e-3, 0.05, 0.5, (0.9, 0.999), 1e-8)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    by_name = {n: scale[id(p)] for n, p in model.named_parameters()}
    assert by_name["head.weight"] == by_name["pool.pos_embed"] == 1.0
    assert by_name["backbone.blocks.2.attn.qkv.weight"] > by_name["backbone.blocks.0.attn.qkv.weight"]
    assert by_name["backbone.patch_embed.proj.weight"] < by_name["backbone.blocks.0.attn.qkv.weight"]
    # without layer decay: one group, weight decay on every parameter (as the reference runs)
    plain = build_optimizer(model, 1e-3, 0.05, None, (0.9, 0.999), 1e-8)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["weight_decay"] == 0.05


# ---------------------------------------------------------------------------------------------
# bad input: one line each
# ---------------------------------------------------------------------------------------------


def run_cli(args, capsys):
    rc = cli.main(["finetune", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


def base_args(root, out):
    name, kw = TINY["clip"]
    return ["--recipe", "demo", "--model.backbone", name, "--model.pretrained", "false",
            "--model.timm_kwargs", json.dumps(kw), "--data.root", str(root), "--output_dir", str(out),
            "--global_batch", "8", "--micro_batch", "4", "--max_steps", "1"]


@pytest.mark.parametrize("case", ["missing_val", "empty_train", "class_mismatch", "loose_image", "bad_field",
                                  "odd_micro_batch", "bad_head", "one_class", "bad_backbone"])
def test_bad_input_is_one_line(case, squares, tmp_path, capsys):
    args = base_args(squares, tmp_path / "runs")
    if case == "missing_val":
        os.rename(squares / "val", squares / "validation")
        want = "image folder not found"
    elif case == "empty_train":
        for p in (squares / "train").rglob("*.png"):
            p.unlink()
        want = "no image files"
    elif case == "class_mismatch":
        os.rename(squares / "val" / "blue", squares / "val" / "cyan")
        want = "class folders differ"
    elif case == "loose_image":
        Image.new("RGB", (32, 32)).save(squares / "train" / "stray.png")
        want = "an image directly in the split folder"
    elif case == "bad_field":
        args += ["--optim.lr", "-1"]
        want = "'optim.lr' must be > 0"
    elif case == "odd_micro_batch":
        args += ["--mix.mixup", "0.8", "--micro_batch", "3", "--global_batch", "9"]
        want = "must be even"
    elif case == "bad_head":
        args += ["--model.head", "map"]
        want = "'model.head'"
    elif case == "bad_backbone":
        args[args.index("--model.backbone") + 1] = str(tmp_path)  # a folder, not an aligned checkpoint
        want = f"{tmp_path}/config.json"
    else:
        one = write_folder(tmp_path / "one", classes={"red": COLOURS["red"]})
        args[args.index("--data.root") + 1] = str(one)
        want = "needs 2 or more"
    rc, line = run_cli(args, capsys)
    assert rc == 1 and line.startswith("locality finetune: error:") and want in line, line


def test_unreadable_image_is_a_counted_logged_skip(squares, tmp_path, caplog, one_thread):
    bad = squares / "train" / "red" / "000.png"
    bad.write_bytes(b"not an image")
    out = FT.finetune(tiny_cfg(squares, tmp_path / "runs", max_steps=2))
    res = json.loads((out / "results.json").read_text())
    assert res["skipped_images"] == 1
    assert sum("skipped unreadable image" in r.getMessage() and str(bad) in r.getMessage() for r in caplog.records) == 1
    recs = read_jsonl(out / "metrics.jsonl")
    assert recs[-2]["skipped_images"] == 1


def test_randaugment_full_strength_posterize_is_a_black_image_on_any_pillow():
    from prismatic_locality.finetune.data import TrainTransform

    t = TrainTransform(FC.get_recipe("clip-b-224"), 32, (0.5,) * 3, (0.5,) * 3)
    op = next(op for op in t.color.ops if op.name == "PosterizeIncreasing")
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert op.aug_fn(img, 0).getextrema() == ((0, 0),) * 3      # keep 0 bits (magnitude 10)
    assert op.aug_fn(img, 1).getpixel((0, 0)) == (128, 0, 0)    # ordinary strengths: Pillow's posterize
