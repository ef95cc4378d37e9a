"""Today's ViT families through the timm adapter, on tiny random instances of the real timm classes.

For every family: the token-level forward equals timm's own, token masking equals pixel masking,
soft-capped attention with a huge cap equals the family's own attention (RoPE included), and a
MaskEmbed step, an aligned checkpoint round trip and `load_aligned` work. Families that an older
timm lacks are skipped with the reason.
"""
import copy

import pytest
import timm
import torch

from prismatic_locality import vit as V
from prismatic_locality.checkpoint import load_aligned, save_aligned
from prismatic_locality.decoder import MaskEmbedDecoder
from prismatic_locality.maskembed import MaskEmbed, Teacher, aligned_features, default_decoder_config, make_encoder
from prismatic_locality.probe.backbone import Backbone

TINY = dict(embed_dim=48, depth=2, num_heads=3)

# family: (timm name, tiny overrides). Real names are the L-size models the recipes use.
FAMILIES = {
    "dinov3": ("vit_large_patch16_dinov3", dict(img_size=32, patch_size=8, **TINY)),        # Eva, RoPE, 1 cls + 4 reg, NHWC
    "pe_core": ("vit_pe_core_large_patch14_336", dict(img_size=28, attn_pool_num_heads=3, **TINY)),  # AttentionRope, MAP
    "pe_spatial": ("vit_pe_spatial_large_patch14_448", dict(img_size=28, **TINY)),            # no final norm
    "pe_lang": ("vit_pe_lang_large_patch14_448", dict(img_size=28, **TINY)),                  # cls, LayerScale
    "eva02_clip": ("eva02_large_patch14_clip_336", dict(img_size=28, **TINY)),                # q/k/v proj, SwiGLU, scale norm
    "eva02_fused": ("eva02_base_patch14_224", dict(img_size=28, qkv_fused=True, **TINY)),      # fused qkv + q/v bias, avg pool
    "aimv2": ("aimv2_large_patch14_336", dict(img_size=28, **TINY)),                          # SwiGLU, RmsNorm, no prefix
    "dynamic": ("vit_base_patch16_clip_224", dict(img_size=32, patch_size=8, dynamic_img_size=True, **TINY)),
    "radio": ("vit_large_patch16_radio_v3", dict(img_size=32, **TINY)),                       # 1 cls + 7 reg, no norm
    "avgpool": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, global_pool="avg", **TINY)),  # fc_norm only
    # NaFlex at its one fixed resolution (pretrained input size, here overlaid to 32 px)
    "naflex_siglip2": ("naflexvit_base_patch16_siglip", dict(pretrained_cfg_overlay={"input_size": (3, 32, 32)}, **TINY)),
    "naflex_radio": ("naflexvit_large_patch16_radio_v3", dict(pretrained_cfg_overlay={"input_size": (3, 32, 32)}, **TINY)),
    "vitamin": ("vitamin_small_224", dict(img_size=32, depth=2)),  # conv stem: masked patch = zeroed pixels; GeGLU
}
ROPE = ["dinov3", "pe_core", "pe_spatial", "pe_lang", "eva02_clip", "eva02_fused"]


def build(family, seed=0):
    name, kw = FAMILIES[family]
    if not timm.is_model(name):
        pytest.skip(f"timm {timm.__version__} has no '{name}' ({family}); it needs a newer timm (tested: 1.0.31)")
    torch.manual_seed(seed)
    m = V.create_vit(name, **kw).eval()
    with torch.no_grad():  # zero-initialised biases (EVA's q/v bias) and LayerScales must matter in the tests
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def images(model, b=2, seed=1):
    s = V.vit_spec(model)
    return torch.randn(b, 3, s.img_size, s.img_size, generator=torch.Generator().manual_seed(seed))


def tokens_out(model, x, mask=None):
    return V.final_norm(model, V.run_blocks(model, V.embed(model, x, mask)))


