"""The trainer's three objectives, each a (student, teacher) pair with MaskEmbed's call signature

    target = teacher(images, masks)        # frozen, no gradient
    loss = student(images, masks, target)  # the trained side

so `align.train.train_step`, data, resume, checkpoints and parallelism are shared (``--objective``).
x is a normalised image, m ∈ {0,1}^n a patch mask (or crop window) from the run's sampler, h the
frozen pretrained ViT, f_θ its trainable copy (attention soft-capped, as the MaskEmbed encoder).

maskembed (paper §3.2, Eq. 1; `maskembed.py`)
    min_{θ,ψ} E_x E_m || g_ψ(f_θ(x) ⊙ m) − h(x ⊙ m) ||²

mim (masked image modelling with a feature target, as the reference implementation's MIM script,
https://github.com/iancovert/locality-alignment `scripts/mim.py`)
    min_θ E_x E_m || W f_θ(x ⊙ m) − s · h_L(x) ||²
    - student: the MaskEmbed encoder surgery (`maskembed.make_encoder`: soft-capped attention, fresh
      final norm, pooling removed, zero-initialised linear head W to the teacher width) run on the
      MASKED PIXELS x ⊙ m (masked patches set to 0 in normalised space), whole token sequence out;
    - target: the teacher's UNMASKED final-layer features h_L(x) (last block + final norm, prefix
      tokens included), the same for each of the image's K masks, scaled by s = 1/std (target
      scaling as MaskEmbed's, estimated on the unmasked outputs);
    - masks: the MaskEmbed sampler (|m| uniform, plus 1 − m and the all-ones mask); loss as
      ``--loss`` (mse by default), mean over masks, tokens and channels.
    The result is an encoder with the same checkpoint layout and no decoder; it can serve as a
    MaskEmbed teacher (``--teacher.aligned``), as the reference's MIM-then-MaskEmbed runs.

clipself (the crop objective of Wu et al. 2024 in the paper's version, App. B.3 and Table 1)
    min_θ E_x E_c [ 1 − cos( fc_norm(mean_{j ∈ c} f_θ(x)_j),  h_cls(resize(x|_c)) ) ]
    - c: ONE crop window per image, aligned to the patch grid: height and width (in patches)
      independently uniform on {a, ..., g} for a g x g grid with a = ceil(3 g / 14) (the paper's
      3..14 on CLIP ViT-B/16's 14 x 14 grid; 2..6 on the demo's 6 x 6 grid), position uniform
      over the places where it fits (`CropSampler`; a (B, 1, n) window mask);
    - target: the teacher's pooled pre-logits ([CLS] after the final norm for CLIP) of the crop's
      pixels resized (bilinear) to the input size;
    - student: the ViT's own output space, no new head: the patch features (last block, the
      PRETRAINED final norm kept) averaged over exactly the window's patches, then the model's
      fc_norm (Identity for [CLS]-pooled ViTs), i.e. its pre-logits with average pooling
      restricted to the window; soft-capped attention as the other objectives;
    - loss: cosine (the recipes; ``--loss`` is honoured).
    No decoder; the checkpoint's encoder head is a frozen identity map (the layout needs one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import vit as V
from .choices import LOSSES, OBJECTIVES
from .maskembed import Teacher, aligned_features, encode, make_encoder, reconstruction_loss


# --------------------------------------------------------------------------------------------
# mim
# --------------------------------------------------------------------------------------------


class MIMTeacher(Teacher):
    """s · h_L(x): the unmasked final-layer features, repeated for each of the image's K masks."""

    def __init__(self, vit: nn.Module):
        super().__init__(vit, target="last")

    @torch.no_grad()
    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), masks (B, K, N) -> targets (B·K, T, D), row i·K + k = image i."""
        t = V.final_norm(self.vit, V.run_blocks(self.vit, V.embed(self.vit, images.to(V.param_dtype(self.vit)))))
        return (t * self.scale).repeat_interleave(masks.shape[1], dim=0)


class EncoderStudent(nn.Module):
    """A student that trains the encoder alone: `state_dict()` holds ``encoder.*`` only (no decoder)."""

    decoder = None
    default_loss = "mse"

    def __init__(self, encoder: nn.Module, loss: Optional[str] = None):
        super().__init__()
        loss = loss or self.default_loss
        if loss not in LOSSES:
            raise ValueError(f"unknown loss '{loss}' ({' | '.join(LOSSES)})")
        self.encoder, self.loss = encoder, loss


class MIMStudent(EncoderStudent):
    """W f_θ(x ⊙ m) against the target."""

    def forward(self, images: torch.Tensor, masks: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        B, K, N = masks.shape
        s = V.vit_spec(self.encoder)
        keep = V.pixel_mask(masks.reshape(B * K, N), s.grid, s.patch_size, s.img_size).to(images.dtype)
        pred = encode(self.encoder, images.repeat_interleave(K, dim=0) * keep)   # W f_θ(x ⊙ m)
        if pred.shape != target.shape:
            raise ValueError(f"mim: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        return reconstruction_loss(pred, target, self.loss)


# --------------------------------------------------------------------------------------------
# clipself
# --------------------------------------------------------------------------------------------


def min_crop_side(grid: int) -> int:
    """The smallest crop side, in patches: ceil(3 g / 14) (3 on a 14 x 14 grid, as the paper)."""
    return max(1, math.ceil(3 * grid / 14))


@dataclass
class CropSampler:
    """One grid-aligned crop window per image, as a (B, 1, N) bool mask (True = inside the window).

    Height and width independently uniform on {min_crop_side(g), ..., g}, top-left corner uniform
    over the positions where the window fits."""

    grid: int

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    masks_per_image = 1

    def __call__(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        g, lo, dev = self.grid, min_crop_side(self.grid), generator.device
        u = torch.rand(batch_size, 4, generator=generator, device=dev, dtype=torch.float64)
        h = lo + (u[:, 0] * (g - lo + 1)).floor().long()
        w = lo + (u[:, 1] * (g - lo + 1)).floor().long()
        top = (u[:, 2] * (g - h + 1)).floor().long()
        left = (u[:, 3] * (g - w + 1)).floor().long()
        r = torch.arange(g, device=dev).view(1, g, 1)
        c = torch.arange(g, device=dev).view(1, 1, g)
        v = lambda t: t.view(-1, 1, 1)  # noqa: E731
        window = (r >= v(top)) & (r < v(top + h)) & (c >= v(left)) & (c < v(left + w))
        return window.flatten(1).unsqueeze(1)


def window_bounds(window: torch.Tensor, grid: int) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) in patches of each (N,) rectangular window mask in (M, N)."""
    out = []
    for m in window.reshape(-1, grid, grid).cpu():
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        if len(rows) == 0:
            raise ValueError("clipself: an empty crop window")
        out.append((int(rows[0]), int(cols[0]), int(rows[-1]) - int(rows[0]) + 1, int(cols[-1]) - int(cols[0]) + 1))
    return out


