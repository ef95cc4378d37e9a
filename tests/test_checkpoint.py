import copy
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prismatic_locality import fileio
from prismatic_locality import vit as V
from prismatic_locality.checkpoint import (CheckpointError, is_aligned_checkpoint, load_aligned,
                                           read_config, save_aligned)
from prismatic_locality.decoder import MaskEmbedDecoder
from prismatic_locality.fileio import atomic_dir_write
from prismatic_locality.maskembed import default_decoder_config, encode, make_encoder

from conftest import TINY, tiny_vit


def trained_pair(kind="clip"):
    vit = tiny_vit(kind)
    enc = make_encoder(copy.deepcopy(vit), 24)
    dec = MaskEmbedDecoder(default_decoder_config(V.vit_spec(vit), V.vit_spec(enc), width=24))
    with torch.no_grad():  # make every parameter non-trivial so the round trip is meaningful
        for p in list(enc.parameters()) + list(dec.parameters()):
            p.add_(torch.randn_like(p) * 0.01)
    return enc, dec


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_round_trip(tmp_path, kind):
    enc, dec = trained_pair(kind)
    name, kw = TINY[kind]
    out = save_aligned(tmp_path / "ckpt", enc, dec, model_name=name + ".tag", softcap=30.0, timm_kwargs=kw,
                       extra={"teacher": name})
    assert is_aligned_checkpoint(out)
    keys = load_file(str(out / "model.safetensors")).keys()
    assert {k.split(".")[0] for k in keys} == {"encoder", "decoder"}
    assert "encoder.head.weight" in keys and "decoder.pos_embed" in keys
    a = load_aligned(out)
    s = V.vit_spec(enc)
    x = torch.randn(2, 3, s.img_size, s.img_size)
    assert torch.equal(a.encoder.forward_features(x), enc.eval().forward_features(x))
    assert torch.equal(a.decoder(encode(a.encoder, x)), dec.eval()(encode(enc, x)))
    assert a.config["teacher"] == name and a.spec.num_tokens == s.num_tokens
    assert isinstance(a.encoder.blocks[0].attn, V.SoftCapAttention)


def test_model_card_describes_the_checkpoint_from_its_config(tmp_path):
    enc, dec = trained_pair()
    name, kw = TINY["clip"]
    # as the trainer writes it: teacher weights from the hub tag, a training summary
    out = save_aligned(tmp_path / "hub", enc, dec, model_name=name + ".openai", softcap=30.0, timm_kwargs=kw,
                       extra={"teacher": {"model": name + ".openai", "weights": None, "target": "penultimate"},
                              "target": "penultimate", "recipe": "clip-l-336",
                              "training": {"step": 1200, "epoch": 5.0, "last_loss": 0.0421}})
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert f"base_model: timm/{name}.openai" in front and "library_name: prismatic-locality" in front
    s = V.vit_spec(enc)
    assert f"| architecture | `{name}`: {s.img_size} px, patch {s.patch_size}, width {s.embed_dim}, " in card
    assert "| recipe | `clip-l-336` |" in card and "| training | 1200 steps, last loss 0.0421 |" in card
    assert "| decoder | 2 blocks, width 24 |" in card and "load_aligned(" in card
    # a local teacher file: no hub base model, and the card names the file, not the local path
    out = save_aligned(tmp_path / "local", enc, dec, model_name=name + ".openai", softcap=30.0, timm_kwargs=kw,
                       extra={"teacher": {"model": name, "weights": "/secret/dir/teacher.safetensors"}})
    card = (out / "README.md").read_text()
    assert "base_model" not in card and "| teacher | `teacher.safetensors` |" in card and "/secret" not in card
    # free-form extras of other shapes are left out, not a crash
    out = save_aligned(tmp_path / "odd", enc, dec, model_name=name, softcap=30.0, timm_kwargs=kw,
                       extra={"teacher": 3, "training": "n/a", "recipe": None})
    assert "| recipe |" not in (out / "README.md").read_text()


