"""The Prismatic plugin's Prismatic-free parts: weights resolution, featurizer, transform, DecoderProjector.

Always run (CI has no Prismatic). Tiny random models; the real CLIP-L/336 and SO400M/384
architectures are only built on the meta device (shapes, no memory, no weights).
"""
import copy
import os

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms.functional as TVF
from PIL import Image
from torchvision.transforms import Compose, InterpolationMode

from prismatic_locality import vit as V
from prismatic_locality.checkpoint import CheckpointError, load_aligned, save_aligned
from prismatic_locality.decoder import MaskEmbedDecoder
from prismatic_locality.maskembed import default_decoder_config, make_encoder
from prismatic_locality.prismatic import features as F
from prismatic_locality.prismatic import weights as W
from prismatic_locality.prismatic.projector import (
    DecoderProjector,
    TransformerProjector,
    TruncatedProjector,
    cut_featurizer,
    projector_init,
    truncate_featurizer,
)

from conftest import TINY, tiny_vit

LLM_DIM = 40


def make_tiny_checkpoint(path, kind="clip", seed=0, width=24, model_name=None):
    """A tiny aligned checkpoint with every parameter perturbed (so copies can be told apart).

    `model_name` (a timm name with tag) replaces the kind's architecture, with the same tiny sizes.
    """
    name, kw = TINY[kind]
    if model_name is None:
        vit = tiny_vit(kind, seed)
    else:
        name = model_name
        torch.manual_seed(seed)
        vit = V.create_vit(model_name, **kw)
    enc = make_encoder(copy.deepcopy(vit), width)
    dec = MaskEmbedDecoder(default_decoder_config(V.vit_spec(vit), V.vit_spec(enc), width=width))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in list(enc.parameters()) + list(dec.parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return save_aligned(path, enc, dec, model_name=name, softcap=30.0, timm_kwargs=kw)


@pytest.fixture
def no_registrations(monkeypatch):
    monkeypatch.setattr(W, "_registered", {})
    monkeypatch.delenv(W.ENV_ROOT, raising=False)


# ------------------------------------------------------------------------------------------------
# DecoderProjector
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_projector_is_the_trained_decoder_with_a_zero_head(tmp_path, kind):
    a = load_aligned(make_tiny_checkpoint(tmp_path / "ck", kind))
    proj = DecoderProjector.from_init(projector_init(a), LLM_DIM)
    # Stable keys = the paper fork's TransformerProjector keys.
    top = {k.split(".")[0] for k in proj.state_dict()}
    assert top == {"in_proj", "pos_embed", "blocks", "norm", "head"}
    assert torch.equal(proj.in_proj.weight, a.encoder.head.weight) and torch.equal(proj.in_proj.bias, a.encoder.head.bias)
    dec_sd = a.decoder.state_dict()
    for k, v in proj.state_dict().items():
        if not k.startswith(("in_proj", "head")):
            assert torch.equal(v, dec_sd[k]), k
    assert proj.head.weight.shape == (LLM_DIM, a.decoder.cfg.width)
    assert not proj.head.weight.any() and not proj.head.bias.any()

    s = a.spec
    x = torch.randn(2, 3, s.img_size, s.img_size)
    feats = a.encoder.forward_features(x)
    out = proj(feats)
    assert out.shape == (2, s.num_tokens, LLM_DIM)
    assert not out.any()  # zero-initialised head: the LLM sees zeros at step 0
    # Before the head it is exactly the MaskEmbed decoder on the encoder's output, no patch masked.
    pre = proj.forward_features(proj.in_proj(feats))
    ref = a.decoder.forward_features(a.encoder.head(feats))
    torch.testing.assert_close(pre, ref, rtol=0, atol=0)
    # Trainable: the zero head still receives a gradient.
    proj(feats.detach()).sum().backward()
    assert proj.head.weight.grad.abs().sum() > 0


def test_projector_activation_override_and_state_round_trip(tmp_path):
    a = load_aligned(make_tiny_checkpoint(tmp_path / "ck", "clip"))
    assert a.decoder.cfg.act == "quick_gelu"
    init = projector_init(a)
    gelu = DecoderProjector.from_init(init, LLM_DIM, act="gelu")
    assert type(gelu.blocks[0].mlp.act) is torch.nn.GELU
    own = DecoderProjector.from_init(init, LLM_DIM)
    assert "quickgelu" in type(own.blocks[0].mlp.act).__name__.lower()
    # What a finished run saves, a fresh projector loads strictly (prismatic.load()'s contract).
    with torch.no_grad():
        own.head.weight.normal_()
    fresh = DecoderProjector.from_init(init, LLM_DIM)
    fresh.load_state_dict(own.state_dict())
    feats = torch.randn(1, a.spec.num_tokens, a.spec.embed_dim)
    assert torch.equal(fresh(feats), own(feats)) and fresh(feats).abs().sum() > 0


def test_projector_rejects_a_mismatched_decoder(tmp_path):
    init = projector_init(load_aligned(make_tiny_checkpoint(tmp_path / "ck", "clip")))
    init.decoder_state = {k: v for k, v in init.decoder_state.items() if k != "pos_embed"}
    with pytest.raises(ValueError, match="pos_embed"):
        DecoderProjector.from_init(init, LLM_DIM)


# ------------------------------------------------------------------------------------------------
# Adapter ablations (paper App. D): TransformerProjector, TruncatedProjector
# ------------------------------------------------------------------------------------------------


def test_transformer_projector_is_a_random_decoder_sized_adapter():
    torch.manual_seed(0)
    proj = TransformerProjector(48, 3, num_tokens=17, num_prefix_tokens=1, llm_dim=LLM_DIM)
    # The fork's TransformerProjector keys (= the DecoderProjector's), 2 blocks of the ViT's width and heads.
    assert {k.split(".")[0] for k in proj.state_dict()} == {"in_proj", "pos_embed", "blocks", "norm", "head"}
    assert len(proj.blocks) == 2 and proj.blocks[0].attn.num_heads == 3 and proj.in_proj.weight.shape == (48, 48)
    assert proj.pos_embed.shape == (1, 17, 48) and proj.head.weight.shape == (LLM_DIM, 48)
    assert proj.head.weight.abs().sum() > 0  # random, unlike the DecoderProjector's zero head
    feats = torch.randn(2, 17, 48, requires_grad=True)
    out = proj(feats)
    assert out.shape == (2, 17, LLM_DIM)
    # Prefix tokens are used as they come (not zeroed, as the decoder's are): CLS changes the output.
    other = feats.detach().clone()
    other[:, 0] += 1.0
    assert not torch.allclose(proj(other), out)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_truncated_adapter_takes_the_loaded_blocks_and_finishes_the_features(tmp_path, kind):
    """The aligned featurizer split in two: the adapter's blocks and norm are the checkpoint's last two
    blocks and final norm, the featurizer runs only the rest, and adapter-minus-Linear after the
    featurizer is bit-identical to the unsplit features."""
    ck = make_tiny_checkpoint(tmp_path / "ck", kind)
    size = TINY[kind][1]["img_size"]
    featurizer, _, _ = F.load_featurizer(ck, image_size=size)
    whole, _, _ = F.load_featurizer(ck, image_size=size)
    x = torch.randn(2, 3, size, size)
    ref = whole(x)
    adapter = truncate_featurizer(featurizer, LLM_DIM)
    assert isinstance(adapter, TruncatedProjector) and len(adapter) == 4
    assert len(featurizer.blocks) == 1 and isinstance(featurizer.norm, torch.nn.Identity)
    for i in (0, 1):  # the loaded backbone's blocks 1 and 2 (of 3), weights unchanged
        want = whole.blocks[1 + i].state_dict()
        assert all(torch.equal(v, want[k]) for k, v in adapter[i].state_dict().items())
    assert all(torch.equal(v, whole.norm.state_dict()[k]) for k, v in adapter[2].state_dict().items())
    assert not adapter[3].weight.any() and not adapter[3].bias.any() and adapter[3].weight.shape == (LLM_DIM, 48)
    # The paper fork's Sequential keys: 0, 1 (blocks), 2 (norm), 3 (Linear).
    assert {k.split(".")[0] for k in adapter.state_dict()} == {"0", "1", "2", "3"}
    mid = featurizer(x)
    assert mid.shape == ref.shape  # every token still, prefix included
    torch.testing.assert_close(adapter[:3](mid), ref, rtol=0, atol=0)
    out = adapter(mid)
    assert out.shape == (*ref.shape[:2], LLM_DIM) and not out.any()
    # Trainable although the featurizer it came from is frozen; the featurizer keeps no moved block.
    assert all(p.requires_grad for p in adapter.parameters())
    assert not any(p.requires_grad for p in featurizer.parameters())
    adapter(mid.detach()).sum().backward()
    assert adapter[3].weight.grad.abs().sum() > 0


def test_truncated_adapter_on_stock_features():
    """A stock ViT's features (Prismatic: block L-2 output, no norm): cut there with prefix tokens, the
    adapter moves blocks L-3 and L-2 and no norm; the patch tokens it computes are the stock features."""
    torch.manual_seed(0)
    vit = tiny_vit("clip")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for blk in vit.blocks[:-1]:
            h = blk(h)
    stock = h[:, vit.num_prefix_tokens:]
    kept = [vit.blocks[0], vit.blocks[1]]
    cut_featurizer(vit, len(vit.blocks) - 1, keep_norm=False)
    adapter = truncate_featurizer(vit, LLM_DIM)
    assert adapter[0] is kept[0] and adapter[1] is kept[1] and isinstance(adapter[2], torch.nn.Identity)
    assert len(vit.blocks) == 0 and {k.split(".")[0] for k in adapter.state_dict()} == {"0", "1", "3"}
    with torch.no_grad():
        got = adapter[:3](vit(x))
    torch.testing.assert_close(got[:, vit.num_prefix_tokens:], stock, rtol=0, atol=0)


def test_truncate_and_cut_reject_too_few_blocks():
    vit = tiny_vit("clip")
    with pytest.raises(ValueError, match="cannot keep 4 of the featurizer's 3 blocks"):
        cut_featurizer(vit, 4, keep_norm=True)
    cut_featurizer(vit, 1, keep_norm=True)
    with pytest.raises(ValueError, match="needs 2 blocks; the featurizer has 1"):
        truncate_featurizer(vit, LLM_DIM)


# ------------------------------------------------------------------------------------------------
# Featurizer and transform
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,tokens", [("clip", 1 + 16), ("siglip", 4)])
def test_featurizer_features_and_token_counts(tmp_path, kind, tokens):
    ck = make_tiny_checkpoint(tmp_path / "ck", kind)
    featurizer, init, cfg = F.load_featurizer(ck, image_size=TINY[kind][1]["img_size"])
    ref = load_aligned(ck)
    s = ref.spec
    x = torch.randn(2, 3, s.img_size, s.img_size)
    out = featurizer(x)  # __call__ -> forward_features (the FSDP-safe path)
    assert out.shape == (2, tokens, 48)
    torch.testing.assert_close(out, ref.encoder.forward_features(x))
    assert not any(p.requires_grad for p in featurizer.parameters())
    assert isinstance(featurizer.head, torch.nn.Identity)
    assert torch.equal(init.in_proj["weight"], ref.encoder.head.weight)
    assert cfg["encoder"]["num_tokens"] == tokens


def test_featurizer_rejects_wrong_image_size(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "ck", "clip")
    with pytest.raises(CheckpointError, match="img_size is 32, but this backbone id expects 336"):
        F.load_featurizer(ck, image_size=336)


@pytest.mark.parametrize("strategy", ["resize-naive", "resize-crop", "letterbox"])
def test_image_transform_strategies(strategy):
    mean, std = (0.5, 0.25, 0.75), (0.5, 0.5, 0.25)
    t = F.image_transform(16, mean, std, strategy)
    assert isinstance(t, Compose)
    img = Image.new("RGB", (40, 20), (255, 0, 128))
    out = t(img)
    assert out.shape == (3, 16, 16)
    red = (1.0 - mean[0]) / std[0]
    if strategy == "letterbox":
        # top/bottom rows are the mean colour, i.e. ~0 after normalisation (int(mean*255) rounding)
        assert out[:, 0, 8].abs().max() < 0.05 and abs(out[0, 8, 8] - red) < 1e-4
    else:
        assert torch.allclose(out[0], torch.full((16, 16), red), atol=1e-4)


@pytest.mark.parametrize("size,pad", [((40, 19), (0, 10)), ((19, 40), (10, 0)), ((40, 20), (0, 10))])
def test_letterbox_pads_like_prismatic(size, pad):
    """Prismatic pads ``int(diff / 2)`` on *both* sides: an odd difference leaves the image one pixel short
    of square (40 x 19 -> 40 x 39), and its transform then resizes the short side and centre-crops."""
    (w, h), (px, py) = size, pad
    padded = F.LetterboxPad((0, 0, 255))(Image.new("RGB", size, (255, 0, 0)))
    assert padded.size == (w + 2 * px, h + 2 * py)
    red = np.all(np.asarray(padded) == (255, 0, 0), axis=-1)
    assert red[py:py + h, px:px + w].all() and red.sum() == w * h

    mean, std = (0.5, 0.25, 0.75), (0.5, 0.5, 0.25)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    fill = tuple(int(m * 255) for m in mean)
    padded = TVF.pad(img, [px, py, px, py], fill=fill)
    ref = TVF.normalize(TVF.to_tensor(TVF.center_crop(TVF.resize(padded, 16, InterpolationMode.BICUBIC), 16)), mean, std)
    out = F.image_transform(16, mean, std, "letterbox")(img)
    assert out.shape == (3, 16, 16) and torch.equal(out, ref)


def test_crop_pct_follows_prismatic():
    assert F.prismatic_crop_pct("vit_base_patch16_clip_quickgelu_224.openai") == 0.9    # timm's value for the tag
    assert F.prismatic_crop_pct("vit_large_patch14_clip_quickgelu_336.openai") == 1.0
    assert F.prismatic_crop_pct("vit_so400m_patch14_siglip_384.webli") == 1.0           # Prismatic resizes SigLIP to S
    assert F.prismatic_crop_pct("not_a_timm_model.x", default=0.5) == 0.5
    t = F.image_transform(224, (0, 0, 0), (1, 1, 1), "resize-crop", crop_pct=0.9)
    assert t.transforms[0].size == 248 and t(Image.new("RGB", (300, 250))).shape == (3, 224, 224)


def test_image_transform_resize_crop_keeps_aspect():
    t = F.image_transform(8, (0, 0, 0), (1, 1, 1), "resize-crop", interpolation="nearest")
    img = Image.new("RGB", (32, 16), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 8, 16))  # white left quarter: cropped away by a centre crop
    assert t(img).max() == 0
    squash = F.image_transform(8, (0, 0, 0), (1, 1, 1), "resize-naive", interpolation="nearest")(img)
    assert squash[:, :, :2].min() == 1


