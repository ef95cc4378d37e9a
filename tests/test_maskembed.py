import copy

import pytest
import torch
import torch.nn.functional as F

from prismatic_locality import vit as V
from prismatic_locality.decoder import DecoderConfig, MaskEmbedDecoder
from prismatic_locality.maskembed import (MaskEmbed, Teacher, aligned_features, default_decoder_config, encode,
                                          estimate_target_scale, make_encoder, reconstruction_loss,
                                          train_flops_per_image)
from prismatic_locality.masks import UniformMaskSampler, step_generator

from conftest import tiny_vit


def build(kind="clip", width=None):
    vit = tiny_vit(kind)
    teacher = Teacher(copy.deepcopy(vit))
    encoder = make_encoder(copy.deepcopy(vit), width or teacher.spec.embed_dim)
    decoder = MaskEmbedDecoder(default_decoder_config(teacher.spec, V.vit_spec(encoder), width=width))
    return vit, teacher, encoder, decoder


def images(spec, b=2):
    return torch.randn(b, 3, spec.img_size, spec.img_size)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_teacher_penultimate_target_is_final_norm_of_block_L_minus_1(kind):
    vit, teacher, *_ = build(kind)
    s = teacher.spec
    x = images(s)
    masks = torch.ones(2, 1, s.num_patches, dtype=torch.bool)
    t = x
    tok = vit.patch_embed(t)
    tok = vit.norm_pre(vit._pos_embed(tok))
    for blk in vit.blocks[:-1]:
        tok = blk(tok)
    expected = vit.norm(tok)
    got = teacher(x, masks)
    assert got.shape == (2, s.num_tokens, s.embed_dim)  # whole sequence, prefix included
    assert torch.allclose(got, expected, atol=1e-6)
    assert not teacher.vit.training and not any(p.requires_grad for p in teacher.vit.parameters())


def test_teacher_targets_last_and_cls():
    vit, _, _, _ = build("clip")
    x = images(V.vit_spec(vit))
    ones = torch.ones(2, 1, 16, dtype=torch.bool)
    last = Teacher(copy.deepcopy(vit), target="last")(x, ones)
    assert torch.allclose(last, vit.eval().forward_features(x), atol=1e-6)
    cls = Teacher(copy.deepcopy(vit), target="cls")(x, ones)
    assert cls.shape == (2, 1, 48)
    assert torch.allclose(cls[:, 0], vit.forward_head(vit.forward_features(x), pre_logits=True), atol=1e-6)
    with pytest.raises(ValueError, match="target"):
        Teacher(vit, target="middle")


def test_teacher_row_layout_and_masking_changes_output():
    _, teacher, *_ = build("clip")
    s = teacher.spec
    x = images(s)
    masks = UniformMaskSampler(s.num_patches)(2, step_generator(0, 0))
    out = teacher(x, masks)
    assert out.shape == (6, s.num_tokens, s.embed_dim)
    # row i*K + 2 is image i under the all-ones mask
    full = teacher(x, torch.ones(2, 1, s.num_patches, dtype=torch.bool))
    assert torch.allclose(out[2::3], full, atol=1e-6)
    assert not torch.allclose(out[0::3], full, atol=1e-3)
    pixel = Teacher(copy.deepcopy(teacher.vit), masking="pixel")(x, masks)
    assert torch.allclose(out, pixel, atol=1e-5)


def test_target_scale_gives_unit_variance():
    _, teacher, *_ = build("clip")
    s = teacher.spec
    sampler = UniformMaskSampler(s.num_patches)
    batches = [(images(s, 4), sampler(4, step_generator(0, i))) for i in range(3)]
    stats = estimate_target_scale(teacher, batches)
    t = torch.cat([teacher(x, m) for x, m in batches]).double()
    assert abs(t.var(unbiased=False).item() - 1.0) < 1e-6
    assert stats["count"] == t.numel() and stats["scale"] == pytest.approx(teacher.scale.item())
    with pytest.raises(ValueError, match="held-out"):
        estimate_target_scale(teacher, [])


