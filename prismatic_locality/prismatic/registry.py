"""Registration with Prismatic: the one place that changes Prismatic's state (imports Prismatic).

`register()` (run on ``import prismatic_locality.prismatic``; idempotent) does four things:

1. Vision backbones: inserts the aligned ids (and the fork's aliases), and the stock baselines
   Prismatic lacks (`weights.STOCK_BACKBONES`: SigLIP 2, PE-Core), into
   ``prismatic.models.materialize.VISION_BACKBONES``. `get_vision_backbone_and_transform` reads that
   dict at call time, so training, ``prismatic.load()`` and vlm-evaluation all see them.
2. Model configs: registers `configs.MODEL_CONFIGS` as draccus ``--model.type`` choices.
3. The projector patch: ``PrismaticVLM.__init__`` picks its projector with a closed
   if/elif on ``arch_specifier`` and raises for anything else, and both `get_vlm` and
   ``PrismaticVLM.from_pretrained`` go through it. We wrap it on the class: for our arch specifiers
   the original runs with a stock one (building a throw-away MLP), then ``projector`` is replaced
   by ours and ``arch_specifier`` restored. Stock specifiers are untouched. Ours:
   ``no-align+decoder`` (the DecoderProjector, aligned backbones only) and the paper's App. D
   ablations ``no-align+transformer`` / ``no-align+truncated`` (any single timm ViT backbone; they
   cut the backbone's featurizer, see `build_ablation_adapter`).
   ``PrismaticVLM.get_fsdp_wrapping_policy`` is wrapped too, to add our adapter classes to its
   projector rule (it names only Prismatic's own).
   Our specifiers start with ``no-align+`` (so single-stage runs need no align checkpoint) and
   never end in ``linear``/``gelu-mlp``, which upstream would silently build as its own projector.
4. timm >= 1.0 (SigLIP 2 and PE-Core need >= 1.0.15 / 1.0.16): Prismatic's own timm backbones wrap
   ``get_intermediate_layers`` in ``unpack_tuple``, which takes the single layer out of a tuple, but
   timm >= 1.0.3 returns a list (TRI-ML/prismatic-vlms#34), so every stock backbone would hand the
   projector a list. ``unpack_tuple`` is replaced, in the three modules that bound it, by one that
   unpacks both; on timm 0.9.10 (a tuple) nothing changes.

Two attributes are also set on Prismatic's classes, each only where nothing else set it:

- ``PrismaticVLM._supports_cache_class = False``: transformers >= 4.42 asks `generate` callers for
  it (TRI-ML/prismatic-vlms#42); the value is what the fork sets.
- ``ModelConfig``/``DatasetConfig.default_choice_name``: the draccus on PyPI refuses a group field
  without its type (``--model.vision_backbone_id X`` alone: "Expected a dict with a 'type' key")
  unless the choice class names a default. Upstream's commands rely on the meaning the draccus it
  was written for gives them, its ``scripts/pretrain.py`` defaults with that field replaced, so
  those defaults (``prism-dinosiglip+7b``, ``llava-v15``) are named here.
"""
from __future__ import annotations

from functools import partial, wraps
from typing import Any, Callable

import prismatic.models.backbones.vision.base_vision as base_vision
import prismatic.models.backbones.vision.dinoclip_vit as dinoclip_vit
import prismatic.models.backbones.vision.dinosiglip_vit as dinosiglip_vit
import prismatic.models.materialize as materialize
from prismatic.conf import DatasetConfig, DatasetRegistry, ModelConfig, ModelRegistry
from prismatic.models.vlms.prismatic import PrismaticVLM
import torch
from torch.distributed.fsdp.wrap import _module_wrap_policy, _or_policy

from .backbone import AlignedViTBackbone
from .configs import DECODER_ARCH, MLP_ARCH, TRANSFORMER_ARCH, TRUNCATED_ARCH, register_model_configs
from .projector import (
    DecoderProjector,
    TransformerProjector,
    TruncatedProjector,
    cut_featurizer,
    truncate_featurizer,
)
from .stock import StockViTBackbone
from .weights import STOCK_BACKBONES, all_backbone_ids, register_checkpoint

