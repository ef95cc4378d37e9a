"""Digit scenes: a tiny stand-in for COCO-Stuff made of real handwritten digits.

Each scene is a small RGB image with 1–4 handwritten digits (scikit-learn's `load_digits`, the
UCI 8×8 digits, shipped inside the package, so nothing is downloaded) pasted at random scale,
colour and position on a textured background. Every pixel has a class (0 = background, d + 1 =
digit d), so patch labels and image labels follow the probing benchmark's rules:

- patch label = union of the classes in the patch's pixels; background only when nothing else is;
- image label = union over the whole image (background positive when any background pixel exists).

Train and val scenes are drawn from *disjoint digit instances* (a fixed 80/20 split of the 1,797
digits), so a probe or teacher never sees a val digit's strokes during training.

`write_scenes` stores a split in the "demo" layout of docs/INTERFACES.md:
``{root}/{split}/images/{id}.png``, ``{root}/{split}/labels/{id}.png`` and ``{root}/classes.json``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..fileio import write_json

CLASSES = ["background"] + [str(d) for d in range(10)]
NUM_CLASSES = len(CLASSES)
SPLITS = ("train", "val")
SPLIT_SEED = 1234       # the digit-instance split is fixed: the shipped teacher never saw val digits
VAL_FRACTION = 0.2
MANIFEST = "scenes.json"


@dataclass(frozen=True)
class SceneConfig:
    img_size: int = 48
    min_digits: int = 1
    max_digits: int = 4
    min_scale: int = 10          # digit side in pixels (the 8×8 digit is upsampled)
    max_scale: int = 18
    max_overlap: float = 0.1     # of the smaller box; more overlap and the placement is re-drawn
    alpha_threshold: float = 0.3  # a digit owns the pixels where its stroke alpha exceeds this

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"scenes.min_digits/max_digits must satisfy 1 <= min <= max, got {self.min_digits}/{self.max_digits}")
        if not 4 <= self.min_scale <= self.max_scale <= self.img_size:
            raise ValueError(f"scenes.min_scale/max_scale must satisfy 4 <= min <= max <= img_size, got {self.min_scale}/{self.max_scale}")


@dataclass
class Scenes:
    images: np.ndarray   # (n, H, W, 3) uint8
    labels: np.ndarray   # (n, H, W) uint8 class ids
    digits: np.ndarray   # (n, max_digits) int: indices into load_digits, -1 = none (for provenance/tests)
    split: str

    def __len__(self) -> int:
        return len(self.images)


@lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def digit_pool(split: str) -> np.ndarray:
    """Indices of the `load_digits` instances that scenes of `split` may use (fixed, disjoint)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' ({' | '.join(SPLITS)})")
    n = len(_load_digits()[1])
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_val = int(round(VAL_FRACTION * n))
    return np.sort(perm[:n_val] if split == "val" else perm[n_val:])


def _split_rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split)])


