"""Labelled images for fine-tuning: ImageFolder classes, the reference's train augmentation, Mixup.

- Classes are the sub-folders of ``{root}/{split}`` (sorted names = label ids, as torchvision's
  ImageFolder); train and val must have the same set. Images are found by `data.ImageFolderSource`
  and read by `data.SeededImages`: an unreadable file is a counted, logged skip whose slot is filled
  by the next readable file, with that file's label.
- Train transform: the reference's ``rkrc`` crop and flip (`data.RKRC`), then timm's RandAugment (or
  ColorJitter when it is off, as timm does), normalise, timm's RandomErasing; Mixup / CutMix with
  label smoothing is timm's `Mixup` on the micro-batch.
- timm's augmentations draw from the global ``random`` / numpy / torch generators. Each is run
  inside `seeded_globals`, seeded from the sample's (seed, epoch, index) generator or from (seed,
  step, micro-batch), and the global state is put back afterwards: an image's augmentation and a
  batch's mix do not depend on the worker, or on where a resumed run restarted.
"""
from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

from ..data import RKRC, EvalTransform, ImageFolderSource, SeededImages
from ..data.transforms import to_normalized_tensor
from .config import FinetuneConfig, mixing


@contextlib.contextmanager
def seeded_globals(seed: Sequence[int]) -> Iterator[None]:
    """Run the body with python's `random`, numpy's and torch's global generators seeded from `seed`
    (a numpy SeedSequence entropy), then restore all three."""
    py, npy = random.getstate(), np.random.get_state()
    s = np.random.SeedSequence(list(seed)).generate_state(3)
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        random.seed(int(s[0]))
        np.random.seed(int(s[1]))
        torch.manual_seed(int(s[2]))
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def class_folders(root: str, split: str) -> Tuple[ImageFolderSource, np.ndarray, List[str]]:
    """The split's images, their labels and the class names (sorted sub-folder names)."""
    directory = Path(root) / split
    source = ImageFolderSource(directory)  # missing folder / no images: one line naming it
    prefix = len(os.fspath(directory).rstrip(os.sep)) + 1
    names = [source.name(i)[prefix:] for i in range(len(source))]
    loose = next((n for n in names if os.sep not in n), None)
    if loose is not None:
        raise ValueError(f"{directory / loose}: an image directly in the split folder; expected "
                         f"{directory}/<class>/<image>")
    folder_of = [n.split(os.sep, 1)[0] for n in names]
    classes = sorted(set(folder_of))
    index = {c: i for i, c in enumerate(classes)}
    return source, np.array([index[f] for f in folder_of], dtype=np.int64), classes


def check_same_classes(train: List[str], val: List[str], train_dir: Path, val_dir: Path) -> None:
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise ValueError(f"class folders differ between {train_dir} and {val_dir}: only in train "
                         f"{only_train[:5] or '[]'}, only in val {only_val[:5] or '[]'}")


class LabeledImages(SeededImages):
    """``dataset[(epoch, index)]`` -> (image, label, notes); the label is the file actually read."""

    def __init__(self, source, labels: np.ndarray, transform, seed: int):
        super().__init__(source, transform, seed)
        self.labels = labels

    def __getitem__(self, key: Tuple[int, int]):
        image, notes, j = self.load_item(*key)
        return image, int(self.labels[j]), notes


def collate_labeled(batch):
    """-> (images, labels, the notes of all items)."""
    return (torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.long),
            [note for b in batch for note in b[2]])


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op, for any Pillow: at full magnitude RandAugment keeps 0 bits, which Pillow < 12
    turned into a black image and Pillow >= 12 refuses (ValueError); keep the black image."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


class TrainTransform:
    """rkrc crop + flip, then RandAugment (else ColorJitter), normalise, RandomErasing: timm's
    ``transforms_imagenet_train`` order, with timm's own RandAugment and RandomErasing."""

    def __init__(self, cfg: FinetuneConfig, size: int, mean, std):
        from timm.data.random_erasing import RandomErasing
        from timm.data.auto_augment import rand_augment_transform
        import torchvision.transforms as T

        d = cfg.data
        self.mean, self.std = tuple(mean), tuple(std)
        # augment none: the eval resize + centre crop instead of the random crop and flip
        self.geometry = (RKRC(size, self.mean, self.std, scale=tuple(d.scale), ratio=tuple(d.ratio), hflip=d.hflip,
                              interpolation=d.interpolation) if d.augment == "rkrc" else
                         EvalTransform(size, self.mean, self.std, crop_pct=1.0, interpolation=d.val_interpolation))
        self.color = None
        if d.randaugment:
            # timm's hparams for it: translation 45% of the image, fill with the mean colour
            hparams = dict(translate_const=int(size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean))
            self.color = rand_augment_transform(d.randaugment, hparams)
            for op in self.color.ops:
                if op.aug_fn.__name__ == "posterize":
                    op.aug_fn = _posterize
        elif d.color_jitter > 0:
            self.color = T.ColorJitter(*(float(d.color_jitter),) * 3)
        self.erase = RandomErasing(d.reprob, mode="pixel", max_count=1, device="cpu") if d.reprob > 0 else None

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        img = self.geometry.crop(img, rng)
        with seeded_globals(rng.integers(0, 2**32, size=4).tolist()):  # after the crop's own draws
            if self.color is not None:
                img = self.color(img)
            x = to_normalized_tensor(img, self.mean, self.std)
            return self.erase(x) if self.erase is not None else x


def build_mixup(cfg: FinetuneConfig, num_classes: int):
    """timm's Mixup (soft targets with label smoothing), or None when Mixup and CutMix are off."""
    if not mixing(cfg):
        return None
    from timm.data import Mixup

    m = cfg.mix
    return Mixup(mixup_alpha=m.mixup, cutmix_alpha=m.cutmix, prob=m.prob, switch_prob=m.switch_prob, mode=m.mode,
                 label_smoothing=m.label_smoothing, num_classes=num_classes)


__all__ = ["seeded_globals", "class_folders", "check_same_classes", "LabeledImages", "collate_labeled",
           "TrainTransform", "build_mixup"]
