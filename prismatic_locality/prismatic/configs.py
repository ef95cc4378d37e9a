"""Prismatic model configs for the paper's VLM comparison, all on one recipe (imports Prismatic).

The recipe is the paper's App. D (and its fork's ``Base_Config``): Prismatic's single-stage
``Exp_7B_One_Stage`` (LLaVA-1.5 data mixture, finetune stage only, FSDP full-shard, global batch 128,
lr 2e-5, warmup 3%) with Llama-2 7B (pure), ``resize-naive`` images and 2 epochs. Each variant only
changes the vision backbone and the adapter, so every comparison is controlled:

    aligned-decoder-<fam>+7b   aligned backbone  + DecoderProjector   (arch "no-align+decoder")
    aligned-mlp-<fam>+7b       aligned backbone  + Prismatic's MLP    (arch "no-align+gelu-mlp")
    baseline-<fam>+7b          stock backbone    + Prismatic's MLP
    baseline-dinoclip-l-336+7b / baseline-dinosiglip-so400m-384+7b   DINOv2-fused stock backbones

and the adapter ablations of the paper's App. D, for CLIP-L/336 and SigLIP-SO400M/384 only:

    baseline-transformer-<fam>+7b  stock backbone    + random 2-block transformer (arch "no-align+transformer")
    baseline-truncated-<fam>+7b    stock backbone    + its last 2 blocks, norm, zero Linear ("no-align+truncated")
    aligned-truncated-<fam>+7b     aligned backbone  + its last 2 blocks, norm, zero Linear ("no-align+truncated")

Use with ``--model.type <model_id>``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass

from prismatic.conf.models import Exp_7B_One_Stage, ModelConfig

from .weights import ALIGNED_BACKBONES

DECODER_ARCH = "no-align+decoder"
MLP_ARCH = "no-align+gelu-mlp"
FUSED_MLP_ARCH = "no-align+fused-gelu-mlp"
TRANSFORMER_ARCH = "no-align+transformer"
TRUNCATED_ARCH = "no-align+truncated"
ABLATION_BACKBONES = ("clip-l-336-aligned", "siglip-so400m-384-aligned")  # the paper's App. D backbones


@dataclass
class LocalityRecipe_7B(Exp_7B_One_Stage):
    """The shared recipe (not registered itself: it names no backbone of ours)."""

    model_id: str = "locality-recipe+7b"
    arch_specifier: str = MLP_ARCH
    llm_backbone_id: str = "llama2-7b-pure"
    image_resize_strategy: str = "resize-naive"
    finetune_epochs: int = 2


def _variant(model_id: str, vision_backbone_id: str, arch_specifier: str) -> type:
    name = "Locality_" + "".join(c if c.isalnum() else "_" for c in model_id)
    return make_dataclass(
        name,
        [
            ("model_id", str, field(default=model_id)),
            ("vision_backbone_id", str, field(default=vision_backbone_id)),
            ("arch_specifier", str, field(default=arch_specifier)),
        ],
        bases=(LocalityRecipe_7B,),
        namespace={"__module__": __name__},
    )


def _variants() -> list[type]:
    out = []
    for b in ALIGNED_BACKBONES.values():
        fam = b.id.removesuffix("-aligned")
        out += [
            _variant(f"aligned-decoder-{fam}+7b", b.id, DECODER_ARCH),
            _variant(f"aligned-mlp-{fam}+7b", b.id, MLP_ARCH),
            _variant(f"baseline-{fam}+7b", b.stock_id, MLP_ARCH),
        ]
    for b in (ALIGNED_BACKBONES[i] for i in ABLATION_BACKBONES):
        fam = b.id.removesuffix("-aligned")
        out += [
            _variant(f"baseline-transformer-{fam}+7b", b.stock_id, TRANSFORMER_ARCH),
            _variant(f"baseline-truncated-{fam}+7b", b.stock_id, TRUNCATED_ARCH),
            _variant(f"aligned-truncated-{fam}+7b", b.id, TRUNCATED_ARCH),
        ]
    out += [
        _variant("baseline-dinoclip-l-336+7b", "dinoclip-vit-l-336px", FUSED_MLP_ARCH),
        _variant("baseline-dinosiglip-so400m-384+7b", "dinosiglip-vit-so-384px", FUSED_MLP_ARCH),
    ]
    return out


MODEL_CONFIGS: dict[str, type] = {cls.model_id: cls for cls in _variants()}


def register_model_configs() -> None:
    """Make every variant a ``--model.type`` choice (idempotent: a name already taken is left alone)."""
    known = ModelConfig.get_known_choices()
    for model_id, cls in MODEL_CONFIGS.items():
        if model_id not in known:
            ModelConfig.register_subclass(model_id, cls)
