"""The DecoderProjector: the trained MaskEmbed decoder reused as the VLM adapter (paper §5; no Prismatic import).

    features (B, T, D_vit) ─ in_proj ─► zero prefix tokens ─► + pos_embed ─► blocks ─► norm ─► head ─► (B, T, D_llm)

- ``in_proj`` is the aligned encoder's ``head`` (the Linear that fed the decoder during MaskEmbed);
- ``pos_embed``, ``blocks``, ``norm`` are the decoder's, run with no patch mask (prefix tokens are
  still zeroed at the input, exactly as in training);
- ``head`` is new and zero-initialised, so at step 0 every visual token is the zero vector in the
  LLM's embedding space and the LLM starts out undisturbed.

All T tokens (CLS included) go to the LLM. It *is* a `MaskEmbedDecoder` whose ``head`` maps to the
LLM width, so its state-dict keys are ``in_proj.*``, ``pos_embed``, ``blocks.*``, ``norm.*``,
``head.*``: the keys of the paper fork's ``TransformerProjector``, which keeps its runs loadable.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn

from ..checkpoint import AlignedModel
from ..decoder import DecoderConfig, MaskEmbedDecoder


@dataclass
class ProjectorInit:
    """What a DecoderProjector is initialised from, split off an aligned checkpoint.

    The vision backbone carries this as a plain attribute (not a submodule), so it is neither cast
    to bf16 with the frozen backbone nor saved in its state dict.
    """

    decoder: DecoderConfig
    vision_dim: int
    in_proj: dict[str, torch.Tensor]                  # the encoder head: weight (width, D_vit), bias
    decoder_state: dict[str, torch.Tensor]            # pos_embed, blocks.*, norm.* (decoder head dropped)
    in_norm: Optional[dict[str, torch.Tensor]] = None  # the encoder's fc_norm, for models that have one


def projector_init(aligned: AlignedModel) -> ProjectorInit:
    enc, dec = aligned.encoder, aligned.decoder
    fc_norm = getattr(enc, "fc_norm", None)
    has_fc_norm = fc_norm is not None and not isinstance(fc_norm, nn.Identity)
    clone = lambda sd: {k: v.detach().clone().cpu() for k, v in sd.items()}  # noqa: E731
    return ProjectorInit(
        decoder=dec.cfg,
        vision_dim=enc.embed_dim,
        in_proj=clone(enc.head.state_dict()),
        decoder_state=clone({k: v for k, v in dec.state_dict().items() if not k.startswith("head.")}),
        in_norm=clone(fc_norm.state_dict()) if has_fc_norm else None,
    )


class DecoderProjector(MaskEmbedDecoder):
    def __init__(self, cfg: DecoderConfig, vision_dim: int, llm_dim: int, in_norm: bool = False):
        super().__init__(cfg)
        self.in_norm = nn.LayerNorm(vision_dim, eps=cfg.norm_eps) if in_norm else nn.Identity()
        self.in_proj = nn.Linear(vision_dim, cfg.width)
        self.head = nn.Linear(cfg.width, llm_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_init(cls, init: ProjectorInit, llm_dim: int, act: Optional[str] = None) -> "DecoderProjector":
        """Build from a trained decoder. `act` overrides the decoder's activation (the fork used GELU everywhere)."""
        cfg = init.decoder if act is None else replace(init.decoder, act=act)
        proj = cls(cfg, init.vision_dim, llm_dim, in_norm=init.in_norm is not None)
        trained = {**init.decoder_state, **{f"in_proj.{k}": v for k, v in init.in_proj.items()}}
        if init.in_norm is not None:
            trained.update({f"in_norm.{k}": v for k, v in init.in_norm.items()})
        missing, unexpected = proj.load_state_dict(trained, strict=False)
        # Only the new head may stay at its (zero) initialisation.
        if sorted(missing) != ["head.bias", "head.weight"] or unexpected:
            raise ValueError(f"aligned decoder does not fit the DecoderProjector (missing {missing}, unexpected {unexpected})")
        return proj

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T, D_vit) aligned features -> (B, T, D_llm) LLM input embeddings."""
        return self.head(self.forward_features(self.in_proj(self.in_norm(features))))
