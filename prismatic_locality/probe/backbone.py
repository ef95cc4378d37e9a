"""The frozen backbone being probed: a timm ViT (by name / local weights) or an aligned checkpoint.

Features are the whole token sequence after the last block and the final norm (paper App. B; docs/probe.md):
``forward_features`` for timm models (SigLIP's MAP head is not used; any timm ViT-like model, including
ones MaskEmbed cannot align, e.g. NaFlex or ViTamin's conv stem), `maskembed.aligned_features`
for aligned encoders. The fingerprint (hash of weights + architecture facts) keys the feature cache,
so changed weights never reuse stale features.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from .. import checkpoint as C
from .. import maskembed as M
from .. import vit as V


@dataclass
class BackboneConfig:
    name: str = ""                  # timm name (optionally with a pretrained tag) or an aligned checkpoint dir
    weights: Optional[str] = None   # local timm-layout weights file instead of the hub tag
    pretrained: bool = True         # timm names only: False = random init (tests, controls)
    timm_kwargs: dict = field(default_factory=dict)  # architecture overrides (tiny test models)
    init_seed: int = 0              # random init (pretrained=false) is seeded, so reruns hit the cache


class Backbone:
    """A frozen ViT plus the function that turns normalised images into (B, T, D) features."""

    def __init__(self, model: nn.Module, kind: str, name: str):
        if kind not in ("timm", "aligned"):
            raise ValueError(f"backbone kind must be 'timm' or 'aligned', got {kind!r}")
        self.model = model.eval().requires_grad_(False)
        self.kind, self.name = kind, name
        # a timm baseline needs only the grid, prefix tokens, mean/std and its own forward_features,
        # so any timm ViT-like model is probed (no MaskEmbed check); an aligned encoder passed it
        self.spec = V.vit_spec(model, strict=kind == "aligned")
        self._fingerprint: Optional[tuple] = None

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, T, D) features with autograd (fine-tuning); `features` is this without gradients."""
        if self.kind == "aligned":
            return M.aligned_features(self.model, x)
        return self.model.forward_features(x)

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.spec.mean, device=images_uint8.device).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std, device=images_uint8.device).view(1, 3, 1, 1)
        return (images_uint8.float() / 255.0 - mean) / std

    def fingerprint(self) -> str:
        """blake2b over the kind, the spec, the attention soft-caps and every weight's bytes."""
        state = self.model.state_dict()
        # memo key: tensor storage and in-place version counters, so any weight update re-hashes
        memo = tuple((k, v.data_ptr(), v._version) for k, v in state.items())
        if self._fingerprint is None or self._fingerprint[0] != memo:
            h = hashlib.blake2b(digest_size=16)
            caps = [m.cap for m in self.model.modules() if isinstance(m, V.SoftCapAttention)]
            h.update(f"{self.kind}|{self.spec}|caps={caps}".encode())
            for k, v in sorted(state.items()):
                t = v.detach().to("cpu").contiguous()
                h.update(f"|{k}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy
            self._fingerprint = (memo, h.hexdigest())
        return self._fingerprint[1]

    def describe(self) -> dict:
        s = self.spec
        return {"name": self.name, "kind": self.kind, "fingerprint": self.fingerprint(),
                "img_size": s.img_size, "patch_size": s.patch_size, "embed_dim": s.embed_dim,
                "depth": s.depth, "num_heads": s.num_heads, "num_prefix_tokens": s.num_prefix_tokens,
                "num_tokens": s.num_tokens}


def load_backbone(cfg: BackboneConfig, device: str | torch.device = "cpu") -> Backbone:
    """A timm name (hub tag or `weights` file) or an aligned checkpoint directory."""
    if not cfg.name:
        raise ValueError("backbone: give a timm model name or an aligned checkpoint dir (--backbone NAME)")
    if C.is_aligned_checkpoint(cfg.name):
        aligned = C.load_aligned(cfg.name, device=device)
        return Backbone(aligned.encoder, "aligned", cfg.name)
    if os.path.exists(cfg.name) or cfg.name.startswith((".", "/", "~")):
        # a path that is not a checkpoint: say why instead of asking timm for a model named like a path
        C.read_config(cfg.name)  # raises CheckpointError naming the missing file
        raise C.CheckpointError(f"not an aligned checkpoint: {cfg.name}/{C.WEIGHTS_NAME} is missing")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = V.create_vit(cfg.name, pretrained=cfg.pretrained, weights=cfg.weights, **cfg.timm_kwargs)
    return Backbone(model.to(device), "timm", cfg.name)
