"""On-disk cache of frozen features and probing targets.

The reference recomputes the frozen backbone at every step of every epoch; features are
deterministic (no augmentation), so we compute them once and memory-map them afterwards. Later
epochs, other heads and the local/global runs all reuse the same files.

Two caches under `cache_dir`, each a directory ``<kind>-<key>/`` with ``.npy`` arrays and a
``meta.json`` written last:

- ``labels-<key>``:   patch targets (N, P*P, ceil(C/8)) uint8 bit-packed, image targets
                      (N, ceil(C/8)), class pixel fractions (N, C) float32.
                      key = dataset fingerprint (kind, root, split, every file's name/size/mtime)
                      + resolution + patch size + number of classes. Shared by all backbones.
- ``features-<key>``: (N, T, D) float16. key = backbone fingerprint (weights, architecture,
                      soft-caps) + dataset fingerprint + resolution + mean/std + compute precision
                      (`precision.py`; bf16 also keyed by the device type).

A cache is built in a hidden ``.<kind>-<key>.partial`` directory and renamed into place only when
complete, so a killed extraction never leaves a directory that is taken as a valid cache. The
partial directory records how many images it holds (``progress.json``, written after the arrays
are flushed, every `PROGRESS_EVERY_S` seconds): a rerun continues from there with the same
batches, so a resumed extraction writes the same bytes as an uninterrupted one. A lock file
makes a second process wait for the first instead of writing the same files (it logs that it waits
and for whom, and then reuses what the first one wrote).

A finished cache whose files are damaged (truncated by a full disk or a partial copy) is an error
naming the directory to delete; the next run rebuilds it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .. import precision as P
from ..fileio import write_json
from .backbone import Backbone
from .datasets import ProbeDataset

log = logging.getLogger(__name__)

CACHE_VERSION = "probe-cache-v1"
PROGRESS_EVERY_S = 30.0  # how often a partial extraction records its progress (flushing the arrays)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "prismatic-locality" / "probe"


@dataclass
class ProbeSplit:
    """One split's cached arrays (memory-mapped, read-only) and its dataset."""

    features: np.ndarray       # (N, T, D) float16
    patch: np.ndarray          # (N, P*P, ceil(C/8)) uint8, bit-packed local targets
    image: np.ndarray          # (N, ceil(C/8)) uint8, bit-packed global targets
    fractions: np.ndarray      # (N, C) float32, pixel fraction of each class (object size)
    dataset: ProbeDataset
    features_dir: Path
    labels_dir: Path
    features_cached: bool      # True if the features came from an existing cache

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def __len__(self) -> int:
        return self.features.shape[0]


def _key(*parts) -> str:
    return hashlib.blake2b("|".join(map(str, (CACHE_VERSION, *parts))).encode(), digest_size=12).hexdigest()


def labels_key(ds: ProbeDataset) -> str:
    return _key("labels", ds.fingerprint(), ds.size, ds.patch_size, ds.num_classes)


def features_key(backbone: Backbone, ds: ProbeDataset, precision: str, device: torch.device | str = "cpu") -> str:
    s = backbone.spec
    # bf16 results depend on the device's kernels, so bf16 is keyed per device type (fp32 keys as before)
    how = precision if precision == "fp32" else f"{precision}-{torch.device(device).type}"
    return _key("features", backbone.fingerprint(), ds.fingerprint(), s.img_size, s.mean, s.std, how)


def _complete(d: Path) -> bool:
    return (d / "meta.json").is_file()


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished temp dir into place; if another process won the race, keep theirs."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not _complete(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


