"""Aligned backbones outside this package: timm names, hub directories, transformers, `locality export`."""
import copy
import json

import pytest
import timm
import torch

import prismatic_locality  # noqa: F401  (registers <timm ViT>_softcap with timm)
from prismatic_locality import checkpoint as C
from prismatic_locality import export as E
from prismatic_locality import hub as H
from prismatic_locality import vit as V
from prismatic_locality.maskembed import aligned_features

from test_inspect import aligned

TIMM_1 = int(timm.__version__.split(".")[0]) >= 1
# timm 0.9.10 imports names huggingface_hub >= 1.0 no longer has (HfFolder): it then refuses every hf-hub: name
needs_timm_hub = pytest.mark.skipif(not timm.models._hub._has_hf_hub, reason=f"timm {timm.__version__} cannot import "
                                    "this huggingface_hub, so it has no hf-hub: model source")


def reference(ckpt, x):
    with torch.no_grad():
        return aligned_features(C.load_aligned(ckpt, attn_impl="math").encoder, x)


def features(model, x):
    with torch.no_grad():
        return model.eval().forward_features(x)


@pytest.fixture
def ckpt(tmp_path):
    return aligned(tmp_path, qk_gain=2.0)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A private Hugging Face cache (offline: HF_HUB_OFFLINE=1 is set by conftest)."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    return cache


def test_every_timm_vit_has_a_registered_aligned_variant():
    names = timm.list_models("*" + H.SUFFIX)
    assert "vit_base_patch16_clip_224" + H.SUFFIX in names and "vit_tiny_patch16_224" + H.SUFFIX in names
    assert "vit_tiny_patch16_224_softcap.maskembed" in timm.list_models("vit_tiny*", include_tags=True)


def test_registered_name_with_the_aligned_file_is_the_trained_function(ckpt):
    """Only the file is given: architecture, cap, head, eps and mean/std come from the config beside it."""
    m = timm.create_model("vit_base_patch16_clip_quickgelu_224_softcap.maskembed", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(ckpt / "model.safetensors")))
    assert isinstance(m.blocks[0].attn, V.SoftCapAttention) and m.blocks[0].attn.cap == 30.0
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(features(m, x), reference(ckpt, x))
    assert m.pretrained_cfg["mean"] == tuple(C.read_config(ckpt)["encoder"]["mean"])
    assert m.head.out_features == 24


def test_registered_name_without_weights_is_one_line():
    with pytest.raises(ValueError, match="pretrained_cfg_overlay"):
        timm.create_model("vit_tiny_patch16_224_softcap.maskembed", pretrained=True)


