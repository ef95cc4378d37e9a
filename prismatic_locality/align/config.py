"""MaskEmbed training configuration: draccus dataclasses plus a registry of named recipes.

A run's config is resolved in three layers, later ones winning:

    recipe (``--recipe clip-l-336``)  <  YAML file (``--config_path x.yaml``)  <  CLI (``--optim.lr 1e-4``)

Recipes are plain `AlignConfig` instances built in code (`RECIPES`), the way Prismatic registers
its model configs. The per-model values are the reference's main runs (paper App. C; docs/align.md):
global batch 1024 everywhere, per-GPU micro-batch sized for 80 GB GPUs, lr/min_lr 3e-4/3e-5 for
ViT-B and 2e-4/2e-5 for ViT-L and SO400M, 5 epochs, no warmup.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import tempfile
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import draccus

from ..choices import ATTN_IMPLS, DATA_FORMATS, LOSSES, MASK_KINDS, OBJECTIVES, PRECISIONS, TARGETS, TEACHER_MASKING

DTYPES = ("auto", "float32", "bfloat16", "float16")
AUGMENTS = ("rkrc", "none")
INTERPOLATIONS = ("random", "bilinear", "bicubic")


@dataclass
class TeacherConfig:
    # timm name, optionally with a pretrained tag (vit_large_patch14_clip_quickgelu_336.openai)
    model: str = "vit_base_patch16_224.augreg_in21k_ft_in1k"
    # load the tag's weights through timm (hub or local HF cache); ignored when `weights` is set
    pretrained: bool = True
    # local weights file (.safetensors / .pth, timm key layout); wins over `pretrained`
    weights: Optional[str] = None
    # an aligned checkpoint directory (e.g. a MIM run's `aligned/`) whose encoder is the teacher h,
    # exactly as trained (soft-cap included); the student is still initialised from model/weights
    aligned: Optional[str] = None
    # architecture overrides passed to timm.create_model (tiny models: img_size, embed_dim, ...)
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)
    # reconstruction target: penultimate (final norm of block L-1, reference) | last | cls
    target: str = "penultimate"
    # how the teacher sees masked patches: token (zero-patch embedding, exact and cheaper) | pixel
    masking: str = "token"
    # teacher weight dtype: auto = bfloat16 for a bf16 run on GPU, else float32 (precision.teacher_dtype)
    dtype: str = "auto"


@dataclass
class EncoderConfig:
    # attention-logit soft-cap cap·tanh(s/cap) in every encoder block (paper App. C); 0 disables
    softcap: float = 30.0
    # soft-capped attention kernel: auto (flex on CUDA) | flex | math
    attn_impl: str = "auto"
    # activation checkpointing over the encoder blocks (memory for speed)
    grad_checkpointing: bool = False


@dataclass
class DecoderSettings:
    width: Optional[int] = None      # None (null) = the teacher's width (reference)
    depth: int = 2
    init_values: float = 1e-6        # LayerScale init: a weak decoder avoids the identity solution


@dataclass
class MaskConfig:
    kind: str = "uniform"            # uniform | bernoulli | block
    complement: bool = True          # add 1 - m
    null: bool = True                # add the all-ones mask
    keep_prob: float = 0.5           # bernoulli only
    block_ratio: float = 0.4         # block only: visible fraction to reach


@dataclass
class DataConfig:
    # ImageFolder tree ({root}/{split}/**/*.jpg) or webdataset shards ({root}/{split}/*.tar)
    root: Optional[str] = None
    format: str = "auto"             # auto | folder | wds
    train_split: str = "train"       # a folder name, or for wds a brace pattern of shards
    val_split: str = "val"
    # train augmentation: rkrc (reference: resize keep ratio + random zoom/aspect, centre crop or pad,
    # h-flip) | none (eval transform)
    augment: str = "rkrc"
    scale: Tuple[float, float] = (0.08, 1.0)           # rkrc zoom, as an area fraction
    ratio: Tuple[float, float] = (0.75, 4.0 / 3.0)     # rkrc aspect distortion range
    hflip: float = 0.5
    interpolation: str = "random"    # random (bilinear or bicubic per image) | bilinear | bicubic
    val_batch_size: int = 32         # fixed, so val masks do not depend on the world size
    val_max_images: Optional[int] = None  # cap on held-out images (target scale + val loss)
    workers: int = 8                 # DataLoader workers per process (augmentation is seeded per sample)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: Optional[float] = None   # default lr / 10
    weight_decay: float = 0.01
    # the reference decays every parameter; True exempts norms, biases, pos/cls tokens
    exclude_norm_bias_from_wd: bool = False
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip_grad: float = 1.0           # global grad-norm clip; 0 disables
    warmup_steps: int = 0            # linear warmup from warmup_lr, counted inside the cosine horizon
    warmup_lr: Optional[float] = None  # default min_lr

    @property
    def resolved_min_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def resolved_warmup_lr(self) -> float:
        return self.resolved_min_lr if self.warmup_lr is None else self.warmup_lr


@dataclass
class AlignConfig:
    recipe: Optional[str] = None
    # what is trained (objectives.py; docs/align.md): maskembed (paper Eq. 1) | mim | clipself
    objective: str = "maskembed"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderSettings = field(default_factory=DecoderSettings)
    masks: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: str = "mse"                # mse | cosine | l1
    # targets scaled to unit global variance before training; auto = for mse only (reference)
    target_scale: str = "auto"       # auto | on | off

    epochs: float = 5.0
    max_steps: Optional[int] = None  # overrides epochs
    global_batch: int = 1024         # = micro_batch x grad accumulation x world size
    micro_batch: int = 32            # per process
    seed: int = 0

    device: str = "auto"             # auto | cpu | cuda
    precision: str = "auto"          # auto = bf16 autocast on GPU, fp32 on CPU | bf16 | fp32
    compile: bool = False            # torch.compile the student and the teacher

    output_dir: str = "runs"
    run_name: Optional[str] = None   # default: the recipe name, else "align"
    save_every: int = 1000           # training state every N optimiser steps (and at each epoch end)
    save_epoch_checkpoints: bool = False  # also an aligned checkpoint dir per epoch
    resume: str = "auto"             # auto (from the run dir if present) | never | <state dir>
    log_every: int = 10
    validate: bool = True            # val loss at the end of every epoch
    wandb: bool = False              # log to Weights & Biases (only if installed)
    wandb_project: str = "prismatic-locality"


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------


def _recipe(name: str, teacher: str, lr: float, micro_batch: int, timm_kwargs: Optional[dict] = None) -> AlignConfig:
    """A main-run recipe: the teacher, its lr (min_lr = lr / 10) and per-GPU micro-batch; global batch 1024."""
    return AlignConfig(recipe=name, teacher=TeacherConfig(model=teacher, timm_kwargs=dict(timm_kwargs or {})),
                       optim=OptimConfig(lr=lr), global_batch=1024, micro_batch=micro_batch)


def demo_recipe() -> AlignConfig:
    """The CPU demo (values owned by the demo, see docs/demo.md): the shipped 4-block teacher on 48 px
    digit scenes, its weights given by ``--teacher.weights``.

    target = "last": with only 4 blocks, the reference's penultimate target (block 3 of 4) drops the
    block where this CLS-trained teacher forms its image-level answer; aligning to it cost 5-7 points
    of global recall in our tuning runs (and local recall too with a weaker teacher), while the
    last-layer target kept global and gained local.
    """
    cfg = AlignConfig(
        recipe="demo",
        teacher=TeacherConfig(
            model="vit_tiny_patch16_224", pretrained=False,
            timm_kwargs=dict(img_size=48, patch_size=8, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0),
            target="last",
        ),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4),  # a short run wants a larger lr (2e-3 and 3e-4 were worse)
        # the demo layout: {root}/{split}/images/*.png (the label maps beside them are not images to align on)
        data=DataConfig(augment="none", train_split="train/images", val_split="val/images",
                        val_batch_size=64, val_max_images=512, workers=0),
        # 600 steps = 4.8 passes over the 8,000 scenes: the local gain grew with alignment compute
        # (300 steps +1.0, 600 +1.3, 1200 +2.5 points on a tuning seed); 600 is what fits the 10-minute
        # demo in fp32, and `demo-bf16` runs 1200 in the same time
        epochs=1.0, max_steps=600, global_batch=64, micro_batch=64,
        device="cpu", save_every=100, log_every=10,
    )
    return cfg


def _objective(base: AlignConfig, name: str, objective: str) -> AlignConfig:
    """`base` trained with another objective: mim keeps the MaskEmbed recipe's values (the reference's
    MIM configs use the same ones); clipself uses the cosine loss (paper App. B.3)."""
    base.recipe, base.objective = name, objective
    if objective == "clipself":
        base.loss = "cosine"
    return base


def demo_bf16_recipe() -> AlignConfig:
    """The demo on a CPU that multiplies bf16 in hardware (AVX512-BF16 / AMX, `vit.cpu_has_native_bf16`):
    bf16 autocast makes the step ~1.7x faster, so the same wall time aligns on twice the images
    (1200 steps x 64). `locality demo` picks this recipe on such CPUs."""
    cfg = demo_recipe()
    cfg.recipe, cfg.precision, cfg.max_steps = "demo-bf16", "bf16", 1200
    return cfg


RECIPES: Dict[str, Callable[[], AlignConfig]] = {
    "clip-l-336": lambda: _recipe("clip-l-336", "vit_large_patch14_clip_quickgelu_336.openai", 2e-4, 32),
    "siglip-so400m-384": lambda: _recipe("siglip-so400m-384", "vit_so400m_patch14_siglip_384", 2e-4, 16),
    "clip-b-224": lambda: _recipe("clip-b-224", "vit_base_patch16_clip_quickgelu_224.openai", 3e-4, 256),
    "siglip-b-224": lambda: _recipe("siglip-b-224", "vit_base_patch16_siglip_224", 3e-4, 256),
    "in1k-vit-b": lambda: _recipe("in1k-vit-b", "vit_base_patch16_224.augreg_in21k_ft_in1k", 3e-4, 256),
    # The paper fork's other aligned backbones (Prismatic ids in1k-vit-l-aligned, clip-vit-l-aligned,
    # siglip-vit-so400m-aligned): the ViT-L/SO400M hyperparameters at 224 px; micro-batches scaled by
    # sequence length from 32 at 577 tokens, not measured.
    "in1k-vit-l": lambda: _recipe("in1k-vit-l", "vit_large_patch16_224.augreg_in21k_ft_in1k", 2e-4, 64),
    "clip-l-224": lambda: _recipe("clip-l-224", "vit_large_patch14_clip_quickgelu_224.openai", 2e-4, 64),
    "siglip-so400m-224": lambda: _recipe("siglip-so400m-224", "vit_so400m_patch14_siglip_224", 2e-4, 32),
    # Today's ViTs (a timm that has them, tested: 1.0.31; docs/align.md): the paper's ViT-L/SO400M
    # hyperparameters, each family's own resolution and mean/std (read from the teacher's timm config);
    # micro-batches scaled by sequence length from the reference's 80 GB sizes (32 at 577 tokens), not measured.
    "siglip2-so400m-384": lambda: _recipe("siglip2-so400m-384", "vit_so400m_patch16_siglip_384.v2_webli", 2e-4, 16),
    "pe-core-l-336": lambda: _recipe("pe-core-l-336", "vit_pe_core_large_patch14_336.fb", 2e-4, 32),
    "dinov3-l-16": lambda: _recipe("dinov3-l-16", "vit_large_patch16_dinov3.lvd1689m", 2e-4, 64,
                                   timm_kwargs={"img_size": 256}),
    "eva02-l-clip-336": lambda: _recipe("eva02-l-clip-336", "eva02_large_patch14_clip_336.merged2b", 2e-4, 32),
    "aimv2-l-336": lambda: _recipe("aimv2-l-336", "aimv2_large_patch14_336.apple_pt", 2e-4, 32),
    "c-radio-v3-l": lambda: _recipe("c-radio-v3-l", "vit_large_patch16_radio_v3.c_radio", 2e-4, 16),
    "demo": demo_recipe,
    "demo-bf16": demo_bf16_recipe,
    # Other objectives (objectives.py; docs/align.md "Objectives"): the reference's MIM configs use
    # clip-b-224's values; clipself has no reference config: clip-b-224's values with the cosine loss
    "clip-b-224-mim": lambda: _objective(RECIPES["clip-b-224"](), "clip-b-224-mim", "mim"),
    "clip-b-224-clipself": lambda: _objective(RECIPES["clip-b-224"](), "clip-b-224-clipself", "clipself"),
    "demo-mim": lambda: _objective(demo_recipe(), "demo-mim", "mim"),
    "demo-clipself": lambda: _objective(demo_recipe(), "demo-clipself", "clipself"),
}


def describe_recipe(name: str, config_cls: type = None, get: Callable[[str], Any] = None) -> str:
    """The fields a recipe sets, as dotted ``--field value`` lines (what ``--recipe X --help`` prints).
    `config_cls` / `get`: another command's config class and recipe lookup (default: align's)."""
    base, cfg = to_dict((config_cls or AlignConfig)()), to_dict((get or get_recipe)(name))

    def diff(a: dict, b: dict, prefix: str = "") -> List[str]:
        out = []
        for k, v in b.items():
            if isinstance(v, dict) and isinstance(a.get(k), dict) and a[k]:  # a config group
                out += diff(a[k], v, f"{prefix}{k}.")
            elif a.get(k) != v and k != "recipe":
                out.append(f"  --{prefix}{k} {json.dumps(v) if isinstance(v, dict) else v}")
        return out

    return "\n".join([f"recipe '{name}' sets (over the defaults below):", *diff(base, cfg)])


def get_recipe(name: str, recipes: Optional[Dict[str, Callable[[], Any]]] = None) -> AlignConfig:
    recipes = RECIPES if recipes is None else recipes
    if name not in recipes:
        raise ValueError(f"unknown recipe '{name}' (known: {', '.join(recipes)})")
    return recipes[name]()


# --------------------------------------------------------------------------------------------
# Validation and parsing
# --------------------------------------------------------------------------------------------


def _choice(value: Any, allowed: tuple, name: str) -> None:
    if value not in allowed:
        raise ValueError(f"config field '{name}': '{value}' is not one of {' | '.join(map(str, allowed))}")


def check_finite(cfg: Any, prefix: str = "") -> None:
    """Every float of a (nested) config dataclass is finite: `--optim.lr inf` is refused, not trained with."""
    for f in fields(cfg):
        v, name = getattr(cfg, f.name), f"{prefix}{f.name}"
        if is_dataclass(v):
            check_finite(v, f"{name}.")
        elif any(isinstance(x, float) and not math.isfinite(x) for x in (v if isinstance(v, (tuple, list)) else [v])):
            raise ValueError(f"config field '{name}' must be a finite number, got {v}")


def check_range(name: str, value: Any, lo: float, hi: float = math.inf, lo_open: bool = False, hint: str = "") -> None:
    """`value` in [lo, hi] (or (lo, hi] with lo_open); `None` passes (an optional field left unset)."""
    if value is None or ((value > lo if lo_open else value >= lo) and value <= hi):
        return
    want = (f"> {lo}" if lo_open else f">= {lo}") if hi == math.inf else f"in {'(' if lo_open else '['}{lo}, {hi}]"
    raise ValueError(f"config field '{name}' must be {want}, got {value}{hint}")


def check_crop(scale, ratio) -> None:
    """RandomResizedCrop's area `scale` and aspect `ratio` ranges (data.scale, data.ratio)."""
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"config field 'data.scale' must satisfy 0 < lo <= hi <= 1, got {scale}")
    lo, hi = ratio
    if not 0 < lo <= hi:
        raise ValueError(f"config field 'data.ratio' must satisfy 0 < lo <= hi, got {ratio}")


