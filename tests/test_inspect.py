"""`locality inspect`: attention-logit statistics and the cost of removing the soft-cap."""
import copy
import json

import pytest
import torch

from prismatic_locality import checkpoint as C
from prismatic_locality import inspect as I
from prismatic_locality import vit as V
from prismatic_locality.decoder import MaskEmbedDecoder
from prismatic_locality.maskembed import aligned_features, default_decoder_config, make_encoder

from conftest import TINY, tiny_vit


def aligned(tmp_path, kind="clip", softcap=30.0, qk_gain=1.0, proj_gain=1.0, name="ckpt"):
    """A tiny aligned checkpoint; `qk_gain` scales the q and k weights so logits grow by qk_gain², `proj_gain`
    the attention output (so attention, not the residual stream, dominates the features)."""
    vit = tiny_vit(kind)
    enc = make_encoder(copy.deepcopy(vit), 24, softcap=softcap)
    dec = MaskEmbedDecoder(default_decoder_config(V.vit_spec(vit), V.vit_spec(enc), width=24))
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for blk in enc.blocks:
            w = blk.attn.qkv.weight
            d = w.shape[0] // 3
            w[: 2 * d] *= qk_gain
            blk.attn.proj.weight *= proj_gain
    model, kw = TINY[kind]
    return C.save_aligned(tmp_path / name, enc, dec, model_name=model, softcap=softcap, timm_kwargs=kw)


def test_logit_stats_match_a_direct_computation(tmp_path):
    enc = C.load_aligned(aligned(tmp_path, qk_gain=3.0)).encoder
    x = torch.randn(5, 3, 32, 32)
    r = I.inspect_encoder(enc, x, batch_size=2)
    # direct: block 0's logits from its input
    t = V.embed(enc, x)
    with torch.no_grad():
        s = enc.blocks[0].attn.logits(enc.blocks[0].norm1(t)).abs()
    row = r["blocks"][0]
    assert row["max_abs"] == pytest.approx(float(s.max()), rel=1e-6)
    assert row["frac_above"]["5"] == pytest.approx(float((s > 5).float().mean()), abs=1e-9)
    assert len(r["blocks"]) == 3 and r["softcap"] == 30.0 and r["images"] == 5


def test_large_logits_make_the_cap_matter(tmp_path):
    """q, k scaled so logits reach far beyond the cap: removing it changes the features a lot."""
    enc = C.load_aligned(aligned(tmp_path, qk_gain=40.0, proj_gain=20.0)).encoder
    r = I.inspect_encoder(enc, torch.randn(4, 3, 32, 32))
    assert max(b["max_abs"] for b in r["blocks"]) > 60
    assert max(b["frac_above"]["20"] for b in r["blocks"]) > 0.01
    assert r["uncapped_feature_error"]["total"] > 0.1


def test_a_huge_cap_costs_nothing_to_remove(tmp_path):
    enc = C.load_aligned(aligned(tmp_path, softcap=1e9)).encoder
    r = I.inspect_encoder(enc, torch.randn(4, 3, 32, 32))
    # cap·tanh(s/cap) = s up to fp32 rounding: the error is rounding, 1e-7 relative
    assert r["uncapped_feature_error"]["total"] < 1e-6
    assert r["uncapped_feature_error"]["max_image"] < 1e-6