def resized_crops(images: torch.Tensor, window: torch.Tensor, grid: int, patch_size: int) -> torch.Tensor:
    """Each image's window (pixels of its patches) resized (bilinear) back to the input size: (M, 3, H, W)."""
    K = window.shape[1]
    x = images.repeat_interleave(K, dim=0)
    size = tuple(images.shape[-2:])
    crops = [F.interpolate(x[i:i + 1, :, t * patch_size:(t + h) * patch_size, l * patch_size:(l + w) * patch_size],
                           size=size, mode="bilinear", align_corners=False)
             for i, (t, l, h, w) in enumerate(window_bounds(window.flatten(0, 1), grid))]
    return torch.cat(crops)


class CropTeacher(Teacher):
    """h_cls(resize(x|_c)): the pooled pre-logits of the resized crop, (B·K, 1, D)."""

    def __init__(self, vit: nn.Module):
        super().__init__(vit, target="cls")

    @torch.no_grad()
    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        s = self.spec
        x = resized_crops(images.to(V.param_dtype(self.vit)), masks, s.grid, s.patch_size)
        t = V.final_norm(self.vit, V.run_blocks(self.vit, V.embed(self.vit, x)))
        return (self.vit.forward_head(t, pre_logits=True) * self.scale).unsqueeze(1)


