"""Probing datasets in their real on-disk layouts: COCO-Stuff 164k, ADE20k, and the demo scenes.

Each reader pairs images with label maps by file stem (sorted) and yields what the probe needs
per image: the centre-cropped, resized RGB image (uint8) and, optionally, the reduced targets
(labels.py). Missing pairs, size mismatches and out-of-range label values are errors that name
the files; `skip_unpaired=True` turns unpaired files into a counted, logged skip instead.

Layouts (`root` = the directory passed as ``--data.root``):
- coco-stuff: images  {root}/images/{train,val}2017/*.jpg  (or {root}/{train,val}2017/*.jpg)
              labels  {root}/stuffthingmaps_trainval2017/{train,val}2017/*.png
                      (or {root}/annotations/{train,val}2017/*.png, the reference's unzip target)
              class = (PNG value + 1) mod 256: 255 (unlabeled) -> 0, 0..181 -> COCO ids 1..182.
- ade20k:     {root}/ADEChallengeData2016/{images,annotations}/{training,validation}/*.{jpg,png}
              (root may also be the ADEChallengeData2016 directory itself); 0 = "other".
- demo:       {root}/{train,val}/{images,labels}/{id}.png, {root}/classes.json; 0 = background.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..fileio import read_json
from . import labels as L

log = logging.getLogger(__name__)

DATASETS = ("coco-stuff", "ade20k", "demo")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _coco_label(v: np.ndarray) -> np.ndarray:
    return (v.astype(np.int64) + 1) % 256


def _identity(v: np.ndarray) -> np.ndarray:
    return v.astype(np.int64)


@dataclass
class DatasetSpec:
    """Where one split's files are and how to read their labels."""

    name: str
    split: str
    image_dir: Path
    label_dir: Path
    class_names: tuple[str, ...]
    label_fn: Callable[[np.ndarray], np.ndarray]


def _first_dir(candidates: list[Path], what: str) -> Path:
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(f"{what} not found; looked for: " + ", ".join(str(c) for c in candidates))


