"""Classification fine-tuning configuration: draccus dataclasses plus named recipes.

Resolved like align's config (recipe < YAML ``--config_path`` < CLI) with align's parser
(`align.config.parse_config`). The recipes are the reference's ImageNet fine-tuning configs
(https://github.com/iancovert/locality-alignment, ``configs-ft/*.yaml`` run by ``scripts/finetune.py``;
docs/finetune.md lists every value and where it comes from).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..align.config import AUGMENTS, INTERPOLATIONS, _choice, check_crop, check_finite, check_range
from ..align.config import describe_recipe as _describe
from ..align.config import get_recipe as _get
from ..align.config import parse_config as _parse
from ..align.config import to_dict
from ..choices import PRECISIONS

HEADS = ("transformer", "mean", "cls")
MIX_MODES = ("batch", "pair", "elem")


@dataclass
class ModelConfig:
    # what the probe loads: a timm name (optionally .tag) or an aligned checkpoint directory
    backbone: str = ""
    weights: Optional[str] = None    # local timm-layout weights file instead of the hub tag
    pretrained: bool = True          # timm names only: False = random init (tests)
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)  # architecture overrides (tiny test models)
    # pooling of the (B, T, D) features before the new Linear classifier, the same for every backbone:
    # transformer (reference: pos-embed + 1 block + norm + mean over all tokens) | mean (patch tokens) | cls
    head: str = "transformer"
    head_depth: int = 1              # transformer head blocks (reference: 1)
    drop_path: float = 0.1           # stochastic depth of the backbone's last block (linear from 0)
    init_seed: int = 0               # seeds the new head (and a random backbone)


@dataclass
class FinetuneDataConfig:
    # ImageFolder tree: {root}/{train_split}/<class>/*.jpg and {root}/{val_split}/<class>/*.jpg
    root: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    augment: str = "rkrc"            # rkrc (reference train crop + flip) | none (eval transform)
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (0.75, 4.0 / 3.0)
    hflip: float = 0.5
    interpolation: str = "random"    # train resize: random (bilinear or bicubic per image) | bilinear | bicubic
    randaugment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment policy; "" = off
    color_jitter: float = 0.3        # timm applies it only when RandAugment is off
    reprob: float = 0.25             # timm RandomErasing probability (pixel mode, one box)
    crop_pct: float = 0.9            # val: resize to size / crop_pct, centre crop
    val_interpolation: str = "bicubic"
    val_batch_size: int = 256
    workers: int = 8


@dataclass
class MixConfig:
    """timm Mixup / CutMix (with label smoothing folded into the soft targets)."""
    mixup: float = 0.8               # Beta alpha; 0 = off
    cutmix: float = 1.0              # Beta alpha; 0 = off
    prob: float = 1.0                # chance a batch is mixed
    switch_prob: float = 0.5         # chance of CutMix instead of Mixup when both are on
    mode: str = "batch"
    label_smoothing: float = 0.1


@dataclass
class FinetuneOptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.05
    # timm layer-wise lr decay (param_groups_layer_decay); None = off, as the reference runs (its configs
    # give 0.7 / 0.8, but its script hands timm a parameter iterator, with which timm ignores it)
    layer_decay: Optional[float] = None
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 3.0           # global grad-norm clip; 0 disables
    warmup_epochs: float = 5.0       # linear warmup from warmup_lr, inside the cosine horizon
    warmup_lr: float = 0.0


@dataclass
class FinetuneConfig:
    recipe: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)

    epochs: float = 50.0
    max_steps: Optional[int] = None  # overrides epochs
    global_batch: int = 256          # = micro_batch x grad accumulation (one process)
    micro_batch: int = 256
    seed: int = 0

    device: str = "auto"             # auto | cpu | cuda
    precision: str = "auto"          # auto = bf16 autocast on GPU, fp32 on CPU | bf16 | fp32

    output_dir: str = "runs"
    run_name: Optional[str] = None   # default: "finetune-" + the recipe name
    save_every: int = 1000           # training state every N optimiser steps (and at each epoch end)
    resume: str = "auto"             # auto (from the run dir if present) | never | <state dir>
    log_every: int = 10
    wandb: bool = False
    wandb_project: str = "prismatic-locality"


# Fields that may differ when a run resumes (where/how it runs, not what it computes); every
# other field must match the saved state's config (`align.state.config_mismatch`).
RESUMABLE_CHANGES = ("resume", "output_dir", "run_name", "save_every", "log_every", "wandb", "wandb_project",
                     "device", "micro_batch", "data.workers", "data.root", "data.val_batch_size", "model.weights")


# --------------------------------------------------------------------------------------------
# Recipes: the reference's configs-ft/*.yaml
# --------------------------------------------------------------------------------------------


def _recipe(name: str, backbone: str, lr: float, weight_decay: float, drop_path: float, micro_batch: int
            ) -> FinetuneConfig:
    """Shared by every reference config: AdamW, clip 3.0, cosine per update to lr/10, 5 warmup epochs from 0,
    50 epochs, rkrc + RandAugment m9 + RandomErasing 0.25, Mixup 0.8 / CutMix 1.0, smoothing 0.1,
    the transformer head, bf16 autocast; 256 images per update per process."""
    return FinetuneConfig(recipe=name, model=ModelConfig(backbone=backbone, drop_path=drop_path),
                          optim=FinetuneOptimConfig(lr=lr, min_lr=lr / 10, weight_decay=weight_decay),
                          global_batch=256, micro_batch=micro_batch)


def demo_recipe() -> FinetuneConfig:
    """A CPU smoke run: give ``--model.backbone`` and ``--data.root``; no Mixup / RandAugment, so a few
    epochs on a tiny folder already learn."""
    return FinetuneConfig(
        recipe="demo",
        data=FinetuneDataConfig(randaugment="", color_jitter=0.0, reprob=0.0, crop_pct=1.0, val_batch_size=64,
                                workers=0),
        mix=MixConfig(mixup=0.0, cutmix=0.0, label_smoothing=0.1),
        optim=FinetuneOptimConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.05, warmup_epochs=1.0),
        epochs=5.0, global_batch=32, micro_batch=32, device="cpu", save_every=100, log_every=5,
    )


# The aligned recipes take the aligned checkpoint directory as the backbone (--model.backbone DIR);
# the reference's ViT-L/336 aligned config differs from its stock one only in the per-GPU batch split.
RECIPES: Dict[str, Callable[[], FinetuneConfig]] = {
    "clip-b-224": lambda: _recipe("clip-b-224", "vit_base_patch16_clip_quickgelu_224.openai", 3e-4, 0.05, 0.1, 256),
    "clip-b-224-aligned": lambda: _recipe("clip-b-224-aligned", "", 3e-4, 0.05, 0.1, 256),
    "clip-l-224": lambda: _recipe("clip-l-224", "vit_large_patch14_clip_quickgelu_224.openai", 6e-5, 0.01, 0.2, 128),
    "clip-l-224-aligned": lambda: _recipe("clip-l-224-aligned", "", 6e-5, 0.01, 0.2, 128),
    "clip-l-336": lambda: _recipe("clip-l-336", "vit_large_patch14_clip_quickgelu_336.openai", 6e-5, 0.01, 0.2, 128),
    "clip-l-336-aligned": lambda: _recipe("clip-l-336-aligned", "", 6e-5, 0.01, 0.2, 64),
    "demo": demo_recipe,
}


def get_recipe(name: str) -> FinetuneConfig:
    return _get(name, RECIPES)


def describe_recipe(name: str) -> str:
    return _describe(name, FinetuneConfig, get_recipe)


def parse_config(argv: Optional[List[str]] = None) -> FinetuneConfig:
    return _parse(argv, FinetuneConfig, RECIPES)


def mixing(cfg: FinetuneConfig) -> bool:
    return cfg.mix.mixup > 0 or cfg.mix.cutmix > 0


def validate(cfg: FinetuneConfig) -> FinetuneConfig:
    """Fail fast, one line naming the field."""
    _choice(cfg.model.head, HEADS, "model.head")
    _choice(cfg.data.augment, AUGMENTS, "data.augment")
    _choice(cfg.data.interpolation, INTERPOLATIONS, "data.interpolation")
    _choice(cfg.data.val_interpolation, INTERPOLATIONS[1:], "data.val_interpolation")
    _choice(cfg.mix.mode, MIX_MODES, "mix.mode")
    _choice(cfg.precision, PRECISIONS, "precision")
    _choice(cfg.device, ("auto", "cpu", "cuda"), "device")
    check_finite(cfg)
    for name, v in {"global_batch": cfg.global_batch, "micro_batch": cfg.micro_batch, "save_every": cfg.save_every,
                    "log_every": cfg.log_every, "max_steps": cfg.max_steps, "optim.lr": cfg.optim.lr,
                    "optim.eps": cfg.optim.eps, "model.head_depth": cfg.model.head_depth,
                    "data.val_batch_size": cfg.data.val_batch_size, "data.crop_pct": cfg.data.crop_pct}.items():
        check_range(name, v, 0, lo_open=True)
    for name, v in {"optim.min_lr": cfg.optim.min_lr, "optim.warmup_lr": cfg.optim.warmup_lr,
                    "optim.weight_decay": cfg.optim.weight_decay, "optim.clip_grad": cfg.optim.clip_grad,
                    "optim.warmup_epochs": cfg.optim.warmup_epochs, "mix.mixup": cfg.mix.mixup,
                    "mix.cutmix": cfg.mix.cutmix, "data.color_jitter": cfg.data.color_jitter,
                    "data.workers": cfg.data.workers}.items():
        check_range(name, v, 0)
    check_range("optim.layer_decay", cfg.optim.layer_decay, 0, 1, lo_open=True)
    check_range("model.drop_path", cfg.model.drop_path, 0, 1, hint=" (a probability)")
    for name in ("hflip", "reprob"):
        check_range(f"data.{name}", getattr(cfg.data, name), 0, 1)
    check_range("data.crop_pct", cfg.data.crop_pct, 0, 1, lo_open=True)
    for name in ("prob", "switch_prob"):
        check_range(f"mix.{name}", getattr(cfg.mix, name), 0, 1)
    if not 0 <= cfg.mix.label_smoothing < 1:
        raise ValueError(f"config field 'mix.label_smoothing' must be in [0, 1), got {cfg.mix.label_smoothing}")
    if not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ValueError(f"config field 'optim.betas' must be two numbers in [0, 1), got {cfg.optim.betas}")
    if cfg.max_steps is None and not cfg.epochs > 0:
        raise ValueError(f"config field 'epochs' must be > 0, got {cfg.epochs}")
    if cfg.global_batch % cfg.micro_batch:
        raise ValueError(f"config field 'global_batch': {cfg.global_batch} is not divisible by micro_batch {cfg.micro_batch}")
    if mixing(cfg) and cfg.micro_batch % 2:
        raise ValueError(f"config field 'micro_batch': Mixup/CutMix pair images within a micro-batch, so it must be "
                         f"even, got {cfg.micro_batch} (or set mix.mixup and mix.cutmix to 0)")
    check_crop(cfg.data.scale, cfg.data.ratio)
    if cfg.data.randaugment and not cfg.data.randaugment.startswith("rand"):
        raise ValueError(f"config field 'data.randaugment': '{cfg.data.randaugment}' is not a timm RandAugment "
                         f"policy (rand-m9-mstd0.5-inc1 style), or \"\" for none")
    if not cfg.model.backbone:
        raise ValueError("config field 'model.backbone' is required (a timm model name or an aligned checkpoint dir)")
    if cfg.data.root is None:
        raise ValueError("config field 'data.root' is required (an ImageFolder tree with train/ and val/)")
    return cfg


__all__ = ["FinetuneConfig", "ModelConfig", "FinetuneDataConfig", "MixConfig", "FinetuneOptimConfig", "RECIPES",
           "RESUMABLE_CHANGES", "get_recipe", "describe_recipe", "parse_config", "validate", "mixing", "to_dict"]
