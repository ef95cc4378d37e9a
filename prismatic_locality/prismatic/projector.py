"""The VLM adapters beyond Prismatic's MLP (no Prismatic import).

`DecoderProjector`: the trained MaskEmbed decoder reused as the VLM adapter (paper §5), and the
paper's two adapter ablations (App. D): `TransformerProjector`, the same transformer randomly
initialised, and `TruncatedProjector`, the backbone's own last two blocks made trainable.

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

from ..checkpoint import AlignedModel, CheckpointError
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
    if dec is None:  # mim / clipself checkpoints: nothing to initialise the adapter from
        raise CheckpointError(f"the DecoderProjector needs a MaskEmbed decoder; this checkpoint was trained with "
                              f"objective '{aligned.objective}' and has none (use another projector)")
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


# ------------------------------------------------------------------------------------------------
# Adapter ablations (paper App. D)
# ------------------------------------------------------------------------------------------------

ADAPTER_DEPTH = 2  # blocks in every transformer-style adapter: the MaskEmbed decoder's depth


class TransformerProjector(DecoderProjector):
    """The DecoderProjector's architecture at the decoder's size, randomly initialised.

    "Baseline Transformer" in the paper (App. D): it tests whether the decoder helps only by being a
    bigger adapter. As the paper fork's random ``TransformerProjector``: width = the ViT's width,
    its heads, 2 blocks with LayerScale 1e-6, GELU, every Linear (``head`` included) at PyTorch's
    default init, and prefix tokens are *not* zeroed (no decoder was trained to expect that).
    Same state-dict keys as the DecoderProjector.
    """

    def __init__(self, vision_dim: int, num_heads: int, num_tokens: int, num_prefix_tokens: int, llm_dim: int,
                 depth: int = ADAPTER_DEPTH):
        cfg = DecoderConfig(num_tokens=num_tokens, num_prefix_tokens=num_prefix_tokens, width=vision_dim,
                            out_dim=vision_dim, num_heads=num_heads, depth=depth)
        super().__init__(cfg, vision_dim, llm_dim)
        self.head.reset_parameters()  # random, not zero: nothing in this adapter is pre-trained

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T, D_vit) -> (B, T, D_llm), every token (prefix included) as it comes."""
        return self.head(self.norm(self.blocks(self.in_proj(features) + self.pos_embed)))


class TruncatedProjector(nn.Sequential):
    """The backbone's last 2 feature blocks, its final norm and a zero-initialised Linear to the LLM width.

    "Truncated" in the paper (App. D): pre-trained transformer layers as the adapter, for a backbone
    with no decoder, i.e. partially fine-tuning the ViT. Built by `truncate_featurizer`, which moves
    the blocks out of the (frozen, bf16) vision backbone, so the ViT runs once: the featurizer stops
    two blocks early and this adapter finishes the job, trainable, in fp32. At step 0 the visual
    tokens are zero (the Linear), as with the DecoderProjector.

    An ``nn.Sequential`` (keys ``0.*``, ``1.*`` the blocks, ``2.*`` the norm, ``3.*`` the Linear), as the
    paper fork's truncated adapter, so its runs reload here.
    """

    @classmethod
    def build(cls, blocks: list[nn.Module], norm: nn.Module, vision_dim: int, llm_dim: int) -> "TruncatedProjector":
        linear = nn.Linear(vision_dim, llm_dim)
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        return cls(*blocks, norm, linear)


def cut_featurizer(featurizer: nn.Module, num_blocks: int, keep_norm: bool) -> None:
    """Make `featurizer(x)` return the output of its first `num_blocks` blocks, prefix tokens kept.

    The final norm stays only with `keep_norm`. This is what the transformer-style adapters read: the
    backbone's own feature layer (the last block + norm for aligned backbones; the second-to-last
    block, no norm, for Prismatic's stock ones) but with the prefix tokens their attention needs.
    Blocks past `num_blocks` are dropped, not run. The forward is re-bound on the instance, as
    Prismatic does for FSDP.
    """
    if not 0 <= num_blocks <= len(featurizer.blocks):
        raise ValueError(f"cannot keep {num_blocks} of the featurizer's {len(featurizer.blocks)} blocks")
    featurizer.blocks = featurizer.blocks[:num_blocks]
    if not keep_norm:
        featurizer.norm = nn.Identity()
    featurizer.forward = featurizer.forward_features


def truncate_featurizer(featurizer: nn.Module, llm_dim: int, depth: int = ADAPTER_DEPTH) -> TruncatedProjector:
    """Move the last `depth` blocks and the final norm of a (cut) featurizer into a `TruncatedProjector`.

    Afterwards ``featurizer(x)`` returns the hidden states entering the first moved block: every
    token, no norm. ``adapter(featurizer(x))`` equals ``Linear(features)`` for the features the
    featurizer returned before (bit for bit in fp32), with the Linear zero at first.
    """
    blocks = featurizer.blocks
    if len(blocks) < depth:
        raise ValueError(f"a truncated adapter needs {depth} blocks; the featurizer has {len(blocks)}")
    moved = list(blocks[len(blocks) - depth:])
    featurizer.blocks = blocks[:len(blocks) - depth]
    norm, featurizer.norm = featurizer.norm, nn.Identity()
    featurizer.forward = featurizer.forward_features
    adapter = TruncatedProjector.build(moved, norm, featurizer.embed_dim, llm_dim)
    return adapter.requires_grad_(True)  # the blocks come from a frozen backbone