@pytest.mark.parametrize("family", FAMILIES)
def test_token_forward_equals_timm_forward_features(family, one_thread):
    m = build(family)
    x = images(m)
    ones = torch.ones(2, V.vit_spec(m).num_patches, dtype=torch.bool)
    with torch.no_grad():
        ref = m.forward_features(x)
        assert (tokens_out(m, x, ones) - ref).abs().max().item() <= 1e-6
        s = V.vit_spec(m)
        assert tokens_out(m, x).shape == ref.shape == (2, s.num_tokens, s.embed_dim)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_masking_equals_pixel_masking(family, one_thread):
    """Masked patch -> null-patch token (its position embedding and RoPE rotation kept) equals
    zeroing the patch's pixels in normalised space, for a plain patch-embedding conv."""
    m = build(family)
    s = V.vit_spec(m)
    x = images(m)
    mask = torch.rand(2, s.num_patches, generator=torch.Generator().manual_seed(3)) < 0.5
    with torch.no_grad():
        tok = tokens_out(m, x, mask)
        pix = tokens_out(m, x * V.pixel_mask(mask, s.grid, s.patch_size, s.img_size))
        assert (tok - pix).abs().max().item() <= 1e-6
        assert (tok - tokens_out(m, x)).abs().max().item() > 1e-3  # the mask matters