# arch_specifier -> activation override for the decoder (None = the checkpoint's own).
# "no-align+pretrained-decoder" is the paper fork's name; it built the decoder with nn.GELU even
# for QuickGELU CLIP checkpoints, so its runs are reloaded with GELU to reproduce them exactly.
DECODER_ARCHS: dict[str, str | None] = {DECODER_ARCH: None, "no-align+pretrained-decoder": "gelu"}

# The adapter ablations (paper App. D): any backbone with one timm ViT featurizer, aligned or stock.
ABLATION_ARCHS = (TRANSFORMER_ARCH, TRUNCATED_ARCH)
# Every adapter of ours, for the FSDP policy (Prismatic's own set names only its stock projectors).
ADAPTER_CLASSES = (DecoderProjector, TransformerProjector, TruncatedProjector)

_PATCH_FLAG = "_prismatic_locality_patched"


def register_aligned_backbone(backbone_id: str, default_image_size: int, checkpoint=None) -> None:
    """Make `backbone_id` an aligned vision backbone id in Prismatic (e.g. your own alignment run).

    `checkpoint`: an aligned checkpoint directory or ``hf://owner/name[@rev]``; without it the
    weights are looked up under ``$PRISMATIC_LOCALITY_CKPT_ROOT/<backbone_id>/``.
    """
    materialize.VISION_BACKBONES[backbone_id] = {
        "cls": AlignedViTBackbone, "kwargs": {"default_image_size": int(default_image_size)}
    }
    if checkpoint is not None:
        register_checkpoint(backbone_id, checkpoint)


def feature_layer(vision_backbone) -> tuple[int, bool]:
    """(blocks run, final norm applied) for the features `vision_backbone` hands its projector.

    Aligned backbones: every block and the norm (`features.py`). Stock ones (Prismatic's
    `TimmViTBackbone`, our `StockViTBackbone`): the second-to-last block, no norm.
    """
    from timm.models.vision_transformer import VisionTransformer

    featurizer = getattr(vision_backbone, "featurizer", None)
    if not isinstance(featurizer, VisionTransformer):
        raise ValueError(
            f"the adapters {' / '.join(ABLATION_ARCHS)} need a vision backbone with one timm VisionTransformer "
            f"featurizer; '{vision_backbone.identifier}' has {type(featurizer).__name__ if featurizer is not None else 'none'}"
        )
    if isinstance(vision_backbone, AlignedViTBackbone):
        return len(featurizer.blocks), True
    return len(featurizer.blocks) - 1, False


def build_ablation_adapter(arch_specifier: str, vision_backbone, llm_dim: int):
    """The `no-align+transformer` or `no-align+truncated` adapter; cuts the backbone's featurizer.

    Both read the backbone's own feature layer with the prefix tokens kept (as the paper fork), and
    all tokens go to the LLM (577 for CLIP-L/14@336, 729 for SigLIP-SO400M/14@384). The truncated
    adapter takes its blocks from the featurizer actually loaded (aligned or stock weights) and leaves
    the featurizer two blocks shorter, so nothing is computed twice.
    """
    num_blocks, keep_norm = feature_layer(vision_backbone)
    featurizer = vision_backbone.featurizer
    num_heads = featurizer.blocks[0].attn.num_heads
    cut_featurizer(featurizer, num_blocks, keep_norm)
    if arch_specifier == TRUNCATED_ARCH:
        return truncate_featurizer(featurizer, llm_dim)
    torch.manual_seed(vision_backbone.embed_dim)  # Prismatic's projector seed, whatever the MLP above consumed
    prefix = featurizer.num_prefix_tokens
    return TransformerProjector(vision_backbone.embed_dim, num_heads,
                                prefix + featurizer.patch_embed.num_patches, prefix, llm_dim)


