"""`locality convert` builds the student the way the reference trainer did: architecture overrides
(`model_kwargs`, `student_model_kwargs`, `in_chans`) and the soft-cap come from the checkpoint's args."""
import argparse
import json

import pytest
import torch

from prismatic_locality import cli
from prismatic_locality.checkpoint import load_aligned
from prismatic_locality.convert import convert

from conftest import TINY
from test_convert import official_state, student


def write_with_args(path, enc, dec, arch, **args):
    torch.save({"epoch": 1, "arch": arch, "state_dict": official_state(enc, dec), "version": 2,
                "args": argparse.Namespace(model=arch, student_model=arch, **args)}, path)
    return path


def test_architecture_overrides_and_softcap_come_from_the_checkpoint_args(tmp_path):
    name, kw = TINY["clip"]
    enc, dec = student("clip", softcap=50.0)
    # as the reference's `--model-kwargs k=v` / `--student-model-kwargs k=v` store them
    src = write_with_args(tmp_path / "last.pth.tar", enc, dec, "s" + name, in_chans=None,
                          model_kwargs=dict(kw), student_model_kwargs={"max_attn_val": 50.0})
    out = convert(src, tmp_path / "out")  # no --timm-kwargs, no --softcap
    a = load_aligned(out)
    assert a.config["encoder"]["softcap"] == 50.0
    assert {b.attn.cap for b in a.encoder.blocks} == {50.0}
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    with torch.no_grad():
        assert torch.equal(a.encoder.forward_features(x), enc.eval().forward_features(x))
    # explicit flags still win over the file
    b = load_aligned(convert(src, tmp_path / "out2", softcap=40.0, timm_kwargs={"depth": kw["depth"]}))
    assert b.config["encoder"]["softcap"] == 40.0


def test_remaining_architecture_mismatch_is_one_line(tmp_path, capsys):
    name, kw = TINY["clip"]
    enc, dec = student("clip")
    src = write_with_args(tmp_path / "a.pth.tar", enc, dec, "s" + name, model_kwargs=dict(kw, not_a_vit_arg=1))
    assert cli.main(["convert", str(src), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a.pth.tar" in err and "not_a_vit_arg" in err
    assert not (tmp_path / "o").exists()
    # overrides that contradict the tensors: one line naming the file and the mismatch
    src = write_with_args(tmp_path / "b.pth.tar", enc, dec, "s" + name, model_kwargs=dict(kw, embed_dim=96))
    assert cli.main(["convert", str(src), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "b.pth.tar" in err and "embed_dim" in err


def test_max_attn_val_on_a_non_svit_student_is_named(tmp_path):
    name, kw = TINY["in1k"]
    enc, dec = student("in1k", softcap=0.0)
    src = write_with_args(tmp_path / "c.pth.tar", enc, dec, name, model_kwargs=dict(kw),
                          student_model_kwargs={"max_attn_val": 20.0})
    with pytest.raises(Exception, match=r"c.pth.tar: .*max_attn_val=20.0.*not an svit_"):
        convert(src, tmp_path / "o")