def test_image_transform_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="'pad-corner' is not supported"):
        F.image_transform(8, (0, 0, 0), (1, 1, 1), "pad-corner")


# ------------------------------------------------------------------------------------------------
# The real architectures (meta device: shapes only)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,tokens,dim,act", [
    ("vit_large_patch14_clip_quickgelu_336", 577, 1024, "quick_gelu"),
    ("vit_so400m_patch14_siglip_384", 729, 1152, None),
])
def test_real_token_counts_on_meta(name, tokens, dim, act, monkeypatch):
    # Parameters go to the meta device as they are registered (timm 0.9.10 cannot be built under
    # `torch.device("meta")`: it calls .item() on a tensor while building).
    register = torch.nn.Module.register_parameter

    def to_meta(self, pname, param):
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, pname, param)

    monkeypatch.setattr(torch.nn.Module, "register_parameter", to_meta)
    vit = timm.create_model(name, pretrained=False, num_classes=0)
    spec = V.vit_spec(vit)
    enc = make_encoder(vit, dim, attn_impl="math")
    dec_cfg = default_decoder_config(spec, spec)
    proj = DecoderProjector(dec_cfg, dim, 4096)
    assert proj.head.weight.is_meta and enc.blocks[0].attn.qkv.weight.is_meta
    feats = enc.forward_features(torch.empty(1, 3, spec.img_size, spec.img_size, device="meta"))
    out = proj(feats)
    assert (spec.num_tokens, spec.embed_dim) == (tokens, dim)
    assert feats.shape == (1, tokens, dim) and out.shape == (1, tokens, 4096)
    if act:
        assert dec_cfg.act == act
    assert proj.pos_embed.shape == (1, tokens, dim)