def clipself_encoder(vit: nn.Module, softcap: float = 30.0, attn_impl: str = "auto") -> nn.Module:
    """The clipself student f_θ (in place): soft-capped attention, pretrained norms KEPT (its output
    is compared with the teacher's own pre-logits), pooling removed, and a frozen identity ``head``
    so the checkpoint layout (encoder.head) holds."""
    V.vit_spec(vit)
    V.apply_softcap(vit, softcap, attn_impl)
    dim = vit.embed_dim
    device = next(vit.parameters()).device
    vit.attn_pool, vit.global_pool, vit.head_drop = None, "", nn.Identity()
    vit.head = nn.Linear(dim, dim, device=device)
    with torch.no_grad():
        vit.head.weight.copy_(torch.eye(dim))
        vit.head.bias.zero_()
    vit.requires_grad_(True)
    vit.head.requires_grad_(False)  # not trained: not in the optimiser, no unused DDP parameter
    return vit


def window_pool(encoder: nn.Module, images: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """fc_norm(mean of the patch features inside each window): (B·K, 1, D)."""
    K = window.shape[1]
    p = V.vit_spec(encoder).num_prefix_tokens
    z = aligned_features(encoder, images)[:, p:].repeat_interleave(K, dim=0)   # (M, N, D)
    w = window.flatten(0, 1).to(z.dtype).unsqueeze(-1)
    pooled = (z * w).sum(1) / w.sum(1)
    return encoder.fc_norm(pooled).unsqueeze(1)


class CropStudent(EncoderStudent):
    """Window-pooled f_θ(x) against the crop target."""

    default_loss = "cosine"

    def forward(self, images: torch.Tensor, masks: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred = window_pool(self.encoder, images, masks)
        if pred.shape != target.shape:
            raise ValueError(f"clipself: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        return reconstruction_loss(pred, target, self.loss)


# --------------------------------------------------------------------------------------------
# The factory for the non-MaskEmbed objectives
# --------------------------------------------------------------------------------------------


def build_pair(objective: str, student_vit: nn.Module, teacher_vit: nn.Module, *, loss: str,
               softcap: float, attn_impl: str = "auto") -> tuple[nn.Module, Teacher]:
    """(student, teacher) for `objective` ("mim" | "clipself"); MaskEmbed's is built by the trainer."""
    if objective == "mim":
        teacher = MIMTeacher(teacher_vit)
        encoder = make_encoder(student_vit, teacher.spec.embed_dim, softcap=softcap, attn_impl=attn_impl)
        return MIMStudent(encoder, loss), teacher
    if objective == "clipself":
        return CropStudent(clipself_encoder(student_vit, softcap, attn_impl), loss), CropTeacher(teacher_vit)
    raise ValueError(f"unknown objective '{objective}' ({' | '.join(OBJECTIVES)})")


def train_flops_per_image(objective: str, teacher: V.ViTSpec, encoder: V.ViTSpec, masks_per_image: int) -> dict:
    """Analytic FLOPs of one training image (backward = 2 x forward), for the log's MFU.

    mim       encoder 3 · K · ViT_L(x ⊙ m) + head;  teacher 1 · ViT_L(x)
    clipself  encoder 3 · ViT_L(x);                 teacher K · ViT_L(crop)
    """
    K, T = masks_per_image, encoder.num_tokens
    enc = V.vit_flops_per_image(encoder)
    tea = V.vit_flops_per_image(teacher, teacher.depth)
    if objective == "mim":
        parts = {"encoder": 3 * K * (enc + 2 * T * encoder.embed_dim * teacher.embed_dim), "teacher": tea}
    else:
        parts = {"encoder": 3 * enc, "teacher": K * tea}
    return {**parts, "total": sum(parts.values())}


__all__ = ["MIMTeacher", "MIMStudent", "CropSampler", "CropTeacher", "CropStudent", "min_crop_side",
           "window_bounds", "resized_crops", "window_pool", "clipself_encoder", "build_pair",
           "train_flops_per_image"]