def validate(cfg: AlignConfig) -> AlignConfig:
    """Fail fast, one line naming the field."""
    _choice(cfg.objective, OBJECTIVES, "objective")
    _choice(cfg.teacher.target, TARGETS, "teacher.target")
    _choice(cfg.teacher.masking, TEACHER_MASKING, "teacher.masking")
    _choice(cfg.teacher.dtype, DTYPES, "teacher.dtype")
    _choice(cfg.encoder.attn_impl, ATTN_IMPLS, "encoder.attn_impl")
    _choice(cfg.masks.kind, MASK_KINDS, "masks.kind")
    _choice(cfg.loss, LOSSES, "loss")
    _choice(cfg.target_scale, ("auto", "on", "off"), "target_scale")
    _choice(cfg.precision, PRECISIONS, "precision")
    _choice(cfg.device, ("auto", "cpu", "cuda"), "device")
    _choice(cfg.data.augment, AUGMENTS, "data.augment")
    _choice(cfg.data.interpolation, INTERPOLATIONS, "data.interpolation")
    _choice(cfg.data.format, DATA_FORMATS, "data.format")
    check_finite(cfg)
    positive = {"global_batch": cfg.global_batch, "micro_batch": cfg.micro_batch, "save_every": cfg.save_every,
                "log_every": cfg.log_every, "data.val_batch_size": cfg.data.val_batch_size,
                "data.val_max_images": cfg.data.val_max_images, "decoder.depth": cfg.decoder.depth, "optim.lr": cfg.optim.lr, "optim.eps": cfg.optim.eps,
                "max_steps": cfg.max_steps}
    for name, v in positive.items():
        check_range(name, v, 0, lo_open=True)
    # 0 is not a width: the teacher's width is asked for by leaving the field unset (null)
    check_range("decoder.width", cfg.decoder.width, 0, lo_open=True, hint=" (null for the teacher's width)")
    non_negative = {"optim.min_lr": cfg.optim.min_lr, "optim.warmup_lr": cfg.optim.warmup_lr,
                    "optim.weight_decay": cfg.optim.weight_decay, "optim.clip_grad": cfg.optim.clip_grad,
                    "optim.warmup_steps": cfg.optim.warmup_steps, "encoder.softcap": cfg.encoder.softcap,
                    "decoder.init_values": cfg.decoder.init_values, "data.workers": cfg.data.workers}
    for name, v in non_negative.items():
        check_range(name, v, 0)
    check_range("masks.keep_prob", cfg.masks.keep_prob, 0, 1)
    check_range("masks.block_ratio", cfg.masks.block_ratio, 0, 1, lo_open=True)
    check_range("data.hflip", cfg.data.hflip, 0, 1)
    if not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ValueError(f"config field 'optim.betas' must be two numbers in [0, 1), got {cfg.optim.betas}")
    if cfg.max_steps is None and not cfg.epochs > 0:
        raise ValueError(f"config field 'epochs' must be > 0, got {cfg.epochs}")
    check_crop(cfg.data.scale, cfg.data.ratio)
    if cfg.teacher.aligned is not None:
        if cfg.objective == "clipself" or (cfg.objective == "maskembed" and cfg.teacher.target == "cls"):
            raise ValueError(f"config field 'teacher.aligned': an aligned encoder has no pooled output, so it cannot "
                             f"be the teacher of objective '{cfg.objective}'"
                             + (" with teacher.target cls" if cfg.objective == "maskembed" else ""))
        if not os.path.isdir(cfg.teacher.aligned):
            raise FileNotFoundError(f"config field 'teacher.aligned': no aligned checkpoint directory {cfg.teacher.aligned}")
    if cfg.data.root is None:
        raise ValueError("config field 'data.root' is required (an ImageFolder tree or a folder of .tar shards)")
    return cfg


