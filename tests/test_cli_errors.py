"""User errors through the `locality` entry point: each exits non-zero with ONE stderr line that
names the culprit (file, field or value), no traceback, and those that can be checked up front are
refused before any compute."""
from __future__ import annotations

import collections
import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from prismatic_locality import checkpoint as C
from prismatic_locality import cli
from prismatic_locality import vit as V
from prismatic_locality.align import train as align_train
from prismatic_locality.decoder import MaskEmbedDecoder
from prismatic_locality.maskembed import default_decoder_config, make_encoder
from prismatic_locality.probe import run as probe_run

from conftest import TINY, tiny_vit
from test_align_train import write_tree
from test_convert import student, write_official
from test_probe_e2e import TINY_KW, TINY_NAME, ade_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_ALIGN = json.dumps(dict(TINY["in1k"][1], depth=2))


def one_line_error(capsys, argv, *culprits, main=cli.main) -> str:
    """Run a command; it must fail with exactly one stderr line containing every culprit."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code not in (0, None), err
    assert len(lines) == 1 and "Traceback" not in err, err
    for c in culprits:
        assert str(c) in lines[0], (c, lines[0])
    return lines[0]


@pytest.fixture
def no_compute(monkeypatch):
    """Building the models is where the trainer's compute starts: a check must fire before it."""
    def refuse(*_a, **_k):
        raise AssertionError("compute started before the check")
    monkeypatch.setattr(align_train, "build_model", refuse)


def align_argv(tmp_path, *extra):
    return ["align", "--recipe", "demo", "--data.root", str(tmp_path / "data"), "--output_dir", str(tmp_path / "runs"),
            "--teacher.timm_kwargs", TINY_ALIGN, "--global_batch", "8", "--micro_batch", "4", "--max_steps", "2",
            "--data.val_batch_size", "4", "--data.train_split", "train", "--data.val_split", "val", *extra]


def make_read_only(path: Path) -> None:
    """chmod is not enough for root; the immutable flag is (where the file system supports it)."""
    path.chmod(0o555)
    if os.access(path, os.W_OK) and os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a directory read-only for root here (no chattr)")


def undo_read_only(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o755)


# --------------------------------------------------------------------------------------------
# Output directory: a file, read-only, or a full disk -> refused before any compute
# --------------------------------------------------------------------------------------------


def test_align_output_dir_that_is_a_file(tmp_path, capsys, no_compute):
    (tmp_path / "runs").write_text("not a directory")
    one_line_error(capsys, align_argv(tmp_path), "output_dir", tmp_path / "runs", "not a directory")


def test_align_output_dir_read_only(tmp_path, capsys, no_compute):
    (tmp_path / "runs").mkdir()
    make_read_only(tmp_path / "runs")
    try:
        one_line_error(capsys, align_argv(tmp_path), "output_dir", tmp_path / "runs", "not writable")
    finally:
        undo_read_only(tmp_path / "runs")


def test_align_disk_full(tmp_path, capsys, no_compute, monkeypatch):
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 4096))
    one_line_error(capsys, align_argv(tmp_path), "output_dir", "free")