def _patch_projector_selection() -> None:
    original = PrismaticVLM.__init__
    if getattr(original, _PATCH_FLAG, False):
        return

    @wraps(original)
    def __init__(self, model_id, vision_backbone, llm_backbone, enable_mixed_precision_training=True,
                 arch_specifier="gelu-mlp"):
        if arch_specifier in ABLATION_ARCHS:
            feature_layer(vision_backbone)  # fail before building anything
            original(self, model_id, vision_backbone, llm_backbone,
                     enable_mixed_precision_training=enable_mixed_precision_training, arch_specifier=MLP_ARCH)
            self.projector = build_ablation_adapter(arch_specifier, vision_backbone, llm_backbone.embed_dim)
            self.arch_specifier = arch_specifier
            return
        if arch_specifier not in DECODER_ARCHS:
            return original(self, model_id, vision_backbone, llm_backbone,
                            enable_mixed_precision_training=enable_mixed_precision_training, arch_specifier=arch_specifier)
        if not isinstance(vision_backbone, AlignedViTBackbone):
            raise ValueError(
                f"arch_specifier '{arch_specifier}' needs an aligned vision backbone (one of "
                f"{sorted(all_backbone_ids())}), got '{vision_backbone.identifier}'"
            )
        original(self, model_id, vision_backbone, llm_backbone,
                 enable_mixed_precision_training=enable_mixed_precision_training, arch_specifier=MLP_ARCH)
        self.projector = DecoderProjector.from_init(
            vision_backbone.projector_init, llm_backbone.embed_dim, act=DECODER_ARCHS[arch_specifier]
        )
        self.arch_specifier = arch_specifier

    setattr(__init__, _PATCH_FLAG, True)
    PrismaticVLM.__init__ = __init__


def _patch_fsdp_policy() -> None:
    """Add our adapter classes to `PrismaticVLM.get_fsdp_wrapping_policy`, whose projector set is a
    literal of Prismatic's own; the truncated and transformer adapters also sit on stock backbones,
    whose policies know nothing of them."""
    original = PrismaticVLM.get_fsdp_wrapping_policy
    if getattr(original, _PATCH_FLAG, False):
        return

    @wraps(original)
    def get_fsdp_wrapping_policy(self) -> Callable:
        adapters = partial(_module_wrap_policy, module_classes=set(ADAPTER_CLASSES))
        return partial(_or_policy, policies=[original(self), adapters])

    setattr(get_fsdp_wrapping_policy, _PATCH_FLAG, True)
    PrismaticVLM.get_fsdp_wrapping_policy = get_fsdp_wrapping_policy


# The defaults of upstream's scripts/pretrain.py (PretrainConfig.model / .dataset).
DEFAULT_CHOICES = ((ModelConfig, ModelRegistry.PRISM_DINOSIGLIP_7B.model_id),
                   (DatasetConfig, DatasetRegistry.LLAVA_V15.dataset_id))


def _name_default_choices() -> None:
    for choice_cls, default in DEFAULT_CHOICES:
        named = getattr(choice_cls, "default_choice_name", None)  # absent in older draccus, which needs none
        if named is not None and named() is None:
            choice_cls.default_choice_name = classmethod(lambda cls, name=default: name)


def unpack_first(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Prismatic's ``unpack_tuple`` for any timm: the single requested layer, from a tuple or a list."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        return result[0] if isinstance(result, (tuple, list)) else result

    return wrapper


def _patch_unpack_tuple() -> None:
    for module in (base_vision, dinoclip_vit, dinosiglip_vit):  # each bound the name at import
        module.unpack_tuple = unpack_first


def register() -> None:
    for backbone_id, size in all_backbone_ids().items():
        register_aligned_backbone(backbone_id, size)
    for b in STOCK_BACKBONES.values():
        entry = {"cls": StockViTBackbone, "kwargs": {"default_image_size": b.default_image_size}}
        materialize.VISION_BACKBONES.setdefault(b.id, entry)
    register_model_configs()
    _name_default_choices()
    _patch_projector_selection()
    _patch_fsdp_policy()
    _patch_unpack_tuple()
    if not hasattr(PrismaticVLM, "_supports_cache_class"):
        PrismaticVLM._supports_cache_class = False
