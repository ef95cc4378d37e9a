"""Image sources: random access to the i-th image of a split, whatever the storage.

MaskEmbed needs no labels, so a source is just an ordered list of images:

- `ImageFolderSource`: every image file found recursively under ``{root}/{split}``, sorted by
  path. Covers the ImageNet-1k/21k ``{split}/<class>/*.JPEG`` layout and the demo scenes'
  ``{split}/images/*.png``.
- `TarShardSource`: webdataset shards (``{root}/{split}/*.tar`` or a brace pattern such as
  ``/data/in21k/train-{000000..001023}.tar``). The tar headers are indexed once (no image is
  decoded), after which the i-th image is read by seeking to its byte offset. This gives shards
  the same guarantees as a folder (global shuffle, exact resume, world-size-independent order) at
  the price of random reads; it needs a seekable file system (local disk, NFS, a FUSE mount), not an
  HTTP/object-store stream.

Both return RGB PIL images from `load(i)` and raise `UnreadableImage` (naming the file) for a file
that cannot be decoded, which the dataset turns into a counted, logged skip.
"""
from __future__ import annotations

import glob
import io
import logging
import os
import tarfile
from pathlib import Path
from typing import List, Tuple

import numpy as np
from PIL import Image

from ..choices import DATA_FORMATS

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# webdataset keys, most preferred first, when one sample holds several encodings
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class UnreadableImage(Exception):
    """A file that is not a decodable image. ``name`` is the file (or shard:member) it came from."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name


def decode_rgb(data_or_path, name: str) -> Image.Image:
    """Open and fully decode an image (so truncation is caught here, not in a transform)."""
    try:
        with Image.open(data_or_path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL raises UnidentifiedImageError (an OSError) for non-images, OSError for truncation
        raise UnreadableImage(name, f"{type(e).__name__}: {e}") from None


class ImageFolderSource:
    """All image files under a directory, recursively, in sorted path order."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.directory}")
        paths: List[str] = []
        for dirpath, dirnames, filenames in os.walk(self.directory, followlinks=True):
            dirnames.sort()
            paths += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        if not paths:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {self.directory}")
        # One numpy buffer, not millions of str objects: forked DataLoader workers share it instead of
        # copying every page that a refcount update touches (IN21k has ~13M paths).
        self._paths = np.array([p.encode() for p in paths], dtype=np.bytes_)

    def __len__(self) -> int:
        return len(self._paths)

    def name(self, i: int) -> str:
        return self._paths[i].decode()

    def load(self, i: int) -> Image.Image:
        path = self.name(i)
        return decode_rgb(path, path)