def test_overwrite_is_atomic_and_leaves_no_temp(tmp_path):
    enc, dec = trained_pair()
    name, kw = TINY["clip"]
    save_aligned(tmp_path / "c", enc, dec, model_name=name, softcap=30.0, timm_kwargs=kw)
    save_aligned(tmp_path / "c", enc, dec, model_name=name, softcap=30.0, timm_kwargs=kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_aligned(tmp_path)
    enc, dec = trained_pair()
    name, kw = TINY["clip"]
    out = save_aligned(tmp_path / "c", enc, dec, model_name=name, softcap=30.0, timm_kwargs=kw)
    cfg = json.loads((out / "config.json").read_text())

    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        read_config(out)

    (out / "config.json").write_text(json.dumps({**cfg, "format": "something-else"}))
    with pytest.raises(CheckpointError, match="format"):
        load_aligned(out)

    # weights from a different architecture
    (out / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(out / "model.safetensors"))
    state.pop("encoder.blocks.2.mlp.fc1.weight")
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.safetensors.*encoder"):
        load_aligned(out)

    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_aligned(out)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class Killed(BaseException):
    pass


def _kill_between_the_renames(monkeypatch):
    """Make the rename that puts the new version in place fail as a kill would (nothing after it runs)."""
    real = os.replace

    def replace(src, dst):
        if f".{Path(dst).name}.new-" in Path(src).name:
            raise Killed
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    return real


def test_a_kill_between_the_renames_is_recovered_by_the_next_write_or_read(tmp_path, monkeypatch):
    out = tmp_path / "state"
    atomic_dir_write(out, lambda d: (d / "v").write_text("1"))
    real = _kill_between_the_renames(monkeypatch)
    with pytest.raises(Killed):
        atomic_dir_write(out, lambda d: (d / "v").write_text("2"))
    monkeypatch.setattr(fileio.os, "replace", real)
    # what a kill leaves: no state/, the old version moved aside, the new one complete beside it
    assert not out.exists() and len(list(tmp_path.iterdir())) == 2
    assert "recovered" in fileio.recover_dir(out)
    assert (out / "v").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_stale_temp_dirs_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    (tmp_path / f".c.tmp-{dead}-abc").mkdir()                        # a half-written copy: dropped
    (tmp_path / f".c.tmp-{live}-xyz").mkdir()                        # another live process: kept
    (tmp_path / f".c.old-{dead}-def").mkdir()
    atomic_dir_write(tmp_path / "c", lambda d: (d / "v").write_text("1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".c.tmp-{live}-xyz", "c"]


def test_files_get_the_permissions_of_a_plain_open(tmp_path):
    def write(d):
        fd, name = tempfile.mkstemp(dir=d)          # 0600, as safetensors 0.8 writes model.safetensors
        os.close(fd)
        os.rename(name, d / "model.safetensors")
        (d / "config.json").write_text("{}")

    atomic_dir_write(tmp_path / "c", write)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "c").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~fileio._umask(), modes
    enc, dec = trained_pair()                        # and a real checkpoint
    name, kw = TINY["clip"]
    out = save_aligned(tmp_path / "real", enc, dec, model_name=name, softcap=30.0, timm_kwargs=kw)
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o666 & ~fileio._umask()}


def test_model_card_of_a_checkpoint_without_decoder_names_its_objective(tmp_path):
    """mim / clipself checkpoints: the card names the objective and does not promise a decoder."""
    enc, _ = trained_pair()
    name, kw = TINY["clip"]
    out = save_aligned(tmp_path / "mim", enc, None, model_name=name, softcap=30.0, timm_kwargs=kw,
                       extra={"objective": "mim", "target": "last"})
    card = (out / "README.md").read_text()
    assert "post-trained with MIM" in card and "| objective | `mim` |" in card and "| decoder | none |" in card
    assert "decoder g_ψ" not in card and "post-trained with MaskEmbed" not in card