# ------------------------------------------------------------------------------------------------
# Weights resolution
# ------------------------------------------------------------------------------------------------


def test_resolve_from_env_root_and_alias(tmp_path, monkeypatch, no_registrations):
    root = tmp_path / "root"
    ck = make_tiny_checkpoint(root / "clip-l-336-aligned", "clip")
    other = tmp_path / "empty"
    other.mkdir()
    monkeypatch.setenv(W.ENV_ROOT, os.pathsep.join([str(other), str(root)]))
    monkeypatch.chdir(other)  # the working directory plays no part
    assert W.resolve_checkpoint("clip-l-336-aligned") == ck
    assert W.resolve_checkpoint("clip-vit-l-336px-aligned") == ck  # the fork's id finds the canonical dir


@pytest.mark.parametrize("fork_id,ours", [("clip-vit-l-336px-aligned", "clip-l-336-aligned"),
                                           ("siglip-vit-so400m-384px-aligned", "siglip-so400m-384-aligned"),
                                           ("clip-vit-b-aligned", "clip-b-224-aligned"),
                                           ("siglip-vit-b-aligned", "siglip-b-224-aligned"),
                                           ("clip-vit-l-aligned", "clip-l-224-aligned"),
                                           ("siglip-vit-so400m-aligned", "siglip-so400m-224-aligned")])