class _Partial:
    """The arrays of one cache being extracted, in ``.<name>.partial/``, resumable.

    `done` images (a multiple of the batch size) are valid; `arrays` maps file stem -> memmap."""

    def __init__(self, final: Path, shapes: dict[str, tuple[tuple[int, ...], str]], batch_size: int):
        self.final, self.dir = final, final.parent / f".{final.name}.partial"
        plan = {"shapes": {k: [list(shape), dtype] for k, (shape, dtype) in shapes.items()}, "batch_size": batch_size}
        self.done, mode = 0, "w+"
        progress = self.dir / "progress.json"
        if progress.is_file():
            saved = json.loads(progress.read_text())
            if {k: saved.get(k) for k in plan} == plan:
                self.done, mode = saved["done"], "r+"
                log.info("%s: resuming a partial extraction at %d images", final.name, self.done)
            else:
                log.warning("%s: discarding a partial extraction made with other shapes or batch size", final.name)
        if mode == "w+":
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir()
        self.plan = plan
        self.arrays = {k: np.lib.format.open_memmap(self.dir / f"{k}.npy", mode, np.dtype(dtype), shape)
                       for k, (shape, dtype) in shapes.items()}

    def record(self, done: int) -> None:
        """Flush the arrays, then say that the first `done` images are in them."""
        for a in self.arrays.values():
            a.flush()
        write_json(self.dir / "progress.json", {**self.plan, "done": done})
        self.done = done

    def finish(self, meta: dict) -> None:
        for a in self.arrays.values():
            a.flush()
        self.arrays.clear()  # drop the memmaps before the rename
        (self.dir / "progress.json").unlink(missing_ok=True)
        write_json(self.dir / "meta.json", meta)
        _publish(self.dir, self.final)


def build_split(ds: ProbeDataset, backbone: Backbone, cache_dir: str | os.PathLike | None = None, *,
                batch_size: int = 64, num_workers: int = 0, device: str | torch.device = "cpu",
                precision: str = "auto", desc: str = "") -> ProbeSplit:
    """Return the split's cached features and targets, extracting whatever is missing in one pass."""
    device = torch.device(device)
    precision = P.resolve(precision, device, "extract precision")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    s = backbone.spec
    if (ds.size, ds.patch_size) != (s.img_size, s.patch_size):
        raise ValueError(f"dataset prepared for {ds.size}px/{ds.patch_size}px patches, backbone is {s.img_size}/{s.patch_size}")
    lab_dir = cache_dir / f"labels-{labels_key(ds)}"
    feat_dir = cache_dir / f"features-{features_key(backbone, ds, precision, device)}"
    need_labels, need_features = not _complete(lab_dir), not _complete(feat_dir)
    extracted_features = False
    if need_labels or need_features:
        extracted_features = _extract(ds, backbone if need_features else None, lab_dir if need_labels else None,
                                      feat_dir if need_features else None, batch_size, num_workers, device,
                                      precision, desc)
    if not extracted_features:
        log.info("%s: reusing cached features %s", desc or ds.spec.split, feat_dir)
    feats = _open_cached(feat_dir, "features")
    patch = _open_cached(lab_dir, "patch")
    image = _open_cached(lab_dir, "image")
    fractions = _open_cached(lab_dir, "fractions")
    n = len(ds)
    if not (feats.shape[0] == patch.shape[0] == n and feats.shape[1:] == (s.num_tokens, s.embed_dim)
            and patch.shape[1] == s.num_patches):
        raise ValueError(f"cache {feat_dir} / {lab_dir} does not match the dataset ({n} images) "
                         f"and backbone ({s.num_tokens} tokens x {s.embed_dim}); delete it and rerun")
    return ProbeSplit(feats, patch, image, fractions, ds, feat_dir, lab_dir, not extracted_features)


def _open_cached(d: Path, name: str) -> np.ndarray:
    """Memory-map one array of a finished cache; a damaged file is one line naming the cache."""
    try:
        return np.load(d / f"{name}.npy", mmap_mode="r")
    except (OSError, ValueError) as e:  # e.g. "mmap length is greater than file size" for a truncated file
        raise ValueError(f"cache {d} is damaged ({name}.npy: {e}); delete that directory and rerun to "
                         f"rebuild it") from None


@contextlib.contextmanager
def _locked(final: Path):
    """Hold ``.<name>.lock`` beside a cache: a second process extracting it waits for the first.
    The holder writes who it is into the lock file, so that a waiter can say whom it waits for."""
    path = final.parent / f".{final.name}.lock"
    with open(path, "a+") as lock:  # not "w": that would erase the holder's note
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            log.warning("%s is being extracted by %s; waiting for it to finish (lock file %s)", final.name, holder, path)
            t0 = time.perf_counter()
            fcntl.flock(lock, fcntl.LOCK_EX)
            log.info("%s: the other extraction ended after %.0f s", final.name, time.perf_counter() - t0)
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        lock.flush()
        yield


