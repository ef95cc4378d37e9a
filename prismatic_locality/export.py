"""`locality export`: an aligned checkpoint's backbone as a hub-ready timm / transformers directory.

    locality export runs/demo/aligned exported/ --format timm|transformers [--drop-softcap --tolerance 1e-3]

The directory holds ``config.json`` (timm's hub format: ``architecture``, ``model_args``,
``pretrained_cfg``), ``model.safetensors`` (the encoder f_θ in timm's key layout, head included) and
a model card. With the cap (default) the architecture is ``<base>_softcap`` (`prismatic_locality.hub`:
needs ``import prismatic_locality``); with ``--drop-softcap`` it is the stock timm architecture
``<base>`` with ``num_classes`` = head width and ``global_pool=""``, loadable with timm alone — refused
unless the measured relative feature error on the images is below ``--tolerance``. Either way the
exported model is built back from the written files, as timm / transformers will build it, and its
features compared with ``load_aligned``'s; the error is recorded in config.json and the card.
The decoder g_ψ is not exported (it stays in the aligned checkpoint, for the Prismatic plugin).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from . import hub as H
from . import vit as V

FORMATS = ("timm", "transformers")
DEFAULT_TOLERANCE = 1e-3


def exported_model(directory: str | Path) -> torch.nn.Module:
    """Build a model from an exported directory exactly as timm does for ``hf-hub:`` / ``local-dir:``
    (``create_model(architecture, **model_args)``, then its weights), without a hub lookup."""
    import timm

    from .weights_file import read_weights

    directory = Path(directory)
    cfg = json.loads((directory / H.CONFIG_NAME).read_text())
    model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=cfg["num_classes"],
                              **cfg.get("model_args", {}))
    model.load_state_dict(read_weights(str(directory / H.WEIGHTS_NAME)))
    return model.eval()


def export_config(enc_cfg: dict, drop_softcap: bool, fmt: str, extra: dict) -> dict:
    base = enc_cfg["model"]
    # num_classes (the head's width) is top-level, as in timm's hub configs: TimmWrapper passes its own (0)
    model_args = {"img_size": enc_cfg["img_size"], **enc_cfg.get("timm_kwargs", {})}
    if drop_softcap:
        architecture = base
        # per-token head as the aligned encoder's, unless the teacher's pooling decides its norms (fc_norm)
        model_args.setdefault("global_pool", "")
    else:
        architecture = H.aligned_arch(base)
        model_args.update(softcap=enc_cfg["softcap"], norm_eps=enc_cfg.get("norm_eps", H.DEFAULT_NORM_EPS))
    pretrained_cfg = {**H.preprocessing_cfg(base), "tag": H.TAG, "custom_load": False,
                      "input_size": [3, enc_cfg["img_size"], enc_cfg["img_size"]], "fixed_input_size": True,
                      "mean": list(enc_cfg["mean"]), "std": list(enc_cfg["std"]),
                      "num_classes": enc_cfg["head_out"], "classifier": "head"}
    pretrained_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in pretrained_cfg.items()}
    if fmt == "transformers":  # transformers' TimmWrapper; it finds timm configs by these keys anyway
        extra = {"model_type": "timm_wrapper", **extra}
    return H.hub_config(architecture, model_args, pretrained_cfg, enc_cfg["head_out"], enc_cfg["embed_dim"], extra)


def card(config: dict, exported: dict, fmt: str) -> str:
    """The checkpoint's model card (`checkpoint.model_card`) with the export's loading lines and measured error."""
    from .checkpoint import model_card

    loc = exported["locality"]
    lib = "timm" if fmt == "timm" else "transformers"
    text = model_card(config).replace("library_name: prismatic-locality", f"library_name: {lib}", 1)
    arch = exported["architecture"]
    needs = "" if loc["softcap"] == 0 else "import prismatic_locality  # registers the soft-capped architecture\n"
    err = loc["feature_error"]
    what = ("the cap removed: a stock timm architecture" if loc["softcap"] == 0
            else f"attention soft-capped at {loc['softcap']:g}, as trained")
    return text.split("\n```python")[0] + f"""
## This export

`{arch}`, {what}. Features of the model built from these files against the aligned checkpoint's
on {loc['images']} images ({loc['image_set']}): relative error {err['total']:.3e} (worst image
{err['max_image']:.3e}){f", tolerance {loc['tolerance']:g}" if loc.get('tolerance') is not None else ""}.