def to_dict(cfg: AlignConfig) -> dict:
    return draccus.encode(cfg)


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "timm_kwargs" else v
    return out


def _check_keys(d: dict, cls: type, where: str, prefix: str = "") -> None:
    """Unknown YAML keys: name them (draccus's own message does not say which file)."""
    names = {f.name: f for f in fields(cls)}
    for k, v in d.items():
        if k not in names:
            raise ValueError(f"{where}: unknown config field '{prefix}{k}'")
        factory = names[k].default_factory
        if isinstance(v, dict) and factory is not MISSING and is_dataclass(factory):
            _check_keys(v, factory, where, f"{prefix}{k}.")


def parse_config(argv: Optional[List[str]] = None, config_cls: type = None,
                 recipes: Optional[Dict[str, Callable[[], Any]]] = None) -> AlignConfig:
    """recipe < YAML (--config_path) < CLI, parsed by draccus; errors are one line naming the field.
    `config_cls` / `recipes`: another command's config dataclass and recipe registry (default: align's)."""
    import yaml

    config_cls = config_cls or AlignConfig
    get = functools.partial(get_recipe, recipes=recipes)

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=None)
    pre.add_argument("--config_path", default=None)
    known, rest = pre.parse_known_args(list(argv or []))

    file_cfg: dict = {}
    if known.config_path:
        if not os.path.isfile(known.config_path):
            raise FileNotFoundError(f"config file not found: {known.config_path}")
        with open(known.config_path) as f:
            try:
                file_cfg = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{known.config_path}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(file_cfg, dict):
            raise ValueError(f"{known.config_path}: expected a mapping of config fields")
        _check_keys(file_cfg, config_cls, known.config_path)
    recipe = known.recipe or file_cfg.get("recipe")
    base = to_dict(get(recipe)) if recipe else to_dict(config_cls())
    if recipe and any(a in ("-h", "--help") for a in rest):
        print(describe_recipe(recipe, config_cls, get))
    merged = _deep_merge(base, file_cfg)
    merged["recipe"] = recipe

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(merged, f)
        try:
            cfg = draccus.parse(config_cls, config_path=path, args=rest, exit_on_error=False)
        except draccus.utils.DraccusException as e:
            msg = " ".join(str(e).split())
            if msg.startswith("unrecognized arguments"):
                msg = f"unknown config field(s): {msg.split(':', 1)[1].strip()}"
            raise ValueError(f"bad config: {msg}") from None
    return cfg


__all__ = [
    "AlignConfig", "TeacherConfig", "EncoderConfig", "DecoderSettings", "MaskConfig", "DataConfig",
    "OptimConfig", "RECIPES", "get_recipe", "describe_recipe", "demo_recipe", "parse_config", "validate",
    "check_finite", "to_dict",
]