def test_probe_output_dir_checked_before_extraction(tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    argv = ade_cli(tmp_path, epochs=1) + ["--output_dir", str(tmp_path / "out")]
    one_line_error(capsys, argv, "output_dir", tmp_path / "out", main=probe_run.main)
    assert not (tmp_path / "cache").exists()  # no feature extraction happened


def test_probe_read_only_output_dir(tmp_path, capsys):
    (tmp_path / "ro").mkdir()
    make_read_only(tmp_path / "ro")
    try:
        argv = ade_cli(tmp_path, epochs=1) + ["--output_dir", str(tmp_path / "ro" / "out")]
        one_line_error(capsys, argv, "output_dir", tmp_path / "ro", "not writable", main=probe_run.main)
    finally:
        undo_read_only(tmp_path / "ro")
    assert not (tmp_path / "cache").exists()


def test_convert_output_is_a_file(tmp_path, capsys):
    enc, dec = student("clip")
    src = write_official(tmp_path / "c.pth.tar", enc, dec, "svit_base_patch16_clip_quickgelu_224")
    (tmp_path / "out").write_text("a file")
    one_line_error(capsys, ["convert", str(src), str(tmp_path / "out")], tmp_path / "out", "not a directory")
    assert (tmp_path / "out").read_text() == "a file"


# --------------------------------------------------------------------------------------------
# Data: every image unreadable, decoded in DataLoader workers
# --------------------------------------------------------------------------------------------


def test_all_images_unreadable_with_workers(tmp_path, capsys):
    write_tree(tmp_path / "data", n_train=8, n_val=4)
    for f in (tmp_path / "data").rglob("*.png"):
        f.write_bytes(b"not an image")
    line = one_line_error(capsys, align_argv(tmp_path, "--data.workers", "2"), "unreadable", tmp_path / "data")
    assert "DataLoader worker" not in line


# --------------------------------------------------------------------------------------------
# locality convert: empty file, NaN-corrupted tensor
# --------------------------------------------------------------------------------------------


def test_convert_empty_file(tmp_path, capsys):
    (tmp_path / "empty.pth.tar").write_bytes(b"")
    one_line_error(capsys, ["convert", str(tmp_path / "empty.pth.tar"), str(tmp_path / "o")], "empty.pth.tar", "empty")
    assert not (tmp_path / "o").exists()


def test_convert_nan_tensor_is_named_and_nothing_is_written(tmp_path, capsys):
    enc, dec = student("clip")
    with torch.no_grad():
        enc.blocks[1].attn.qkv.weight[0, 0] = float("nan")
    src = write_official(tmp_path / "c.pth.tar", enc, dec, "svit_base_patch16_clip_quickgelu_224")
    line = one_line_error(capsys, ["convert", str(src), str(tmp_path / "o")], "c.pth.tar",
                          "encoder.blocks.1.attn.qkv.weight", "non-finite")
    assert "round trip" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth.tar"]  # no output dir, no temp dir


# --------------------------------------------------------------------------------------------
# config.json of an aligned checkpoint: missing or malformed fields
# --------------------------------------------------------------------------------------------


@pytest.fixture
def aligned_dir(tmp_path):
    vit = tiny_vit("in1k")
    enc = make_encoder(copy.deepcopy(vit), 24)
    dec = MaskEmbedDecoder(default_decoder_config(V.vit_spec(vit), V.vit_spec(enc), width=24))
    name, kw = TINY["in1k"]
    return C.save_aligned(tmp_path / "ckpt", enc, dec, model_name=name, softcap=30.0, timm_kwargs=kw)


def edit_config(ckpt: Path, edit) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    edit(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, culprit", [
    (lambda c: c["encoder"].pop("head_out"), "encoder.head_out"),
    (lambda c: c["decoder"].update(colour="blue"), "decoder.colour"),
    (lambda c: c["encoder"].update(mean=0.5), "encoder.mean"),
    (lambda c: c["decoder"].pop("width"), "decoder.width"),
    (lambda c: c["decoder"].update(depth="two"), "decoder.depth"),
    (lambda c: c["encoder"].update(timm_kwargs=[1, 2]), "encoder.timm_kwargs"),
    (lambda c: c.update(encoder="vit"), "encoder"),
])
def test_malformed_config_json_is_named(aligned_dir, tmp_path, capsys, edit, culprit):
    edit_config(aligned_dir, edit)
    with pytest.raises(C.CheckpointError, match="config.json") as e:
        C.load_aligned(aligned_dir)
    assert f"'{culprit}'" in str(e.value) and "\n" not in str(e.value)
    argv = ["--backbone", str(aligned_dir), "--dataset", "demo", "--data.root", str(tmp_path), "--device", "cpu",
            "--output_dir", str(tmp_path / "out")]
    one_line_error(capsys, argv, "config.json", f"'{culprit}'", main=probe_run.main)


def test_valid_config_json_still_loads(aligned_dir):
    assert C.load_aligned(aligned_dir).spec.embed_dim == 48
    edit_config(aligned_dir, lambda c: c["encoder"].update(written_by_a_newer_version=1))  # tolerated
    assert C.load_aligned(aligned_dir).spec.embed_dim == 48


# --------------------------------------------------------------------------------------------
# Weight files that are not weights: the teacher (align) and the probed backbone
# --------------------------------------------------------------------------------------------