def _attention_pairs(m, impl):
    capped = V.apply_softcap(copy.deepcopy(m), cap=1e6, impl=impl)
    rope = V.rope_embed(m)
    kw = {} if rope is None else {"rope": rope}
    s = V.vit_spec(m)
    y = torch.randn(2, s.num_tokens, s.embed_dim, generator=torch.Generator().manual_seed(5)) * 3
    for own, soft in zip(m.blocks, capped.blocks):
        yield own.attn(y, **kw), soft.attn(y, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_softcap_with_huge_cap_equals_family_attention(family, one_thread):
    m = build(family)
    with torch.no_grad():
        for own, soft in _attention_pairs(m, "math"):
            assert (own - soft).abs().max().item() <= 1e-5
        capped = V.apply_softcap(copy.deepcopy(m), cap=1e6, impl="math")
        assert isinstance(capped.blocks[0].attn, V.SoftCapAttention)
        assert capped.state_dict().keys() == m.state_dict().keys()
        x = images(m)
        assert (capped.forward_features(x) - m.forward_features(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["dinov3", "pe_core"])
def test_rope_skips_exactly_the_prefix_tokens(family, one_thread):
    """RoPE rotates patch tokens only: rotating the class/register tokens too changes the output."""
    m = build(family)
    rope = V.rope_embed(m)
    assert rope is not None
    attn = V.SoftCapAttention(copy.deepcopy(m.blocks[0].attn), cap=1e6, impl="math")
    assert attn.num_prefix_tokens == m.num_prefix_tokens
    y = torch.randn(2, V.vit_spec(m).num_tokens, 48) * 3
    with torch.no_grad():
        right = attn(y, rope=rope)
        attn.num_prefix_tokens = 0
        wrong_rope = torch.cat([rope[:1].expand(m.num_prefix_tokens, -1), rope])  # position 0 for the prefix
        assert (attn(y, rope=wrong_rope) - right).abs().max().item() > 1e-4
        assert (m.blocks[0].attn(y, rope=rope) - right).abs().max().item() <= 1e-5


@pytest.mark.slow
@pytest.mark.skipif(V._flex_attention() is None, reason="torch < 2.5 has no FlexAttention")
@pytest.mark.parametrize("family", ["dinov3", "eva02_clip"])
def test_softcap_flex_path_equals_family_attention(family, one_thread):
    """The GPU path (FlexAttention, compiled for CPU here, forward only) with RoPE."""
    m = build(family)
    with torch.no_grad():
        for own, soft in _attention_pairs(m, "flex"):
            assert (own - soft).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_maskembed_step_checkpoint_round_trip_and_load_aligned(family, tmp_path, one_thread):
    vit = build(family)
    name, kw = FAMILIES[family]
    teacher = Teacher(copy.deepcopy(vit))
    encoder = make_encoder(copy.deepcopy(vit).train(), 24, attn_impl="math")
    decoder = MaskEmbedDecoder(default_decoder_config(teacher.spec, V.vit_spec(encoder), width=24))
    model = MaskEmbed(encoder, decoder)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    s = teacher.spec
    masks = torch.rand(2, 3, s.num_patches, generator=torch.Generator().manual_seed(2)) < 0.5
    masks[:, 2] = True
    x = images(vit)
    losses = []
    for _ in range(2):
        loss = model(x, masks, teacher(x, masks))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in encoder.named_parameters() if n.startswith("blocks"))

    out = save_aligned(tmp_path / family, encoder, decoder, model_name=name, softcap=30.0, timm_kwargs=kw)
    back = load_aligned(out, attn_impl="math")
    encoder.eval()
    with torch.no_grad():
        assert torch.equal(aligned_features(back.encoder, x), aligned_features(encoder, x))
        assert torch.equal(back.encoder.forward_features(x), encoder.forward_features(x))
    assert back.spec == V.vit_spec(encoder)


def test_average_pooled_vit_keeps_identity_norm_as_the_reference():
    """An avg-pool ViT (norm Identity, fc_norm LayerNorm): the encoder re-initialises fc_norm only,
    as the reference's ``type(model.norm)(dim)``; no trainable LayerNorm is added to the features."""
    vit = build("avgpool")
    assert not V.has_final_norm(vit) and isinstance(vit.fc_norm, torch.nn.LayerNorm)
    enc = make_encoder(copy.deepcopy(vit), 24)
    assert isinstance(enc.norm, torch.nn.Identity)
    assert isinstance(enc.fc_norm, torch.nn.LayerNorm) and enc.fc_norm.eps == 1e-5
    assert not any(k.startswith("norm.") for k in enc.state_dict())
    with torch.no_grad():  # before training, the aligned features are the teacher's (cap 30 barely matters)
        x = images(vit)
        assert (aligned_features(enc.eval(), x) - vit.forward_features(x)).abs().max().item() < 1e-4


def test_rmsnorm_final_norm_is_reinitialised_as_its_own_kind():
    vit = build("aimv2")
    enc = make_encoder(copy.deepcopy(vit), 24)
    assert type(enc.norm) is type(vit.norm) and enc.norm.eps == 1e-5
    assert torch.equal(enc.norm.weight, torch.ones(48))


@pytest.mark.parametrize("name,kw,piece", [
    ("vit_base_patch16_rope_mixed_224", dict(img_size=32, **TINY), "per-block \\(mixed\\) RoPE"),
    ("vit_base_patch16_xp_224", dict(img_size=32, **TINY), "ParallelScalingBlock has no separate attention"),
    ("beit_base_patch16_224", dict(img_size=32, **TINY), "model class Beit"),  # relative position bias
    ("vit_base_patch16_224", dict(img_size=32, patch_drop_rate=0.5, **TINY), "patch dropout"),
    ("eva02_base_patch14_224", dict(img_size=28, patch_drop_rate=0.5, **TINY), "patch dropout"),
])
def test_unsupported_models_fail_at_construction_with_one_line(name, kw, piece):
    if not timm.is_model(name):
        pytest.skip(f"timm {timm.__version__} has no '{name}'")
    torch.manual_seed(0)
    vit = V.create_vit(name, **kw)
    for build_it in (lambda: make_encoder(copy.deepcopy(vit), 24), lambda: Teacher(copy.deepcopy(vit))):
        with pytest.raises(ValueError, match=piece) as e:
            build_it()
        assert name in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name,kw", [
    ("naflexvit_base_patch16_siglip", dict(img_size=32, **TINY)),
    ("vitamin_small_224", dict(img_size=32, depth=1)),
    ("aimv2_large_patch14_336", dict(img_size=28, **TINY)),
    ("eva02_large_patch14_clip_336", dict(img_size=28, **TINY)),
])
def test_probe_baselines_any_timm_vit(name, kw, one_thread):
    """The probe needs only the grid, prefix tokens, mean/std and features, no MaskEmbed check."""
    if not timm.is_model(name):
        pytest.skip(f"timm {timm.__version__} has no '{name}'")
    torch.manual_seed(0)
    b = Backbone(V.create_vit(name, **kw), "timm", name)
    s = b.spec
    x = torch.randn(2, 3, s.img_size, s.img_size)
    f = b.features(x)
    assert f.shape[:2] == (2, s.num_tokens) and s.num_tokens == s.num_prefix_tokens + s.grid**2
    assert b.describe()["num_tokens"] == s.num_tokens


