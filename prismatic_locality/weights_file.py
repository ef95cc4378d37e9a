"""Read a local weights file (safetensors, or a torch checkpoint) into a flat dict of tensors.

Never runs pickled code: torch files go through ``torch.load(weights_only=True)``. A file that is
not weights fails with one line naming it and what is wrong (empty, truncated, a pickle that needs
code to load, not a weights file at all), instead of a library traceback or a guess about the hub.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import warnings

import torch

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format
PICKLE_PROTO = 0x80        # first byte of a pickle (protocol >= 2): torch's legacy format, or a bare pickle
# wrappers a training script saves the weights under, most preferred first
STATE_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of `path`, unwrapped from a training checkpoint's ``state_dict`` (EMA preferred)."""
    path = str(path)
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"weights file {path} is empty")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(ZIP_MAGIC) or head[0] == PICKLE_PROTO:
        state = _read_torch(path)
    elif path.endswith(".safetensors") or _safetensors_header_len(head) is not None:
        state = _read_safetensors(path, size)
    else:
        raise ValueError(f"weights file {path} is not a weights file (neither safetensors nor a torch "
                         f"checkpoint; it starts with bytes {head.hex(' ')})")
    for key in STATE_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        what = f"a {type(state).__name__}" if not isinstance(state, dict) else "a dict with non-tensor entries"
        raise ValueError(f"weights file {path} holds {what}, not a state dict of tensors")
    return state


def _safetensors_header_len(head: bytes) -> int | None:
    """The header length of a plausible safetensors file (8-byte little-endian length, then JSON)."""
    if len(head) < 8:
        return None
    n = struct.unpack("<Q", head)[0]
    return n if 0 < n < 100 << 20 else None


def _read_safetensors(path: str, size: int) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    # say what is wrong in the user's terms: most often a copy or download cut short
    with open(path, "rb") as f:
        head = f.read(8)
        n = _safetensors_header_len(head)
        header = f.read(n) if n else b""
    if n is None:
        raise ValueError(f"weights file {path} is not a safetensors file ({reason})")
    if 8 + n > size:
        raise ValueError(f"weights file {path} is truncated: {size} bytes, its header alone needs {8 + n}")
    try:
        end = max((t["data_offsets"][1] for k, t in json.loads(header).items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        raise ValueError(f"weights file {path} is a corrupt safetensors file ({reason})") from None
    if 8 + n + end > size:
        raise ValueError(f"weights file {path} is truncated: {size} bytes, its tensors need {8 + n + end}")
    raise ValueError(f"weights file {path} is a corrupt safetensors file ({reason})")


def _read_torch(path: str):
    try:
        with warnings.catch_warnings(record=True) as caught:  # kept only if the file loads: else the error says it all
            warnings.simplefilter("always")
            state = torch.load(path, map_location="cpu", weights_only=True)
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return state
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        if any("truncated" in ln for ln in lines):
            raise ValueError(f"weights file {path} is truncated ({lines[-1]})") from None
        needs = next((m.group(1) for ln in lines if (m := re.search(r"GLOBAL ([\w.]+)", ln))), None)
        what = (f"needs {needs} to load" if needs else "is not one torch's safe loader reads "
                f"({next((ln for ln in lines if 'Unsupported' in ln), lines[-1] if lines else 'unsupported pickle')})")
        raise ValueError(f"weights file {path} is a pickle that {what}; pickled code is never run: save the weights "
                         f"as .safetensors or as a plain state dict") from None
    except (RuntimeError, EOFError, OSError) as e:  # a zip archive cut short, a pickle ending early, ...
        reason = str(e).split(". ")[0].strip() if str(e).strip() else type(e).__name__
        cut_short = isinstance(e, EOFError) or "central directory" in reason or "truncated" in reason
        raise ValueError(f"weights file {path} is {'truncated' if cut_short else 'not a readable torch checkpoint'} "
                         f"({reason})") from None
