"""Aligned checkpoints: a directory with ``config.json`` + ``model.safetensors``.

``model.safetensors`` holds ``encoder.*`` (the timm ViT: soft-capped attention, re-trained final
norm, ``head`` = the Linear to the decoder width) and ``decoder.*`` (``pos_embed``, ``blocks``,
``norm``, ``head``): the same keys as the paper's released checkpoints. ``config.json`` has all that
is needed to rebuild both modules without the trainer and without downloading the teacher.
``config.json``'s ``objective`` says what trained it (absent = ``maskembed``); the ``mim`` and
``clipself`` objectives train no decoder: ``"decoder": null`` and no ``decoder.*`` keys.

Writes are atomic (temp directory + rename); loading never unpickles anything.
"""
from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from . import vit as V
from .choices import OBJECTIVES
from .decoder import DecoderConfig, MaskEmbedDecoder
from .fileio import atomic_dir_write, read_json, write_json
from .maskembed import make_encoder

FORMAT = "prismatic-locality/aligned-v1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"  # a Hugging Face model card, so the directory can be uploaded as it is


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed or does not match the model (message names the file)."""


@dataclass
class AlignedModel:
    """What `load_aligned` returns.

    encoder: timm ViT; ``encoder.forward_features(x)`` (= `maskembed.aligned_features`) is the aligned
             backbone's output: last block, final norm, prefix tokens kept, soft-capped attention.
             ``encoder.head`` maps features to the decoder width (the VLM adapter's input projection).
    decoder: the trained `MaskEmbedDecoder`; None for a checkpoint trained without one (mim, clipself).
    """

    encoder: nn.Module
    decoder: Optional[MaskEmbedDecoder]
    config: dict

    @property
    def objective(self) -> str:
        return objective_of(self.config)

    @property
    def spec(self) -> V.ViTSpec:
        return V.vit_spec(self.encoder)


def encoder_config(encoder: nn.Module, model_name: str, softcap: float, timm_kwargs: Optional[dict] = None) -> dict:
    s = V.vit_spec(encoder)
    return {
        "model": model_name.split(".")[0],     # architecture only: weights come from this file
        "pretrained_tag": model_name,
        "img_size": s.img_size,
        "patch_size": s.patch_size,
        "embed_dim": s.embed_dim,
        "depth": s.depth,
        "num_heads": s.num_heads,
        "num_prefix_tokens": s.num_prefix_tokens,
        "num_tokens": s.num_tokens,
        "mean": list(s.mean),
        "std": list(s.std),
        "softcap": softcap,
        "norm_eps": V.output_norm_eps(encoder),
        "head_out": encoder.head.out_features,
        "timm_kwargs": dict(timm_kwargs or {}),  # architecture overrides passed to timm.create_model
    }


OBJECTIVE_NAMES = {"maskembed": "MaskEmbed", "mim": "MIM", "clipself": "CLIPSelf"}  # as the paper writes them


def objective_of(config: dict) -> str:
    """The objective an aligned checkpoint was trained with (config.json's ``objective``; absent = maskembed)."""
    return config.get("objective", "maskembed")


def save_aligned(out_dir: str | os.PathLike, encoder: nn.Module, decoder: Optional[MaskEmbedDecoder], *,
                 model_name: str, softcap: float, timm_kwargs: Optional[dict] = None,
                 extra: Optional[dict] = None) -> Path:
    """Write an aligned checkpoint directory atomically.

    `model_name` is the timm name the encoder was created from, `timm_kwargs` any architecture
    overrides it was created with (tiny test models); `extra` (teacher id, target, recipe,
    training summary, ...) is stored verbatim in config.json."""
    config = {
        "format": FORMAT,
        "encoder": encoder_config(encoder, model_name, softcap, timm_kwargs),
        "decoder": None if decoder is None else decoder.cfg.to_dict(),
        **(extra or {}),
    }
    tensors = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    if decoder is not None:
        tensors.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def write(tmp: Path):
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})
        write_json(tmp / CONFIG_NAME, config)
        (tmp / CARD_NAME).write_text(model_card(config))

    atomic_dir_write(Path(out_dir), write)
    return Path(out_dir)


