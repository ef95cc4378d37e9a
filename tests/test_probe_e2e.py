"""End-to-end probing on tiny fixtures written in the real COCO-Stuff / ADE20k / demo layouts."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from prismatic_locality import checkpoint as C
from prismatic_locality import maskembed as M
from prismatic_locality.decoder import DecoderConfig, MaskEmbedDecoder
from prismatic_locality.fileio import write_json
from prismatic_locality.probe import compare as probe_compare
from prismatic_locality.probe import features as F
from prismatic_locality.probe import labels as L
from prismatic_locality.probe import run as probe_run
from prismatic_locality.probe.backbone import Backbone, BackboneConfig
from prismatic_locality.probe.datasets import ProbeDataset
from prismatic_locality.probe.run import ProbeDataConfig, ProbeConfig, run_probe
from prismatic_locality.probe.train import HeadConfig, ProbeOptimConfig

from conftest import TINY, tiny_vit

TINY_NAME, TINY_KW = TINY["in1k"]  # 32 px, 8 px patches -> 4 x 4 grid, CLS token
COLORS = np.random.RandomState(0).randint(0, 255, size=(256, 3))


def _scene(rng, w, h, classes, bg):
    """A label map with 1-3 rectangles of `classes` on `bg`, and an image coloured by class."""
    lbl = np.full((h, w), bg, dtype=np.int64)
    for _ in range(rng.randint(1, 4)):
        c = classes[rng.randint(len(classes))]
        x0, y0 = rng.randint(0, w - 8), rng.randint(0, h - 8)
        lbl[y0:y0 + rng.randint(6, 16), x0:x0 + rng.randint(6, 16)] = c
    img = COLORS[lbl] + rng.randint(-20, 20, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8), lbl


def write_coco(root, n_train=12, n_val=6, images_subdir=True, w=40, h=36):
    """COCO-Stuff 164k: {root}/images/{split}2017/*.jpg + stuffthingmaps_trainval2017/{split}2017/*.png."""
    rng = np.random.RandomState(1)
    for split, n in (("train", n_train), ("val", n_val)):
        idir = root / ("images" if images_subdir else "") / f"{split}2017"
        ldir = root / "stuffthingmaps_trainval2017" / f"{split}2017"
        idir.mkdir(parents=True), ldir.mkdir(parents=True)
        for i in range(n):
            img, lbl = _scene(rng, w, h, [1, 3, 18, 92, 150], bg=0)  # bg 0 = unlabeled
            name = f"{i:012d}"
            Image.fromarray(img).save(idir / f"{name}.jpg", quality=95)
            Image.fromarray(((lbl - 1) % 256).astype(np.uint8)).save(ldir / f"{name}.png")  # id -> PNG value
    return root


def write_ade(root, n_train=12, n_val=6, w=36, h=44):
    rng = np.random.RandomState(2)
    base = root / "ADEChallengeData2016"
    for split, n in (("training", n_train), ("validation", n_val)):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            img, lbl = _scene(rng, w, h, [1, 3, 13, 150], bg=0)
            name = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(img).save(base / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(lbl.astype(np.uint8)).save(base / "annotations" / split / f"{name}.png")
    return root


def write_demo(root, n_train=12, n_val=6):
    rng = np.random.RandomState(3)
    (root).mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps(["background", "zero", "one", "two"]))
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(n):
            img, lbl = _scene(rng, 32, 32, [1, 2, 3], bg=0)
            Image.fromarray(img).save(root / split / "images" / f"{i:05d}.png")
            Image.fromarray(lbl.astype(np.uint8)).save(root / split / "labels" / f"{i:05d}.png")
    return root


def tiny_cfg(root, dataset, tmp_path, **kw):
    cfg = ProbeConfig(
        backbone=BackboneConfig(name=TINY_NAME, pretrained=False, timm_kwargs=dict(TINY_KW, depth=2)),
        dataset=dataset,
        data=ProbeDataConfig(root=str(root), num_workers=0),
        optim=ProbeOptimConfig(batch_size=4, epochs=2, warmup_steps=2),
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "out"),
        extract_batch_size=5,
        figure_images=2,
        threads=1,  # fast on a shared CPU; restored after the run
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


class CountForward:
    """Counts backbone forwards through a forward hook (no monkeypatching)."""

    def __init__(self, model):
        self.calls = 0
        model.blocks[0].register_forward_hook(self)

    def __call__(self, *_):
        self.calls += 1


@pytest.mark.slow
def test_coco_end_to_end_and_cache_reuse(tmp_path):
    root = write_coco(tmp_path / "coco")
    cfg = tiny_cfg(root, "coco-stuff", tmp_path)
    vit = tiny_vit("in1k")
    counter = CountForward(vit)
    bb = Backbone(vit, "timm", "tiny-in1k")
    threads = torch.get_num_threads()
    r1 = run_probe(cfg, backbone=bb)
    assert torch.get_num_threads() == threads
    first_calls = counter.calls
    assert first_calls == 3 + 2  # 12 train in batches of 5, 6 val
    assert not r1["cache"]["reused"]
    for task in ("local", "global"):
        r = r1[task]
        assert 0.0 <= r["macro_recall"] <= 1.0 and 1 <= r["best_epoch"] <= 2
        assert r["macro_recall"] == max(e["macro_recall"] for e in r["epochs"])
        assert r["steps"] == 2 * (12 // 4)
        assert len(r["per_class_recall"]) == 183 and len(r["size_bins"]) == 10
        # never-used COCO ids (12 street sign) have no positives and no recall
        assert r["per_class_recall"][12] is None and r["val_positives"][12] == 0
    assert r1["dataset"]["num_classes"] == 183
    out = tmp_path / "out"
    for f in ("results.json", "per_class.csv", "per_class.md", "size_recall.csv", "size_recall.png", "qualitative.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    saved = json.loads((out / "results.json").read_text())
    assert saved["local"]["macro_recall"] == r1["local"]["macro_recall"]
    assert "macro recall local" in saved["summary"]
    # val positives of the global task = number of val images containing the class
    val = ProbeDataset("coco-stuff", root, "val", 32, 8)
    present = sum(int((val.load_label_map(i) == 1).any()) for i in range(len(val)))
    assert saved["global"]["val_positives"][1] == present

    # second run: features come from the cache, the backbone is not run, results are bit-identical
    r2 = run_probe(cfg, backbone=bb)
    assert counter.calls == first_calls
    assert r2["cache"]["reused"]
    assert r2["local"]["epochs"] == r1["local"]["epochs"] and r2["global"]["epochs"] == r1["global"]["epochs"]

    # changed weights invalidate the cache
    with torch.no_grad():
        vit.blocks[0].mlp.fc1.weight.add_(0.01)
    r3 = run_probe(cfg, backbone=bb)
    assert counter.calls == 2 * first_calls
    assert not r3["cache"]["reused"] and r3["cache"]["train"] != r1["cache"]["train"]
    # ... but the labels cache (backbone-independent) is shared
    assert len(list((tmp_path / "cache").glob("labels-*"))) == 2  # train + val
    assert len(list((tmp_path / "cache").glob("features-*"))) == 4


class Killed(Exception):
    pass


def test_killed_extraction_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "PROGRESS_EVERY_S", 0.0)  # record progress after every batch
    root = write_coco(tmp_path / "coco")
    vit = tiny_vit("in1k")
    bb = Backbone(vit, "timm", "tiny")
    ds = ProbeDataset("coco-stuff", root, "train", 32, 8)  # 12 images: 3 batches of 4
    ref = F.build_split(ds, bb, tmp_path / "ref", batch_size=4)

    calls = {"n": 0, "kill_at": 3}

    def hook(*_):
        calls["n"] += 1
        if calls["n"] == calls["kill_at"]:
            raise Killed("simulated kill")

    vit.blocks[0].register_forward_hook(hook)
    cache = tmp_path / "cache"
    with pytest.raises(Killed):
        F.build_split(ds, bb, cache, batch_size=4)
    partial = [d for d in cache.glob(".features-*.partial")]
    assert len(partial) == 1 and json.loads((partial[0] / "progress.json").read_text())["done"] == 8
    assert not list(cache.glob("features-*")) and not list(cache.glob("labels-*"))

    calls.update(n=0, kill_at=None)
    got = F.build_split(ds, bb, cache, batch_size=4)  # resumes: only the last batch is computed
    assert calls["n"] == 1
    assert np.array_equal(np.asarray(got.features), np.asarray(ref.features))
    assert np.array_equal(np.asarray(got.patch), np.asarray(ref.patch))
    assert np.array_equal(np.asarray(got.fractions), np.asarray(ref.fractions))
    assert json.loads((got.features_dir / "meta.json").read_text())["resumed_at"] == 8 and not list(cache.glob("*.partial"))

    # a partial made with another batch size is not mixed in: extraction starts over
    calls.update(n=0, kill_at=2)
    with pytest.raises(Killed):
        F.build_split(ds, bb, tmp_path / "other", batch_size=4)
    calls.update(n=0, kill_at=None)
    again = F.build_split(ds, bb, tmp_path / "other", batch_size=6)
    assert calls["n"] == 2 and json.loads((again.features_dir / "meta.json").read_text())["resumed_at"] == 0


def locked_cache_fixture(tmp_path):
    """A tiny COCO split, a backbone, an empty cache dir and the feature dir an extraction would take."""
    root = write_coco(tmp_path / "coco", n_train=4)
    bb = Backbone(tiny_vit("in1k"), "timm", "tiny")
    ds = ProbeDataset("coco-stuff", root, "train", 32, 8)
    cache = tmp_path / "cache"
    cache.mkdir()
    return bb, ds, cache, cache / f"features-{F.features_key(bb, ds, 'fp32')}"


@pytest.mark.slow
def test_a_second_extraction_of_the_same_cache_waits_for_the_first(tmp_path):
    import threading

    bb, ds, cache, feat_dir = locked_cache_fixture(tmp_path)
    result = {}
    with F._locked(feat_dir):  # as if another process were extracting it
        t = threading.Thread(target=lambda: result.update(split=F.build_split(ds, bb, cache, batch_size=4)))
        t.start()
        t.join(timeout=1.0)
        assert t.is_alive() and not F._complete(feat_dir)  # waiting, not writing
    t.join(timeout=60)
    assert not t.is_alive() and result["split"].features.shape[0] == 4 and F._complete(feat_dir)


def ade_cli(tmp_path, epochs: int) -> list[str]:
    """`locality probe` arguments for a tiny random backbone on a fresh ADE20k fixture."""
    return ["--dataset", "ade20k", "--data.root", str(write_ade(tmp_path / "ade")), "--data.num_workers", "0",
            "--backbone", TINY_NAME, "--backbone.pretrained", "false",
            "--backbone.timm_kwargs", json.dumps(dict(TINY_KW, depth=2)),
            "--optim.batch_size", "4", "--optim.epochs", str(epochs), "--optim.warmup_steps", "2",
            "--cache_dir", str(tmp_path / "cache"), "--device", "cpu", "--figure_images", "1", "--threads", "1"]


@pytest.mark.slow
def test_cli_ade20k_and_compare(tmp_path, capsys):
    common = ade_cli(tmp_path, epochs=2)
    assert probe_run.main(common + ["--output_dir", str(tmp_path / "a"), "--task", "local"]) == 0
    assert probe_run.main(common + ["--output_dir", str(tmp_path / "b"), "--head.kind", "linear",
                                    "--backbone.init_seed", "1"]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert "global" not in a and a["dataset"]["num_classes"] == 151
    assert b["config"]["head"]["kind"] == "linear" and "global" in b
    assert a["backbone"]["fingerprint"] != b["backbone"]["fingerprint"]
    out = capsys.readouterr().out
    assert "probe vit_tiny_patch16_224 on ade20k (12 train / 6 val, transformer head)" in out

    assert probe_compare.main([str(tmp_path / "a"), str(tmp_path / "b" / "results.json"),
                               "--names", "teacher,aligned", "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    la, lb = 100 * a["local"]["macro_recall"], 100 * b["local"]["macro_recall"]
    assert f"| teacher | vit_tiny_patch16_224 | ade20k | transformer | {la:.2f} | – | +0.00 | – |" in md
    assert f"| aligned | vit_tiny_patch16_224 | ade20k | linear | {lb:.2f} | {100 * b['global']['macro_recall']:.2f} | {lb - la:+.2f} | – |" in md
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    assert (tmp_path / "cmp" / "compare_size.png").stat().st_size > 0
    assert "## Local recall by class: aligned vs teacher" in md and "- classes: most improved" in md
    assert (tmp_path / "cmp" / "compare_class_aligned.png").stat().st_size > 0
    assert probe_compare.main([str(tmp_path / "missing")]) == 2
    assert "probe results not found" in capsys.readouterr().err


def test_intervention_view_is_run_recorded_and_validated_early(tmp_path, capsys):
    common = ade_cli(tmp_path, epochs=1) + ["--head.view", "cls", "--output_dir", str(tmp_path / "cls")]
    assert probe_run.main(common) == 2  # task defaults to both: refused before any feature extraction
    assert "use --task local --head.kind transformer" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
    assert probe_run.main(common + ["--task", "local"]) == 0
    r = json.loads((tmp_path / "cls" / "results.json").read_text())
    assert r["config"]["head"]["view"] == "cls" and r["local"]["view"] == "cls" and "global" not in r
    assert "transformer head, cls view)" in r["summary"]


def test_aligned_checkpoint_backbone_and_demo_layout(tmp_path):
    root = write_demo(tmp_path / "scenes")
    vit = tiny_vit("clip")
    enc = M.make_encoder(vit, out_dim=48)
    s = C.V.vit_spec(enc)
    dec = MaskEmbedDecoder(DecoderConfig(num_tokens=s.num_tokens, num_prefix_tokens=1, width=48, out_dim=48, num_heads=3))
    name, kw = TINY["clip"]
    ckpt = C.save_aligned(tmp_path / "aligned", enc, dec, model_name=name, softcap=30.0, timm_kwargs=kw)
    cfg = tiny_cfg(root, "demo", tmp_path, backbone=BackboneConfig(name=str(ckpt)),
                   head=HeadConfig(kind="mlp", hidden=16), task="global")
    r = run_probe(cfg)
    assert r["backbone"]["kind"] == "aligned" and r["dataset"]["class_names"] == ["background", "zero", "one", "two"]
    assert "local" not in r and 0 <= r["global"]["macro_recall"] <= 1
    # the cached features are the aligned features of the preprocessed images
    meta = json.loads(next((tmp_path / "cache").glob("features-*")).joinpath("meta.json").read_text())
    assert meta["backbone"]["kind"] == "aligned"
    feats = np.load(r["cache"]["val"] + "/features.npy")
    loaded = C.load_aligned(ckpt).encoder
    ds = ProbeDataset("demo", root, "val", 32, 8)
    x = torch.from_numpy(np.array(ds.load_image(0))).permute(2, 0, 1)[None]
    bb = Backbone(loaded, "aligned", "x")
    ref = M.aligned_features(loaded, bb.normalize(x))[0].half().numpy()
    np.testing.assert_array_equal(feats[0], ref)


def test_deterministic_across_fresh_loads(tmp_path):
    root = write_demo(tmp_path / "scenes", n_train=8, n_val=4)
    cfg = tiny_cfg(root, "demo", tmp_path, task="local", write_outputs=False)
    r1 = run_probe(cfg)
    cfg.cache_dir = str(tmp_path / "cache2")  # fresh extraction, fresh model load
    r2 = run_probe(cfg)
    assert r1["local"]["epochs"] == r2["local"]["epochs"]
    assert r1["backbone"]["fingerprint"] == r2["backbone"]["fingerprint"]
    cfg.optim.max_ram_gb = 0.0  # batches read straight from the memory map: same numbers
    r3 = run_probe(cfg)
    assert r3["cache"]["reused"] and r3["local"]["epochs"] == r1["local"]["epochs"]


def test_bf16_head_training_is_deterministic_and_recorded(tmp_path):
    root = write_demo(tmp_path / "scenes", n_train=8, n_val=4)
    cfg = tiny_cfg(root, "demo", tmp_path, task="local", write_outputs=False)
    fp32 = run_probe(cfg)["local"]
    cfg.optim.precision = "bf16"
    r1, r2 = run_probe(cfg)["local"], run_probe(cfg)["local"]
    assert (fp32["precision"], r1["precision"]) == ("fp32", "bf16")
    assert r1["epochs"] == r2["epochs"] and 0 <= r1["macro_recall"] <= 1
    assert [e["train_loss"] for e in r1["epochs"]] != [e["train_loss"] for e in fp32["epochs"]]  # bf16 did run
    cfg.optim.precision = "fp16"
    with pytest.raises(ValueError, match="optim.precision"):
        run_probe(cfg)


# -------------------------------------------------------------------------- bad input


def test_missing_pairs_are_named(tmp_path):
    root = write_coco(tmp_path / "coco", n_train=4, n_val=2, images_subdir=False)  # {root}/val2017 layout
    os.remove(root / "stuffthingmaps_trainval2017" / "val2017" / "000000000001.png")
    with pytest.raises(ValueError, match=r"1 images in .*val2017 without a label map.*000000000001"):
        ProbeDataset("coco-stuff", root, "val", 32, 8)
    ds = ProbeDataset("coco-stuff", root, "val", 32, 8, skip_unpaired=True)
    assert len(ds) == 1
    Image.new("L", (40, 36)).save(root / "stuffthingmaps_trainval2017" / "train2017" / "extra.png")
    with pytest.raises(ValueError, match="label maps .* without an image: extra"):
        ProbeDataset("coco-stuff", root, "train", 32, 8)


def test_size_mismatch_and_bad_values_are_named(tmp_path, capsys):
    root = write_ade(tmp_path / "ade", n_train=3, n_val=2)
    ann = root / "ADEChallengeData2016" / "annotations" / "validation"
    bad = sorted(ann.iterdir())[1]
    Image.new("L", (10, 10)).save(bad)
    ds = ProbeDataset("ade20k", root, "val", 32, 8)
    with pytest.raises(ValueError, match=rf"size mismatch: image .*{bad.stem}.jpg is 36x44, label map .*{bad.name} is 10x10"):
        ds[1]
    Image.new("L", (36, 44), color=151).save(bad)
    with pytest.raises(ValueError, match=rf"{bad.name}: label value maps to class 151"):
        ds[1]
    # a failing extraction leaves no cache that could be taken as complete
    cfg = tiny_cfg(root, "ade20k", tmp_path)
    with pytest.raises(ValueError):
        run_probe(cfg)
    cache = tmp_path / "cache"
    done = [d for d in cache.iterdir() if (d / "meta.json").is_file()]
    assert sorted(d.name.split("-")[0] for d in done) == ["features", "labels"]  # only the train split
    assert all(json.loads((d / "meta.json").read_text())["split"] == "train" for d in done)
    # what the failed val extraction left is hidden and incomplete (a partial dir, lock files)
    assert sorted(d.name for d in cache.iterdir() if not d.name.startswith(".")) == sorted(d.name for d in done)
    assert not [d for d in cache.glob(".*") if (d / "meta.json").exists()]
    # from the CLI, with decoding in a worker process: one clear line
    argv = ["--dataset", "ade20k", "--data.root", str(root), "--data.num_workers", "1", "--backbone", TINY_NAME,
            "--backbone.pretrained", "false", "--backbone.timm_kwargs", json.dumps(dict(TINY_KW, depth=2)),
            "--cache_dir", str(cache), "--device", "cpu", "--threads", "1"]
    capsys.readouterr()
    assert probe_run.main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and err[0].startswith("locality probe: error: ") and f"{bad.name}: label value" in err[0]


@pytest.mark.slow
def test_empty_split_and_missing_dirs(tmp_path):
    root = write_demo(tmp_path / "scenes", n_train=2, n_val=1)
    for f in (root / "val" / "images").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=r"empty split: no images .* in .*val/images"):
        ProbeDataset("demo", root, "val", 32, 8)
    with pytest.raises(FileNotFoundError, match="COCO val2017 images not found"):
        ProbeDataset("coco-stuff", root, "val", 32, 8)
    with pytest.raises(ValueError, match="unknown dataset"):
        ProbeDataset("voc", root, "val", 32, 8)
    cfg = tiny_cfg(root, "demo", tmp_path)
    assert probe_run.main(["--dataset", "demo", "--data.root", str(root), "--backbone", TINY_NAME,
                           "--backbone.pretrained", "false", "--backbone.timm_kwargs", json.dumps(TINY_KW),
                           "--cache_dir", str(tmp_path / "c"), "--threads", "1"]) == 2
    cfg.optim.batch_size = 64
    (root / "val" / "images" / "00000.png").write_bytes((root / "train" / "images" / "00000.png").read_bytes())
    (root / "val" / "labels" / "00000.png").write_bytes((root / "train" / "labels" / "00000.png").read_bytes())
    with pytest.raises(ValueError, match="train split has 2 images, fewer than one batch"):
        run_probe(cfg)


def coco_results(name: str, recall: dict) -> dict:
    """A results.json as run_probe writes it, COCO-Stuff, local only: `recall` = {class id: recall}."""
    n = len(L.COCO_STUFF_CLASSES)
    per_class = [recall.get(c) for c in range(n)]
    return {"backbone": {"name": name}, "config": {"head": {"kind": "transformer"}},
            "dataset": {"name": "coco-stuff", "num_classes": n, "class_names": list(L.COCO_STUFF_CLASSES)},
            "local": {"macro_recall": sum(v for v in per_class if v is not None) / len(recall),
                      "per_class_recall": per_class, "val_positives": [int(v is not None) for v in per_class]}}


@pytest.mark.slow  # two probe runs on the COCO fixture: ~6 s
def test_compare_ranks_class_changes_within_things_and_stuff(tmp_path):
    # person (1) +0.20, cup (47) +0.30, bottle (44) -0.10, grass (124) +0.05, sky-other (157) -0.20;
    # class 12 (street sign, never annotated) has no recall in either run
    ref = {1: 0.5, 47: 0.2, 44: 0.6, 124: 0.7, 157: 0.9}
    run = {1: 0.7, 47: 0.5, 44: 0.5, 124: 0.75, 157: 0.7, 12: 0.4}
    for name, rec in (("teacher", ref), ("aligned", run)):
        write_json(tmp_path / name / "results.json", coco_results(name, rec))
    deltas = probe_compare.class_deltas(coco_results("t", ref), coco_results("a", run))
    assert [r["class_id"] for r in deltas] == [1, 44, 47, 124, 157]
    assert [round(r["delta"], 6) for r in deltas] == [0.2, -0.1, 0.3, 0.05, -0.2]
    table = probe_compare.compare([str(tmp_path / "teacher"), str(tmp_path / "aligned")], tmp_path / "cmp")
    assert "Improved on 3 of 5 classes, declined on 2; median Δ +5.00 (points)." in table
    assert "- things: most improved cup (+30.0), person (+20.0); most declined bottle (-10.0)" in table
    assert "- stuff: most improved grass (+5.0); most declined sky-other (-20.0)" in table
    assert (tmp_path / "cmp" / "compare_class_aligned.png").stat().st_size > 0
    assert table in (tmp_path / "cmp" / "compare.md").read_text()


@pytest.mark.slow
def test_a_waiting_extraction_says_whom_it_waits_for_and_reports_reuse_truthfully(tmp_path, caplog):
    import threading

    bb, ds, cache, feat_dir = locked_cache_fixture(tmp_path)
    lab_dir = cache / f"labels-{F.labels_key(ds)}"
    result = {}
    with caplog.at_level("INFO", logger=F.__name__):
        with F._locked(lab_dir), F._locked(feat_dir):    # as if another process were extracting both
            t = threading.Thread(target=lambda: result.update(split=F.build_split(ds, bb, cache, batch_size=4)))
            t.start()
            t.join(timeout=2.0)
            assert t.is_alive()
            # ... and that process finishes the caches while the thread waits
            F._extract_locked(ds, bb, lab_dir, feat_dir, 4, 0, torch.device("cpu"), "fp32", "other")
        t.join(timeout=60)
    assert not t.is_alive()
    waits = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert waits and f"pid {os.getpid()}" in waits[0] and lab_dir.name in waits[0], waits
    assert result["split"].features_cached                 # it reused the other process's features


def test_a_damaged_finished_cache_names_the_directory_and_how_to_rebuild(tmp_path):
    root = write_coco(tmp_path / "coco", n_train=4)
    bb = Backbone(tiny_vit("in1k"), "timm", "tiny")
    ds = ProbeDataset("coco-stuff", root, "train", 32, 8)
    split = F.build_split(ds, bb, tmp_path / "cache", batch_size=4)
    feats = split.features_dir / "features.npy"
    del split
    feats.write_bytes(feats.read_bytes()[:300])             # e.g. a disk that filled up, a partial copy
    with pytest.raises(ValueError, match=r"features-\w+ is damaged .*features.npy.*delete .* rebuild"):
        F.build_split(ds, bb, tmp_path / "cache", batch_size=4)