def _extract(ds: ProbeDataset, backbone: Optional[Backbone], lab_dir: Optional[Path], feat_dir: Optional[Path],
             batch_size: int, num_workers: int, device: torch.device, precision: str, desc: str) -> bool:
    """Extract what is missing; returns whether the features were extracted here (False: another
    process finished them while this one waited for the lock)."""
    with contextlib.ExitStack() as locks:
        for d in (lab_dir, feat_dir):  # always this order, so two processes cannot deadlock
            if d is not None:
                locks.enter_context(_locked(d))
        # another process may have finished one of them while we waited
        lab_dir = None if lab_dir is None or _complete(lab_dir) else lab_dir
        feat_dir, backbone = (None, None) if feat_dir is None or _complete(feat_dir) else (feat_dir, backbone)
        if lab_dir is None and feat_dir is None:
            return False
        ds.with_images, ds.with_labels = backbone is not None, lab_dir is not None
        try:
            _extract_locked(ds, backbone, lab_dir, feat_dir, batch_size, num_workers, device, precision, desc)
        finally:
            ds.with_images = ds.with_labels = True
        return feat_dir is not None


def _extract_locked(ds: ProbeDataset, backbone: Optional[Backbone], lab_dir: Optional[Path],
                    feat_dir: Optional[Path], batch_size: int, num_workers: int, device: torch.device,
                    precision: str, desc: str) -> None:
    n, s, C = len(ds), ds.size, ds.num_classes
    nb = (C + 7) // 8
    parts = {}
    if lab_dir is not None:
        grid = ds.size // ds.patch_size
        parts["labels"] = _Partial(lab_dir, {"patch": ((n, grid * grid, nb), "uint8"), "image": ((n, nb), "uint8"),
                                             "fractions": ((n, C), "float32")}, batch_size)
    if backbone is not None:
        sp = backbone.spec
        parts["features"] = _Partial(feat_dir, {"features": ((n, sp.num_tokens, sp.embed_dim), "float16")}, batch_size)
        backbone.model.to(device)
    start_at = min(p.done for p in parts.values())  # whole batches, so the remaining batches are the same
    loader = DataLoader(Subset(ds, range(start_at, n)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    what = " + ".join(parts)
    start = last_record = time.perf_counter()
    attention = P.switched_attention(precision, device, backbone.model) if backbone is not None else contextlib.nullcontext()
    with attention, tqdm(total=n, initial=start_at, desc=f"{desc or ds.spec.split}: {what}", unit="img",
                         dynamic_ncols=True) as bar:
        for batch in loader:
            idx = batch["index"].numpy()
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            if "labels" in parts:
                a = parts["labels"].arrays
                a["patch"][lo:hi] = batch["patch"].numpy()
                a["image"][lo:hi] = batch["image_labels"].numpy()
                a["fractions"][lo:hi] = batch["fractions"].numpy()
            if "features" in parts:
                x = backbone.normalize(batch["image"].to(device, non_blocking=True))
                with P.autocast(precision, device):
                    f = backbone.features(x)
                parts["features"].arrays["features"][lo:hi] = f.to(torch.float16).cpu().numpy()
            bar.update(hi - lo)
            if time.perf_counter() - last_record >= PROGRESS_EVERY_S and hi < n:
                for p in parts.values():
                    p.record(hi)
                last_record = time.perf_counter()
    seconds = time.perf_counter() - start
    meta = {"version": CACHE_VERSION, "dataset": ds.spec.name, "split": ds.spec.split, "root": str(ds.spec.image_dir),
            "num_images": n, "img_size": s, "patch_size": ds.patch_size, "num_classes": C,
            "seconds": round(seconds, 3), "resumed_at": start_at}
    if "labels" in parts:
        parts["labels"].finish(meta)
    if "features" in parts:
        parts["features"].finish({**meta, "backbone": backbone.describe(), "precision": precision,
                                  "autocast_device": device.type if precision == "bf16" else None,
                                  "images_per_s": round((n - start_at) / max(seconds, 1e-9), 2)})
