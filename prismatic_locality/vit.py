"""timm VisionTransformer adapter: build, inspect, soft-cap and run ViTs token-by-token.

Everything MaskEmbed needs from a ViT goes through this module, so the rest of the package
never touches timm internals and runs on timm 0.9.10 (Prismatic's pin) and timm 1.0.x alike.

- `create_vit`: a timm ViT by name, weights from the hub tag (``pretrained=True``), a local
  file, or none (random init, for tests).
- `ViTSpec`: the handful of facts other modules need (width, heads, grid, prefix tokens, ...).
- `SoftCapAttention`: attention with logits soft-capped as ``cap * tanh(s / cap)`` (paper App. C),
  a drop-in replacement for timm's ``Attention`` that keeps its parameter names.
- `embed` / `run_blocks`: the ViT forward split at the token level, so a teacher can mask patch
  tokens (exactly equivalent to masking pixels to 0 in normalised space) and stop at any block.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .activations import act_name

# --------------------------------------------------------------------------------------------
# Creation
# --------------------------------------------------------------------------------------------


def create_vit(
    name: str,
    pretrained: bool = False,
    weights: Optional[str] = None,
    **kwargs,
) -> nn.Module:
    """Create a timm VisionTransformer without its classifier.

    `name` is any timm ViT name, optionally with a pretrained tag (``vit_base_patch16_224.augreg_in1k``).
    `pretrained=True` loads the tag's weights through timm (hub or cache); `weights` is a local
    ``.safetensors``/``.pth``/``.bin`` file in timm's key layout, loaded with timm's own
    checkpoint filter (so OpenAI/SigLIP originals convert), never executing pickled code.
    """
    if weights is not None and not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file not found: {weights}")
    if not timm.is_model(name.split(".")[0]):
        raise ValueError(f"unknown timm model '{name}' (see timm.list_models())")
    model = timm.create_model(name, pretrained=pretrained and weights is None, num_classes=0, **kwargs)
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise ValueError(f"'{name}' is not a VisionTransformer-style timm model (no blocks/patch_embed)")
    if weights is not None:
        load_timm_weights(model, weights)
    return model


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file or a torch file, never running pickled code; a file that
    is not weights fails with one line naming it and what is wrong (`weights_file.read_weights`)."""
    from .weights_file import read_weights

    return read_weights(path)


