"""Training state: everything a killed run needs to continue bit-identically.

``{run_dir}/state/`` is written atomically as a whole directory (`fileio.atomic_dir_write`), so a
kill during a save leaves the previous state intact, or, in the instant between the renames that
swap it, a complete copy beside it that the next run puts back (`fileio.recover_dir`):

- ``model.safetensors``: the student (``encoder.*``, ``decoder.*``), the same keys as an aligned checkpoint;
- ``optimizer.pt``: AdamW's state dict (tensors and numbers only; read with ``weights_only=True``);
- ``state.json``: step, epoch, the target scale (so a resume does not re-estimate it), the full
  config, counters (files skipped or cropped), the log window open at the save (so the first log
  record after a resume averages the same steps as an uninterrupted run's).

Nothing else is needed: data order, augmentation and masks are pure functions of (seed, step), and
the model has no dropout, so there is no RNG state to restore.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..checkpoint import CheckpointError
from ..fileio import atomic_dir_write, read_json, write_json
from .optim import load_optimizer_state

STATE_FORMAT = "prismatic-locality/align-state-v1"
MODEL_FILE, OPTIM_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "state.json"

# Every `AlignConfig` field is in exactly one of these two lists (tests/test_align_config.py checks
# it, so a new field must be classified). A resume refuses a config that differs from the saved one
# in any field not listed as resumable (a field unknown to this version included).
#
# May differ on resume: they change where/how things run, not the result (micro_batch only changes
# how the global batch is accumulated; teacher.weights and data.root may move).
RESUMABLE_CHANGES = (
    "resume", "output_dir", "run_name", "save_every", "save_epoch_checkpoints", "log_every", "validate",
    "wandb", "wandb_project", "device", "compile", "micro_batch", "data.workers", "data.root",
    "teacher.weights", "teacher.aligned", "encoder.attn_impl", "encoder.grad_checkpointing",
)
# Must match: they decide what is trained on, how, and what the result is.
RESULT_FIELDS = (
    "recipe", "objective", "teacher.model", "teacher.pretrained", "teacher.timm_kwargs", "teacher.target", "teacher.masking",
    "teacher.dtype", "encoder.softcap", "decoder.width", "decoder.depth", "decoder.init_values", "masks.kind",
    "masks.complement", "masks.null", "masks.keep_prob", "masks.block_ratio", "data.format", "data.train_split",
    "data.val_split", "data.augment", "data.scale", "data.ratio", "data.hflip", "data.interpolation",
    "data.val_batch_size", "data.val_max_images", "optim.lr", "optim.min_lr", "optim.weight_decay",
    "optim.exclude_norm_bias_from_wd", "optim.betas", "optim.eps", "optim.clip_grad", "optim.warmup_steps",
    "optim.warmup_lr", "loss", "target_scale", "epochs", "max_steps", "global_batch", "seed", "precision",
)


def config_fields(cfg: dict) -> list:
    """The dotted names of a config dict's fields (`teacher.timm_kwargs` is one field, not a group)."""
    return list(_flatten(cfg))


def save_training_state(state_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, info: dict) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    optim_state = optimizer.state_dict()

    def write(tmp: Path):
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": STATE_FORMAT})
        torch.save(optim_state, tmp / OPTIM_FILE)
        write_json(tmp / STATE_FILE, {"format": STATE_FORMAT, **info})

    atomic_dir_write(Path(state_dir), write)


def has_state(state_dir: Path) -> bool:
    return (Path(state_dir) / STATE_FILE).is_file()


def read_state_info(state_dir: Path) -> dict:
    path = Path(state_dir) / STATE_FILE
    info = read_json(path, "no training state", CheckpointError, missing=CheckpointError)
    if info.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: format is {info.get('format')!r}, expected {STATE_FORMAT!r}")
    return info


def load_training_state(state_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    state_dir = Path(state_dir)
    info = read_state_info(state_dir)
    weights = state_dir / MODEL_FILE
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{weights}: unreadable ({e})") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights}: does not match the model (missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")
    try:
        optim_state = torch.load(state_dir / OPTIM_FILE, map_location="cpu", weights_only=True)
        load_optimizer_state(optimizer, optim_state)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{state_dir / OPTIM_FILE}: cannot restore the optimiser ({e})") from None
    return info


def _flatten(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "timm_kwargs":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))  # tuples vs lists, as stored


# Fields added after training states were first written: their value in a state that lacks them.
ADDED_FIELDS = {"objective": "maskembed", "teacher.aligned": None}


def config_mismatch(saved: dict, current: dict, source: str, resumable: tuple = RESUMABLE_CHANGES) -> Optional[str]:
    """A one-line description of the first config field that differs (None if resumable);
    `resumable`: the fields that may change on resume (another command's list, default align's)."""
    a, b = _flatten(_norm(saved)), _flatten(_norm(current))
    a = {**{k: v for k, v in ADDED_FIELDS.items() if k in b}, **a}
    for key in sorted(set(a) | set(b)):
        if key in resumable:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            return (f"{source}: config field '{key}' differs from the checkpoint "
                    f"(checkpoint: {a.get(key, '<absent>')!r}, now: {b.get(key, '<absent>')!r}); "
                    f"use --resume never or another --run_name to start over")
    return None
