"""Aligned backbones as timm models: registered names, hub-format directories, the HF cache.

Importing `prismatic_locality` registers, for every timm ViT architecture ``A`` (`vit.vit_architectures`),
an architecture ``A_softcap`` with one pretrained tag ``maskembed``: the aligned encoder f_θ, i.e. ``A``
with soft-capped attention (`vit.SoftCapAttention`), its re-trained final norm and the per-token
``head`` to the decoder width (``num_classes``; ``num_classes=0`` drops it, as transformers'
``TimmWrapperModel`` does). ``forward_features`` is the aligned backbone, exactly as ``load_aligned``'s.

    import prismatic_locality, timm
    m = timm.create_model("vit_base_patch16_clip_224_softcap.maskembed", pretrained=True,
                          pretrained_cfg_overlay=dict(file="aligned/model.safetensors"))
    m = timm.create_model("hf-hub:<org>/<repo>", pretrained=True)     # an exported directory on the hub

The architecture arguments (image size, width overrides, ``softcap``, ``norm_eps``, ``num_classes``) come
from, in order: the call's keyword arguments; the ``model_args`` of the hub directory's config.json
(timm >= 1.0 passes them itself, timm 0.9.10 ignores them, so they are read here too); the aligned
checkpoint's config.json beside a ``file=`` weights file; the base architecture's defaults (cap 30).
Weights are read with safetensors (or ``torch.load(weights_only=True)``), an aligned checkpoint's
``encoder.*`` keys taken and its ``decoder.*`` keys left out.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

# No module-level import of `vit` (or anything importing timm): `register` runs right after timm's own
# import, which importing this module must therefore not trigger (it would find this module half-built).

SUFFIX = "_softcap"     # architecture: the base architecture with soft-capped attention and the head
TAG = "maskembed"       # pretrained tag: weights come from a file or a hub directory
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
DEFAULT_SOFTCAP = 30.0  # the paper's cap (App. C)
DEFAULT_NORM_EPS = 1e-5  # the re-initialised final norm's eps (maskembed.make_encoder)

# pretrained_cfg fields that describe the preprocessing (kept from the base architecture's default tag)
_PREPROCESSING = ("input_size", "test_input_size", "min_input_size", "fixed_input_size", "interpolation",
                  "crop_pct", "test_crop_pct", "crop_mode", "mean", "std", "pool_size", "first_conv")

default_cfgs: dict = {}  # read by timm's register_model: the ``maskembed`` tag of each registered architecture


def aligned_arch(base: str) -> str:
    """The registered architecture of an aligned `base` (a timm architecture, no tag)."""
    return base.split(".")[0] + SUFFIX


def base_arch(arch: str) -> str:
    return arch[: -len(SUFFIX)] if arch.endswith(SUFFIX) else arch


def preprocessing_cfg(base: str) -> dict:
    """The base architecture's default preprocessing (input size, interpolation, crop, mean/std)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(base)
    d = asdict(cfg) if cfg is not None else {}
    return {k: d[k] for k in _PREPROCESSING if d.get(k) is not None}


# --------------------------------------------------------------------------------------------
# Building the model
# --------------------------------------------------------------------------------------------


def _hub_model_args(hf_hub_id: str) -> dict:
    """``model_args`` of a hub directory's config.json (what timm 0.9.10 does not pass on)."""
    from huggingface_hub import hf_hub_download

    return dict(json.loads(Path(hf_hub_download(hf_hub_id, CONFIG_NAME)).read_text()).get("model_args") or {})


def _weights_path(cfg) -> Optional[Path]:
    """The weights file a resolved pretrained cfg points at (a file, a local directory, or a hub repo)."""
    if cfg.file:
        p = Path(cfg.file)
        return p / WEIGHTS_NAME if p.is_dir() else p
    if cfg.hf_hub_id:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(cfg.hf_hub_id, cfg.hf_hub_filename or WEIGHTS_NAME))
    return None


def _aligned_config_beside(weights: Optional[Path]) -> dict:
    """An aligned checkpoint's encoder config when `weights` is its model.safetensors, else {}: so that
    a ``file=`` overlay gets the trained architecture (image size, cap, head, eps, mean/std) by itself."""
    if weights is None or not (weights.parent / CONFIG_NAME).is_file():
        return {}
    try:
        from .checkpoint import FORMAT, read_config

        cfg = json.loads((weights.parent / CONFIG_NAME).read_text())
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            return {}
        return read_config(weights.parent)["encoder"]
    except json.JSONDecodeError:
        return {}