def load_timm_weights(model: nn.Module, path: str) -> None:
    """Load a local pretrained checkpoint into a timm ViT using timm's filter function.

    timm's ``checkpoint_filter_fn`` converts original OpenAI CLIP / big_vision layouts and
    resamples position embeddings, just as the hub path would.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = read_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = checkpoint_filter_fn(state, model)
    # The classifier is not part of a backbone; anything else missing is a mismatch.
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(
            f"weights {path} do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


# --------------------------------------------------------------------------------------------
# Facts about a ViT
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViTSpec:
    embed_dim: int
    num_heads: int
    depth: int
    img_size: int
    patch_size: int
    num_prefix_tokens: int
    qkv_bias: bool
    act: str  # activation name, see prismatic_locality.activations
    mlp_hidden: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches


def vit_spec(model: nn.Module) -> ViTSpec:
    blk = model.blocks[0]
    attn = blk.attn
    if not hasattr(attn, "qkv") or not hasattr(blk.mlp, "fc1"):  # e.g. EVA02: q/k/v projections, SwiGLU
        raise ValueError(f"{type(model).__name__} blocks ({type(attn).__name__}, {type(blk.mlp).__name__}) are not "
                         "supported: a fused qkv projection and a two-layer MLP are expected, as in timm's "
                         "VisionTransformer and Beit")
    img_size = model.patch_embed.img_size
    patch_size = model.patch_embed.patch_size
    if img_size[0] != img_size[1] or patch_size[0] != patch_size[1]:
        raise ValueError(f"only square images and patches are supported, got {img_size}/{patch_size}")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return ViTSpec(
        embed_dim=model.embed_dim,
        num_heads=attn.num_heads,
        depth=len(model.blocks),
        img_size=img_size[0],
        patch_size=patch_size[0],
        num_prefix_tokens=model.num_prefix_tokens,
        qkv_bias=attn.qkv.bias is not None,
        act=act_name(blk.mlp.act),
        mlp_hidden=blk.mlp.fc1.out_features,
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
    )


# --------------------------------------------------------------------------------------------
# Soft-capped attention
# --------------------------------------------------------------------------------------------


def _flex_attention():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:  # torch < 2.5
        return None
    return flex_attention


_compiled_flex = None


def softcap_attention(q, k, v, scale: float, cap: float, impl: str = "auto") -> torch.Tensor:
    """softmax(cap * tanh(q k^T * scale / cap)) v for (B, H, N, d) tensors.

    ``impl``: ``"math"`` materialises the logits (exact, any device); ``"flex"`` uses FlexAttention
    with a score_mod (fused, CUDA); ``"auto"`` picks flex on CUDA when available.
    """
    global _compiled_flex
    if impl == "auto":
        impl = "flex" if (q.is_cuda and _flex_attention() is not None) else "math"
    if impl == "flex":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(_flex_attention(), dynamic=False)

        def score_mod(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)

        return _compiled_flex(q, k, v, score_mod=score_mod, scale=scale)
    if impl != "math":
        raise ValueError(f"unknown attention impl '{impl}' (auto | flex | math)")
    logits = (q * scale) @ k.transpose(-2, -1)
    logits = cap * torch.tanh(logits / cap)
    return logits.softmax(dim=-1) @ v


class SoftCapAttention(nn.Module):
    """timm ``Attention`` with tanh soft-capped logits (the paper's stabilised "svit" attention).

    Built from an existing timm attention module, adopting its sub-modules, so the state-dict keys
    (``qkv``, ``q_norm``, ``k_norm``, ``proj``, ...) and pretrained weights are unchanged.
    """

    def __init__(self, attn: nn.Module, cap: float = 30.0, impl: str = "auto"):
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise ValueError("gated attention is not supported by SoftCapAttention")
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scale
        self.cap = cap
        self.impl = impl
        self.qkv = attn.qkv
        self.q_norm = attn.q_norm
        self.k_norm = attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = getattr(attn, "norm", nn.Identity())  # timm >= 1.0 has an optional scale norm
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("SoftCapAttention does not take attention masks")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = softcap_attention(q, k, v, self.scale, self.cap, self.impl)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        x = self.norm(x)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, cap={self.cap}, impl={self.impl}"


def apply_softcap(model: nn.Module, cap: float = 30.0, impl: str = "auto") -> nn.Module:
    """Swap every block's attention for `SoftCapAttention` in place (no-op for cap <= 0)."""
    if cap and cap > 0:
        for blk in model.blocks:
            if isinstance(blk.attn, SoftCapAttention):
                blk.attn.cap, blk.attn.impl = cap, impl
            else:
                blk.attn = SoftCapAttention(blk.attn, cap=cap, impl=impl)
    return model


def set_attention_impl(model: nn.Module, impl: str) -> None:
    for m in model.modules():
        if isinstance(m, SoftCapAttention):
            m.impl = impl


def set_fused_attention(model: nn.Module, enabled: bool) -> int:
    """Switch timm ``Attention`` modules between ``F.scaled_dot_product_attention`` and timm's own
    explicit softmax path (same maths); returns how many modules were switched.

    Why: torch's CPU flash-attention kernel is slow in bf16 for ViT-sized sequences (demo shapes:
    its backward takes 65 ms per call against 10 ms in fp32), so bf16 on CPU runs faster without it.
    """
    switched = 0
    for m in model.modules():
        if hasattr(m, "fused_attn") and not isinstance(m, SoftCapAttention):
            m.fused_attn = enabled
            switched += 1
    return switched


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX).

    There, bf16 autocast makes a small ViT's training step ~1.7x faster than fp32; elsewhere bf16 is
    emulated and slower than fp32. (torch.cpu's probes are private; absent on old torch = False.)
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


# --------------------------------------------------------------------------------------------
# Token-level forward
# --------------------------------------------------------------------------------------------


def null_patch_token(model: nn.Module) -> torch.Tensor:
    """The patch embedding of an all-zero (normalised) patch: what a masked patch becomes.

    Masking pixels to 0 in normalised space (reference, paper App. C) and replacing the patch's
    token with this vector are the same thing for a non-overlapping conv patch embed.
    """
    p = model.patch_embed.patch_size
    w = model.patch_embed.proj.weight
    zeros = torch.zeros(1, w.shape[1], p[0], p[1], device=w.device, dtype=w.dtype)
    pe = model.patch_embed
    # Run the projection on a single patch, bypassing the patch embed's fixed-size check.
    return pe.norm(pe.proj(zeros).reshape(1, -1)).reshape(-1)


def embed(model: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor] = None, repeats: int = 1) -> torch.Tensor:
    """Images (B, 3, H, W) to the token sequence entering block 0, patch tokens optionally masked.

    `mask` is (B * repeats, N) with 1/True = keep; masked patches are replaced by
    `null_patch_token`. With `repeats` > 1 each image is patch-embedded once and its tokens are
    repeated (image i's copies are rows i*repeats ... i*repeats + repeats - 1).
    """
    t = model.patch_embed(x)
    if t.ndim == 4:  # NHWC output (dynamic_img_size): flatten to tokens
        t = t.reshape(t.shape[0], -1, t.shape[-1])
    if repeats > 1:
        t = t.repeat_interleave(repeats, dim=0)
    if mask is not None:
        keep = mask.to(torch.bool).unsqueeze(-1)
        t = torch.where(keep, t, null_patch_token(model).to(t.dtype))
    t = model._pos_embed(t)
    t = model.patch_drop(t)
    return model.norm_pre(t)


