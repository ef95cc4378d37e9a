"""`locality inspect`: what the attention soft-cap does in a trained aligned encoder.

MaskEmbed trains the encoder with attention logits soft-capped as ``cap * tanh(s / cap)`` (paper
App. C). No stock ViT implementation has that cap, so whether it can be dropped after training
decides whether an aligned checkpoint is a plain timm checkpoint. This command measures, on an
image set (default: demo scenes, or any ImageFolder):

- per block, the distribution of the raw logits s = q k^T / sqrt(d) *before* the cap: the fraction
  with |s| above 5, 10, 20 (with cap 30, ``cap * tanh(s / cap)`` is below s by 0.9 %, 3.5 % and
  12.6 % there) and the largest |s| seen;
- the relative error of the final features when the cap is removed at inference
  (||f_nocap - f|| / ||f|| over all images and tokens, and the worst single image);
- with ``--probe``, the local probe's macro recall (the probing benchmark's head, demo scenes) with
  and without the cap.

Outputs (atomic): ``inspect.json``, ``inspect.txt`` (the table) and ``inspect.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from . import vit as V

THRESHOLDS = (5.0, 10.0, 20.0)
DEFAULT_IMAGES = 256


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def demo_images(n: int, img_size: int, mean, std, seed: int = 0) -> torch.Tensor:
    """`n` val demo scenes (prismatic_locality.demo.scenes), resized to the encoder's input and normalised."""
    from .demo import scenes as S

    x = S.to_tensor(S.make_scenes(n, "val", seed, progress=False).images, mean, std)
    if x.shape[-1] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    return x


def folder_images(root: str | Path, n: int, img_size: int, mean, std) -> torch.Tensor:
    """The first `n` images of a torchvision ImageFolder (class sub-directories), resized and centre-cropped."""
    from torchvision import datasets, transforms

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    tf = transforms.Compose([transforms.Resize(img_size), transforms.CenterCrop(img_size), transforms.ToTensor(),
                             transforms.Normalize(mean, std)])
    try:
        ds = datasets.ImageFolder(str(root), transform=tf)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders / no images
        raise ValueError(f"{root}: not an ImageFolder ({str(e).splitlines()[0]})") from None
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


