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
   by the DecoderProjector and ``arch_specifier`` restored. Stock specifiers are untouched.
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

from functools import wraps
from typing import Any, Callable

import prismatic.models.backbones.vision.base_vision as base_vision
import prismatic.models.backbones.vision.dinoclip_vit as dinoclip_vit
import prismatic.models.backbones.vision.dinosiglip_vit as dinosiglip_vit
import prismatic.models.materialize as materialize
from prismatic.conf import DatasetConfig, DatasetRegistry, ModelConfig, ModelRegistry
from prismatic.models.vlms.prismatic import PrismaticVLM

from .backbone import AlignedViTBackbone
from .configs import DECODER_ARCH, MLP_ARCH, register_model_configs
from .projector import DecoderProjector
from .stock import StockViTBackbone
from .weights import STOCK_BACKBONES, all_backbone_ids, register_checkpoint

# arch_specifier -> activation override for the decoder (None = the checkpoint's own).
# "no-align+pretrained-decoder" is the paper fork's name; it built the decoder with nn.GELU even
# for QuickGELU CLIP checkpoints, so its runs are reloaded with GELU to reproduce them exactly.
DECODER_ARCHS: dict[str, str | None] = {DECODER_ARCH: None, "no-align+pretrained-decoder": "gelu"}

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


def _patch_projector_selection() -> None:
    original = PrismaticVLM.__init__
    if getattr(original, _PATCH_FLAG, False):
        return

    @wraps(original)
    def __init__(self, model_id, vision_backbone, llm_backbone, enable_mixed_precision_training=True,
                 arch_specifier="gelu-mlp"):
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
    _patch_unpack_tuple()
    if not hasattr(PrismaticVLM, "_supports_cache_class"):
        PrismaticVLM._supports_cache_class = False