```python
{needs}import timm
model = timm.create_model("hf-hub:<org>/<repo>", pretrained=True)   # or "local-dir:<this dir>" (timm >= 1.0.20)
features = model.forward_features(images)                            # (B, tokens, {exported['num_features']})

from transformers import AutoModel                                    # TimmWrapper
model = AutoModel.from_pretrained("<org>/<repo>")                     # .last_hidden_state = the features
```
"""


def export(checkpoint: str | Path, out: str | Path, fmt: str = "timm", drop_softcap: bool = False,
           tolerance: float = DEFAULT_TOLERANCE, images: Optional[str] = None, num_images: int = 256,
           batch_size: int = 32, seed: int = 0) -> dict:
    """Write the export directory atomically; returns its config.json. ValueError (nothing written)
    for ``drop_softcap`` when the measured feature error is not below `tolerance`."""
    from .checkpoint import CheckpointError, load_aligned
    from .fileio import atomic_dir_write, write_json
    from .inspect import feature_error, load_images

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {' | '.join(FORMATS)}, got {fmt!r}")
    if not tolerance > 0:
        raise ValueError(f"--tolerance must be > 0, got {tolerance}")
    aligned = load_aligned(checkpoint, attn_impl="math")
    enc_cfg = aligned.config["encoder"]
    x, source = load_images(aligned.encoder, images, num_images, seed)
    state = {k: v.detach().cpu().contiguous() for k, v in aligned.encoder.state_dict().items()}

    def write(tmp: Path):
        save_file(state, str(tmp / H.WEIGHTS_NAME), metadata={"format": "pt"})  # transformers needs "pt"
        locality = {"checkpoint": str(checkpoint), "trained_softcap": enc_cfg["softcap"],
                    "softcap": 0.0 if drop_softcap else enc_cfg["softcap"], "image_set": source,
                    "images": int(x.shape[0]), "tolerance": tolerance if drop_softcap else None}
        cfg = export_config(enc_cfg, drop_softcap, fmt, {"locality": locality})
        write_json(tmp / H.CONFIG_NAME, cfg)
        try:
            model = exported_model(tmp)
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{checkpoint}: the {cfg['architecture']} export does not load back "
                                  f"({str(e).splitlines()[0]})") from None
        err = feature_error(model, x, aligned.encoder, batch_size, features=lambda m, b: m.forward_features(b))
        locality["feature_error"] = err
        if drop_softcap and not err["total"] < tolerance:
            raise ValueError(f"--drop-softcap refused for {checkpoint}: without the cap the features change by "
                             f"{err['total']:.3e} (relative, on {x.shape[0]} images of {source}), not below "
                             f"--tolerance {tolerance:g}; export with the cap, or raise --tolerance")
        write_json(tmp / H.CONFIG_NAME, cfg)
        (tmp / "README.md").write_text(card(aligned.config, cfg, fmt))
        result.update(cfg)

    result: dict = {}
    atomic_dir_write(Path(out), write)
    return result


def build_parser() -> argparse.ArgumentParser:
    from .cli import ArgumentParser

    p = ArgumentParser(prog="locality export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="aligned checkpoint directory (config.json + model.safetensors)")
    p.add_argument("out", help="directory to write (replaced atomically)")
    p.add_argument("--format", choices=FORMATS, default="timm")
    p.add_argument("--drop-softcap", action="store_true",
                   help="export the stock timm architecture without the attention cap (if the measured error allows)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="largest relative feature error --drop-softcap accepts (default %(default)g)")
    p.add_argument("--images", default=None, help="an ImageFolder to measure on (default: demo scenes)")
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.num_images <= 0 or args.batch_size <= 0:
        p.error(f"--num-images and --batch-size must be > 0, got {args.num_images}/{args.batch_size}")
    from .fileio import check_output_dir

    try:
        check_output_dir(args.out, "out")
        cfg = export(args.checkpoint, args.out, args.format, args.drop_softcap, args.tolerance, args.images,
                     args.num_images, args.batch_size, args.seed)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        p.exit(1, f"locality export: error: {e}\n")
    err = cfg["locality"]["feature_error"]["total"]
    print(f"wrote {args.out}: {cfg['architecture']} ({args.format}), relative feature error {err:.3e} "
          f"on {cfg['locality']['images']} images")
    return 0
