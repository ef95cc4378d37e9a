"""`locality convert`: the paper's released MaskEmbed checkpoints -> our aligned checkpoint directory.

The reference trainer saves timm-style ``.pth.tar`` dicts (docs/faithfulness.md): ``state_dict`` with
``encoder.*`` (the whole student ViT: re-trained final norm, zero-init ``head`` to the decoder
width) and ``decoder.*``; optional ``state_dict_ema``; ``arch`` (the student's timm name); the
optimizer state; and ``args``, a pickled ``argparse.Namespace``.

Reading it never executes pickled code: ``torch.load(weights_only=True)`` with an allow-list of
exactly the plain-data classes the trainer pickles (``argparse.Namespace``, ``pathlib`` paths).
Torch's own restricted unpickler then rebuilds only tensors, containers and those classes; a file
asking for anything else fails with an error instead of running it. (A hand-written unpickler
would have to re-implement torch's tensor storage handling for no gain.)

The student's ``svit_*`` name (timm ViT with tanh soft-capped attention logits) becomes the plain
timm name plus ``softcap``. The student is rebuilt as the trainer built it: the architecture
overrides in ``args`` (``model_kwargs``, then ``student_model_kwargs``, and ``in_chans``) are passed
to timm, and their ``max_attn_val`` is the soft-cap (30 when absent); ``--timm-kwargs`` and
``--softcap`` override the file. The image size and decoder shape are read off the tensors, so no
network and no ``locality_alignment`` install are needed. Whatever still disagrees with the tensors
is one error line naming the file, the mismatch and the architecture that was built.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import pickle
import sys
from pathlib import Path
from typing import Optional

import torch

from . import vit as V
from .checkpoint import CheckpointError, load_aligned, load_module_state, save_aligned, split_state
from .fileio import check_output_dir
from .cli import ArgumentParser
from .decoder import DecoderConfig, MaskEmbedDecoder
from .maskembed import make_encoder

# The only non-tensor classes an official checkpoint may contain.
SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]
REFERENCE_SOFTCAP = 30.0  # `max_attn_val` of the reference's StableAttention (paper App. C)


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def load_official(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (an interrupted download or copy?)")
    try:
        if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        else:  # torch 2.4: process-wide allow-list
            torch.serialization.add_safe_globals(SAFE_GLOBALS)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = next((ln for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), _first_line(e))
        raise CheckpointError(f"{path}: refusing to unpickle it ({first.strip()})") from None
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: not a torch checkpoint, or truncated ({_first_line(e)})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: no 'state_dict' entry; not a MaskEmbed training checkpoint")
    return ckpt


def student_state(ckpt: dict, use_ema: bool = True) -> tuple[dict, str]:
    """The student's weights (EMA preferred, like the reference's loader), wrapper prefixes stripped."""
    which = "state_dict_ema" if use_ema and isinstance(ckpt.get("state_dict_ema"), dict) else "state_dict"
    state = {}
    for k, v in ckpt[which].items():
        k = k.removeprefix("_orig_mod.").removeprefix("module.")
        state[k] = v
    return state, which


def check_finite_state(state: dict, source: str) -> None:
    """A NaN/Inf weight means a corrupt file (or a diverged run): refuse it before anything is written."""
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        n = int((~torch.isfinite(state[bad[0]])).sum())
        more = f" and {len(bad) - 1} other tensor(s) hold" if len(bad) > 1 else " holds"
        raise CheckpointError(f"{source}: {bad[0]}{more} non-finite values (NaN/Inf; {n} of "
                              f"{state[bad[0]].numel()} in the first); the checkpoint is corrupt, nothing was written")


def plain_timm_name(arch: str) -> tuple[str, bool]:
    """``svit_large_patch14_clip_quickgelu_336.openai`` -> (``vit_large_patch14_clip_quickgelu_336.openai``, True)."""
    if arch.startswith("svit_"):
        return arch[1:], True
    return arch, False


def _args_dict(args) -> dict:
    d = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    return {k: (v if isinstance(v, (bool, int, float, str, type(None), list, tuple)) else str(v)) for k, v in d.items()}


def student_kwargs(args) -> dict:
    """The architecture overrides the reference trainer passed to ``create_model`` for the student:
    ``model_kwargs``, then ``student_model_kwargs`` (both ``--x k=v`` dicts), and ``in_chans``."""
    get = (lambda k: getattr(args, k, None)) if isinstance(args, argparse.Namespace) else dict(args or {}).get
    kwargs = {}
    for field in ("model_kwargs", "student_model_kwargs"):
        kwargs.update(get(field) or {})
    if get("in_chans") is not None:
        kwargs["in_chans"] = get("in_chans")
    return kwargs


def _grid_image_size(vit, pos_embed: torch.Tensor) -> int:
    """The image size whose patch grid matches a checkpoint's position embedding."""
    spec = V.vit_spec(vit)
    prefix_in_pe = V.abs_pos_embed(vit).shape[1] - spec.num_patches
    n = pos_embed.shape[1] - prefix_in_pe
    grid = math.isqrt(n)
    if grid * grid != n:
        raise CheckpointError(f"encoder.pos_embed has {pos_embed.shape[1]} positions: not a square patch grid")
    return grid * spec.patch_size