class LogitStats:
    """Running per-block statistics of the raw attention logits (hooked on each `SoftCapAttention`)."""

    def __init__(self, encoder: torch.nn.Module, thresholds: Iterable[float] = THRESHOLDS):
        self.thresholds = tuple(float(t) for t in thresholds)
        self.attns = [blk.attn for blk in encoder.blocks]
        if not all(isinstance(a, V.SoftCapAttention) for a in self.attns):
            raise ValueError("the encoder's attention is not SoftCapAttention (not an aligned encoder?)")
        d = len(self.attns)
        self.count = [0] * d
        self.above = [[0] * len(self.thresholds) for _ in range(d)]
        self.max_abs = [0.0] * d
        self.sum_abs = [0.0] * d
        self._handles = []

    def __enter__(self):
        for i, attn in enumerate(self.attns):
            self._handles.append(attn.register_forward_pre_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def _hook(self, i: int):
        def hook(module, args, kwargs):
            s = module.logits(args[0], kwargs.get("rope")).abs().float()
            self.count[i] += s.numel()
            self.max_abs[i] = max(self.max_abs[i], float(s.max()))
            self.sum_abs[i] += float(s.sum())
            for j, t in enumerate(self.thresholds):
                self.above[i][j] += int((s > t).sum())
        return hook

    def rows(self) -> list[dict]:
        return [{"block": i, "frac_above": {f"{t:g}": self.above[i][j] / max(self.count[i], 1)
                                            for j, t in enumerate(self.thresholds)},
                 "max_abs": self.max_abs[i], "mean_abs": self.sum_abs[i] / max(self.count[i], 1)}
                for i in range(len(self.attns))]


@torch.no_grad()
def feature_error(encoder: torch.nn.Module, images: torch.Tensor, reference: torch.nn.Module,
                  batch_size: int = 32, features=None) -> dict:
    """Relative error of `encoder`'s final features against `reference`'s on `images`:
    ``total`` = ||f - f_ref|| / ||f_ref|| over everything, ``max_image`` = the worst image's."""
    from .maskembed import aligned_features

    features = features or aligned_features
    num = den = 0.0
    worst = 0.0
    for x in images.split(batch_size):
        ref = aligned_features(reference, x).double()
        out = features(encoder, x).double()
        d2 = (out - ref).pow(2).flatten(1).sum(1)
        r2 = ref.pow(2).flatten(1).sum(1)
        num, den = num + float(d2.sum()), den + float(r2.sum())
        worst = max(worst, float((d2 / r2.clamp_min(1e-30)).sqrt().max()))
    return {"total": math.sqrt(num / max(den, 1e-30)), "max_image": worst}


@torch.no_grad()
def inspect_encoder(encoder: torch.nn.Module, images: torch.Tensor, batch_size: int = 32,
                    thresholds: Iterable[float] = THRESHOLDS) -> dict:
    """Per-block logit statistics of a soft-capped encoder on `images`, and the feature error with
    the cap removed. The encoder is left unchanged."""
    from .maskembed import aligned_features

    encoder = encoder.eval()
    cap = V.softcap_of(encoder)
    if cap == 0:  # trained without a cap (plain attention): measure its logits through cap-0 wrappers
        encoder = _logits_visible(encoder)
    stats = LogitStats(encoder, thresholds)
    with stats:
        for x in images.split(batch_size):
            aligned_features(encoder, x)
    uncapped = _uncapped(encoder) if cap else encoder  # no cap to remove: the error is 0 by definition
    return {
        "softcap": cap,
        "images": int(images.shape[0]),
        "thresholds": list(stats.thresholds),
        "blocks": stats.rows(),
        "uncapped_feature_error": feature_error(uncapped, images, encoder, batch_size),
    }


@torch.no_grad()
def _logits_visible(encoder: torch.nn.Module) -> torch.nn.Module:
    """A copy of a plain-attention encoder whose blocks are `SoftCapAttention` with cap 0: the same
    function (softmax(q kᵀ · scale) v), with the logits exposed to `LogitStats`."""
    m = copy.deepcopy(encoder)
    for blk in m.blocks:
        blk.attn = V.SoftCapAttention(blk.attn, cap=0.0, impl="math")
    return m


@torch.no_grad()
def _uncapped(encoder: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(encoder)
    V.set_softcap(m, 0)
    return m


def probe_change(encoder: torch.nn.Module, work_dir: Path, n_train: int = 3000, n_val: int = 1000,
                 epochs: int = 10, seed: int = 0) -> dict:
    """Local probe macro recall (the probing benchmark's head and metric, demo scenes; the demo's probe
    sizes by default) with and without the cap; ``delta_points`` = 100 · (uncapped − capped). Scenes and
    feature caches go in `work_dir`."""
    from .demo import scenes as S
    from .probe.backbone import Backbone
    from .probe.datasets import ProbeDataset
    from .probe.features import build_split
    from .probe.train import HeadConfig, ProbeOptimConfig, fit_probe

    root = Path(work_dir) / "scenes"
    S.build_dataset(root, n_train, n_val, seed, progress=False)
    spec = V.vit_spec(encoder)
    optim = ProbeOptimConfig(lr=2e-3, epochs=epochs, batch_size=32, warmup_steps=50, precision="fp32")
    recall = {}
    for name, enc in (("capped", encoder), ("uncapped", _uncapped(encoder))):
        backbone = Backbone(enc, "aligned", name)
        splits = {split: build_split(ProbeDataset("demo", root, split, spec.img_size, spec.patch_size), backbone,
                                     Path(work_dir) / "cache", batch_size=64, num_workers=0, device="cpu",
                                     precision="fp32", desc=f"{name} {split}")
                  for split in S.SPLITS}
        r, _ = fit_probe(splits["train"], splits["val"], "local", spec.num_heads, HeadConfig(), optim, seed, "cpu",
                         desc=f"{name} ")
        recall[name] = float(r["macro_recall"])
    return {"task": "local", "scenes": {"train": n_train, "val": n_val, "seed": seed}, "epochs": epochs,
            "macro_recall": recall, "delta_points": round(100 * (recall["uncapped"] - recall["capped"]), 2)}


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def table(result: dict) -> str:
    ts = result["thresholds"]
    head = f"{'block':>5} " + " ".join(f"{'|s|>' + format(t, 'g'):>10}" for t in ts) + f" {'max |s|':>9} {'mean |s|':>9}"
    what = (f"before the cap (cap = {result['softcap']:g})" if result["softcap"]
            else "(no cap: trained with plain attention)")
    lines = [f"attention logits {what} on {result['images']} images", head]
    for r in result["blocks"]:
        fr = " ".join(f"{r['frac_above'][format(t, 'g')]:>10.2e}" for t in ts)
        lines.append(f"{r['block']:>5} {fr} {r['max_abs']:>9.3f} {r['mean_abs']:>9.3f}")
    e = result["uncapped_feature_error"]
    if result["softcap"]:
        lines.append(f"cap removed at inference: relative feature error {e['total']:.3e} (worst image {e['max_image']:.3e})")
    if "probe" in result:
        pr = result["probe"]
        lines.append(f"local probe macro recall: {100 * pr['macro_recall']['capped']:.2f} with the cap, "
                     f"{100 * pr['macro_recall']['uncapped']:.2f} without ({pr['delta_points']:+.2f} points)")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    blocks = [r["block"] for r in result["blocks"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for t in result["thresholds"]:
        k = format(t, "g")
        # a fraction of 0 cannot sit on a log axis: drawn at the floor, labelled as such
        a.plot(blocks, [max(r["frac_above"][k], 1e-9) for r in result["blocks"]], marker="o", label=f"|s| > {k}")
    a.set_yscale("log")
    a.set_ylim(bottom=5e-10)
    a.set_xlabel("block")
    a.set_ylabel("fraction of logits (floor 1e-9 = none)")
    a.legend(fontsize=8)
    b.plot(blocks, [r["max_abs"] for r in result["blocks"]], marker="o", label="max |s|")
    if result["softcap"] > 0:
        b.axhline(result["softcap"], color="k", ls="--", lw=1, label=f"cap {result['softcap']:g}")
    b.set_xlabel("block")
    b.set_ylabel("largest |s|")
    b.legend(fontsize=8)
    e = result["uncapped_feature_error"]["total"]
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"attention logits before the cap; cap removed: relative feature error {e:.2e}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: Path, result: dict) -> Path:
    from .fileio import atomic_dir_write

    def write(tmp: Path):
        (tmp / "inspect.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "inspect.txt").write_text(table(result))
        plot(result, tmp / "inspect.png")

    atomic_dir_write(Path(out), write)
    return Path(out)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def load_images(encoder: torch.nn.Module, images: Optional[str], num_images: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """The image set: an ImageFolder path, or (None) `num_images` demo scenes; and how to name it."""
    s = V.vit_spec(encoder)
    if images:
        return folder_images(images, num_images, s.img_size, s.mean, s.std), str(images)
    return demo_images(num_images, s.img_size, s.mean, s.std, seed), f"demo scenes (val, seed {seed})"


def build_parser() -> argparse.ArgumentParser:
    from .cli import ArgumentParser

    p = ArgumentParser(prog="locality inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="aligned checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--images", default=None, help="an ImageFolder (default: demo scenes)")
    p.add_argument("--num-images", type=int, default=DEFAULT_IMAGES, help="images to measure on (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="demo scenes' seed")
    p.add_argument("--output-dir", default=None, help="default: <checkpoint>-inspect beside the checkpoint")
    p.add_argument("--probe", action="store_true",
                   help="also train local probes (demo scenes) with and without the cap: the change in macro recall")
    p.add_argument("--probe-train", type=int, default=3000, help="--probe: train scenes (default %(default)s)")
    p.add_argument("--probe-val", type=int, default=1000, help="--probe: val scenes (default %(default)s)")
    p.add_argument("--probe-epochs", type=int, default=10, help="--probe: head epochs (default %(default)s)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("num_images", "batch_size", "probe_train", "probe_val", "probe_epochs"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    from .checkpoint import CheckpointError, load_aligned
    from .fileio import check_output_dir

    ckpt = Path(args.checkpoint)
    out = Path(args.output_dir) if args.output_dir else ckpt.with_name(ckpt.name + "-inspect")
    try:
        check_output_dir(out, "--output-dir")
        model = load_aligned(ckpt, attn_impl="math")
        images, source = load_images(model.encoder, args.images, args.num_images, args.seed)
        result = {"checkpoint": str(ckpt), "image_set": source, **inspect_encoder(model.encoder, images, args.batch_size)}
        if args.probe and result["softcap"] == 0:
            raise ValueError(f"--probe compares the features with and without the cap; {ckpt} was trained without one")
        if args.probe:
            with tempfile.TemporaryDirectory(prefix="locality-inspect-") as work:
                result["probe"] = probe_change(model.encoder, Path(work), args.probe_train, args.probe_val,
                                               args.probe_epochs, args.seed)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        p.exit(1, f"locality inspect: error: {e}\n")
    write_outputs(out, result)
    print(table(result), end="")
    print(f"wrote {out}/inspect.json, inspect.txt, inspect.png")
    return 0
