"""timm ViT adapter: build, inspect, soft-cap and run ViTs token-by-token.

Everything MaskEmbed needs from a ViT goes through this module, so the rest of the package
never touches timm internals and runs on timm 0.9.10 (Prismatic's pin) and timm 1.0.x alike.
These timm model classes are handled (see docs/faithfulness.md, "Backbone families"):

- ``VisionTransformer`` (CLIP, SigLIP/SigLIP 2, DINOv2, RADIO, TIPS, AIMv2 with SwiGLU, ...),
  including ``dynamic_img_size`` models at their configured resolution;
- ``Eva`` (EVA02, Perception Encoder, DINOv3, ...): RoPE on the patch tokens only (never on the
  class/register tokens), fused qkv with separate q/v biases or separate q/k/v projections,
  SwiGLU/GLU MLPs, LayerScale, post-norm blocks;
- ``NaFlexVit`` (SigLIP 2 / RADIO NaFlex) at one fixed square resolution, and ViTamin's conv stem
  (a masked patch is then its zeroed pixels).

Other timm models are still probed as baselines (`vit_spec(model, strict=False)`), but MaskEmbed
refuses them at construction with one line naming the model and the missing piece.

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
from dataclasses import dataclass, field
from typing import Optional

# Defined before `import timm`: `prismatic_locality.hub` registers aligned architectures right after timm is
# imported (package __init__), which may happen during this very import.
# timm modules whose architectures are ViTs of the classes above (the hub registration gives each an
# aligned variant; MaskEmbed still checks each model it builds, `vit_spec(strict=True)`)
TIMM_VIT_MODULES = ("vision_transformer", "vision_transformer_hybrid", "eva", "naflexvit", "vitamin")


def vit_architectures() -> list[str]:
    """timm architecture names (no pretrained tags) defined in `TIMM_VIT_MODULES`, on this timm version."""
    from timm.models import _registry

    return sorted(n for n in _registry._model_entrypoints if _registry._model_to_module.get(n) in TIMM_VIT_MODULES)


import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GluMlp, Mlp, apply_rot_embed_cat
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from .activations import act_name
from .choices import ATTN_IMPLS

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
    if not hasattr(model, "blocks") or not (hasattr(model, "patch_embed") or hasattr(model, "embeds")):
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
    act: str  # activation name, see prismatic_locality.activations ("" when unknown: probe-only spec)
    mlp_hidden: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # SwiGLU / GeGLU MLP: two hidden projections (3·d·h MACs instead of 2·d·h); kept out of the repr,
    # which keys the probe's feature cache.
    mlp_gated: bool = field(default=False, repr=False)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches


def model_name(model: nn.Module) -> str:
    """The timm name a model was built from (for error messages)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def is_eva(model: nn.Module) -> bool:
    """timm's ``Eva`` class (EVA02, Perception Encoder, DINOv3): `_pos_embed` also returns RoPE."""
    return isinstance(model, Eva)


def is_naflex(model: nn.Module) -> bool:
    """timm's ``NaFlexVit`` (SigLIP 2 NaFlex, RADIO NaFlex): patches embedded by ``embeds``, run here in its
    standard mode at one fixed square resolution (the pretrained config's input size)."""
    return hasattr(model, "embeds") and not hasattr(model, "patch_embed")


def has_conv_stem(model: nn.Module) -> bool:
    """A hybrid ViT whose patch tokens come from a CNN (ViTamin's MbConv stages): a masked patch is then
    defined in pixels (zeroed in normalised space, the paper's definition), see `embed`."""
    return hasattr(getattr(model, "patch_embed", None), "backbone")


def _attention_layout(attn: nn.Module) -> Optional[str]:
    """How an attention module computes q, k, v: "fused" (timm Attention, AttentionRope with a fused
    qkv: bias inside the Linear), "fused_qv_bias" (EvaAttention: bias-free qkv + q_bias/v_bias),
    "separate" (q_proj/k_proj/v_proj); None = not a layout SoftCapAttention reproduces."""
    if isinstance(attn, SoftCapAttention):
        return attn.layout
    if attn is None or not all(hasattr(attn, a) for a in ("num_heads", "proj")):
        return None
    if getattr(attn, "qkv", None) is not None:
        return "fused_qv_bias" if hasattr(attn, "q_bias") else "fused"
    if all(getattr(attn, a, None) is not None for a in ("q_proj", "k_proj", "v_proj")):
        return "separate"
    return None


