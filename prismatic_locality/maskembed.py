"""MaskEmbed (paper §3.2, Eq. 1):

    min_{θ, ψ}  E_x E_m  || g_ψ( f_θ(x) ⊙ m ) − h(x ⊙ m) ||²

- h   `Teacher`: the frozen pretrained ViT run on the masked image (masked patches = 0 in
      normalised pixel space), truncated at the target layer, scaled to unit target variance.
- f_θ `make_encoder`: a trainable copy of the same ViT with soft-capped attention, a fresh final
      norm and a zero-initialised head to the decoder width. After training, f_θ without its head
      is the *aligned backbone*.
- g_ψ `MaskEmbedDecoder` (decoder.py): a 2-block transformer that must reconstruct h(x ⊙ m) from
      the masked embeddings.
- m   masks.py: |m| uniform, plus 1 − m and the all-ones mask for every image.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import vit as V
from .choices import LOSSES, TARGETS, TEACHER_MASKING
from .decoder import DecoderConfig, MaskEmbedDecoder



# --------------------------------------------------------------------------------------------
# h: the teacher
# --------------------------------------------------------------------------------------------


class Teacher(nn.Module):
    """h(x ⊙ m): frozen ViT outputs on masked images.

    target = "penultimate": final norm applied to block L−1's output, whole sequence (default; paper §4.2)
             "last":        final norm applied to block L's output, whole sequence
             "cls":         the pooled pre-logits (prefix / MAP token), shape (M, 1, D)
    masking = "token": masked patch tokens are replaced by the embedding of an all-zero patch
              "pixel": masked pixels are set to 0 on a K-times repeated image batch (the reference's
                       way; mathematically the same, kept for the side-by-side benchmark and test)
    """

    def __init__(self, vit: nn.Module, target: str = "penultimate", masking: str = "token"):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"unknown target '{target}' ({' | '.join(TARGETS)})")
        if masking not in TEACHER_MASKING:
            raise ValueError(f"unknown teacher masking '{masking}' ({' | '.join(TEACHER_MASKING)})")
        self.vit = vit.eval().requires_grad_(False)
        self.spec = V.vit_spec(vit)
        self.target = target
        self.masking = masking
        self.num_blocks = self.spec.depth - 1 if target == "penultimate" else self.spec.depth
        # One scalar: targets are divided by their global std, so predicting the mean scores 1.0.
        self.register_buffer("scale", torch.ones(()))

    def train(self, mode: bool = True):  # the teacher never leaves eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), masks (B, K, N) -> targets (B·K, T, D), row i·K + k = image i, mask k."""
        B, K, N = masks.shape
        m = masks.reshape(B * K, N)
        x = images.to(V.param_dtype(self.vit))
        if self.masking == "token":
            t = V.embed(self.vit, x, m, repeats=K)
        else:
            s = self.spec
            x = x.repeat_interleave(K, dim=0) * V.pixel_mask(m, s.grid, s.patch_size, s.img_size).to(x.dtype)
            t = V.embed(self.vit, x)
        t = V.final_norm(self.vit, V.run_blocks(self.vit, t, self.num_blocks))
        if self.target == "cls":
            t = self.vit.forward_head(t, pre_logits=True).unsqueeze(1)
        return t * self.scale


# --------------------------------------------------------------------------------------------
# f_θ: the encoder
# --------------------------------------------------------------------------------------------


def make_encoder(vit: nn.Module, out_dim: int, softcap: float = 30.0, attn_impl: str = "auto",
                 norm_eps: float = 1e-5) -> nn.Module:
    """Turn a pretrained timm ViT (in place) into the MaskEmbed encoder f_θ (paper App. C; docs/faithfulness.md).

    - every block's attention soft-capped at `softcap` (paper App. C: stabilises training);
    - the final norm re-initialised (and fc_norm), where the teacher has one: an average-pooled ViT's
      Identity norm stays Identity, as the reference's ``type(norm)(dim)``; eps 1e-5 as the reference;
    - pooling removed (SigLIP's MAP head is deleted): the whole token sequence is the output;
    - `head` = zero-initialised Linear(embed_dim, out_dim), applied to every token, so the
      decoder's input starts at exactly zero.

    The result is still the timm model (VisionTransformer, Eva, NaFlexVit) with its key names:
    `forward_features(x)` is the aligned backbone's feature map, `forward(x)` = head(features) is what
    the decoder sees.
    """
    V.vit_spec(vit)  # one line naming the model and the missing piece if MaskEmbed cannot run it exactly
    V.apply_softcap(vit, softcap, attn_impl)
    V.reset_output(vit, out_dim, norm_eps)
    vit.requires_grad_(True)
    return vit