class Payload:
    """Unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bad_weight_files(tmp_path) -> dict:
    good = tmp_path / "good.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit("in1k").state_dict().items()}, str(good))
    files = {}
    files["pickle"] = tmp_path / "payload.pth"
    torch.save({"state_dict": Payload(tmp_path / "pwned")}, files["pickle"])
    files["raw_pickle"] = tmp_path / "payload.pkl"
    with open(files["raw_pickle"], "wb") as f:
        pickle.dump({"state_dict": Payload(tmp_path / "pwned")}, f)
    files["truncated"] = tmp_path / "cut.safetensors"
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["random"] = tmp_path / "noise.bin"
    files["random"].write_bytes(b"\x13" + np.random.default_rng(0).bytes(4095))
    torch.save({"state_dict": {}}, tmp_path / "ok.pth")
    files["truncated_torch"] = tmp_path / "cut.pth"
    files["truncated_torch"].write_bytes((tmp_path / "ok.pth").read_bytes()[:200])
    files["empty"] = tmp_path / "empty.safetensors"
    files["empty"].write_bytes(b"")
    return files


WHAT_IS_WRONG = {"pickle": "pickle that needs posix.system", "raw_pickle": "pickle", "truncated": "truncated", "random": "not", "truncated_torch": "truncated",
                 "empty": "empty"}


@pytest.mark.parametrize("kind", list(WHAT_IS_WRONG))
def test_teacher_weights_that_are_not_weights(tmp_path, capsys, kind):
    path = bad_weight_files(tmp_path)[kind]
    line = one_line_error(capsys, align_argv(tmp_path, "--teacher.weights", str(path)), path, WHAT_IS_WRONG[kind])
    assert "offline" not in line and "hub" not in line
    assert not (tmp_path / "pwned").exists()  # the pickled command never ran


@pytest.mark.parametrize("kind", ["pickle", "truncated"])
def test_probe_backbone_weights_that_are_not_weights(tmp_path, capsys, kind):
    path = bad_weight_files(tmp_path)[kind]
    argv = ["--backbone", TINY_NAME, "--backbone.weights", str(path), "--backbone.timm_kwargs", json.dumps(TINY_KW),
            "--dataset", "demo", "--data.root", str(tmp_path), "--device", "cpu", "--output_dir", str(tmp_path / "o")]
    one_line_error(capsys, ["probe", *argv], path, WHAT_IS_WRONG[kind])


# --------------------------------------------------------------------------------------------
# Arguments and config values
# --------------------------------------------------------------------------------------------


def test_probe_bad_argument_value(tmp_path, capsys):
    one_line_error(capsys, ["probe", "--optim.epochs", "abc"], "optim.epochs", "abc")


@pytest.mark.parametrize("field, value", [
    ("optim.lr", "inf"), ("optim.min_lr", "nan"), ("encoder.softcap", "-inf"),
    ("decoder.width", "-8"), ("decoder.width", "0"), ("masks.block_ratio", "5"), ("data.workers", "-1"),
])
def test_align_bad_values_rejected_in_validation(tmp_path, capsys, no_compute, field, value):
    one_line_error(capsys, align_argv(tmp_path, f"--{field}={value}"), f"'{field}'", value)


def test_decoder_width_default_is_explicit(tmp_path):
    from prismatic_locality.align.config import parse_config, validate

    argv = align_argv(tmp_path)[1:]
    assert validate(parse_config(argv)).decoder.width is None
    assert validate(parse_config(argv + ["--decoder.width", "null"])).decoder.width is None
    assert validate(parse_config(argv + ["--decoder.width", "32"])).decoder.width == 32
    with pytest.raises(ValueError, match="width"):
        default_decoder_config(V.vit_spec(tiny_vit("in1k")), V.vit_spec(tiny_vit("in1k")), width=0)


@pytest.mark.parametrize("field, value", [
    ("optim.lr", "inf"), ("optim.epochs", "0"), ("optim.batch_size", "-1"), ("data.num_workers", "-1"),
    ("extract_batch_size", "0"), ("head.layer_scale", "nan"),
])
def test_probe_bad_values_rejected_before_extraction(tmp_path, capsys, field, value):
    argv = ade_cli(tmp_path, epochs=1) + ["--output_dir", str(tmp_path / "out"), f"--{field}={value}"]
    one_line_error(capsys, argv, f"'{field}'", value, main=probe_run.main)
    assert not (tmp_path / "cache").exists()


def test_demo_usage_error_is_one_line_and_parsed_before_heavy_imports():
    code = ("import sys\nfrom prismatic_locality.cli import main\n"
            "try:\n    main(['demo', '--bogus'])\nexcept SystemExit as e:\n    code = e.code\n"
            "print(code, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.stdout.split() == ["2", "False"], (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--bogus" in lines[0], r.stderr
