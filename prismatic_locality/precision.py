"""One precision policy for every stage: MaskEmbed training, probe feature extraction, probe heads, demo.

    fp32  no autocast: float32 everywhere, bit-reproducible on CPU.
    bf16  ``torch.autocast(<the device's type>, torch.bfloat16)``: matmuls and attention in bf16,
          parameters, optimiser state, norms and losses in fp32 (how the reference trains
          MaskEmbed and the probe heads, and extracts probe features, on GPU).
    auto  bf16 on CUDA, fp32 anywhere else (exact on CPU, where bf16 is usually emulated).

`fastest(device)` is the demo's choice instead: bf16 wherever the hardware multiplies bf16 (CUDA, or
a CPU with AVX512-BF16 / AMX), fp32 elsewhere.

On a CPU under bf16, timm's attention modules use timm's explicit softmax path instead of torch's
fused kernel (`switch_attention`): same maths, and torch's CPU flash attention is slow in bf16.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator

import torch
import torch.nn as nn

from . import vit as V
from .choices import PRECISIONS



def resolve(precision: str, device: torch.device | str, field: str = "precision") -> str:
    """"bf16" | "fp32" for `precision` on `device`; `field` names the setting in the error."""
    if precision not in PRECISIONS:
        raise ValueError(f"{field} must be one of {' | '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def fastest(device: torch.device | str = "cpu") -> str:
    """bf16 where the hardware multiplies bf16 (CUDA, or a CPU with AVX512-BF16 / AMX), else fp32."""
    if torch.device(device).type == "cuda" or V.cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def autocast(precision: str, device: torch.device | str) -> ContextManager:
    """A fresh context that runs its body in `precision` (resolved here) on `device`'s type."""
    device = torch.device(device)
    if resolve(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def teacher_dtype(dtype: str, precision: str, device: torch.device | str) -> torch.dtype:
    """The frozen teacher's weight dtype: `auto` = bfloat16 when the run is bf16 on CUDA (the
    weights are cast once instead of at every autocast matmul), else float32."""
    if dtype == "auto":
        on_gpu_bf16 = torch.device(device).type == "cuda" and resolve(precision, device) == "bf16"
        return torch.bfloat16 if on_gpu_bf16 else torch.float32
    return getattr(torch, dtype)


def switch_attention(precision: str, device: torch.device | str, *modules: nn.Module) -> int:
    """For a bf16 run on a CPU, timm attention in `modules` takes the explicit path (for good);
    returns how many modules were switched."""
    if torch.device(device).type == "cpu" and resolve(precision, device) == "bf16":
        return sum(V.set_fused_attention(module, False) for module in modules)
    return 0


@contextlib.contextmanager
def switched_attention(precision: str, device: torch.device | str, *modules: nn.Module) -> Iterator[int]:
    """`switch_attention` for the duration of the block only (for modules the caller does not own)."""
    saved = [(m, m.fused_attn) for module in modules for m in module.modules() if hasattr(m, "fused_attn")]
    try:
        yield switch_attention(precision, device, *modules)
    finally:
        for m, was in saved:
            m.fused_attn = was