def test_fork_ids_are_aliases(tmp_path, monkeypatch, no_registrations, fork_id, ours):
    """The paper fork's ids resolve to the same checkpoint folder and image size as ours."""
    assert W.canonical_id(fork_id) == ours
    assert W.all_backbone_ids()[fork_id] == W.ALIGNED_BACKBONES[ours].default_image_size
    ck = make_tiny_checkpoint(tmp_path / ours, "clip")
    monkeypatch.setenv(W.ENV_ROOT, str(tmp_path))
    assert W.resolve_checkpoint(fork_id) == ck


def test_every_aligned_id_has_the_align_recipe_of_its_family():
    """`<fam>-aligned` is aligned by `locality align --recipe <fam>`: same teacher, same image size.
    Covers the paper fork's IN-1k ViT-L and 224 px CLIP-L / SigLIP-SO400M ids."""
    from prismatic_locality.align.config import get_recipe

    assert {"in1k-vit-l-aligned", "clip-l-224-aligned", "siglip-so400m-224-aligned"} <= set(W.ALIGNED_BACKBONES)
    assert W.canonical_id("clip-vit-l-aligned") == "clip-l-224-aligned"
    assert W.canonical_id("siglip-vit-so400m-aligned") == "siglip-so400m-224-aligned"
    for b in W.ALIGNED_BACKBONES.values():
        teacher = get_recipe(b.id.removesuffix("-aligned")).teacher.model
        assert teacher.split(".")[0] == b.teacher.split(".")[0], b.id
        if b.min_timm is None or timm.is_model(b.teacher.split(".")[0]):
            assert timm.models.get_pretrained_cfg(b.teacher).input_size[-1] == b.default_image_size, b.id


