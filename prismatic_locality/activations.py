"""Activation names <-> classes, so configs stay JSON and the decoder matches its backbone."""
from __future__ import annotations

import torch.nn as nn
from timm.layers import QuickGELU

try:  # timm >= 1.0
    from timm.layers import GELUTanh
except ImportError:  # timm 0.9.10
    GELUTanh = None

ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU, "silu": nn.SiLU}  # silu: SwiGLU backbones (EVA02, AIMv2)


def resolve_act_layer(name: str) -> type:
    if name == "gelu_tanh":
        # SigLIP in newer timm uses tanh-approximate GELU.
        if GELUTanh is not None:
            return GELUTanh
        from functools import partial

        return partial(nn.GELU, approximate="tanh")
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}' (gelu | quick_gelu | gelu_tanh | silu)")
    return ACTIVATIONS[name]


def act_name(module_or_cls) -> str:
    """The config name of a backbone MLP's activation (instance or class)."""
    cls = module_or_cls if isinstance(module_or_cls, type) else type(module_or_cls)
    if issubclass(cls, QuickGELU) or "quickgelu" in cls.__name__.lower():
        return "quick_gelu"
    if GELUTanh is not None and issubclass(cls, GELUTanh):
        return "gelu_tanh"
    if issubclass(cls, nn.SiLU):
        return "silu"
    if issubclass(cls, nn.GELU):
        approx = getattr(module_or_cls, "approximate", "none") if not isinstance(module_or_cls, type) else "none"
        return "gelu_tanh" if approx == "tanh" else "gelu"
    raise ValueError(f"unsupported backbone activation {cls.__name__} (gelu | quick_gelu | gelu_tanh | silu)")