def locate(name: str, root: str | os.PathLike, split: str) -> DatasetSpec:
    """Resolve a dataset's image and label directories for split 'train' or 'val'."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} is not a directory")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name == "coco-stuff":
        s = f"{split}2017"
        images = _first_dir([root / "images" / s, root / s], f"COCO {s} images")
        lbls = _first_dir([root / "stuffthingmaps_trainval2017" / s, root / "annotations" / s],
                          f"COCO-Stuff {s} label maps")
        return DatasetSpec(name, split, images, lbls, L.COCO_STUFF_CLASSES, _coco_label)
    if name == "ade20k":
        s = "training" if split == "train" else "validation"
        base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
        images = _first_dir([base / "images" / s], f"ADE20k {s} images")
        lbls = _first_dir([base / "annotations" / s], f"ADE20k {s} annotations")
        return DatasetSpec(name, split, images, lbls, L.ADE20K_CLASSES, _identity)
    if name == "demo":
        classes_file = root / "classes.json"
        names = read_json(classes_file, "demo dataset")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{classes_file}: expected a non-empty list of class names")
        images = _first_dir([root / split / "images"], f"demo {split} images")
        lbls = _first_dir([root / split / "labels"], f"demo {split} labels")
        return DatasetSpec(name, split, images, lbls, tuple(names), _identity)
    raise ValueError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")


def _listing(d: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    return {p.stem: p for p in sorted(d.iterdir()) if p.suffix.lower() in exts and p.is_file()}


def _names(stems: list[str], limit: int = 5) -> str:
    more = f" (+{len(stems) - limit} more)" if len(stems) > limit else ""
    return ", ".join(stems[:limit]) + more


def pair_files(spec: DatasetSpec, skip_unpaired: bool = False) -> list[tuple[Path, Path]]:
    """Sorted (image, label) pairs matched by stem; unpaired files are an error naming them."""
    images = _listing(spec.image_dir, IMAGE_EXTS)
    lbls = _listing(spec.label_dir, (".png",))
    if not images:
        raise ValueError(f"empty split: no images ({'/'.join(IMAGE_EXTS)}) in {spec.image_dir}")
    no_label = sorted(set(images) - set(lbls))
    no_image = sorted(set(lbls) - set(images))
    if no_label or no_image:
        msg = []
        if no_label:
            msg.append(f"{len(no_label)} images in {spec.image_dir} without a label map in {spec.label_dir}: {_names(no_label)}")
        if no_image:
            msg.append(f"{len(no_image)} label maps in {spec.label_dir} without an image: {_names(no_image)}")
        if not skip_unpaired:
            raise ValueError("; ".join(msg) + " (data.skip_unpaired=true skips them)")
        log.warning("skipping unpaired files: %s", "; ".join(msg))
    pairs = [(images[s], lbls[s]) for s in sorted(set(images) & set(lbls))]
    if not pairs:
        raise ValueError(f"empty split: no image/label pairs in {spec.image_dir} and {spec.label_dir}")
    return pairs


class ProbeDataset(Dataset):
    """One split: item i = dict(image uint8 (3, S, S)[, patch uint8 packed, image_labels, fractions]).

    `size` is the backbone resolution, `patch_size` its patch; targets follow labels.py.
    `limit` keeps the first `limit` pairs (sorted order) for quick runs.
    """

    def __init__(self, name: str, root: str | os.PathLike, split: str, size: int, patch_size: int,
                 limit: Optional[int] = None, skip_unpaired: bool = False):
        self.spec = locate(name, root, split)
        self.pairs = pair_files(self.spec, skip_unpaired)
        if limit is not None:
            if limit < 1:
                raise ValueError(f"data limit must be >= 1, got {limit}")
            self.pairs = self.pairs[:limit]
        self.size, self.patch_size = size, patch_size
        self.with_labels = True
        self.with_images = True

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    @property
    def num_classes(self) -> int:
        return len(self.spec.class_names)

    def __len__(self) -> int:
        return len(self.pairs)

    def fingerprint(self) -> str:
        """Hash of the dataset kind, root, split and the (name, size, mtime) of every file used.

        Computed once per dataset object (a COCO split is ~240k stat calls)."""
        if getattr(self, "_fingerprint", None):
            return self._fingerprint
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.spec.name}|{self.spec.split}|{self.spec.image_dir.resolve()}|{self.spec.label_dir.resolve()}".encode())
        for img, lbl in self.pairs:
            for p in (img, lbl):
                st = p.stat()
                h.update(f"|{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        self._fingerprint = h.hexdigest()
        return self._fingerprint

    def load_image(self, i: int) -> Image.Image:
        img_path, _ = self.pairs[i]
        try:
            with Image.open(img_path) as im:
                return L.prepare_image(im, self.size)
        except OSError as e:
            raise ValueError(f"{img_path}: unreadable image ({e})") from None

    def load_label_map(self, i: int) -> torch.Tensor:
        """The cropped, resized class map (S, S) int64, with the size and range checks."""
        img_path, lbl_path = self.pairs[i]
        try:
            with Image.open(img_path) as im:
                img_size = im.size
            with Image.open(lbl_path) as lb:
                if lb.mode not in ("L", "P", "I", "I;16"):
                    raise ValueError(f"{lbl_path}: label map must be single-channel, got mode {lb.mode}")
                if lb.size != img_size:
                    raise ValueError(f"size mismatch: image {img_path} is {img_size[0]}x{img_size[1]}, "
                                     f"label map {lbl_path} is {lb.size[0]}x{lb.size[1]}")
                lbl = np.array(L.prepare_label(lb, self.size))
        except OSError as e:
            raise ValueError(f"{lbl_path}: unreadable label map ({e})") from None
        cls = self.spec.label_fn(lbl)
        if cls.max() >= self.num_classes or cls.min() < 0:
            raise ValueError(f"{lbl_path}: label value maps to class {int(cls.max())}, "
                             f"but {self.spec.name} has {self.num_classes} classes")
        return torch.from_numpy(cls)

    def __getitem__(self, i: int) -> dict:
        item = {"index": i}
        if self.with_images:
            img = self.load_image(i)
            item["image"] = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
        if self.with_labels:
            patch, image, fractions = L.reduce_labels(self.load_label_map(i), self.patch_size, self.num_classes)
            item["patch"] = torch.from_numpy(L.pack(patch))
            item["image_labels"] = torch.from_numpy(L.pack(image))
            item["fractions"] = fractions
        return item