def model_card(config: dict) -> str:
    """A Hugging Face model card for an aligned checkpoint, from its config.json alone (the
    fields besides encoder/decoder are free-form, so each is used only when it has the expected shape)."""
    enc = config["encoder"]
    tag = enc["pretrained_tag"]
    teacher = config.get("teacher")
    if isinstance(teacher, dict):  # what the trainer writes: model, weights (a local file or None), ...
        teacher = Path(teacher["weights"]).name if teacher.get("weights") else teacher.get("model")
    training = config.get("training") if isinstance(config.get("training"), dict) else {}
    source = config.get("converted_from") if isinstance(config.get("converted_from"), dict) else {}
    meta = ["library_name: prismatic-locality", "tags: [locality-alignment, maskembed, vision-transformer, timm]"]
    if "." in tag and teacher in (None, tag):  # the teacher's weights are a timm hub tag
        meta.append(f"base_model: timm/{tag}")
    rows = [("architecture", f"`{enc['model']}`: {enc['img_size']} px, patch {enc['patch_size']}, width "
                             f"{enc['embed_dim']}, {enc['depth']} blocks, {enc['num_tokens']} output tokens"),
            ("teacher", f"`{teacher}`" if teacher else None),
            ("target", f"`{config['target']}`" if isinstance(config.get("target"), str) else None),
            ("recipe", f"`{config['recipe']}`" if isinstance(config.get("recipe"), str) else None),
            ("training", f"{training['step']} steps, last loss {training['last_loss']:.4g}"
             if isinstance(training.get("step"), int) and isinstance(training.get("last_loss"), float) else None),
            ("converted from", f"`{Path(str(source['file'])).name}`" if source.get("file") else None),
            ("attention soft-cap", str(enc["softcap"])),
            ("objective", f"`{objective_of(config)}`" if objective_of(config) != "maskembed" else None),
            ("decoder", f"{config['decoder']['depth']} blocks, width {config['decoder']['width']}"
             if isinstance(config.get("decoder"), dict) else "none")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v is not None)
    front = "\n".join(meta)
    objective = objective_of(config)
    if objective == "maskembed":
        about = f"""A vision transformer post-trained with MaskEmbed (*Locality Alignment Improves Vision-Language
Models*, Covert et al., ICLR 2025) so that its patch tokens encode what is where. The encoder
f_θ and the decoder g_ψ (reusable as a VLM adapter) are in `{WEIGHTS_NAME}`; `{CONFIG_NAME}`
holds the architecture and how it was trained."""
    else:  # mim / clipself: the paper's comparison objectives, no decoder
        about = f"""A vision transformer post-trained with {OBJECTIVE_NAMES[objective]}, one of the objectives that *Locality
Alignment Improves Vision-Language Models* (Covert et al., ICLR 2025) compares with MaskEmbed. It has no
decoder: the encoder f_θ is in `{WEIGHTS_NAME}`; `{CONFIG_NAME}` holds the architecture and how it was trained."""
    return f"""---
{front}
---

# {tag}, post-trained with {OBJECTIVE_NAMES[objective]}

{about}

| | |
|---|---|
{table}

```python
from prismatic_locality.checkpoint import load_aligned
model = load_aligned("path/to/this/dir")     # .encoder, .decoder, .config
```

In Prismatic: `prismatic_locality.prismatic.register_checkpoint("<backbone id>", "hf://<owner>/<repo>")`
or `$PRISMATIC_LOCALITY_CKPT_ROOT/<backbone id>/`.
"""


# config.json's "encoder" entry: field -> (check, what it must be). The required ones are what
# `build_encoder` rebuilds the encoder from; unknown fields are ignored (newer writers may add some).
_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
_count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
_rgb = lambda v: isinstance(v, list) and len(v) == 3 and all(map(_number, v))  # noqa: E731
ENCODER_FIELDS = {
    "model": (lambda v: isinstance(v, str) and bool(v), "a timm model name"),
    "img_size": (_count, "a positive integer"),
    "patch_size": (_count, "a positive integer"),
    "embed_dim": (_count, "a positive integer"),
    "depth": (_count, "a positive integer"),
    "mean": (_rgb, "a list of 3 numbers"),
    "std": (_rgb, "a list of 3 numbers"),
    "softcap": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "head_out": (_count, "a positive integer"),
}
ENCODER_OPTIONAL = {
    "pretrained_tag": (lambda v: isinstance(v, str), "a string"),
    "num_heads": (_count, "a positive integer"),
    "num_prefix_tokens": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "num_tokens": (_count, "a positive integer"),
    "norm_eps": (lambda v: _number(v) and v > 0, "a number > 0"),
    "timm_kwargs": (lambda v: isinstance(v, dict), "a mapping of timm.create_model arguments"),
}
# config.json's "decoder" entry: DecoderConfig's fields, checked by their annotation, with two exceptions
_DECODER_CHECKS = {"int": (_count, "a positive integer"), "float": (_number, "a finite number"),
                   "bool": (lambda v: isinstance(v, bool), "true or false"), "str": (lambda v: isinstance(v, str), "a string")}
_DECODER_SPECIAL = {
    "num_prefix_tokens": ENCODER_OPTIONAL["num_prefix_tokens"],
    "init_values": (lambda v: v is None or _number(v), "a number, or null for no LayerScale"),
}