def aligned_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The aligned backbone: last block, final norm, prefix tokens kept (B, T, embed_dim).

    Uses our token-level forward, so it is the same on every timm version; it equals timm's
    ``encoder.forward_features(images)``.
    """
    return V.final_norm(encoder, V.run_blocks(encoder, V.embed(encoder, images)))


def encode(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """f_θ(x): the aligned features through the (zero-initialised) head, (B, T, decoder width)."""
    return encoder.head(encoder.fc_norm(aligned_features(encoder, images)))


# --------------------------------------------------------------------------------------------
# g_ψ and Eq. 1
# --------------------------------------------------------------------------------------------


def default_decoder_config(teacher_spec: V.ViTSpec, encoder_spec: V.ViTSpec, width: Optional[int] = None,
                           depth: int = 2, init_values: float = 1e-6) -> DecoderConfig:
    """The reference's decoder: width = teacher width (`width=None`), heads/qkv_bias/activation from the encoder."""
    if width is not None and width <= 0:
        raise ValueError(f"decoder width must be > 0 (None for the teacher's width), got {width}")
    return DecoderConfig(
        num_tokens=encoder_spec.num_tokens,
        num_prefix_tokens=encoder_spec.num_prefix_tokens,
        width=teacher_spec.embed_dim if width is None else width,
        out_dim=teacher_spec.embed_dim,
        num_heads=encoder_spec.num_heads,
        depth=depth,
        qkv_bias=encoder_spec.qkv_bias,
        init_values=init_values,
        act=encoder_spec.act,
    )


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Mean over masks, tokens and channels (all weighted equally, as the reference)."""
    pred, target = pred.float(), target.float()
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(pred, target, dim=-1).mean()
    raise ValueError(f"unknown loss '{kind}' ({' | '.join(LOSSES)})")


class MaskEmbed(nn.Module):
    """The trained side of Eq. 1: encoder f_θ and decoder g_ψ. `state_dict()` holds exactly
    `encoder.*` and `decoder.*` (the aligned checkpoint's keys); the frozen teacher h is not part of
    it: its output is the `target` argument, so one training step reads

        target = teacher(images, masks)           # h(x ⊙ m)
        loss = student(images, masks, target)     # ||g_ψ(f_θ(x) ⊙ m) − h(x ⊙ m)||²

    pooled_target: the teacher's target is its pooled "cls" output (M, 1, D); the decoder's
    prefix-token outputs (or all of them, without a prefix) are averaged to match.
    """

    def __init__(self, encoder: nn.Module, decoder: MaskEmbedDecoder, loss: str = "mse", pooled_target: bool = False):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss '{loss}' ({' | '.join(LOSSES)})")
        self.encoder = encoder
        self.decoder = decoder
        self.loss = loss
        self.pooled_target = pooled_target

    def forward(self, images: torch.Tensor, masks: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) normalised; masks (B, K, N) keep-masks; target (B·K, T, D) = h(x ⊙ m).
        Returns the scalar loss."""
        K = masks.shape[1]
        z = encode(self.encoder, images).repeat_interleave(K, dim=0)          # f_θ(x), once per image
        pred = self.decoder(z, masks.flatten(0, 1))                           # g_ψ(f_θ(x) ⊙ m)
        if self.pooled_target:
            p = self.decoder.num_prefix_tokens
            pred = (pred[:, :p] if p else pred).mean(1, keepdim=True)
        if pred.shape != target.shape:  # a broadcast would be a silently wrong loss
            raise ValueError(f"MaskEmbed: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ "
                             f"(a pooled 'cls' target needs pooled_target=True)")
        return reconstruction_loss(pred, target, self.loss)


# --------------------------------------------------------------------------------------------
# Target scaling
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def estimate_target_scale(teacher: Teacher, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Global mean/variance of h(x ⊙ m) over held-out (images, masks) batches (docs/faithfulness.md).

    Sums are float64 and all-reduced when torch.distributed is initialised. Sets
    ``teacher.scale = 1/std`` so the reconstruction targets have unit global variance.
    """
    teacher.scale.fill_(1.0)
    acc = None
    for images, masks in batches:
        t = teacher(images, masks).double()
        part = torch.stack([t.sum(), (t * t).sum(), torch.tensor(float(t.numel()), dtype=torch.float64, device=t.device)])
        acc = part if acc is None else acc + part
    if acc is None:
        raise ValueError("no held-out images to estimate the target scale from")
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(acc)
    total, sq, n = acc.tolist()
    mean = total / n
    var = max(sq / n - mean * mean, 1e-12)
    teacher.scale.fill_(var**-0.5)
    return {"mean": mean, "var": var, "scale": var**-0.5, "count": int(n)}


# --------------------------------------------------------------------------------------------
# Cost model (for MFU in logs and benchmarks)
# --------------------------------------------------------------------------------------------


def train_flops_per_image(teacher: V.ViTSpec, encoder: V.ViTSpec, decoder: DecoderConfig, masks_per_image: int,
                          teacher_blocks: Optional[int] = None) -> dict:
    """Analytic FLOPs of one MaskEmbed training image (backward = 2 x forward):

    encoder  3 · [ViT_L(x) + head]                      (forward + backward, once per image)
    teacher  K · ViT_{L-1}(x ⊙ m)                       (forward only, K masked views)
    decoder  3 · K · [blocks(width) + head]             (forward + backward, K views)
    """
    K, T = masks_per_image, encoder.num_tokens
    enc = V.vit_flops_per_image(encoder) + 2 * T * encoder.embed_dim * decoder.width
    tea = V.vit_flops_per_image(teacher, teacher.depth - 1 if teacher_blocks is None else teacher_blocks)
    dec = V.transformer_flops(T, decoder.width, int(decoder.width * decoder.mlp_ratio), decoder.depth)
    dec += 2 * T * decoder.width * decoder.out_dim
    parts = {"encoder": 3 * enc, "teacher": K * tea, "decoder": 3 * K * dec}
    return {**parts, "total": sum(parts.values())}


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, per GPU


def peak_tflops(device: torch.device) -> Optional[float]:
    """Nominal dense bf16 peak of a known GPU (for MFU); None on CPU or unknown hardware."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
