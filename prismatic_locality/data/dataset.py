"""Seeded, skip-tolerant image datasets and the global-batch order that drives training.

Determinism design (what makes DDP runs equal single-process runs and resumes bit-exact):

- Epoch e visits the images in a global permutation that is a pure function of (seed, e).
- Global batch g of the epoch is ``perm[g*G : (g+1)*G]``; rank r takes its contiguous slice of it
  and micro-batch j the contiguous slice of that (`GlobalBatchOrder`).
- Image i's augmentation is drawn from a generator seeded by (seed, e, i) (`SeededImages`), so
  DataLoader workers, world size and restarts do not change it.

An unreadable image is skipped: the dataset returns the next readable image in file order instead
(a deterministic substitute, so every micro-batch keeps its size and every DDP rank does the same
work) and reports the skipped file, which the trainer counts (files, not skip events) and logs once.
An image of extreme aspect ratio is centre-cropped first (`transforms.crop_extreme_aspect`, bounding
the work per image) and reported the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .sources import UnreadableImage
from .transforms import MAX_ASPECT, crop_extreme_aspect, is_extreme_aspect

MAX_CONSECUTIVE_UNREADABLE = 64
UNREADABLE, CROPPED = "unreadable", "cropped"  # kinds of the notes a dataset item reports


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


class SeededImages(Dataset):
    """``dataset[(epoch, index)]`` -> (normalised image tensor, notes): one ``(kind, file, message)``
    note per file skipped as `UNREADABLE` to get the image, or `CROPPED` for an extreme aspect ratio."""

    def __init__(self, source, transform: Callable, seed: int):
        self.source = source
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: Tuple[int, int]):
        image, notes, _ = self.load_item(*key)
        return image, notes

    def load_item(self, epoch: int, index: int) -> Tuple[torch.Tensor, List[Tuple[str, str, str]], int]:
        """(image tensor, notes, position of the file actually read: `index` or its substitute)."""
        notes: List[Tuple[str, str, str]] = []
        first_error = None
        tries = min(MAX_CONSECUTIVE_UNREADABLE, len(self.source))
        for attempt in range(tries):
            j = (index + attempt) % len(self.source)
            try:
                img = self.source.load(j)
            except UnreadableImage as e:
                notes.append((UNREADABLE, e.name, f"skipped unreadable image {e}"))
                first_error = first_error or f"{e}"
                continue
            if is_extreme_aspect(img):
                notes.append((CROPPED, self.source.name(j), f"centre-cropped {self.source.name(j)} "
                              f"({img.size[0]}x{img.size[1]} px) to aspect {MAX_ASPECT:g}:1 before resizing"))
                img = crop_extreme_aspect(img)
            # the augmentation is keyed on the slot (index), not on the substitute file
            return self.transform(img, sample_rng(self.seed, epoch, index)), notes, j
        what = f"all {tries} images" if tries == len(self.source) else f"{tries} consecutive images from {self.source.name(index)}"
        raise ValueError(f"{what} are unreadable, e.g. {first_error}")


def collate(batch):
    """-> (images, the notes of all items)."""
    images = torch.stack([b[0] for b in batch])
    notes = [note for b in batch for note in b[1]]
    return images, notes


def surface_worker_errors(loader: Iterable) -> Iterator:
    """Iterate a DataLoader; a user error (ValueError, OSError) raised in a worker process is re-raised
    with its own one-line message, not the worker's traceback that torch folds into it."""
    batches = iter(loader)
    try:
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (ValueError, OSError) as e:
                lines = [ln for ln in str(e).splitlines() if ln.strip()]
                if not lines or "DataLoader worker process" not in lines[0]:
                    raise
                # the traceback's last line is "ValueError: <message>" (or "pkg.module.Error: <message>")
                name, _, message = lines[-1].partition(": ")
                raise type(e)(message if name.split(".")[-1] == type(e).__name__ else lines[-1]) from None
            yield batch
    finally:
        # Stop the workers now, not whenever the iterator is collected: they ignore SIGTERM (the trainer
        # saves before it stops), so left to the interpreter's exit they would be terminated in vain
        # and joined forever.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


@dataclass
class GlobalBatchOrder:
    """Which (epoch, index) items each rank's micro-batches hold, step by step."""

    num_samples: int
    global_batch: int
    micro_batch: int
    world_size: int = 1
    rank: int = 0
    seed: int = 0

    def __post_init__(self):
        per_rank = self.micro_batch * self.world_size
        if self.global_batch % per_rank:
            raise ValueError(
                f"config field 'global_batch': {self.global_batch} is not divisible by micro_batch "
                f"{self.micro_batch} x world size {self.world_size}"
            )
        if self.num_samples < self.global_batch:
            raise ValueError(f"the train split has {self.num_samples} images, fewer than one global batch ({self.global_batch})")

    @property
    def accum_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch  # drop_last, as the reference

    @property
    def rank_batch(self) -> int:
        return self.global_batch // self.world_size

    def rank_slice(self) -> slice:
        return slice(self.rank * self.rank_batch, (self.rank + 1) * self.rank_batch)

    def micro_batches(self, start_step: int, end_step: int) -> Iterator[List[Tuple[int, int]]]:
        """Micro-batches of (epoch, index) for this rank, for optimiser steps [start_step, end_step)."""
        perm, perm_epoch = None, -1
        for step in range(start_step, end_step):
            epoch, g = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = epoch_permutation(self.seed, epoch, self.num_samples), epoch
            mine = perm[g * self.global_batch: (g + 1) * self.global_batch][self.rank_slice()]
            for j in range(self.accum_steps):
                yield [(epoch, int(i)) for i in mine[j * self.micro_batch: (j + 1) * self.micro_batch]]


__all__ = ["SeededImages", "GlobalBatchOrder", "collate", "surface_worker_errors", "epoch_permutation", "sample_rng",
           "UNREADABLE", "CROPPED"]
