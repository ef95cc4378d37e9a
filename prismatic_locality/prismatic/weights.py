"""Vision-backbone ids the plugin adds, and where aligned weights live (no Prismatic import).

Aligned ids (`ALIGNED_BACKBONES`) load an aligned checkpoint; stock ids (`STOCK_BACKBONES`) are the
un-aligned baselines for teachers Prismatic itself does not know (SigLIP 2, PE-Core), built from timm
with Prismatic's feature definition. Both record the timm version their teacher needs.

Prismatic saves only the projector and the LLM in a run; `prismatic.load()` rebuilds the vision
backbone from its id alone. So an id must map to an aligned checkpoint directory (`config.json` +
`model.safetensors`, see `prismatic_locality.checkpoint`) without the run's config and without the
working directory. `resolve_checkpoint(id)` looks, in order, at:

1. `register_checkpoint(id, location)` calls made in this process (a directory or ``hf://owner/name[@rev]``);
2. every root in ``$PRISMATIC_LOCALITY_CKPT_ROOT`` (absolute paths, ``os.pathsep``-separated):
   ``<root>/<id>/`` for the id as given and for its canonical id (aliases share one directory);
3. a hub repo registered for the id (``hf://...``), fetched with ``huggingface_hub.snapshot_download``,
   which honours ``HF_HUB_OFFLINE=1`` by answering from the local cache.

Missing everywhere -> `FileNotFoundError` listing every place it looked.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, is_aligned_checkpoint

ENV_ROOT = "PRISMATIC_LOCALITY_CKPT_ROOT"
HUB_PREFIX = "hf://"


# Prismatic pins timm 0.9.10. The teachers below that it lacks need (first release with the tag):
SIGLIP2_TIMM = "1.0.15"   # the .v2_webli tags
PE_CORE_TIMM = "1.0.16"   # the .fb tags (timm's Eva class)


@dataclass(frozen=True)
class AlignedBackboneId:
    """An aligned backbone Prismatic can build: its id, input size and what it was aligned from."""

    id: str
    default_image_size: int
    teacher: str        # the timm model it was aligned from (documentation; weights come from the checkpoint)
    stock_id: str       # the id of the unaligned backbone, the matching baseline (Prismatic's, or STOCK_BACKBONES)
    min_timm: Optional[str] = None  # the first timm with `teacher`; None: timm 0.9.10 (Prismatic's pin) has it


ALIGNED_BACKBONES: dict[str, AlignedBackboneId] = {
    b.id: b
    for b in [
        AlignedBackboneId("clip-l-336-aligned", 336, "vit_large_patch14_clip_quickgelu_336.openai", "clip-vit-l-336px"),
        AlignedBackboneId("siglip-so400m-384-aligned", 384, "vit_so400m_patch14_siglip_384.webli", "siglip-vit-so400m-384px"),
        AlignedBackboneId("clip-b-224-aligned", 224, "vit_base_patch16_clip_quickgelu_224.openai", "clip-vit-b"),
        AlignedBackboneId("siglip-b-224-aligned", 224, "vit_base_patch16_siglip_224.webli", "siglip-vit-b16-224px"),
        # The paper fork's other backbones (its ids are aliases below): IN-1k ViT-L and the 224 px
        # CLIP-L / SigLIP-SO400M, aligned with the recipes of the same name (docs/align.md).
        AlignedBackboneId("in1k-vit-l-aligned", 224, "vit_large_patch16_224.augreg_in21k_ft_in1k", "in1k-vit-l"),
        AlignedBackboneId("clip-l-224-aligned", 224, "vit_large_patch14_clip_quickgelu_224.openai", "clip-vit-l"),
        AlignedBackboneId("siglip-so400m-224-aligned", 224, "vit_so400m_patch14_siglip_224.webli", "siglip-vit-so400m"),
        # SigLIP 2 at /16@384: 24 x 24 = 576 tokens, as many as CLIP-L/14@336 and 21% fewer LLM
        # input tokens than the /14@378 tag's 729, at the same 384 px input as SigLIP SO400M/14@384.
        AlignedBackboneId("siglip2-so400m-384-aligned", 384, "vit_so400m_patch16_siglip_384.v2_webli",
                          "siglip2-vit-so400m-384px", SIGLIP2_TIMM),
        AlignedBackboneId("pe-core-l-336-aligned", 336, "vit_pe_core_large_patch14_336.fb", "pe-core-vit-l-336px",
                          PE_CORE_TIMM),
    ]
}


@dataclass(frozen=True)
class StockBackboneId:
    """An un-aligned timm backbone Prismatic lacks, used exactly as Prismatic uses its own (see `stock.py`)."""

    id: str
    default_image_size: int
    timm_name: str      # with its pretrained tag: the weights timm downloads
    min_timm: str


STOCK_BACKBONES: dict[str, StockBackboneId] = {
    b.id: b
    for b in [
        StockBackboneId("siglip2-vit-so400m-384px", 384, "vit_so400m_patch16_siglip_384.v2_webli", SIGLIP2_TIMM),
        StockBackboneId("pe-core-vit-l-336px", 336, "vit_pe_core_large_patch14_336.fb", PE_CORE_TIMM),
    ]
}


# The ids the paper's Prismatic fork used, so runs trained there reload here.
ALIASES: dict[str, str] = {
    "clip-vit-l-336px-aligned": "clip-l-336-aligned",
    "siglip-vit-so400m-384px-aligned": "siglip-so400m-384-aligned",
    "clip-vit-b-aligned": "clip-b-224-aligned",        # the fork's svit_base_patch16_clip_quickgelu_224
    "siglip-vit-b-aligned": "siglip-b-224-aligned",    # the fork's svit_base_patch16_siglip_224
    "clip-vit-l-aligned": "clip-l-224-aligned",        # the fork's svit_large_patch14_clip_quickgelu_224
    "siglip-vit-so400m-aligned": "siglip-so400m-224-aligned",  # the fork's svit_so400m_patch14_siglip_224
}

_registered: dict[str, str] = {}  # id -> absolute directory or hf:// location


def canonical_id(backbone_id: str) -> str:
    return ALIASES.get(backbone_id, backbone_id)


def all_backbone_ids() -> dict[str, int]:
    """Every aligned id (aliases included) -> its default image size."""
    ids = {b.id: b.default_image_size for b in ALIGNED_BACKBONES.values()}
    ids.update({alias: ALIGNED_BACKBONES[c].default_image_size for alias, c in ALIASES.items()})
    return ids


def require_timm(backbone_id: str) -> None:
    """Fail with one line naming the timm a registered id needs, when the installed timm lacks its model."""
    import timm

    b = ALIGNED_BACKBONES.get(canonical_id(backbone_id)) or STOCK_BACKBONES.get(backbone_id)
    name = getattr(b, "teacher", None) or getattr(b, "timm_name", None)
    if b is None or b.min_timm is None or timm.is_model(name.split(".")[0]):
        return
    raise ValueError(
        f"vision backbone '{backbone_id}' needs timm>={b.min_timm} for '{name}', but timm {timm.__version__} is "
        f"installed (Prismatic pins 0.9.10): pip install 'timm>={b.min_timm}' (see docs/prismatic.md)"
    )


def register_checkpoint(backbone_id: str, location: str | os.PathLike) -> None:
    """Point `backbone_id` at an aligned checkpoint: a directory, or ``hf://owner/name[@revision]``.

    A relative directory is resolved now, against the caller's working directory, so a later
    `prismatic.load()` from elsewhere still finds it.
    """
    loc = str(location)
    if not loc.startswith(HUB_PREFIX):
        loc = str(Path(loc).expanduser().resolve())
    _registered[backbone_id] = loc


def unregister_checkpoint(backbone_id: str) -> None:
    _registered.pop(backbone_id, None)


def env_roots() -> list[Path]:
    roots = []
    for entry in filter(None, os.environ.get(ENV_ROOT, "").split(os.pathsep)):
        root = Path(entry).expanduser()
        if not root.is_absolute():
            raise ValueError(f"${ENV_ROOT}: '{entry}' is not an absolute path (relative roots would depend on the working directory)")
        roots.append(root)
    return roots


def _from_hub(location: str) -> Path:
    from huggingface_hub import snapshot_download

    repo, _, revision = location[len(HUB_PREFIX):].partition("@")
    path = snapshot_download(repo_id=repo, revision=revision or None, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    return Path(path)


def resolve_checkpoint(backbone_id: str) -> Path:
    """The aligned checkpoint directory for `backbone_id` (see the module docstring for the order)."""
    names = list(dict.fromkeys([backbone_id, canonical_id(backbone_id)]))
    tried: list[str] = []

    def check(path: Path, how: str) -> Optional[Path]:
        if is_aligned_checkpoint(path):
            return path
        tried.append(f"{path} ({how})")
        return None

    for name in names:
        loc = _registered.get(name)
        if loc is None:
            continue
        if loc.startswith(HUB_PREFIX):
            try:
                found = check(_from_hub(loc), f"register_checkpoint('{name}') hub snapshot")
            except Exception as e:  # offline cache miss, unknown repo, ...
                tried.append(f"{loc} (register_checkpoint('{name}'): {type(e).__name__}: {str(e).splitlines()[0]})")
                found = None
        else:
            found = check(Path(loc), f"register_checkpoint('{name}')")
        if found:
            return found
    for root in env_roots():
        for name in names:
            found = check(root / name, f"${ENV_ROOT}")
            if found:
                return found
    if not os.environ.get(ENV_ROOT):
        tried.append(f"${ENV_ROOT} (not set)")
    raise FileNotFoundError(
        f"no aligned checkpoint (config.json + model.safetensors) for vision backbone '{backbone_id}'; looked in: "
        + "; ".join(tried)
        + f". Set {ENV_ROOT}=/abs/root with /abs/root/{canonical_id(backbone_id)}/, or call "
        "prismatic_locality.prismatic.register_checkpoint(id, dir_or_hf_uri)"
    )