def test_resolve_rejects_relative_root(monkeypatch, no_registrations):
    monkeypatch.setenv(W.ENV_ROOT, "relative/ckpts")
    with pytest.raises(ValueError, match="not an absolute path"):
        W.resolve_checkpoint("clip-l-336-aligned")


def test_resolve_registered_dir_wins(tmp_path, monkeypatch, no_registrations):
    a = make_tiny_checkpoint(tmp_path / "root" / "siglip-so400m-384-aligned", "siglip", seed=1)
    b = make_tiny_checkpoint(tmp_path / "mine", "siglip", seed=2)
    monkeypatch.setenv(W.ENV_ROOT, str(tmp_path / "root"))
    assert W.resolve_checkpoint("siglip-so400m-384-aligned") == a
    W.register_checkpoint("siglip-so400m-384-aligned", b)
    assert W.resolve_checkpoint("siglip-so400m-384-aligned") == b
    W.unregister_checkpoint("siglip-so400m-384-aligned")
    assert W.resolve_checkpoint("siglip-so400m-384-aligned") == a


def test_resolve_missing_lists_where_it_looked(tmp_path, monkeypatch, no_registrations):
    monkeypatch.setenv(W.ENV_ROOT, str(tmp_path))
    W.register_checkpoint("clip-vit-l-336px-aligned", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as e:
        W.resolve_checkpoint("clip-vit-l-336px-aligned")
    msg = str(e.value)
    assert "'clip-vit-l-336px-aligned'" in msg
    assert str(tmp_path / "nowhere") in msg
    assert str(tmp_path / "clip-vit-l-336px-aligned") in msg and str(tmp_path / "clip-l-336-aligned") in msg
    assert W.ENV_ROOT in msg and "\n" not in msg


def test_resolve_hub_id_from_offline_cache(tmp_path, monkeypatch, no_registrations):
    """An ``hf://`` registration resolves from the HF cache with HF_HUB_OFFLINE=1 (cache layout written here)."""
    import huggingface_hub.constants as C

    cache = tmp_path / "hub"
    repo_dir = cache / "models--acme--clip-l-336-aligned"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = make_tiny_checkpoint(repo_dir / "snapshots" / commit, "clip")
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    W.register_checkpoint("clip-l-336-aligned", "hf://acme/clip-l-336-aligned")
    assert W.resolve_checkpoint("clip-l-336-aligned") == snap
    W.register_checkpoint("clip-b-224-aligned", "hf://acme/not-cached")
    with pytest.raises(FileNotFoundError, match="hf://acme/not-cached"):
        W.resolve_checkpoint("clip-b-224-aligned")


# ------------------------------------------------------------------------------------------------
# SigLIP 2 and PE-Core (timm >= 1.0.15 / 1.0.16; Prismatic pins 0.9.10)
# ------------------------------------------------------------------------------------------------

SIGLIP2, PE_CORE = "vit_so400m_patch16_siglip_384.v2_webli", "vit_pe_core_large_patch14_336.fb"
TINY_KW = TINY["clip"][1]  # img 32, patch 8, width 48, depth 3: 16 patches


def needs_timm(name, version):
    return pytest.mark.skipif(not timm.is_model(name.split(".")[0]),
                              reason=f"timm {timm.__version__} lacks {name} (needs timm>={version})")


def test_new_family_ids():
    a, s = W.ALIGNED_BACKBONES, W.STOCK_BACKBONES
    assert (a["siglip2-so400m-384-aligned"].teacher, a["siglip2-so400m-384-aligned"].default_image_size) == (SIGLIP2, 384)
    assert (a["pe-core-l-336-aligned"].teacher, a["pe-core-l-336-aligned"].default_image_size) == (PE_CORE, 336)
    for b in a.values():
        if b.min_timm is not None:  # the baseline is ours: same teacher, same size, same timm
            stock = s[b.stock_id]
            assert (stock.timm_name, stock.default_image_size, stock.min_timm) == (b.teacher, b.default_image_size, b.min_timm)
    assert (W.SIGLIP2_TIMM, W.PE_CORE_TIMM) == ("1.0.15", "1.0.16")
    assert not set(s) & set(W.all_backbone_ids())


@needs_timm(PE_CORE, W.PE_CORE_TIMM)
@pytest.mark.parametrize("name,tokens", [(SIGLIP2, 576), (PE_CORE, 576)])
def test_new_family_tags_exist_in_timm(name, tokens):
    assert name in timm.list_pretrained(name.split(".")[0] + "*")
    cfg = timm.models.get_pretrained_cfg(name)
    size = cfg.input_size[-1]
    assert size in (384, 336) and (size // int(name.split("patch")[1][:2])) ** 2 == tokens


def test_require_timm_names_the_version(monkeypatch):
    W.require_timm("clip-l-336-aligned")     # in timm 0.9.10: nothing to require
    W.require_timm("some-user-id")           # unknown ids are not checked
    monkeypatch.setattr(timm, "is_model", lambda name: False)
    for bid, v in [("pe-core-l-336-aligned", "1.0.16"), ("siglip2-vit-so400m-384px", "1.0.15")]:
        with pytest.raises(ValueError, match=rf"'{bid}' needs timm>={v} .*pip install 'timm>={v}'") as e:
            W.require_timm(bid)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,version", [(SIGLIP2, W.SIGLIP2_TIMM), (PE_CORE, W.PE_CORE_TIMM)])
def test_stock_featurizer_is_prismatics_feature(name, version):
    """Second-to-last block, no final norm, patch tokens only: a copy cut after that block, norm removed."""
    if not timm.is_model(name.split(".")[0]):
        pytest.skip(f"timm {timm.__version__} lacks {name} (needs timm>={version})")
    kw = {k: v for k, v in TINY_KW.items() if k != "img_size"}
    torch.manual_seed(0)
    feat = F.load_stock_featurizer(name, 32, pretrained=False, **kw)
    cut = copy.deepcopy(feat)
    cut.blocks, cut.norm = cut.blocks[:-1], torch.nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    out = feat(x)
    assert out.shape == (2, 16, 48) and not feat.training
    torch.testing.assert_close(out, cut.forward_features(x)[:, feat.num_prefix_tokens:], rtol=0, atol=0)
    if hasattr(feat, "get_intermediate_layers"):  # Prismatic's own call (a list on timm >= 1.0.3)
        torch.testing.assert_close(out, feat.get_intermediate_layers(x, n={len(feat.blocks) - 2})[0], rtol=0, atol=0)


@needs_timm(SIGLIP2, W.SIGLIP2_TIMM)
def test_aligned_siglip2_featurizer(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "ck", "clip", model_name=SIGLIP2)
    featurizer, init, cfg = F.load_featurizer(ck, image_size=32)
    x = torch.randn(2, 3, 32, 32)
    assert cfg["encoder"]["pretrained_tag"] == SIGLIP2 and cfg["encoder"]["num_tokens"] == 16  # no CLS
    torch.testing.assert_close(featurizer(x), load_aligned(ck).encoder.forward_features(x))
    assert F.prismatic_crop_pct(SIGLIP2) == 1.0


@needs_timm(PE_CORE, W.PE_CORE_TIMM)
def test_aligned_pe_core_featurizer(tmp_path):
    ck = make_tiny_checkpoint(tmp_path / "ck", "clip", model_name=PE_CORE)
    featurizer, init, cfg = F.load_featurizer(ck, image_size=32)
    x = torch.randn(2, 3, 32, 32)
    assert cfg["encoder"]["num_tokens"] == 17  # CLS + 16 patches
    torch.testing.assert_close(featurizer(x), load_aligned(ck).encoder.forward_features(x))
