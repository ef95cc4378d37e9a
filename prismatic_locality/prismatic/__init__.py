"""The Prismatic plugin: aligned vision backbones and the DecoderProjector inside unchanged Prismatic.

``import prismatic_locality.prismatic`` is the whole contract: with Prismatic installed it registers
(idempotently) the aligned backbone ids, the ``no-align+decoder`` projector, the adapter ablations
``no-align+transformer`` / ``no-align+truncated`` and the model configs
(see `registry.py`, the only module that changes Prismatic's state). Import it in every process
before Prismatic parses a config or loads a run: `scripts/pretrain.py` does this for training.

Without Prismatic, the Prismatic-free parts (weights resolution, the featurizer and transform, the
DecoderProjector) are still importable and ``PRISMATIC_AVAILABLE`` is False.
"""
from __future__ import annotations

from .features import LetterboxPad, image_transform, load_featurizer
from .projector import DecoderProjector, ProjectorInit, TransformerProjector, TruncatedProjector, projector_init
from .weights import (
    ALIASES,
    ALIGNED_BACKBONES,
    ENV_ROOT,
    STOCK_BACKBONES,
    canonical_id,
    register_checkpoint,
    resolve_checkpoint,
    unregister_checkpoint,
)

__all__ = [
    "PRISMATIC_AVAILABLE", "LetterboxPad", "image_transform", "load_featurizer", "DecoderProjector", "ProjectorInit",
    "TransformerProjector", "TruncatedProjector", "projector_init", "ALIASES", "ALIGNED_BACKBONES", "ENV_ROOT", "STOCK_BACKBONES", "canonical_id", "register_checkpoint",
    "resolve_checkpoint", "unregister_checkpoint",
]

try:
    import prismatic.models.materialize  # noqa: F401
except ModuleNotFoundError as e:
    if e.name == "prismatic":
        PRISMATIC_AVAILABLE = False
    elif e.name and e.name.startswith("prismatic."):
        raise ImportError(
            "the installed 'prismatic' package is not TRI-ML's Prismatic (PyPI's 'prismatic' is an unrelated "
            "project); install it from source: see docs/prismatic.md"
        ) from e
    else:
        raise
else:
    PRISMATIC_AVAILABLE = True
    from .backbone import AlignedViTBackbone
    from .configs import DECODER_ARCH, MODEL_CONFIGS, TRANSFORMER_ARCH, TRUNCATED_ARCH
    from .registry import register, register_aligned_backbone
    from .stock import StockViTBackbone

    __all__ += ["AlignedViTBackbone", "DECODER_ARCH", "TRANSFORMER_ARCH", "TRUNCATED_ARCH", "MODEL_CONFIGS", "StockViTBackbone", "register",
                "register_aligned_backbone"]
    register()
