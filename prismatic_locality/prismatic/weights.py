"""Aligned vision-backbone ids and where their weights live (no Prismatic import).

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


@dataclass(frozen=True)
class AlignedBackboneId:
    """An aligned backbone Prismatic can build: its id, input size and what it was aligned from."""

    id: str
    default_image_size: int
    teacher: str        # the timm model it was aligned from (documentation; weights come from the checkpoint)
    stock_id: str       # Prismatic's id for the unaligned backbone, the matching baseline


ALIGNED_BACKBONES: dict[str, AlignedBackboneId] = {
    b.id: b
    for b in [
        AlignedBackboneId("clip-l-336-aligned", 336, "vit_large_patch14_clip_quickgelu_336.openai", "clip-vit-l-336px"),
        AlignedBackboneId("siglip-so400m-384-aligned", 384, "vit_so400m_patch14_siglip_384.webli", "siglip-vit-so400m-384px"),
        AlignedBackboneId("clip-b-224-aligned", 224, "vit_base_patch16_clip_quickgelu_224.openai", "clip-vit-b"),
        AlignedBackboneId("siglip-b-224-aligned", 224, "vit_base_patch16_siglip_224.webli", "siglip-vit-b16-224px"),
    ]
}

# The ids the paper's Prismatic fork used, so runs trained there reload here.
ALIASES: dict[str, str] = {
    "clip-vit-l-336px-aligned": "clip-l-336-aligned",
    "siglip-vit-so400m-384px-aligned": "siglip-so400m-384-aligned",
    "clip-vit-b-aligned": "clip-b-224-aligned",        # the fork's svit_base_patch16_clip_quickgelu_224
    "siglip-vit-b-aligned": "siglip-b-224-aligned",    # the fork's svit_base_patch16_siglip_224
}

_registered: dict[str, str] = {}  # id -> absolute directory or hf:// location


def canonical_id(backbone_id: str) -> str:
    return ALIASES.get(backbone_id, backbone_id)


def all_backbone_ids() -> dict[str, int]:
    """Every aligned id (aliases included) -> its default image size."""
    ids = {b.id: b.default_image_size for b in ALIGNED_BACKBONES.values()}
    ids.update({alias: ALIGNED_BACKBONES[c].default_image_size for alias, c in ALIASES.items()})
    return ids


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
