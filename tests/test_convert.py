"""`locality convert` on official-layout .pth.tar files written here from tiny models."""
import argparse
import copy
import json
import pathlib

import pytest
import torch

from prismatic_locality import cli
from prismatic_locality import vit as V
from prismatic_locality.checkpoint import CheckpointError, load_aligned
from prismatic_locality.convert import convert, load_official, plain_timm_name
from prismatic_locality.decoder import MaskEmbedDecoder
from prismatic_locality.maskembed import default_decoder_config, make_encoder

from conftest import TINY, tiny_vit


def perturbed(module, seed):
    m = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def student(kind="clip", softcap=30.0, width=24, seed=1):
    vit = tiny_vit(kind)
    enc = perturbed(make_encoder(copy.deepcopy(vit), width, softcap=softcap, attn_impl="math"), seed)
    dec = perturbed(MaskEmbedDecoder(default_decoder_config(V.vit_spec(vit), V.vit_spec(enc), width=width)), seed + 1)
    return enc, dec


def official_state(enc, dec):
    sd = {f"encoder.{k}": v.clone() for k, v in enc.state_dict().items()}
    sd.update({f"decoder.{k}": v.clone() for k, v in dec.state_dict().items()})
    return sd


def write_official(path, enc, dec, arch, ema=None, prefix=""):
    """The reference CheckpointSaver's layout (docs/faithfulness.md), pickled Namespace included."""
    args = argparse.Namespace(model=arch, teacher_model=arch[1:], lr=2e-4, betas=(0.9, 0.95), data_dir=pathlib.Path("/data/in21k"),
                              mask_sampling="uniform", decoder_width=None, model_ema=ema is not None, amp_dtype="bfloat16")
    ckpt = {
        "epoch": 4,
        "arch": arch,
        "state_dict": {prefix + k: v for k, v in official_state(enc, dec).items()},
        "optimizer": {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 2e-5, "params": [0]}]},
        "version": 2,
        "args": args,
        "metric": 0.123,
    }
    if ema is not None:
        ckpt["state_dict_ema"] = official_state(*ema)
    torch.save(ckpt, path)
    return path


def test_plain_timm_name():
    assert plain_timm_name("svit_large_patch14_clip_quickgelu_336.openai") == ("vit_large_patch14_clip_quickgelu_336.openai", True)
    assert plain_timm_name("vit_base_patch16_224") == ("vit_base_patch16_224", False)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_convert_gives_identical_features_and_decoder(tmp_path, kind):
    name, kw = TINY[kind]
    enc, dec = student(kind)
    ema = student(kind, seed=7)
    src = write_official(tmp_path / "last.pth.tar", enc, dec, "s" + name, ema=ema)
    out = tmp_path / "converted"
    assert cli.main(["convert", str(src), str(out), "--timm-kwargs", json.dumps(kw)]) == 0
    a = load_aligned(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["encoder"]["model"] == name and cfg["encoder"]["softcap"] == 30.0
    assert cfg["converted_from"]["weights"] == "state_dict_ema" and cfg["converted_from"]["args"]["data_dir"] == "/data/in21k"

    s = V.vit_spec(enc)
    x = torch.randn(2, 3, s.img_size, s.img_size)
    ema_enc, ema_dec = (m.eval() for m in ema)
    with torch.no_grad():
        assert torch.equal(a.encoder.forward_features(x), ema_enc.forward_features(x))  # EMA preferred by default
        z = ema_enc(x)
        mask = torch.rand(2, s.num_patches) > 0.5
        assert torch.equal(a.decoder(z, mask), ema_dec(z, mask))
    assert a.decoder.cfg.act == s.act and a.decoder.cfg.depth == 2 and a.decoder.cfg.width == 24

    # --no-ema takes the raw student instead.
    convert(src, tmp_path / "raw", use_ema=False, timm_kwargs=kw)
    raw = load_aligned(tmp_path / "raw")
    with torch.no_grad():
        assert torch.equal(raw.encoder.forward_features(x), enc.eval().forward_features(x))
        assert not torch.equal(raw.encoder.forward_features(x), a.encoder.forward_features(x))


def test_convert_non_svit_infers_image_size_and_strips_prefixes(tmp_path):
    name, kw = TINY["in1k"]
    enc, dec = student("in1k", softcap=0.0)
    src = write_official(tmp_path / "model_best.pth.tar", enc, dec, name, prefix="module.")
    arch_kw = {k: v for k, v in kw.items() if k != "img_size"}  # image size must come from the pos-embed
    out = convert(src, tmp_path / "out", timm_kwargs=arch_kw)
    a = load_aligned(out)
    assert a.config["encoder"]["softcap"] == 0.0 and a.spec.img_size == kw["img_size"]
    assert "| converted from | `model_best.pth.tar` |" in (out / "README.md").read_text()
    assert not any(type(b.attn).__name__ == "SoftCapAttention" for b in a.encoder.blocks)
    x = torch.randn(1, 3, kw["img_size"], kw["img_size"])
    with torch.no_grad():
        assert torch.equal(a.encoder.forward_features(x), enc.eval().forward_features(x))


def test_convert_never_executes_pickled_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    torch.save({"state_dict": {}, "args": Evil()}, tmp_path / "evil.pth.tar")
    with pytest.raises(CheckpointError, match="evil.pth.tar: refusing to unpickle"):
        load_official(tmp_path / "evil.pth.tar")
    assert not marker.exists()


def test_convert_bad_inputs_give_one_line_errors(tmp_path, capsys):
    assert cli.main(["convert", str(tmp_path / "missing.pth.tar"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing.pth.tar" in err and err.count("\n") == 1
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="other.pth: no 'state_dict'"):
        load_official(tmp_path / "other.pth")
    enc, dec = student("clip")
    src = write_official(tmp_path / "c.pth.tar", enc, dec, "svit_base_patch16_clip_quickgelu_224")
    wrong = dict(TINY["clip"][1], embed_dim=96)  # not the architecture the weights came from
    with pytest.raises(CheckpointError, match=r"c.pth.tar \[state_dict\]"):
        convert(src, tmp_path / "o2", timm_kwargs=wrong)
    assert not (tmp_path / "o2").exists()
