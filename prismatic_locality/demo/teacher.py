"""The demo's teacher: a small ViT trained on digit scenes with image-level labels only.

It plays the role of CLIP / an IN1k classifier in the paper: a backbone whose training signal was
one label vector per image (here: which of the ten digits appear, multi-hot, BCE through the CLS
token), never where things are. MaskEmbed then has to make its patch embeddings local.

Two things make the teacher fit for MaskEmbed (design/demo-prototype.md):
- strength: it is trained long enough to recognise digits well (the shipped one: 0.886 global macro
  recall with its own head on unseen digit instances; half as long gave 0.70, docs/demo.md);
- behaviour on masked inputs (paper §3.3): MaskEmbed queries the teacher on images whose patches
  are set to the mean colour, so the teacher sees such images in training too. A fraction
  `mask_prob` of each batch is masked with the paper's own mask distribution; the label stays the
  image's label (the usual random-erasing convention: no location information enters).

The trained teacher ships as `prismatic_locality/assets/demo_teacher.safetensors` (timm key layout,
classifier included under `head.*`, config in the file's metadata). Reproduce it with:

    python -m prismatic_locality.demo.teacher --out prismatic_locality/assets/demo_teacher.safetensors
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import vit as V
from ..masks import UniformMaskSampler, step_generator
from . import scenes as S

SHIPPED_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "demo_teacher.safetensors"
ARCH = "vit_tiny_patch16_224"  # timm architecture; the fields below override its size


@dataclass
class TeacherConfig:
    img_size: int = 48
    patch_size: int = 8
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    seed: int = 0           # init, data order, masks; the training scenes use `data_seed`
    data_seed: int = 1000   # scenes the teacher is trained on (train digit pool only)
    num_scenes: int = 48000
    steps: int = 6000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 300
    mask_prob: float = 0.5  # fraction of each batch seen with random patches masked

    def timm_kwargs(self) -> dict:
        return dict(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                    depth=self.depth, num_heads=self.num_heads)


def build_vit(cfg: TeacherConfig, num_classes: int = 0) -> nn.Module:
    """The teacher's timm ViT; `num_classes=10` adds the training classifier on the CLS token."""
    vit = V.create_vit(ARCH, **cfg.timm_kwargs())
    if num_classes:
        vit.reset_classifier(num_classes)
    return vit