def _encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm-layout encoder weights: an aligned checkpoint's ``encoder.*`` keys (``decoder.*`` left out)."""
    if any(k.startswith("encoder.") for k in state):
        return {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return state


def create_aligned(base: str, pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None,
                   **kwargs) -> nn.Module:
    """The timm entry point of ``<base>_softcap`` (see the module docstring)."""
    from timm.models._builder import resolve_pretrained_cfg

    from . import vit as V
    from .maskembed import make_encoder

    kwargs.pop("pretrained_model_args", None)  # timm >= 1.0's record of model_args, already merged into kwargs
    kwargs.pop("cache_dir", None)
    cfg = resolve_pretrained_cfg(aligned_arch(base), pretrained_cfg, pretrained_cfg_overlay)
    weights = _weights_path(cfg) if pretrained else None
    if pretrained and weights is None:
        raise ValueError(f"{aligned_arch(base)}.{TAG}: no weights to load; pass "
                         "pretrained_cfg_overlay=dict(file='<aligned dir>/model.safetensors')")
    if weights is not None and not weights.is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    if cfg.hf_hub_id:
        for k, v in _hub_model_args(cfg.hf_hub_id).items():
            kwargs.setdefault(k, v)
    beside = _aligned_config_beside(weights)
    if beside:
        for k, v in {"img_size": beside["img_size"], **beside.get("timm_kwargs", {}), "softcap": beside["softcap"],
                     "norm_eps": beside.get("norm_eps", DEFAULT_NORM_EPS), "num_classes": beside["head_out"]}.items():
            kwargs.setdefault(k, v)
    softcap = float(kwargs.pop("softcap", DEFAULT_SOFTCAP))
    norm_eps = float(kwargs.pop("norm_eps", DEFAULT_NORM_EPS))
    attn_impl = kwargs.pop("attn_impl", "auto")
    num_classes = kwargs.pop("num_classes", None)

    # the preprocessing part of an overlay also configures the base (NaFlex takes its resolution from it)
    base_overlay = {k: v for k, v in (pretrained_cfg_overlay or {}).items() if k in _PREPROCESSING}
    if base_overlay:
        kwargs["pretrained_cfg_overlay"] = {**base_overlay, **kwargs.get("pretrained_cfg_overlay", {})}
    vit = V.create_vit(base, pretrained=False, **kwargs)
    # timm's own rule: the pretrained cfg's num_classes unless the call says otherwise (0 = features only)
    head_out = int(cfg.num_classes or 0) if num_classes is None else int(num_classes)
    make_encoder(vit, max(head_out, 1), softcap=softcap, attn_impl=attn_impl, norm_eps=norm_eps)
    if head_out == 0:  # features only
        vit.head = nn.Identity()
    vit.num_classes = head_out
    prep = {**preprocessing_cfg(base), **{k: v for k, v in asdict(cfg).items() if v is not None and k in _PREPROCESSING}}
    if beside:
        prep.update(mean=tuple(beside["mean"]), std=tuple(beside["std"]))
    s = V.vit_spec(vit)
    prep["input_size"] = (3, s.img_size, s.img_size)
    vit.pretrained_cfg = {**{k: v for k, v in asdict(cfg).items() if v is not None}, **prep,
                          "architecture": aligned_arch(base), "num_classes": head_out, "classifier": "head"}
    vit.default_cfg = vit.pretrained_cfg  # timm 0.9's name for it
    if weights is not None:
        from .weights_file import read_weights

        state = _encoder_state(read_weights(str(weights)))
        if head_out == 0:
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        missing, unexpected = vit.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights}: weights do not match {aligned_arch(base)} with {kwargs or 'default arguments'} "
                             f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
    return vit


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def _entrypoint(base: str):
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return create_aligned(base, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = aligned_arch(base)
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{base} locality-aligned with MaskEmbed: soft-capped attention, per-token head."
    return entrypoint


_registered: set[str] = set()


def register(bases: Optional[list[str]] = None) -> list[str]:
    """Register ``<base>_softcap`` (tag ``maskembed``) with timm for each base (default: every timm ViT
    architecture of this timm version); returns the architecture names registered now. Idempotent."""
    from . import vit as V

    from timm.models import register_model
    from timm.models._registry import generate_default_cfgs

    todo = [b for b in (bases or V.vit_architectures()) if not b.endswith(SUFFIX) and aligned_arch(b) not in _registered]
    default_cfgs.update(generate_default_cfgs({f"{aligned_arch(b)}.{TAG}": {"num_classes": 0, "classifier": "head"}
                                               for b in todo}))
    for b in todo:
        register_model(_entrypoint(b))
        _registered.add(aligned_arch(b))
    return [aligned_arch(b) for b in todo]


# --------------------------------------------------------------------------------------------
# Hub-format directories and the local HF cache
# --------------------------------------------------------------------------------------------


def hub_config(architecture: str, model_args: dict, pretrained_cfg: dict, num_classes: int, num_features: int,
               extra: dict) -> dict:
    """config.json of a timm hub directory (what ``timm.create_model("hf-hub:...")`` and transformers'
    ``TimmWrapper`` read): architecture, model_args, and a pretrained_cfg of PretrainedCfg fields only."""
    from timm.models import PretrainedCfg

    known = {f.name for f in fields(PretrainedCfg)}
    bad = sorted(set(pretrained_cfg) - known)
    if bad:
        raise ValueError(f"pretrained_cfg field '{bad[0]}' is not a timm PretrainedCfg field")
    return {"architecture": architecture, "num_classes": num_classes,
            "num_features": num_features, "global_pool": "", "model_args": model_args,
            "pretrained_cfg": pretrained_cfg, **extra}


def install_in_cache(directory: str | os.PathLike, repo_id: str, cache_dir: Optional[str | os.PathLike] = None,
                     revision: str = "0" * 40) -> Path:
    """Lay an exported directory out in the Hugging Face cache as `repo_id` (``<org>/<repo>``), so that
    ``timm.create_model("hf-hub:<org>/<repo>")`` and ``AutoModel.from_pretrained("<org>/<repo>")`` find
    it with ``HF_HUB_OFFLINE=1``, without an upload. Returns the snapshot directory."""
    from huggingface_hub.constants import HF_HUB_CACHE

    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"not an exported directory: {directory / CONFIG_NAME} is missing")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo id must be '<org>/<repo>', got {repo_id!r}")
    root = Path(cache_dir or HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / revision
    if snap.exists():
        shutil.rmtree(snap)
    shutil.copytree(directory, snap)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    return snap