def test_encoder_init():
    vit, _, encoder, _ = build("siglip", width=24)
    assert isinstance(encoder.blocks[0].attn, V.SoftCapAttention) and encoder.blocks[0].attn.cap == 30.0
    assert torch.equal(encoder.norm.weight, torch.ones(48)) and torch.equal(encoder.norm.bias, torch.zeros(48))
    assert encoder.norm.eps == 1e-5
    assert encoder.attn_pool is None  # SigLIP's MAP head removed
    assert encoder.head.out_features == 24 and not encoder.head.weight.any() and not encoder.head.bias.any()
    # pretrained blocks are kept
    assert torch.equal(encoder.blocks[1].mlp.fc1.weight, vit.blocks[1].mlp.fc1.weight)
    x = images(V.vit_spec(vit))
    z = encode(encoder, x)
    assert z.shape == (2, 4, 24) and not z.any()  # zero head: decoder input starts at zero
    assert torch.allclose(aligned_features(encoder, x), encoder.forward_features(x), atol=1e-6)


def test_decoder_init_and_masking():
    cfg = DecoderConfig(num_tokens=17, num_prefix_tokens=1, width=24, out_dim=48, num_heads=3, act="quick_gelu")
    dec = MaskEmbedDecoder(cfg)
    assert len(dec.blocks) == 2 and dec.pos_embed.shape == (1, 17, 24)
    assert abs(dec.pos_embed.std().item() - 0.02) < 0.005
    for blk in dec.blocks:
        assert torch.allclose(blk.ls1.gamma, torch.full((24,), 1e-6))
        assert torch.allclose(blk.ls2.gamma, torch.full((24,), 1e-6))
        assert "QuickGELU" in type(blk.mlp.act).__name__ and blk.mlp.fc1.out_features == 96
        assert blk.attn.qkv.bias is not None
    z = torch.randn(2, 17, 24)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :5] = True
    vis = dec.visible(z, mask)
    assert not vis[:, 0].any()                                   # prefix always zeroed
    assert torch.equal(vis[0, 1:6], z[0, 1:6]) and not vis[0, 6:].any() and not vis[1].any()
    assert dec(z, mask).shape == (2, 17, 48)
    # masked content cannot leak: changing masked embeddings leaves the output unchanged
    z2 = z.clone()
    z2[0, 7:] += 100
    z2[:, 0] += 100
    assert torch.allclose(dec(z, mask), dec(z2, mask))
    with pytest.raises(ValueError, match="divisible"):
        DecoderConfig(num_tokens=17, num_prefix_tokens=1, width=25, out_dim=48, num_heads=3)


def test_default_decoder_config_matches_reference():
    vit = tiny_vit("clip")
    s = V.vit_spec(vit)
    cfg = default_decoder_config(s, s)
    assert (cfg.width, cfg.out_dim, cfg.num_heads, cfg.depth, cfg.init_values, cfg.act) == (48, 48, 3, 2, 1e-6, "quick_gelu")
    assert cfg.num_tokens == 17 and cfg.num_prefix_tokens == 1


def test_losses():
    p, t = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    assert torch.allclose(reconstruction_loss(p, t, "mse"), ((p - t) ** 2).mean())
    assert torch.allclose(reconstruction_loss(p, t, "l1"), (p - t).abs().mean())
    assert torch.allclose(reconstruction_loss(p, t, "cosine"), 1 - F.cosine_similarity(p, t, dim=-1).mean())
    assert reconstruction_loss(t, t, "cosine").abs() < 1e-6
    with pytest.raises(ValueError, match="loss"):
        reconstruction_loss(p, t, "huber")


def test_maskembed_equation_1_and_gradients():
    _, teacher, encoder, decoder = build("clip")
    model = MaskEmbed(encoder, decoder)
    s = teacher.spec
    x = images(s)
    masks = UniformMaskSampler(s.num_patches)(2, step_generator(0, 0))
    target = teacher(x, masks)
    loss = model(x, masks, target)
    # Eq. 1 by hand
    z = encode(encoder, x).repeat_interleave(3, 0)
    expected = ((decoder(z, masks.flatten(0, 1)) - teacher(x, masks)) ** 2).mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    assert encoder.head.weight.grad.abs().sum() > 0 and decoder.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.vit.parameters())
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "decoder"}