def _qkv_bias(attn: nn.Module) -> bool:
    if getattr(attn, "q_bias", None) is not None:
        return True
    lin = attn.qkv if getattr(attn, "qkv", None) is not None else attn.q_proj
    return lin.bias is not None


def _mlp_shape(mlp: nn.Module) -> Optional[tuple[int, bool]]:
    """(hidden width, gated) of timm's Mlp, GluMlp (packed gate, GeGLU/SwiGLU), SwiGLU or GeGluMlp."""
    if hasattr(mlp, "fc1_g") and hasattr(mlp, "fc1_x"):  # SwiGLU: separate gate and value
        return mlp.fc1_g.out_features, True
    if all(hasattr(mlp, w) for w in ("w0", "w1", "w2")):  # ViTamin's GeGluMlp: act(w0 x) * w1 x
        return mlp.w0.out_features, True
    if hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):
        if isinstance(mlp, GluMlp):  # fc1 packs value and gate: 2h outputs
            return mlp.fc1.out_features // 2, True
        if isinstance(mlp, Mlp):
            return mlp.fc1.out_features, False
    return None


def _unsupported(model: nn.Module, piece: str) -> ValueError:
    return ValueError(f"'{model_name(model)}' cannot be aligned with MaskEmbed: {piece}")


def _check_maskembed(model: nn.Module) -> None:
    """One line naming the model and the missing piece, for what MaskEmbed cannot reproduce exactly."""
    if is_naflex(model):
        if getattr(model, "rope", None) is not None:
            raise _unsupported(model, "NaFlexVit with RoPE (only NaFlex models with learned position embeddings, "
                                      "e.g. SigLIP 2 and RADIO, are supported)")
    elif not (isinstance(model, VisionTransformer) or is_eva(model)):
        raise _unsupported(model, f"model class {type(model).__name__} (supported: timm VisionTransformer, Eva, NaFlexVit)")
    elif not hasattr(model, "patch_embed"):
        raise _unsupported(model, "no patch_embed")
    if getattr(model, "rope_mixed", False):
        raise _unsupported(model, "per-block (mixed) RoPE")
    if getattr(getattr(model, "patch_drop", None), "prob", 0) > 0:
        raise _unsupported(model, "patch dropout (patch_drop_rate > 0) drops the tokens the masks index")
    for blk in model.blocks:
        attn = getattr(blk, "attn", None)
        if attn is None:
            raise _unsupported(model, f"{type(blk).__name__} has no separate attention module (parallel blocks)")
        if _attention_layout(attn) is None:
            raise _unsupported(model, f"attention {type(attn).__name__} (needs a fused qkv or q/k/v projections, as "
                                      "timm's Attention, EvaAttention and AttentionRope)")
        if getattr(attn, "gate", None) is not None:
            raise _unsupported(model, "gated attention")
        mlp = getattr(blk, "mlp", None)
        if _mlp_shape(mlp) is None:
            raise _unsupported(model, f"MLP {type(mlp).__name__} (needs timm's Mlp, GluMlp, SwiGLU or GeGluMlp)")