def _check_fields(entry: Any, name: str, required: dict, optional: dict, cfg_file: Path,
                  allow_unknown: bool = False) -> None:
    """One line naming the first missing, malformed (or, unless allowed, unknown) field of a config.json entry."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{cfg_file}: field '{name}' must be a mapping, got {entry!r}")
    for key, (ok, what) in {**required, **optional}.items():
        if key not in entry:
            if key in required:
                raise CheckpointError(f"{cfg_file}: field '{name}.{key}' is missing")
        elif not ok(entry[key]):
            raise CheckpointError(f"{cfg_file}: field '{name}.{key}' must be {what}, got {entry[key]!r}")
    unknown = sorted(set(entry) - set(required) - set(optional))
    if unknown and not allow_unknown:
        raise CheckpointError(f"{cfg_file}: unknown field '{name}.{unknown[0]}'")


def _decoder_fields() -> tuple[dict, dict]:
    """DecoderConfig's fields with their checks, split into required and optional (those with a default)."""
    required, optional = {}, {}
    for f in fields(DecoderConfig):
        check = _DECODER_SPECIAL.get(f.name) or _DECODER_CHECKS.get(str(f.type), (lambda v: True, ""))
        (required if f.default is MISSING else optional)[f.name] = check
    return required, optional


def read_config(path: str | os.PathLike) -> dict:
    """config.json of an aligned checkpoint, every field the loaders use checked (one line naming it)."""
    cfg_file = Path(path) / CONFIG_NAME
    cfg = read_json(cfg_file, "not an aligned checkpoint", CheckpointError, missing=CheckpointError)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file}: format is {cfg.get('format')!r}, expected {FORMAT!r}")
    for key in ("encoder", "decoder"):
        if key not in cfg:
            raise CheckpointError(f"{cfg_file}: missing field '{key}'")
    objective = objective_of(cfg)
    if objective not in OBJECTIVES:
        raise CheckpointError(f"{cfg_file}: field 'objective' must be one of {' | '.join(OBJECTIVES)}, got {objective!r}")
    _check_fields(cfg["encoder"], "encoder", ENCODER_FIELDS, ENCODER_OPTIONAL, cfg_file, allow_unknown=True)
    if cfg["decoder"] is None and objective == "maskembed":
        raise CheckpointError(f"{cfg_file}: field 'decoder' is null, but a maskembed checkpoint has a decoder")
    if cfg["decoder"] is not None:
        _check_fields(cfg["decoder"], "decoder", *_decoder_fields(), cfg_file)  # DecoderConfig(**decoder) takes no others
    return cfg


def build_encoder(enc_cfg: dict, attn_impl: str = "auto") -> nn.Module:
    """An encoder with the checkpoint's architecture and random weights (no download)."""
    kwargs = {"img_size": enc_cfg["img_size"], **enc_cfg.get("timm_kwargs", {})}
    vit = V.create_vit(enc_cfg["model"], pretrained=False, **kwargs)
    spec = V.vit_spec(vit)
    if (spec.embed_dim, spec.depth, spec.patch_size) != (enc_cfg["embed_dim"], enc_cfg["depth"], enc_cfg["patch_size"]):
        raise CheckpointError(
            f"timm model '{enc_cfg['model']}' is {spec.embed_dim}-wide, {spec.depth} deep, patch "
            f"{spec.patch_size}; the checkpoint says {enc_cfg['embed_dim']}/{enc_cfg['depth']}/{enc_cfg['patch_size']}"
        )
    vit.pretrained_cfg = {**(getattr(vit, "pretrained_cfg", None) or {}), "mean": tuple(enc_cfg["mean"]), "std": tuple(enc_cfg["std"])}
    return make_encoder(vit, enc_cfg["head_out"], softcap=enc_cfg["softcap"], attn_impl=attn_impl,
                        norm_eps=enc_cfg.get("norm_eps", 1e-5))


def load_module_state(module: nn.Module, state: dict, what: str, source: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: {what} does not match the checkpoint (missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})"
        )


def split_state(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    enc = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    dec = {k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")}
    return enc, dec


def load_aligned(path: str | os.PathLike, device: str | torch.device = "cpu", attn_impl: str = "auto") -> AlignedModel:
    """Load an aligned checkpoint directory; no trainer, no teacher, no network needed."""
    path = Path(path)
    cfg = read_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"not an aligned checkpoint: {weights} is missing")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{weights}: unreadable safetensors file ({e})") from None
    enc_state, dec_state = split_state(tensors)
    encoder = build_encoder(cfg["encoder"], attn_impl=attn_impl)
    decoder = None if cfg["decoder"] is None else MaskEmbedDecoder(DecoderConfig(**cfg["decoder"]))
    try:
        load_module_state(encoder, enc_state, "encoder", str(weights))
        if decoder is not None:
            load_module_state(decoder, dec_state, "decoder", str(weights))
        elif dec_state:
            raise CheckpointError(f"{weights}: has decoder.* tensors but config.json says it has no decoder")
    except RuntimeError as e:  # size mismatches
        raise CheckpointError(f"{weights}: {str(e).splitlines()[0]} {str(e).splitlines()[1:2]}") from None
    return AlignedModel(encoder.to(device).eval(), None if decoder is None else decoder.to(device).eval(), cfg)


def is_aligned_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()