@pytest.mark.slow
def test_maskembed_learns():
    _, teacher, encoder, decoder = build("clip")
    model = MaskEmbed(encoder, decoder)
    s = teacher.spec
    x = images(s, 8)
    batches = [(x, UniformMaskSampler(s.num_patches)(8, step_generator(0, i))) for i in range(2)]
    estimate_target_scale(teacher, batches)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    losses = []
    for step in range(40):
        masks = UniformMaskSampler(s.num_patches)(8, step_generator(1, step))
        loss = model(x, masks, teacher(x, masks))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.8  # ~1 at init: unit-variance targets
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]


def test_analytic_flops_match_what_torch_counts():
    """The MFU numerator: `train_flops_per_image` against torch's FlopCounterMode over a real
    forward + backward (explicit attention everywhere, so its matmuls are counted too)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    counted = {}
    for masking in ("pixel", "token"):
        vit = tiny_vit("clip")
        teacher = Teacher(copy.deepcopy(vit), masking=masking)
        encoder = make_encoder(copy.deepcopy(vit), teacher.spec.embed_dim, attn_impl="math")
        decoder = MaskEmbedDecoder(default_decoder_config(teacher.spec, V.vit_spec(encoder)))
        V.set_fused_attention(teacher.vit, False)
        V.set_fused_attention(decoder, False)
        model = MaskEmbed(encoder, decoder)
        s, b = teacher.spec, 2
        sampler = UniformMaskSampler(s.num_patches)
        with FlopCounterMode(display=False) as fc:
            x, masks = images(s, b), sampler(b, step_generator(0, 0, torch.device("cpu")))
            model(x, masks, teacher(x, masks)).backward()
        counted[masking] = fc.get_total_flops() / b
    analytic = train_flops_per_image(s, V.vit_spec(encoder), decoder.cfg, sampler.masks_per_image)["total"]
    patch_embed = 2 * s.num_patches * 3 * s.patch_size**2 * s.embed_dim
    # exact but for one term: "backward = 2 x forward" also counts the gradient of the encoder's
    # input images, which nothing needs and autograd does not compute
    assert analytic - counted["pixel"] == patch_embed
    # token-level masking embeds each image once, not once per view
    assert counted["token"] < counted["pixel"]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_cls_target_prediction_pools_prefix_outputs_or_all_outputs_without_prefix(kind):
    """The CLS target's prediction = mean of the decoder's prefix outputs; a model without a prefix
    token (SigLIP) pools all its outputs, as its teacher's pooled head sees all tokens."""
    vit, _, encoder, decoder = build(kind)
    teacher = Teacher(copy.deepcopy(vit), target="cls")
    model = MaskEmbed(encoder, decoder, pooled_target=True)
    with torch.no_grad():  # make the decoder's outputs differ across tokens
        encoder.head.weight.normal_(0, 0.1)
    s = teacher.spec
    x = images(s)
    masks = UniformMaskSampler(s.num_patches)(2, step_generator(0, 0))
    out = decoder(encode(encoder, x).repeat_interleave(3, 0), masks.flatten(0, 1))
    p = s.num_prefix_tokens
    pooled = (out[:, :p] if p else out).mean(1, keepdim=True)
    assert torch.equal(model(x, masks, teacher(x, masks)), F.mse_loss(pooled, teacher(x, masks)))


def test_the_student_holds_no_hidden_modules_and_its_state_is_encoder_and_decoder():
    """The teacher is an argument of the step, not a module smuggled past nn.Module: every module the
    student holds is registered (so .to(), DDP and compile see the same thing), and its state_dict is
    exactly the aligned checkpoint's encoder.* / decoder.*."""
    _, teacher, encoder, decoder = build("clip")
    model = MaskEmbed(encoder, decoder)
    assert not [k for k, v in vars(model).items() if isinstance(v, torch.nn.Module)]
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "decoder"}
    s = teacher.spec
    x, masks = images(s), UniformMaskSampler(s.num_patches)(2, step_generator(0, 0))
    cls_target = Teacher(copy.deepcopy(teacher.vit), target="cls")(x, masks)
    with pytest.raises(ValueError, match="pooled_target"):  # a broadcast would be a silently wrong loss
        model(x, masks, cls_target)