def vit_spec(model: nn.Module, strict: bool = True) -> ViTSpec:
    """The facts other modules need about a ViT.

    ``strict`` (MaskEmbed, checkpoints): the model must be one the token-level forward and
    `SoftCapAttention` reproduce exactly, else one ValueError line. ``strict=False`` (the probe's
    baselines): any timm ViT-like model; only the token grid, prefix tokens and mean/std are
    guaranteed, and fields that cannot be read are 0/"".
    """
    if strict:
        _check_maskembed(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    blk = model.blocks[0]
    attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
    pe = getattr(model, "patch_embed", None)
    if has_conv_stem(model):  # one token per cell of the stem's feature map: a "patch" is its stride
        img_size, grid = tuple(pe.img_size), tuple(pe.grid_size)
        patch_size = (img_size[0] // grid[0], img_size[1] // grid[1])
    elif pe is not None:
        img_size, patch_size = tuple(pe.img_size), tuple(pe.patch_size)
    else:  # NaFlex: one fixed square resolution, the pretrained config's input size
        side = int(cfg.get("input_size", (3, 224, 224))[-1])
        img_size, patch_size = (side, side), tuple(model.embeds.patch_size)
    if img_size[0] != img_size[1] or patch_size[0] != patch_size[1]:
        raise ValueError(f"only square images and patches are supported, got {img_size}/{patch_size}")
    mlp_shape = _mlp_shape(mlp) or (0, False)
    try:
        act = act_name(mlp.act)
    except (ValueError, AttributeError) as e:
        if strict:
            raise _unsupported(model, f"MLP activation ({e})") from None
        act = ""
    return ViTSpec(
        embed_dim=model.embed_dim,
        num_heads=getattr(attn, "num_heads", 0),
        depth=len(model.blocks),
        img_size=img_size[0],
        patch_size=patch_size[0],
        num_prefix_tokens=model.num_prefix_tokens,
        qkv_bias=_qkv_bias(attn) if _attention_layout(attn) else False,
        act=act,
        mlp_hidden=mlp_shape[0],
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        mlp_gated=mlp_shape[1],
    )


def block_classes(model: nn.Module) -> set[type]:
    """The model's block classes (timm Block, EvaBlock, ...): what FSDP wraps one by one."""
    return {type(b) for b in model.blocks}


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
    """softmax(cap * tanh(q k^T * scale / cap)) v for (B, H, N, d) tensors (plain softmax for cap <= 0).

    ``impl``: ``"math"`` materialises the logits (exact, any device); ``"flex"`` uses FlexAttention
    with a score_mod (fused, CUDA); ``"auto"`` picks flex on CUDA when available.
    """
    global _compiled_flex
    if not cap or cap <= 0:  # the cap removed (inference-time inspection, cap-dropped exports): plain softmax
        logits = (q * scale) @ k.transpose(-2, -1)
        return logits.softmax(dim=-1) @ v
    if impl == "auto":
        impl = "flex" if (q.is_cuda and _flex_attention() is not None) else "math"
    if impl == "flex":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(_flex_attention(), dynamic=False)

        def score_mod(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)

        return _compiled_flex(q, k, v, score_mod=score_mod, scale=scale)
    if impl != "math":
        raise ValueError(f"unknown attention impl '{impl}' ({' | '.join(ATTN_IMPLS)})")
    logits = (q * scale) @ k.transpose(-2, -1)
    logits = cap * torch.tanh(logits / cap)
    return logits.softmax(dim=-1) @ v


class SoftCapAttention(nn.Module):
    """A timm attention module with tanh soft-capped logits (the paper's stabilised "svit" attention).

    Built from an existing timm attention module (``Attention``, ``EvaAttention``, ``AttentionRope``),
    adopting its sub-modules and parameters, so the state-dict keys (``qkv``, ``q_bias``/``v_bias``,
    ``q_proj``/``k_proj``/``v_proj``, ``q_norm``, ``k_norm``, ``norm``, ``proj``, ...) and pretrained
    weights are unchanged. q, k, v are computed exactly as the family's own module does, including
    RoPE on the patch tokens only (the first ``num_prefix_tokens`` class/register tokens are not rotated).
    """

    def __init__(self, attn: nn.Module, cap: float = 30.0, impl: str = "auto"):
        super().__init__()
        layout = _attention_layout(attn)
        if layout is None:
            raise ValueError(f"SoftCapAttention cannot reproduce {type(attn).__name__} (no fused qkv or q/k/v projections)")
        if getattr(attn, "gate", None) is not None:
            raise ValueError("gated attention is not supported by SoftCapAttention")
        self.layout = layout
        self.num_heads = attn.num_heads
        self.num_kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)  # grouped-query attention (AttentionRope)
        if hasattr(attn, "head_dim"):
            self.head_dim = attn.head_dim
        else:  # timm 0.9.10's EvaAttention
            lin = attn.q_proj if layout == "separate" else attn.qkv
            self.head_dim = lin.out_features // (1 if layout == "separate" else 3) // attn.num_heads
        self.scale = attn.scale
        self.cap = cap
        self.impl = impl
        # RoPE layout (Eva-class attention; timm 0.9.10's EvaAttention always skips exactly one token)
        self.num_prefix_tokens = getattr(attn, "num_prefix_tokens", 1)
        self.rotate_half = bool(getattr(attn, "rotate_half", False))
        if layout == "separate":
            self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        else:
            self.qkv = attn.qkv
        if layout == "fused_qv_bias":
            self.qkv_bias_separate = bool(getattr(attn, "qkv_bias_separate", False))
            self.q_bias, self.v_bias = attn.q_bias, attn.v_bias
            if attn.q_bias is not None:
                self.register_buffer("k_bias", attn.k_bias, persistent=False)
        self.q_norm = getattr(attn, "q_norm", nn.Identity())  # timm 0.9.10's EvaAttention has none
        self.k_norm = getattr(attn, "k_norm", nn.Identity())
        self.attn_drop = attn.attn_drop
        self.norm = getattr(attn, "norm", nn.Identity())  # timm >= 1.0 has an optional scale norm
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        if self.layout == "separate":
            q = self.q_proj(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).reshape(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).reshape(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
            return q, k, v
        if self.layout == "fused_qv_bias" and self.q_bias is not None:  # EvaAttention: no k bias
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = self.qkv(x) + bias if self.qkv_bias_separate else F.linear(x, self.qkv.weight, bias)
        else:
            qkv = self.qkv(x)
        qkv = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def _rotate(self, t: torch.Tensor, rope: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        npt = self.num_prefix_tokens
        kw = {"half": True} if self.rotate_half else {}  # timm 0.9.10's apply_rot_embed_cat has no `half`
        return torch.cat([t[:, :, :npt, :], apply_rot_embed_cat(t[:, :, npt:, :], rope, **kw)], dim=2).type_as(like)

    def heads(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, heads, N, head_dim) as the family computes them: q/k norms, RoPE, grouped kv repeated."""
        q, k, v = self._qkv(x)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = self._rotate(q, rope, v), self._rotate(k, rope, v)
        if self.num_kv_heads != self.num_heads:
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return q, k, v

    def logits(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention logits s = q k^T * scale (B, heads, N, N) *before* the cap: what the cap acts on."""
        q, k, _ = self.heads(x, rope)
        return (q * self.scale) @ k.transpose(-2, -1)

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask=None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("SoftCapAttention does not take attention masks")
        B, N, _ = x.shape
        q, k, v = self.heads(x, rope)
        x = softcap_attention(q, k, v, self.scale, self.cap, self.impl)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        x = self.norm(x)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, cap={self.cap}, impl={self.impl}, layout={self.layout}"


def apply_softcap(model: nn.Module, cap: float = 30.0, impl: str = "auto") -> nn.Module:
    """Swap every block's attention for `SoftCapAttention` in place (no-op for cap <= 0)."""
    if cap and cap > 0:
        for blk in model.blocks:
            if isinstance(blk.attn, SoftCapAttention):
                blk.attn.cap, blk.attn.impl = cap, impl
            else:
                blk.attn = SoftCapAttention(blk.attn, cap=cap, impl=impl)
    return model


def set_softcap(model: nn.Module, cap: float) -> int:
    """Change the cap of every `SoftCapAttention` in place (0 = removed: plain softmax attention, same
    parameters); returns how many modules were changed. For measuring what the cap does after training."""
    changed = 0
    for m in model.modules():
        if isinstance(m, SoftCapAttention):
            m.cap = float(cap)
            changed += 1
    return changed


def softcap_of(model: nn.Module) -> float:
    """The model's attention soft-cap (0 when its attention is not capped)."""
    caps = {float(m.cap) for m in model.modules() if isinstance(m, SoftCapAttention)}
    if len(caps) > 1:
        raise ValueError(f"'{model_name(model)}' has blocks with different soft-caps {sorted(caps)}")
    return caps.pop() if caps else 0.0


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
    repeated (image i's copies are rows i*repeats ... i*repeats + repeats - 1). A masked token keeps
    its position: its absolute position embedding is added and (Eva) its RoPE rotation applied in
    the blocks, exactly as for the zeroed image patch it stands for.
    """
    if is_naflex(model) or has_conv_stem(model):
        return _embed_by_pixels(model, x, mask, repeats)
    return _embed_patches(model, model.patch_embed(x), mask, repeats)


def _embed_patches(model: nn.Module, t: torch.Tensor, mask: Optional[torch.Tensor], repeats: int) -> torch.Tensor:
    """Patch tokens (B, N, D), or (B, h, w, D) for dynamic_img_size models, to the sequence entering block 0."""
    if repeats > 1:
        t = t.repeat_interleave(repeats, dim=0)
    if mask is not None:
        keep = mask.to(torch.bool).reshape(t.shape[:-1]).unsqueeze(-1)
        t = torch.where(keep, t, null_patch_token(model).to(t.dtype))
    t = model._pos_embed(t)  # dynamic models resample the pos-embed to the NHWC grid and flatten
    if is_eva(model):
        t = t[0]  # (tokens, rope): the RoPE table is recomputed for the blocks by `rope_embed`
    else:
        t = model.patch_drop(t)
    norm_pre = getattr(model, "norm_pre", None)  # timm 0.9.10's Eva has none
    return t if norm_pre is None else norm_pre(t)


def _embed_by_pixels(model: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor], repeats: int) -> torch.Tensor:
    """`embed` for NaFlex and conv-stem models.

    NaFlex: patch projection, norms and the (resampled) position embedding act on each patch token
    alone, so a masked patch's token is the token of an all-zero image at that position: exactly
    pixel masking, computed from one extra zero image. Conv stem (ViTamin): the stem mixes
    neighbouring pixels, so no token stands for a zeroed patch; a masked patch is what the paper
    defines, its pixels set to 0 in normalised space, and the stem runs on each masked view.
    """
    def tokens(images):
        if is_naflex(model):
            return model._forward_embeds(images, patch_coord=None, patch_valid=None, attn_mask=None)["patches"]
        return _embed_patches(model, model.patch_embed(images), None, 1)

    if mask is not None and has_conv_stem(model):  # the stem sees each masked view
        s = vit_spec(model, strict=False)
        return tokens(x.repeat_interleave(repeats, dim=0) * pixel_mask(mask, s.grid, s.patch_size, s.img_size).to(x.dtype))
    t = tokens(x)
    if repeats > 1:
        t = t.repeat_interleave(repeats, dim=0)
    if mask is None:
        return t
    null = tokens(torch.zeros_like(x[:1]))  # NaFlex: every position's token for a zeroed patch
    npt = t.shape[1] - mask.shape[1]
    keep = torch.cat([mask.new_ones(mask.shape[0], npt), mask], dim=1).to(torch.bool).unsqueeze(-1)
    return torch.where(keep, t, null)


def rope_embed(model: nn.Module) -> Optional[torch.Tensor]:
    """The rotary position table timm's own forward gives the blocks (Eva), for the configured grid;
    None for models without RoPE. Content-independent: masked tokens keep their rotation."""
    rope = getattr(model, "rope", None)
    if rope is None or not is_eva(model):
        return None
    grid = tuple(model.patch_embed.grid_size)
    if getattr(model, "dynamic_img_size", False) or not hasattr(rope, "feat_shape"):
        return rope.get_embed(shape=grid)
    return rope.get_embed()


def run_blocks(model: nn.Module, t: torch.Tensor, num_blocks: Optional[int] = None) -> torch.Tensor:
    """Run the first `num_blocks` blocks (all by default), honouring grad checkpointing."""
    blocks = model.blocks if num_blocks is None else model.blocks[:num_blocks]
    rope = rope_embed(model)
    kw = {} if rope is None else {"rope": rope}
    if getattr(model, "grad_checkpointing", False) and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        for blk in blocks:
            t = checkpoint(blk, t, use_reentrant=False, **kw)
        return t
    for blk in blocks:
        t = blk(t, **kw)
    return t


def final_norm(model: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """The model's norm after the last block (Identity for average-pooled ViTs: they norm after pooling)."""
    return model.norm(t)


def abs_pos_embed(model: nn.Module) -> Optional[torch.Tensor]:
    """The learned absolute position embedding (1, positions, D) over a fixed grid, None where there is
    none (DINOv3, RoPE-only PE) or it is not a flat sequence (NaFlex keeps a 2-D grid)."""
    return None if is_naflex(model) else getattr(model, "pos_embed", None)


def param_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's weights are in (images are cast to it)."""
    return next(model.parameters()).dtype


def has_final_norm(model: nn.Module) -> bool:
    return not isinstance(model.norm, nn.Identity)


def _fresh_norm(old: nn.Module, dim: int, eps: float, device) -> nn.Module:
    """A re-initialised norm of the teacher's kind: LayerNorm (as before), else the same class
    (RmsNorm for AIMv2) with weight 1 / bias 0 and `eps`."""
    if isinstance(old, nn.LayerNorm):
        return nn.LayerNorm(dim, eps=eps, device=device)
    return type(old)(dim, eps=eps).to(device)


def reset_output(model: nn.Module, out_dim: int, norm_eps: float = 1e-5) -> nn.Module:
    """The encoder's output surgery (in place): final norm and fc_norm re-initialised where the
    teacher has them (an Identity stays an Identity, as the reference's ``type(norm)(dim)``),
    pooling removed (a MAP head is deleted) and a zero-initialised per-token ``head``."""
    dim = model.embed_dim
    device = next(model.parameters()).device  # new modules live where the model already is
    if has_final_norm(model):
        model.norm = _fresh_norm(model.norm, dim, norm_eps, device)
    if not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity):
        model.fc_norm = _fresh_norm(model.fc_norm, dim, norm_eps, device)
    model.attn_pool = None
    model.global_pool = ""
    model.head_drop = nn.Identity()
    model.head = nn.Linear(dim, out_dim, device=device)
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    return model


def set_drop_path(model: nn.Module, rate: float) -> nn.Module:
    """Stochastic depth in place, rising linearly from 0 at the first block to `rate` at the last
    (timm's ``drop_path_rate`` schedule), for a model built without it (an aligned encoder)."""
    from timm.layers import DropPath

    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        r = rate * i / max(len(blocks) - 1, 1)
        for name in ("drop_path1", "drop_path2"):  # timm Block and Eva block
            if hasattr(block, name):
                setattr(block, name, DropPath(r) if r > 0 else nn.Identity())
    return model


def drop_pooling(model: nn.Module) -> nn.Module:
    """Remove what sits after ``forward_features`` (a MAP head, a classifier or MaskEmbed head), in place:
    only the token features are used, so unused parameters are neither trained nor decayed."""
    if getattr(model, "attn_pool", None) is not None:
        model.attn_pool = None
    model.head = nn.Identity()
    return model


def output_norm_eps(model: nn.Module, default: float = 1e-5) -> float:
    """eps of the encoder's re-initialised output norm (final norm, else fc_norm)."""
    for norm in (model.norm, getattr(model, "fc_norm", None)):
        if norm is not None and not isinstance(norm, nn.Identity):
            return float(getattr(norm, "eps", default))
    return default


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


def transformer_flops(tokens: int, width: int, mlp_hidden: int, depth: int, mlp_gated: bool = False) -> float:
    """Forward FLOPs (2 x MACs) of `depth` pre-norm blocks on one sequence:
    per block 2·n·(4·d² + 2·d·h) for qkv/proj/MLP plus 2·2·n²·d for QKᵀ and AV
    (a gated MLP, SwiGLU/GeGLU, has three d·h projections: 2·n·(4·d² + 3·d·h))."""
    n, d, h = tokens, width, mlp_hidden
    return float(depth * (2 * n * (4 * d * d + (3 if mlp_gated else 2) * d * h) + 4 * n * n * d))


def vit_flops_per_image(spec: ViTSpec, num_blocks: Optional[int] = None) -> float:
    """Forward FLOPs of a ViT on one image: patch embedding + `num_blocks` blocks (all by default)."""
    depth = spec.depth if num_blocks is None else num_blocks
    patch = 2 * spec.num_patches * (3 * spec.patch_size**2) * spec.embed_dim
    return transformer_flops(spec.num_tokens, spec.embed_dim, spec.mlp_hidden, depth, spec.mlp_gated) + patch


__all__ = [
    "create_vit",
    "TIMM_VIT_MODULES",
    "vit_architectures",
    "read_state_dict",
    "load_timm_weights",
    "ViTSpec",
    "vit_spec",
    "SoftCapAttention",
    "softcap_attention",
    "apply_softcap",
    "set_softcap",
    "softcap_of",
    "null_patch_token",
    "embed",
    "rope_embed",
    "run_blocks",
    "final_norm",
    "has_final_norm",
    "param_dtype",
    "abs_pos_embed",
    "is_naflex",
    "has_conv_stem",
    "reset_output",
    "output_norm_eps",
    "model_name",
    "is_eva",
    "block_classes",
    "pixel_mask",
    "count_params",
    "transformer_flops",
    "vit_flops_per_image",
]
