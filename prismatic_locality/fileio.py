"""File I/O shared by every command: atomic writes (a file, or a whole directory), JSON, and the
up-front check of an output directory. Standard library only, so a command that only reads and
writes JSON (e.g. ``vlm-compare``) imports no torch.

Writes are atomic: readers (and a run killed mid-write) see the old version or the new one, never
half of one. A directory is written as a temp directory renamed over the old one
(`atomic_dir_write`); `recover_dir` finishes what a kill between the renames left.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional


# atomic_dir_write's working names beside `out_dir`, each ``.{name}.{kind}-{pid}-{random}``:
# tmp (being written, may be incomplete), new (complete, about to replace out_dir), old (the replaced
# version, about to be deleted). A process killed mid-write leaves them behind; `recover_dir` tidies up.
_TMP, _NEW, _OLD = "tmp", "new", "old"
_IN_FLIGHT: set[str] = set()  # working names of this process's writes in progress


def atomic_dir_write(out_dir: Path, write) -> None:
    """Fill a fresh temp directory with `write(tmp)`, then rename it over `out_dir`.

    A kill at any point leaves `out_dir` complete (old or new) or, for the instant between its
    two renames, complete copies beside it, which `recover_dir` (run first by every write and by
    the trainer before it resumes) renames back into place. Files get the permissions of a plain
    ``open()`` (some writers, e.g. safetensors, create 0600 files).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{_TMP}-{os.getpid()}-", dir=out_dir.parent))
    suffix = tmp.name[len(f".{out_dir.name}.{_TMP}-"):]
    new, old = (out_dir.with_name(f".{out_dir.name}.{k}-{suffix}") for k in (_NEW, _OLD))
    names = {tmp.name, new.name, old.name}
    _IN_FLIGHT.update(names)
    try:
        write(tmp)
        _share_like_open(tmp)
        os.replace(tmp, new)           # complete from here on
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(new, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _IN_FLIGHT.difference_update(names)


def recover_dir(out_dir: Path) -> Optional[str]:
    """Finish what a killed `atomic_dir_write` of `out_dir` left: put the newest complete copy in
    place if `out_dir` is missing or a newer complete copy waits beside it, and delete the working
    directories of writers that are gone. Returns a description of what was recovered, or None."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return None
    stale = {_TMP: [], _NEW: [], _OLD: []}
    for entry in os.listdir(out_dir.parent):
        if not entry.startswith(f".{out_dir.name}."):
            continue
        p = out_dir.parent / entry
        kind, _, rest = entry[len(out_dir.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in stale and pid.isdigit() and p.is_dir() and not _writer_alive(p.name, int(pid)):
            stale[kind].append(p)
    recovered = None
    src = (max(stale[_NEW], key=lambda p: p.stat().st_mtime) if stale[_NEW]    # killed after "complete"
           else max(stale[_OLD], key=lambda p: p.stat().st_mtime) if stale[_OLD] and not out_dir.exists()
           else None)                                                           # (a complete old copy)
    if src is not None:
        stale[_NEW if src in stale[_NEW] else _OLD].remove(src)
        if out_dir.exists():  # the version the interrupted write was replacing
            suffix = src.name[len(out_dir.name) + 2:].partition("-")[2]
            aside = out_dir.with_name(f".{out_dir.name}.{_OLD}-{suffix}")
            os.replace(out_dir, aside)
            stale[_OLD].append(aside)
        os.replace(src, out_dir)
        recovered = f"recovered {out_dir} from {src.name} (a write was interrupted between its renames)"
    for p in stale[_TMP] + stale[_NEW] + stale[_OLD]:
        shutil.rmtree(p, ignore_errors=True)
    return recovered


def _writer_alive(name: str, pid: int) -> bool:
    if pid == os.getpid():
        return name in _IN_FLIGHT
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _share_like_open(directory: Path) -> None:
    """Give every file in `directory` the mode a plain open() would (0666 less the umask)."""
    mode = 0o666 & ~_umask()
    for root, _, files in os.walk(directory):
        for f in files:
            os.chmod(os.path.join(root, f), mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic text write (temp file + rename): readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic JSON write."""
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | os.PathLike, what: str, error: type[Exception] = ValueError,
              missing: type[Exception] = FileNotFoundError) -> Any:
    """Parse a JSON file; a missing file raises `missing`, a malformed one `error`, each with a
    message naming the file (`what` says what the file was expected to be)."""
    path = Path(path)
    if not path.is_file():
        raise missing(f"{what}: {path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON ({e})") from None


# Disk space a command needs besides what it writes: below this, it is refused up front.
MIN_FREE_BYTES = 64 << 20


def check_output_dir(path: str | os.PathLike, what: str, min_free_bytes: int = MIN_FREE_BYTES) -> None:
    """Refuse up front (before any compute) an output directory that could not be written: it, or the
    nearest parent that exists, is not a directory, is not writable (read-only mount, permissions,
    immutable), or sits on a disk with less than `min_free_bytes` free. Creates nothing.
    `what` names the setting in the message (e.g. "config field 'output_dir'")."""
    path = Path(path)
    existing = path
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    target = "" if existing == path else f" (the parent of {path})"
    if not existing.is_dir():
        raise ValueError(f"{what}: {existing}{target} is not a directory")
    try:  # the real test: os.access says yes to root even on a read-only mount or an immutable directory
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what}: {existing}{target} is not writable ({e.strerror})") from None
    free = shutil.disk_usage(existing).free
    if free < min_free_bytes:
        raise ValueError(f"{what}: only {free / 2**20:.1f} MiB free on the disk of {existing}{target}; "
                         f"free some space (at least {min_free_bytes >> 20} MiB) or choose another directory")