def test_an_encoder_trained_without_a_cap_reports_its_logits(tmp_path):
    """`--encoder.softcap 0`: plain timm attention; the logits are still measured (same as a capped
    copy of the same weights) and there is no cap to remove (error 0); the encoder is left unchanged."""
    ckpt = aligned(tmp_path, softcap=0.0, qk_gain=3.0)
    enc = C.load_aligned(ckpt).encoder
    assert not any(isinstance(b.attn, V.SoftCapAttention) for b in enc.blocks)
    x = torch.randn(3, 3, 32, 32)
    before = aligned_features(enc, x)
    r = I.inspect_encoder(enc, x)
    capped = copy.deepcopy(enc)
    V.apply_softcap(capped, 1e9, "math")
    ref = I.inspect_encoder(capped, x)
    assert r["softcap"] == 0.0
    for a, b in zip(r["blocks"], ref["blocks"]):
        assert a["max_abs"] == pytest.approx(b["max_abs"], rel=1e-6)
        assert a["frac_above"] == pytest.approx(b["frac_above"], abs=1e-9)
    assert r["uncapped_feature_error"] == {"total": 0.0, "max_image": 0.0}
    assert not any(isinstance(b.attn, V.SoftCapAttention) for b in enc.blocks)
    assert torch.equal(aligned_features(enc, x), before)
    assert "no cap" in I.table(r)


def test_removing_the_cap_is_plain_attention(tmp_path):
    """cap 0 = softmax(q k^T * scale) v: the same as timm's own attention on the same weights."""
    enc = C.load_aligned(aligned(tmp_path, qk_gain=5.0)).encoder
    x = torch.randn(2, 3, 32, 32)
    capped = aligned_features(enc, x)
    V.set_softcap(enc, 0)
    plain = aligned_features(enc, x)
    blk = enc.blocks[0]
    t = blk.norm1(V.embed(enc, x))
    q, k, v = blk.attn.heads(t)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    ours = V.softcap_attention(q, k, v, blk.attn.scale, 0.0, "math")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(capped, plain)


def test_cli_writes_json_table_and_plot(tmp_path, capsys):
    ckpt = aligned(tmp_path, qk_gain=3.0)
    out = tmp_path / "out"
    assert I.main([str(ckpt), "--num-images", "12", "--output-dir", str(out)]) == 0
    r = json.loads((out / "inspect.json").read_text())
    assert r["images"] == 12 and r["image_set"].startswith("demo scenes")
    assert (out / "inspect.png").stat().st_size > 1000
    assert "relative feature error" in (out / "inspect.txt").read_text()
    assert "relative feature error" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # atomic: no temp left


def test_image_folder(tmp_path):
    from PIL import Image

    for i in range(3):
        (tmp_path / "imgs" / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 50), (i * 40, 10, 200)).save(tmp_path / "imgs" / "a" / f"{i}.png")
    x = I.folder_images(tmp_path / "imgs", 10, 32, (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (3, 3, 32, 32)


@pytest.mark.parametrize("argv,culprit", [
    (["{missing}"], "config.json"),
    (["{ckpt}", "--images", "{missing}"], "missing"),
    (["{ckpt}", "--num-images", "0"], "--num-images"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, culprit):
    ckpt = aligned(tmp_path)
    argv = [a.format(ckpt=ckpt, missing=tmp_path / "missing") for a in argv]
    with pytest.raises(SystemExit) as e:
        I.main(argv + ["--output-dir", str(tmp_path / "o")])
    assert e.value.code in (1, 2)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and culprit in err[0], err


@pytest.mark.slow
def test_probe_change_with_and_without_the_cap(tmp_path, one_thread):
    """--probe: the benchmark's local probe on demo scenes, for the capped and the uncapped encoder."""
    ckpt = aligned(tmp_path, qk_gain=40.0, proj_gain=20.0)
    out = tmp_path / "out"
    assert I.main([str(ckpt), "--num-images", "4", "--output-dir", str(out), "--probe",
                   "--probe-train", "64", "--probe-val", "32", "--probe-epochs", "1"]) == 0
    pr = json.loads((out / "inspect.json").read_text())["probe"]
    rc, ru = pr["macro_recall"]["capped"], pr["macro_recall"]["uncapped"]
    assert 0 <= rc <= 1 and 0 <= ru <= 1 and rc != ru      # the cap matters here, so the probes differ
    assert pr["delta_points"] == round(100 * (ru - rc), 2)
    assert "local probe macro recall" in (out / "inspect.txt").read_text()