def make_scenes(n: int, split: str, seed: int, cfg: SceneConfig = SceneConfig(), progress: bool = True) -> Scenes:
    """Draw `n` scenes of `split` from `seed` (a pure function of its arguments)."""
    rng = _split_rng(seed, split)
    glyphs, targets = _load_digits()
    pool = digit_pool(split)
    H = cfg.img_size
    # Every size a digit can take, pre-rendered once for the whole pool (bilinear upsampling).
    scaled = {
        s: F.interpolate(torch.from_numpy(glyphs[pool])[:, None], size=(s, s), mode="bilinear",
                         align_corners=False)[:, 0].clamp(0, 1).numpy()
        for s in range(cfg.min_scale, cfg.max_scale + 1)
    }
    # Textured background: a dark base colour, smooth low-frequency colour noise, pixel noise.
    base = rng.uniform(0.0, 0.35, size=(n, 3, 1, 1)).astype(np.float32)
    low = torch.from_numpy(rng.uniform(-0.12, 0.12, size=(n, 3, 4, 4)).astype(np.float32))
    low = F.interpolate(low, size=(H, H), mode="bicubic", align_corners=False).numpy()
    noise = rng.normal(0.0, 0.04, size=(n, 3, H, H)).astype(np.float32)
    images = (base + low + noise).transpose(0, 2, 3, 1).copy()
    labels = np.zeros((n, H, H), dtype=np.uint8)
    digits = np.full((n, cfg.max_digits), -1, dtype=np.int64)

    for i in tqdm(range(n), desc=f"scenes:{split}", unit="scene", disable=not progress, leave=False):
        boxes: list[tuple[int, int, int]] = []
        for j in range(int(rng.integers(cfg.min_digits, cfg.max_digits + 1))):
            k = int(rng.integers(len(pool)))
            s = int(rng.integers(cfg.min_scale, cfg.max_scale + 1))
            colour = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
            colour[rng.integers(3)] *= rng.uniform(0.0, 0.5)  # damp one channel: varied hues
            for _ in range(50):  # rejection-sample a position with little overlap
                y, x = (int(v) for v in rng.integers(0, H - s + 1, size=2))
                if all(_overlap((y, x, s), b) <= cfg.max_overlap * min(s, b[2]) ** 2 for b in boxes):
                    break
            else:
                continue  # crowded scene: drop this digit
            boxes.append((y, x, s))
            alpha = scaled[s][k][..., None]
            patch = images[i, y:y + s, x:x + s]
            images[i, y:y + s, x:x + s] = patch * (1 - alpha) + colour * alpha
            labels[i, y:y + s, x:x + s][alpha[..., 0] > cfg.alpha_threshold] = targets[pool[k]] + 1
            digits[i, j] = pool[k]
    images = (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Scenes(images, labels, digits, split)


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> int:
    (ya, xa, sa), (yb, xb, sb) = a, b
    dy = min(ya + sa, yb + sb) - max(ya, yb)
    dx = min(xa + sa, xb + sb) - max(xa, xb)
    return max(dy, 0) * max(dx, 0)


# --------------------------------------------------------------------------------------------
# Labels (the probing benchmark's rules)
# --------------------------------------------------------------------------------------------


def patch_labels(labels: np.ndarray | torch.Tensor, patch_size: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """(n, H, W) class maps -> (n, N, C) bool multi-hot per patch (row-major patches).

    Union of the classes present in the patch; background (0) only when it is the only class.
    """
    lab = torch.as_tensor(np.asarray(labels)).long()
    n, H, W = lab.shape
    g = H // patch_size
    onehot = F.one_hot(lab[:, : g * patch_size, : g * patch_size], num_classes)      # (n, H, W, C)
    tiles = onehot.reshape(n, g, patch_size, g, patch_size, num_classes).amax(dim=(2, 4)).bool()
    tiles = tiles.reshape(n, g * g, num_classes)
    tiles[..., 0] &= ~tiles[..., 1:].any(-1)
    return tiles


def image_labels(labels: np.ndarray | torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """(n, H, W) class maps -> (n, C) bool: every class present anywhere, background included."""
    lab = torch.as_tensor(np.asarray(labels)).long().flatten(1)
    out = torch.zeros(lab.shape[0], num_classes, dtype=torch.bool)
    out.scatter_(1, lab, True)
    return out


def to_tensor(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) normalised with the backbone's mean/std."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# --------------------------------------------------------------------------------------------
# On disk: the "demo" layout
# --------------------------------------------------------------------------------------------


def write_scenes(root: str | os.PathLike, scenes: dict[str, Scenes], manifest: dict, progress: bool = True) -> Path:
    """Write splits as PNGs in the demo layout, atomically (built in a temp dir, then renamed)."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for split, sc in scenes.items():
            (tmp / split / "images").mkdir(parents=True)
            (tmp / split / "labels").mkdir(parents=True)
            for i in tqdm(range(len(sc)), desc=f"write:{split}", unit="png", disable=not progress, leave=False):
                Image.fromarray(sc.images[i], "RGB").save(tmp / split / "images" / f"{i:06d}.png", compress_level=1)
                Image.fromarray(sc.labels[i], "L").save(tmp / split / "labels" / f"{i:06d}.png", compress_level=1)
        write_json(tmp / "classes.json", CLASSES)
        write_json(tmp / MANIFEST, manifest)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def build_dataset(root: str | os.PathLike, n_train: int, n_val: int, seed: int, cfg: SceneConfig = SceneConfig(),
                  progress: bool = True) -> dict[str, Scenes]:
    """Make (or reuse, when the manifest matches) the demo scenes under `root`; returns the arrays."""
    manifest = {"seed": seed, "n_train": n_train, "n_val": n_val, "config": asdict(cfg),
                "split_seed": SPLIT_SEED, "val_fraction": VAL_FRACTION}
    scenes = {
        "train": make_scenes(n_train, "train", seed, cfg, progress),
        "val": make_scenes(n_val, "val", seed, cfg, progress),
    }
    mpath = Path(root) / MANIFEST
    if not (mpath.is_file() and json.loads(mpath.read_text()) == manifest):
        write_scenes(root, scenes, manifest, progress)
    return scenes