@pytest.mark.slow
@needs_timm_hub
def test_export_timm_round_trips_through_hf_hub_offline(ckpt, tmp_path, hf_cache):
    out = tmp_path / "export"
    cfg = E.export(ckpt, out, "timm", num_images=8)
    assert cfg["architecture"] == "vit_base_patch16_clip_quickgelu_224_softcap"
    assert cfg["locality"]["feature_error"]["total"] == 0.0   # the same function, bit for bit
    assert "library_name: timm" in (out / "README.md").read_text()
    H.install_in_cache(out, "locality/tiny-aligned")
    m = timm.create_model("hf-hub:locality/tiny-aligned", pretrained=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(features(m, x), reference(ckpt, x))
    assert list(m.pretrained_cfg["mean"]) == C.read_config(ckpt)["encoder"]["mean"]


@pytest.mark.skipif(not TIMM_1 or not hasattr(timm.models._hub, "load_model_config_from_path"),
                    reason="timm's local-dir: model source is newer than this timm")
def test_export_loads_from_a_local_dir(ckpt, tmp_path):
    out = tmp_path / "export"
    E.export(ckpt, out, "timm", num_images=4)
    m = timm.create_model(f"local-dir:{out}", pretrained=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(features(m, x), reference(ckpt, x))


def test_drop_softcap_is_stock_timm_when_the_cap_is_inactive(ckpt, tmp_path, hf_cache):
    out = tmp_path / "stock"
    cfg = E.export(ckpt, out, "timm", drop_softcap=True, num_images=8)
    assert cfg["architecture"] == "vit_base_patch16_clip_quickgelu_224"      # no package needed to load it
    err = cfg["locality"]["feature_error"]["total"]
    assert 0 < err < E.DEFAULT_TOLERANCE
    assert json.loads((out / "config.json").read_text())["locality"]["feature_error"]["total"] == err
    assert f"{err:.3e}" in (out / "README.md").read_text()
    if not TIMM_1 or not timm.models._hub._has_hf_hub:
        pytest.skip("timm 0.9.10: no hf-hub: source with this huggingface_hub, and it ignores config.json's model_args")
    H.install_in_cache(out, "locality/tiny-stock")
    m = timm.create_model("hf-hub:locality/tiny-stock", pretrained=True)
    assert not any(isinstance(a, V.SoftCapAttention) for a in m.modules())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(features(m, x), reference(ckpt, x), atol=1e-2, rtol=1e-2)


def test_drop_softcap_is_refused_when_the_cap_matters(tmp_path, capsys):
    big = aligned(tmp_path, qk_gain=40.0, proj_gain=20.0, name="big")
    with pytest.raises(SystemExit) as e:
        E.main([str(big), str(tmp_path / "out"), "--drop-softcap", "--num-images", "8"])
    assert e.value.code == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "--drop-softcap refused" in err[0] and "--tolerance" in err[0], err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    # a tolerance the user raises lets it through, and the error is recorded
    assert E.main([str(big), str(tmp_path / "out"), "--drop-softcap", "--num-images", "8", "--tolerance", "10"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["locality"]["feature_error"]["total"] > 0.1


@pytest.mark.parametrize("argv,culprit", [(["--format", "onnx"], "--format"), (["--tolerance", "0"], "--tolerance")])
def test_export_bad_arguments_are_one_line(ckpt, tmp_path, capsys, argv, culprit):
    with pytest.raises(SystemExit):
        E.main([str(ckpt), str(tmp_path / "o"), *argv])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and culprit in err[0], err


def _transformers():
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install '.[hf]')")
    if not TIMM_1:
        pytest.skip(f"transformers' TimmWrapper needs timm >= 1.0 (this is timm {timm.__version__})")
    return transformers


@pytest.mark.slow
@pytest.mark.parametrize("drop", [False, True])
def test_transformers_automodel_gives_the_aligned_features(ckpt, tmp_path, drop):
    transformers = _transformers()
    out = tmp_path / "hf"
    E.export(ckpt, out, "transformers", drop_softcap=drop, num_images=4)
    assert "library_name: transformers" in (out / "README.md").read_text()
    model = transformers.AutoModel.from_pretrained(str(out)).eval()
    assert type(model).__name__ == "TimmWrapperModel"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = model(pixel_values=x).last_hidden_state
    if drop:
        torch.testing.assert_close(got, reference(ckpt, x), atol=1e-2, rtol=1e-2)
    else:
        assert (got - reference(ckpt, x)).abs().max() <= 1e-6


FAMILY_CASES = ["dinov3", "pe_core", "eva02_clip", "eva02_fused", "aimv2", "radio", "avgpool", "naflex_siglip2", "vitamin"]


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_every_family_inspects_exports_and_loads_by_name(family, tmp_path):
    """Each ViT family the adapter aligns: inspect (a huge cap costs nothing to remove), the registered
    name with the aligned file, and the exported directory all give load_aligned's features."""
    from prismatic_locality.decoder import MaskEmbedDecoder
    from prismatic_locality.inspect import inspect_encoder
    from prismatic_locality.maskembed import default_decoder_config, make_encoder

    from test_families import FAMILIES, build, images

    vit = build(family)
    name, kw = FAMILIES[family]
    x = images(vit)
    for cap in (30.0, 1e9):
        enc = make_encoder(copy.deepcopy(vit), 24, softcap=cap, attn_impl="math")
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        dec = MaskEmbedDecoder(default_decoder_config(V.vit_spec(vit), V.vit_spec(enc), width=24))
        ckpt = C.save_aligned(tmp_path / f"ckpt{cap:g}", enc, dec, model_name=name, softcap=cap, timm_kwargs=kw)
        r = inspect_encoder(C.load_aligned(ckpt, attn_impl="math").encoder, x)
        assert len(r["blocks"]) == V.vit_spec(vit).depth and r["blocks"][0]["max_abs"] > 0
        if cap > 1e6:
            assert r["uncapped_feature_error"]["total"] < 1e-6
    ref = reference(ckpt, x)
    m = timm.create_model(H.aligned_arch(name) + ".maskembed", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(ckpt / "model.safetensors")))
    assert torch.equal(features(m, x), ref)
    out = E.export(ckpt, tmp_path / "export", "timm", num_images=4)
    assert out["locality"]["feature_error"]["total"] == 0.0
    exported = E.exported_model(tmp_path / "export")
    assert torch.equal(features(exported, x), ref)
    assert exported.pretrained_cfg["input_size"][-1] == V.vit_spec(vit).img_size


@pytest.mark.slow  # fresh interpreters importing torch and timm: ~5 s each
@pytest.mark.parametrize("order", ["prismatic_locality, timm", "timm, prismatic_locality",
                                   "prismatic_locality, prismatic_locality.export, timm",
                                   "prismatic_locality, prismatic_locality.hub, timm",
                                   "prismatic_locality, prismatic_locality.inspect, timm",
                                   "prismatic_locality, importlib.util; importlib.util.find_spec('timm'); import timm"])
def test_registration_in_either_import_order_and_the_package_import_stays_light(order):
    """`import prismatic_locality` alone imports neither torch nor timm (the CLI starts instantly); once
    timm is imported, before or after, directly or by one of our modules (`locality export` imports
    timm through hub), the aligned architectures are registered."""
    import os
    import subprocess
    import sys

    code = ("import sys\nimport prismatic_locality\nlight = 'torch' not in sys.modules\n" if order.startswith("p") else
            "import sys\nlight = True\n")
    code += f"import {order}\nprint(light, timm.is_model('vit_tiny_patch16_224_softcap'))"
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.stdout.split() == ["True", "True"], (r.stdout, r.stderr[-2000:])


@pytest.mark.slow  # a fresh interpreter importing transformers: ~9 s
def test_transformers_in_a_fresh_process_after_import_prismatic_locality(ckpt, tmp_path):
    """The documented lines, in a process where nothing imported timm before transformers did."""
    import os
    import subprocess
    import sys

    _transformers()
    out = tmp_path / "hf"
    E.export(ckpt, out, "transformers", num_images=4)
    x = torch.randn(2, 3, 32, 32)
    torch.save({"x": x, "ref": reference(ckpt, x)}, tmp_path / "ref.pt")
    code = ("import torch, prismatic_locality\nfrom transformers import AutoModel\n"
            f"m = AutoModel.from_pretrained({str(out)!r}).eval()\nd = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)\n"
            "with torch.no_grad():\n    print(float((m(pixel_values=d['x']).last_hidden_state - d['ref']).abs().max()))")
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.split()[-1]) <= 1e-6