def _sample_key(member_name: str) -> Tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename, ext = the rest."""
    d, base = os.path.split(member_name)
    stem, _, ext = base.partition(".")
    return os.path.join(d, stem), ext.lower()


class TarShardSource:
    """Images in webdataset tar shards, indexed by byte offset for random access.

    Order: shards in the order given (sorted when globbed), samples in tar order within a shard.
    A damaged shard is indexed around the damage: past a garbled member header the index resumes at
    the next valid header, a truncated shard up to the cut. Each damaged shard is counted
    (`damaged_shards`) and logged with where it is damaged and how many samples were lost.
    """

    def __init__(self, shards: List[str]):
        if not shards:
            raise ValueError("no .tar shards given")
        self.shards = list(shards)
        entries: List[Tuple[int, int, int, str]] = []  # (shard, offset, size, member name)
        self.damaged_shards = 0
        for s, path in enumerate(self.shards):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"shard not found: {path}")
            entries += self._index_shard(s, path)
        if not entries:
            raise ValueError(f"no images (keys {', '.join(WDS_IMAGE_KEYS)}) in {len(self.shards)} shard(s), e.g. {self.shards[0]}")
        # numpy arrays rather than a list of tuples, for the same reason as ImageFolderSource
        self.shard_of = np.array([e[0] for e in entries], dtype=np.int32)
        self.offset = np.array([e[1] for e in entries], dtype=np.int64)
        self.size = np.array([e[2] for e in entries], dtype=np.int64)
        self.member = np.array([e[3].encode() for e in entries], dtype=np.bytes_)

    def _index_shard(self, s: int, path: str) -> List[Tuple[int, int, int, str]]:
        best: dict = {}  # key -> (priority, offset, size, name), insertion-ordered = tar order
        keys = set()     # every sample key seen, with or without an image
        file_size = os.path.getsize(path)
        covered = 0      # end of the last member read: the bytes up to here belong to members
        gaps: List[Tuple[int, int]] = []
        error = None
        try:
            # ignore_zeros: past a garbled header, look for the next valid one (plain tarfile stops
            # there quietly, as if the archive had ended); the bytes skipped are checked below
            with tarfile.open(path, mode="r:", ignore_zeros=True) as tar:
                for m in tar:
                    if m.offset > covered:
                        gaps.append((covered, m.offset))
                    covered = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    if not m.isfile():
                        continue
                    key, ext = _sample_key(m.name)
                    keys.add(key)
                    if ext in WDS_IMAGE_KEYS:
                        prio = WDS_IMAGE_KEYS.index(ext)
                        if key not in best or prio < best[key][0]:
                            best[key] = (prio, m.offset_data, m.size, m.name)
        except (tarfile.TarError, OSError) as e:
            error = e
        if covered < file_size:
            gaps.append((covered, file_size))
        # a healthy archive has only zero blocks outside its members (end marker, record padding)
        damaged = [(a, b) for a, b in gaps if not _all_zero(path, a, b)]
        if error is not None or covered > file_size or damaged:
            self.damaged_shards += 1
            if damaged:
                where = ", ".join(f"{b - a} bytes at byte {a}" for a, b in damaged[:3])
                # samples left without an image; each unreadable stretch held at least one member
                lost = max(len(keys - best.keys()), len(damaged))
                log.warning("shard %s is damaged: unreadable member headers (%s) were skipped; %d sample(s) lost, "
                            "%d indexed", path, where, lost, len(best))
            else:
                log.warning("shard %s is damaged: truncated at byte %d (%s); the samples after the cut are lost, "
                            "%d indexed before it", path, file_size, error or "the last member is cut", len(best))
        return [(s, off, size, name) for _, off, size, name in best.values()]

    def __len__(self) -> int:
        return len(self.offset)

    def name(self, i: int) -> str:
        return f"{self.shards[self.shard_of[i]]}:{self.member[i].decode()}"

    def load(self, i: int) -> Image.Image:
        size = int(self.size[i])
        with open(self.shards[self.shard_of[i]], "rb") as f:
            f.seek(int(self.offset[i]))
            data = f.read(size)
        if len(data) != size:
            raise UnreadableImage(self.name(i), "member truncated")
        return decode_rgb(io.BytesIO(data), self.name(i))


def _all_zero(path: str, start: int, end: int, chunk: int = 1 << 20) -> bool:
    with open(path, "rb") as f:
        f.seek(start)
        while start < end:
            data = f.read(min(chunk, end - start))
            if not data:
                return True
            if data.count(0) != len(data):
                return False
            start += len(data)
    return True


def expand_shards(pattern: str) -> List[str]:
    """A brace pattern (``train-{0000..0127}.tar``) and/or glob, expanded in a stable order."""
    from braceexpand import braceexpand  # a webdataset dependency

    out: List[str] = []
    for p in braceexpand(pattern):
        out += sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
    return out


def open_source(root: str, split: str, format: str = "auto") -> "ImageFolderSource | TarShardSource":
    """The images of one split.

    format = folder: ``{root}/{split}`` is an image tree.
             wds:    ``{root}/{split}/*.tar``, or `split` is itself a brace/glob pattern of shards
                     (absolute, or relative to `root`).
             auto:   wds if the split is a pattern or a folder holding .tar files, else folder.
    """
    if format not in DATA_FORMATS:
        raise ValueError(f"config field 'data.format': '{format}' is not one of {' | '.join(DATA_FORMATS)}")
    is_pattern = any(c in split for c in "{*?[") or split.endswith(".tar")
    directory = os.path.join(root, split)
    if format == "auto":
        format = "wds" if is_pattern or glob.glob(os.path.join(directory, "*.tar")) else "folder"
    if format == "folder":
        return ImageFolderSource(directory)
    pattern = os.path.join(root, split) if is_pattern else os.path.join(directory, "*.tar")
    shards = expand_shards(pattern)
    if not shards:
        raise FileNotFoundError(f"no .tar shards match {pattern}")
    return TarShardSource(shards)


__all__ = ["UnreadableImage", "decode_rgb", "ImageFolderSource", "TarShardSource", "expand_shards", "open_source",
           "IMAGE_EXTENSIONS"]