def decoder_config(dec_state: dict, spec: V.ViTSpec, source: str) -> DecoderConfig:
    """The reference decoder's shape, read off its tensors; heads and activation come from the encoder, as the reference builds it."""
    try:
        _, num_tokens, width = dec_state["pos_embed"].shape
        out_dim = dec_state["head.weight"].shape[0]
        hidden = dec_state["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{source}: decoder.{e.args[0]} is missing; not a MaskEmbed decoder") from None
    depth = len({k.split(".")[1] for k in dec_state if k.startswith("blocks.")})
    return DecoderConfig(
        num_tokens=num_tokens,
        num_prefix_tokens=spec.num_prefix_tokens,
        width=width,
        out_dim=out_dim,
        num_heads=spec.num_heads,
        depth=depth,
        mlp_ratio=hidden / width,
        qkv_bias="blocks.0.attn.qkv.bias" in dec_state,
        qk_norm="blocks.0.attn.q_norm.weight" in dec_state,
        init_values=1e-6 if "blocks.0.ls1.gamma" in dec_state else None,
        act=spec.act,
    )


def _build(name: str, kwargs: dict, src: Path):
    try:
        return V.create_vit(name, pretrained=False, **kwargs)
    except Exception as e:  # timm raises TypeError/ValueError/AssertionError/KeyError for bad kwargs
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{src}: cannot build '{name}' with architecture overrides {kwargs} ({msg})") from None