def run_blocks(model: nn.Module, t: torch.Tensor, num_blocks: Optional[int] = None) -> torch.Tensor:
    """Run the first `num_blocks` blocks (all by default), honouring grad checkpointing."""
    blocks = model.blocks if num_blocks is None else model.blocks[:num_blocks]
    if getattr(model, "grad_checkpointing", False) and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        for blk in blocks:
            t = checkpoint(blk, t, use_reentrant=False)
        return t
    for blk in blocks:
        t = blk(t)
    return t


def pixel_mask(mask: torch.Tensor, grid: int, patch_size: int, img_size: int) -> torch.Tensor:
    """Upsample a (B, N) patch mask to a (B, 1, img, img) pixel mask, as the reference does.

    Pixels beyond the patch grid (e.g. 384 px with 14 px patches) are zero-padded ("masked"),
    but a conv patch embed never sees them.
    """
    m = mask.to(torch.float32).reshape(-1, 1, grid, grid)
    m = F.interpolate(m, scale_factor=patch_size, mode="nearest")
    pad = img_size - grid * patch_size
    return F.pad(m, (0, pad, 0, pad)) if pad else m


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def transformer_flops(tokens: int, width: int, mlp_hidden: int, depth: int) -> float:
    """Forward FLOPs (2 x MACs) of `depth` pre-norm blocks on one sequence:
    per block 2·n·(4·d² + 2·d·h) for qkv/proj/MLP plus 2·2·n²·d for QKᵀ and AV."""
    n, d, h = tokens, width, mlp_hidden
    return float(depth * (2 * n * (4 * d * d + 2 * d * h) + 4 * n * n * d))


def vit_flops_per_image(spec: ViTSpec, num_blocks: Optional[int] = None) -> float:
    """Forward FLOPs of a ViT on one image: patch embedding + `num_blocks` blocks (all by default)."""
    depth = spec.depth if num_blocks is None else num_blocks
    patch = 2 * spec.num_patches * (3 * spec.patch_size**2) * spec.embed_dim
    return transformer_flops(spec.num_tokens, spec.embed_dim, spec.mlp_hidden, depth) + patch


__all__ = [
    "create_vit",
    "read_state_dict",
    "load_timm_weights",
    "ViTSpec",
    "vit_spec",
    "SoftCapAttention",
    "softcap_attention",
    "apply_softcap",
    "set_attention_impl",
    "null_patch_token",
    "embed",
    "run_blocks",
    "pixel_mask",
    "count_params",
    "transformer_flops",
    "vit_flops_per_image",
]