def test_gated_mlp_flops_count_three_projections():
    s = V.vit_spec(build("aimv2"))
    assert s.mlp_gated and s.act == "silu"
    n, d, h = s.num_tokens, s.embed_dim, s.mlp_hidden
    per_block = 2 * n * (4 * d * d + 3 * d * h) + 4 * n * n * d
    patch = 2 * s.num_patches * 3 * s.patch_size**2 * d
    assert V.vit_flops_per_image(s) == s.depth * per_block + patch


def _stub_prismatic_vision_backbone(monkeypatch):
    """Prismatic's VisionBackbone base class (attributes only) when TRI-ML Prismatic is not installed."""
    import importlib
    import sys
    import types

    importlib.import_module("prismatic_locality.prismatic")  # the package imports without Prismatic

    try:
        importlib.import_module("prismatic.models.backbones.vision")
    except ImportError:
        class VisionBackbone(torch.nn.Module):
            def __init__(self, vision_backbone_id, image_resize_strategy, default_image_size=224):
                super().__init__()
                self.identifier, self.image_resize_strategy = vision_backbone_id, image_resize_strategy
                self.default_image_size = default_image_size

        for name in ("prismatic", "prismatic.models", "prismatic.models.backbones", "prismatic.models.backbones.vision"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules["prismatic.models.backbones.vision"].VisionBackbone = VisionBackbone
        monkeypatch.delitem(sys.modules, "prismatic_locality.prismatic.backbone", raising=False)
    return importlib.import_module("prismatic_locality.prismatic.backbone").AlignedViTBackbone


@pytest.mark.parametrize("family", ["dinov3", "pe_core", "eva02_clip", "aimv2", "naflex_siglip2", "vitamin"])
def test_prismatic_aligned_backbone_runs_any_adapter_family(family, tmp_path, monkeypatch, one_thread):
    vit = build(family)
    name, kw = FAMILIES[family]
    enc = make_encoder(copy.deepcopy(vit), 24, attn_impl="math")
    dec = MaskEmbedDecoder(default_decoder_config(V.vit_spec(vit), V.vit_spec(enc), width=24))
    save_aligned(tmp_path / "ckpts" / f"{family}-aligned", enc, dec, model_name=name, softcap=30.0, timm_kwargs=kw)
    monkeypatch.setenv("PRISMATIC_LOCALITY_CKPT_ROOT", str(tmp_path / "ckpts"))
    AlignedViTBackbone = _stub_prismatic_vision_backbone(monkeypatch)
    s = V.vit_spec(enc)
    vb = AlignedViTBackbone(f"{family}-aligned", "resize-naive", default_image_size=s.img_size)
    assert (vb.embed_dim, vb.num_patches, vb.num_prefix_tokens, vb.num_heads) == (s.embed_dim, s.num_patches,
                                                                                   s.num_prefix_tokens, s.num_heads)
    x = images(vit)
    with torch.no_grad():
        torch.testing.assert_close(vb(x), aligned_features(enc.eval(), x), rtol=0, atol=0)
    policy = vb.get_fsdp_wrapping_policy()
    assert policy(module=vb.featurizer.blocks[0], recurse=False, nonwrapped_numel=0)


def test_official_avgpool_checkpoint_converts(tmp_path):
    """The reference's student of an avg-pool ViT has no ``norm.*`` (its norm is Identity): it converts,
    and the converted encoder has the student's features."""
    from prismatic_locality.convert import convert

    from test_convert import perturbed, write_official

    vit = build("avgpool")
    enc = perturbed(make_encoder(copy.deepcopy(vit), 24, attn_impl="math"), 1)
    dec = perturbed(MaskEmbedDecoder(default_decoder_config(V.vit_spec(vit), V.vit_spec(enc), width=24)), 2)
    assert "norm.weight" not in enc.state_dict() and "fc_norm.weight" in enc.state_dict()
    name, kw = FAMILIES["avgpool"]
    src = write_official(tmp_path / "last.pth.tar", enc, dec, "s" + name)
    out = convert(src, tmp_path / "aligned", timm_kwargs=kw)
    back = load_aligned(out)
    x = images(vit)
    with torch.no_grad():
        assert torch.equal(aligned_features(back.encoder, x), aligned_features(enc.eval(), x))


NEW_RECIPES = ["siglip2-so400m-384", "pe-core-l-336", "dinov3-l-16", "eva02-l-clip-336", "aimv2-l-336", "c-radio-v3-l"]


@pytest.mark.parametrize("recipe", NEW_RECIPES)
def test_new_recipes_name_supported_timm_models(recipe, capsys):
    from prismatic_locality.align.config import describe_recipe, get_recipe, parse_config

    cfg = get_recipe(recipe)
    arch = cfg.teacher.model.split(".")[0]
    if not timm.is_model(arch):
        pytest.skip(f"timm {timm.__version__} has no '{arch}'")
    assert "." in cfg.teacher.model and cfg.teacher.model in timm.list_pretrained(arch + "*")  # a real hub tag
    assert (cfg.global_batch, cfg.optim.lr, cfg.teacher.target) == (1024, 2e-4, "penultimate")
    torch.manual_seed(0)  # the adapter accepts the architecture (tiny width/depth, the family's own layout)
    tiny = V.create_vit(arch, **{**cfg.teacher.timm_kwargs, "embed_dim": 48, "depth": 1, "num_heads": 3, "img_size": 32,
                                 **({"attn_pool_num_heads": 3} if "pe_core" in arch else {})})
    make_encoder(tiny, 24)
    assert f"--teacher.model {cfg.teacher.model}" in describe_recipe(recipe)
    with pytest.raises(SystemExit):
        parse_config(["--recipe", recipe, "--help"])
    assert f"--teacher.model {cfg.teacher.model}" in capsys.readouterr().out


@pytest.mark.slow
def test_maskembed_step_benchmark_accepts_family_recipes(tmp_path):
    import importlib.util
    import pathlib

    if not timm.is_model("vit_large_patch16_dinov3"):
        pytest.skip(f"timm {timm.__version__} has no DINOv3 / PE models")
    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "maskembed_step.py"
    spec = importlib.util.spec_from_file_location("maskembed_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "step.json"
    assert bench.main(["--models", "dinov3-l-16:small", "pe-core-l-336:small", "--batch", "1", "--steps", "1",
                       "--warmup", "0", "--device", "cpu", "--out", str(out)]) == 0
    import json

    rows = json.loads(out.read_text())["rows"]
    ref, fast = rows[0], rows[1]
    assert (ref["model"], ref["path"], fast["path"]) == ("dinov3-l-16:small", "reference", "fast")
    assert fast["loss"] == pytest.approx(ref["loss"], abs=1e-5)  # pixel masking = token masking, with RoPE
    assert bench.model_entry("dinov3-l-16:small") == ("vit_large_patch16_dinov3", {"img_size": 128, **bench.SMALL})
    with pytest.raises(SystemExit):
        bench.main(["--models", "no-such-recipe"])


def test_conv_stem_masked_patch_is_zeroed_pixels():
    """ViTamin: its MbConv stem mixes neighbouring pixels, so a masked patch is defined in pixels (zero in
    normalised space, the paper's definition): token masking runs the stem on each masked view, equals
    pixel masking exactly, and a masked patch's neighbours see the zeros through the stem."""
    vit = build("vitamin")
    s = V.vit_spec(vit)
    assert (s.img_size, s.patch_size, s.grid, s.mlp_gated) == (32, 16, 2, True)
    x = images(vit)
    mask = torch.ones(2, s.num_patches, dtype=torch.bool)
    mask[:, 0] = False
    with torch.no_grad():
        tok = V.embed(vit, x, mask)
        pix = V.embed(vit, x * V.pixel_mask(mask, s.grid, s.patch_size, s.img_size))
        assert torch.equal(tok, pix)
        plain = V.embed(vit, x)
        assert (tok[:, 1:] - plain[:, 1:]).abs().max().item() > 1e-4  # the stem leaks across patches
        t = Teacher(copy.deepcopy(vit))
        masks = torch.rand(2, 3, s.num_patches, generator=torch.Generator().manual_seed(0)) < 0.5
        pixel = Teacher(copy.deepcopy(vit), masking="pixel")
        assert (t(x, masks) - pixel(x, masks)).abs().max().item() <= 1e-6