def convert(src: str | Path, out: str | Path, *, use_ema: bool = True, model: Optional[str] = None,
            softcap: Optional[float] = None, timm_kwargs: Optional[dict] = None) -> Path:
    """Convert one official checkpoint; returns the written aligned checkpoint directory."""
    src = Path(src)
    check_output_dir(out, "output directory")  # before reading a multi-GB file
    ckpt = load_official(src)
    args = ckpt.get("args")
    arch = model or ckpt.get("arch") or getattr(args, "model", None)
    if not arch:
        raise CheckpointError(f"{src}: no 'arch' entry naming the student model; pass --model <timm name>")
    name, is_svit = plain_timm_name(arch)
    # the student's architecture as trained: the file's overrides, then ours (explicit flags win)
    from_args = student_kwargs(args)
    cap = from_args.pop("max_attn_val", getattr(args, "max_attn_val", None))  # an svit_* kwarg, not timm's
    if cap is not None and not is_svit and softcap is None:
        raise CheckpointError(f"{src}: args set max_attn_val={cap} but the student '{arch}' is not an svit_* "
                              "model; pass --model or --softcap")
    if softcap is None:
        softcap = float(REFERENCE_SOFTCAP if cap is None else cap) if is_svit else 0.0
    timm_kwargs = {**from_args, **(timm_kwargs or {})}

    state, which = student_state(ckpt, use_ema)
    check_finite_state(state, f"{src} [{which}]")
    enc_state, dec_state = split_state(state)
    if "head.weight" not in enc_state:
        raise CheckpointError(f"{src}: {which} has no encoder.head.weight; not a MaskEmbed student checkpoint")

    vit = _build(name, timm_kwargs, src)
    pos_embed = V.abs_pos_embed(vit)
    if "pos_embed" in enc_state and pos_embed is not None and enc_state["pos_embed"].shape != pos_embed.shape:
        timm_kwargs["img_size"] = _grid_image_size(vit, enc_state["pos_embed"])
        vit = _build(name, timm_kwargs, src)
    encoder = make_encoder(vit, enc_state["head.weight"].shape[0], softcap=softcap, attn_impl="math")
    decoder = MaskEmbedDecoder(decoder_config(dec_state, V.vit_spec(encoder), str(src)))
    built = f"student built as '{name}' with {timm_kwargs or 'no overrides'}, softcap {softcap}"
    try:
        load_module_state(encoder, enc_state, "encoder", f"{src} [{which}]")
        load_module_state(decoder, dec_state, "decoder", f"{src} [{which}]")
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{src} [{which}]: {str(e).splitlines()[1].strip()} ({built})") from None
    except CheckpointError as e:  # missing / unexpected keys
        raise CheckpointError(f"{e} ({built})") from None

    extra = {"converted_from": {
        "file": str(src.resolve()), "arch": arch, "weights": which, "epoch": ckpt.get("epoch"),
        "metric": ckpt.get("metric"), "args": _args_dict(args),
    }}
    out = save_aligned(out, encoder, decoder, model_name=name, softcap=softcap, timm_kwargs=timm_kwargs, extra=extra)

    # The written directory must reproduce the student exactly.
    back = load_aligned(out)
    for mine, theirs, what in ((back.encoder, encoder, "encoder"), (back.decoder, decoder, "decoder")):
        ref = theirs.state_dict()
        for k, v in mine.state_dict().items():
            if not torch.equal(v, ref[k]):
                raise CheckpointError(f"{out}: {what}.{k} differs after the round trip")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = ArgumentParser(
        prog="locality convert",
        description="Convert a released MaskEmbed .pth.tar checkpoint (encoder.*/decoder.*, pickled args) into an "
        "aligned checkpoint directory (config.json + model.safetensors), without executing pickled code.",
    )
    p.add_argument("src", help="the .pth.tar file (e.g. model_best.pth.tar)")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--no-ema", action="store_true", help="use state_dict even if state_dict_ema is present")
    p.add_argument("--model", help="timm name of the student (default: the file's 'arch'); svit_* names map to vit_* + soft-cap")
    p.add_argument("--softcap", type=float, help=f"attention soft-cap (default: the file's max_attn_val, else {REFERENCE_SOFTCAP}, for svit_* students; else none)")
    p.add_argument("--timm-kwargs", default="{}", help='JSON architecture overrides for timm.create_model, on top of the file\'s model_kwargs, e.g. \'{"img_size": 224}\'')
    a = p.parse_args(argv)
    try:
        kwargs = json.loads(a.timm_kwargs)
    except json.JSONDecodeError as e:
        p.error(f"--timm-kwargs: invalid JSON ({e})")
    if not isinstance(kwargs, dict):
        p.error("--timm-kwargs: must be a JSON object")
    try:
        out = convert(a.src, a.out, use_ema=not a.no_ema, model=a.model, softcap=a.softcap, timm_kwargs=kwargs)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"locality convert: error: {e}", file=sys.stderr)
        return 2
    cfg = json.loads((out / "config.json").read_text())
    enc = cfg["encoder"]
    print(f"wrote {out}: {enc['model']} ({enc['num_tokens']} tokens x {enc['embed_dim']}, softcap {enc['softcap']}), "
          f"decoder {cfg['decoder']['depth']}x{cfg['decoder']['width']} from {cfg['converted_from']['weights']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