def classify(vit: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Digit logits (B, 10) from the CLS token, optionally with patches masked (token-level)."""
    t = vit.norm(V.run_blocks(vit, V.embed(vit, x, mask)))
    return vit.forward_head(t)


def digit_targets(labels: np.ndarray) -> torch.Tensor:
    """Image-level multi-hot over the ten digits (background dropped: it is in every scene)."""
    return S.image_labels(labels)[:, 1:].float()


def macro_recall(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over classes with ≥ 1 positive of TP / (TP + FN) (the benchmark's metric)."""
    pos = target.bool()
    tp = (pred.bool() & pos).sum(0).double()
    n = pos.sum(0).double()
    keep = n > 0
    return float((tp[keep] / n[keep]).mean())


@torch.no_grad()
def evaluate(vit: nn.Module, x: torch.Tensor, y: torch.Tensor, mask_seed: Optional[int] = None,
             batch_size: int = 512) -> float:
    """Global macro recall of the teacher's own head; with `mask_seed`, under random uniform masks."""
    vit.eval()
    spec = V.vit_spec(vit)
    sampler = UniformMaskSampler(spec.num_patches, complement=False, null=False)
    preds = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        m = None if mask_seed is None else sampler(len(xb), step_generator(mask_seed, i))[:, 0].to(xb.device)
        preds.append(classify(vit, xb, m) > 0)
    return macro_recall(torch.cat(preds), y)


def train_teacher(cfg: TeacherConfig, val: Optional[S.Scenes] = None, progress: bool = True) -> tuple[nn.Module, dict]:
    """Train the teacher from scratch on image-level labels; returns (vit with head, summary)."""
    torch.manual_seed(cfg.seed)
    train = S.make_scenes(cfg.num_scenes, "train", cfg.data_seed, progress=progress)
    vit = build_vit(cfg, num_classes=10)
    spec = V.vit_spec(vit)
    x = S.to_tensor(train.images, spec.mean, spec.std)
    y = digit_targets(train.labels)
    opt = torch.optim.AdamW(vit.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Linear warmup, then cosine to 1% of the peak: the usual ViT-from-scratch schedule.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * (
        0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))))
    sampler = UniformMaskSampler(spec.num_patches, complement=False, null=False)
    order = torch.Generator().manual_seed(cfg.seed)
    perm, pos = torch.randperm(len(x), generator=order), 0
    t0, losses = time.time(), []
    vit.train()
    bar = tqdm(range(cfg.steps), desc="teacher", unit="step", disable=not progress)
    for step in bar:
        if pos + cfg.batch_size > len(x):
            perm, pos = torch.randperm(len(x), generator=order), 0
        idx = perm[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        g = step_generator(cfg.seed, step, stream=7)
        m = sampler(len(idx), g)[:, 0]
        m |= (torch.rand(len(idx), 1, generator=g) >= cfg.mask_prob)  # unmasked rows keep everything
        loss = F.binary_cross_entropy_with_logits(classify(vit, x[idx], m), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vit.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    summary = {"config": asdict(cfg), "train_seconds": round(time.time() - t0, 1),
               "final_loss": float(np.mean(losses[-100:]))}
    if val is not None:
        xv, yv = S.to_tensor(val.images, spec.mean, spec.std), digit_targets(val.labels)
        summary["val_global_recall"] = evaluate(vit, xv, yv)
        summary["val_global_recall_masked"] = evaluate(vit, xv, yv, mask_seed=0)
    vit.eval()
    return vit, summary


def save_teacher(path: str | os.PathLike, vit: nn.Module, cfg: TeacherConfig, summary: dict) -> Path:
    """safetensors in timm's key layout (`head.*` = the digit classifier); config in the metadata.

    Stored in float16 (1.6 MB instead of 3.3 MB, small enough to ship); loading casts back to float32.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in vit.state_dict().items()}
    meta = {"arch": ARCH, "config": json.dumps(asdict(cfg)), "summary": json.dumps(summary)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    save_file(tensors, tmp, metadata=meta)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 is wrong for a file that ships with the package
    os.replace(tmp, path)
    return path


def read_teacher_config(path: str | os.PathLike) -> tuple[TeacherConfig, dict]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights not found: {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("arch") != ARCH or "config" not in meta:
        raise ValueError(f"{path}: not a demo teacher (metadata 'arch'/'config' missing)")
    known = {f.name for f in fields(TeacherConfig)}
    cfg = TeacherConfig(**{k: v for k, v in json.loads(meta["config"]).items() if k in known})
    return cfg, json.loads(meta.get("summary", "{}"))


def load_teacher(path: str | os.PathLike = SHIPPED_TEACHER, num_classes: int = 0) -> tuple[nn.Module, TeacherConfig]:
    """The trained teacher ViT (no classifier unless `num_classes`), through `vit.create_vit`."""
    cfg, _ = read_teacher_config(path)
    if num_classes:
        from safetensors.torch import load_file

        vit = build_vit(cfg, num_classes)
        vit.load_state_dict(load_file(str(path)))
    else:
        vit = V.create_vit(ARCH, weights=str(path), **cfg.timm_kwargs())
    return vit.eval(), cfg


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m prismatic_locality.demo.teacher",
                                description="Train the demo teacher (image-level labels only) and save it.")
    p.add_argument("--out", default=str(SHIPPED_TEACHER), help="output .safetensors file")
    for f in fields(TeacherConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    p.add_argument("--num-val", type=int, default=2000, help="val scenes to report recall on (0 = skip)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TeacherConfig(**{f.name: getattr(args, f.name) for f in fields(TeacherConfig)})
    val = S.make_scenes(args.num_val, "val", cfg.data_seed) if args.num_val else None
    vit, summary = train_teacher(cfg, val)
    save_teacher(args.out, vit, cfg, summary)
    print(json.dumps(summary, indent=2))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
