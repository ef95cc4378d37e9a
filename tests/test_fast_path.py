"""The fast default path and the reference-equivalent path compute the same function."""
import copy

import pytest
import torch

from prismatic_locality import vit as V
from prismatic_locality.decoder import MaskEmbedDecoder
from prismatic_locality.maskembed import MaskEmbed, Teacher, default_decoder_config, make_encoder
from prismatic_locality.masks import UniformMaskSampler, step_generator

from conftest import tiny_vit


def make(vit, fast: bool, device="cpu"):
    teacher = Teacher(copy.deepcopy(vit), masking="token" if fast else "pixel").to(device)
    encoder = make_encoder(copy.deepcopy(vit), 48, attn_impl="auto" if fast else "math").to(device)
    torch.manual_seed(1)
    decoder = MaskEmbedDecoder(default_decoder_config(teacher.spec, V.vit_spec(encoder))).to(device)
    with torch.no_grad():  # a non-zero head so encoder gradients are non-trivial
        encoder.head.weight.normal_(0, 0.05)
    return MaskEmbed(encoder, decoder), teacher


def loss_and_grads(student_and_teacher, x, masks):
    model, teacher = student_and_teacher
    loss = model(x, masks, teacher(x, masks))
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_fast_equals_reference_fp32_cpu(kind):
    vit = tiny_vit(kind)
    s = V.vit_spec(vit)
    x = torch.randn(4, 3, s.img_size, s.img_size)
    masks = UniformMaskSampler(s.num_patches)(4, step_generator(0, 0))
    l_fast, g_fast = loss_and_grads(make(vit, True), x, masks)
    l_ref, g_ref = loss_and_grads(make(vit, False), x, masks)
    assert (l_fast - l_ref).abs().item() < 1e-5
    assert g_fast.keys() == g_ref.keys()
    worst = max((g_fast[k] - g_ref[k]).abs().max().item() for k in g_fast)
    assert worst < 1e-5
    assert any(g.abs().sum() > 0 for k, g in g_fast.items() if k.startswith("encoder.blocks"))


@pytest.mark.skipif(V._flex_attention() is None, reason="torch < 2.5 has no FlexAttention")
@pytest.mark.slow
def test_flex_score_mod_is_the_softcap_on_cpu():
    """The GPU path's FlexAttention call, run forward on CPU (torch compiles a CPU kernel; its
    backward is GPU-only): the score_mod must compute exactly the math path's soft-capped logits."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 17, 16) * 3 for _ in range(3))  # large logits: the cap matters
    flex = V.softcap_attention(q, k, v, 16**-0.5, 30.0, "flex")
    math_ = V.softcap_attention(q, k, v, 16**-0.5, 30.0, "math")
    uncapped = V.softcap_attention(q, k, v, 16**-0.5, 1e9, "math")
    assert (flex - math_).abs().max().item() < 1e-5
    assert (flex - uncapped).abs().max().item() > 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's fused kernel needs CUDA")
def test_flex_attention_matches_math_on_gpu():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 197, 64, device="cuda", requires_grad=True) * 3 for _ in range(3))
    outs = []
    for impl in ("flex", "math"):
        qi, ki, vi = (t.detach().clone().requires_grad_() for t in (q, k, v))
        o = V.softcap_attention(qi, ki, vi, 64**-0.5, 30.0, impl)
        o.square().sum().backward()
        outs.append((o.detach(), qi.grad, ki.grad, vi.grad))
    for a, b in zip(*outs):
        assert (a - b).abs().max().item() < 1e-3 * max(1.0, b.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_equals_reference_fp32_gpu():
    vit = tiny_vit("clip")
    s = V.vit_spec(vit)
    x = torch.randn(4, 3, s.img_size, s.img_size, device="cuda")
    masks = UniformMaskSampler(s.num_patches)(4, step_generator(0, 0, "cuda"))
    l_fast, g_fast = loss_and_grads(make(vit, True, "cuda"), x, masks)
    l_ref, g_ref = loss_and_grads(make(vit, False, "cuda"), x, masks)
    assert (l_fast - l_ref).abs().item() < 1e-4
    assert max((g_fast[k] - g_ref[k]).abs().max().item() for k in g_fast) < 1e-4
