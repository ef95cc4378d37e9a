"""Train one probing head on cached frozen features and evaluate it on val after every epoch.

Reference recipe (docs/probe.md), all overridable: AdamW(lr 1e-3, wd 0.01 on all head params), timm
CosineLRScheduler stepped per update (horizon = epochs x steps/epoch, 500 linear warmup steps from
0 counted inside the horizon, floor 1e-4), batch 32, drop_last, 5 epochs, BCE-with-logits averaged
over all (patch, class) or (image, class) entries, no augmentation. Precision (`precision.py`):
`auto` = bf16 autocast on GPU, as the reference, and exact fp32 on CPU; `bf16` on a CPU with hardware
bf16 is ~1.7x faster (the CPU demo uses it there). Predictions are logit > 0, i.e. sigmoid > 0.5
computed exactly; the reference thresholds a bf16 sigmoid, which rounds to 0.5 (negative) for
logits in (0, 2^-7].

Batches are gathered from the cached arrays (in RAM when they fit `max_ram_gb`, otherwise straight
from the memory map), so an epoch costs only the head's forward and backward.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from tqdm.auto import tqdm

from .. import precision as P
from .features import ProbeSplit
from .heads import build_head
from .labels import unpack
from .metrics import Confusion, best_epoch


@dataclass
class HeadConfig:
    kind: str = "transformer"   # transformer | mlp | linear
    depth: int = 2              # transformer layers
    hidden: int = 1024          # MLP hidden size
    layer_scale: float = 0.01   # transformer LayerScale init
    view: str = "full"          # full | cls | anonymous: the paper's Fig. 9 interventions (heads.py)


@dataclass
class ProbeOptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    min_lr: float = 1e-4
    warmup_steps: int = 500
    batch_size: int = 32
    epochs: int = 5
    eval_batch_size: int = 256
    max_ram_gb: float = 16.0    # load cached features into RAM below this size, else read the memory map
    precision: str = "auto"     # head forward (precision.py): auto = bf16 autocast on GPU (the reference), fp32 on CPU


class _Source:
    """Row gathering from a split's cached arrays (RAM copy or memory map)."""

    def __init__(self, split: ProbeSplit, task: str, max_ram_gb: float):
        in_ram = split.features.nbytes <= max_ram_gb * 2**30
        targets = split.patch if task == "local" else split.image
        self.feats = np.array(split.features) if in_ram else split.features
        self.targets = np.array(targets) if in_ram else targets
        self.C = split.num_classes

    def get(self, idx: np.ndarray, device: torch.device):
        idx = np.sort(idx)  # sorted reads are sequential on a memory map; order in a batch is irrelevant
        x = torch.from_numpy(np.ascontiguousarray(self.feats[idx])).to(device).float()
        y = unpack(torch.from_numpy(self.targets[idx]).to(device), self.C)
        return x, y


def fit_probe(train: ProbeSplit, val: ProbeSplit, task: str, num_heads: int, head_cfg: HeadConfig = HeadConfig(),
              optim: ProbeOptimConfig = ProbeOptimConfig(), seed: int = 0, device: str | torch.device = "cpu",
              desc: str = "") -> tuple[dict, torch.nn.Module]:
    """Train a `task` ("local" | "global") head; returns (results, head at its best epoch)."""
    device = torch.device(device)
    n, T, D = train.features.shape
    num_prefix = T - train.patch.shape[1]
    bs = optim.batch_size
    steps_per_epoch = n // bs  # drop_last, as the reference
    if steps_per_epoch == 0:
        raise ValueError(f"train split has {n} images, fewer than one batch (optim.batch_size={bs})")
    if optim.epochs < 1:
        raise ValueError(f"optim.epochs must be >= 1, got {optim.epochs}")
    torch.manual_seed(seed)
    head = build_head(head_cfg.kind, task, num_tokens=T, num_prefix=num_prefix, dim=D, num_heads=num_heads,
                      num_classes=train.num_classes, depth=head_cfg.depth, hidden=head_cfg.hidden,
                      layer_scale=head_cfg.layer_scale, view=head_cfg.view).to(device)
    precision = P.resolve(optim.precision, device, "optim.precision")
    P.switch_attention(precision, device, head)
    opt = torch.optim.AdamW(head.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    total = optim.epochs * steps_per_epoch
    sched = CosineLRScheduler(opt, t_initial=total, lr_min=optim.min_lr, warmup_t=optim.warmup_steps,
                              warmup_lr_init=0.0, t_in_epochs=False)
    gen = torch.Generator().manual_seed(seed)
    src_train = _Source(train, task, optim.max_ram_gb)
    src_val = _Source(val, task, optim.max_ram_gb)

    history, best_state, best = [], None, None
    step, start = 0, time.perf_counter()
    bar = tqdm(total=total, desc=f"{desc}{task} {head_cfg.kind} head", unit="step", dynamic_ncols=True)
    for epoch in range(optim.epochs):
        head.train()
        perm = torch.randperm(n, generator=gen).numpy()
        loss_sum = 0.0
        for s in range(steps_per_epoch):
            x, y = src_train.get(perm[s * bs:(s + 1) * bs], device)
            with P.autocast(precision, device):
                logits = head(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(num_updates=step)
            loss_sum += loss.item()
            bar.update(1)
        with P.autocast(precision, device):
            ev = evaluate(head, src_val, len(val), task, optim.eval_batch_size, device)
        ev["summary"].update(epoch=epoch + 1, train_loss=loss_sum / steps_per_epoch)
        history.append(ev["summary"])
        bar.set_postfix(recall=f"{ev['summary']['macro_recall']:.4f}")
        if best is None or ev["summary"]["macro_recall"] > best["summary"]["macro_recall"]:
            best, best_state = ev, copy.deepcopy(head.state_dict())
    bar.close()
    head.load_state_dict(best_state)
    b = best_epoch([h["macro_recall"] for h in history])
    result = {
        "task": task,
        "head": head_cfg.kind,
        "view": head_cfg.view,
        "macro_recall": history[b]["macro_recall"],
        "best_epoch": b + 1,
        "epochs": history,
        "per_class_recall": best["per_class"],
        "val_positives": best["positives"],
        "steps": total,
        "precision": precision,
        "seconds": round(time.perf_counter() - start, 3),
    }
    # per (image, class) counts at the best epoch, for the object-size strata (not written to JSON)
    result["_per_image"] = (best["img_pos"], best["img_tp"])
    return result, head


@torch.no_grad()
def predict(head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """sigmoid(logit) > 0.5, i.e. logit > 0."""
    return head(x) > 0


@torch.no_grad()
def evaluate(head: torch.nn.Module, src: _Source, n: int, task: str, batch_size: int, device: torch.device) -> dict:
    head.eval()
    conf = Confusion(src.C)
    img_pos = np.zeros((n, src.C), dtype=np.int32)
    img_tp = np.zeros((n, src.C), dtype=np.int32)
    for lo in range(0, n, batch_size):
        idx = np.arange(lo, min(n, lo + batch_size))
        x, y = src.get(idx, device)
        pred = predict(head, x)
        conf.update(pred, y)
        if task == "local":  # per image: positives and hits over its patches
            img_pos[idx] = y.sum(1).cpu().numpy()
            img_tp[idx] = (pred & y).sum(1).cpu().numpy()
        else:
            img_pos[idx] = y.cpu().numpy()
            img_tp[idx] = (pred & y).cpu().numpy()
    return {"summary": conf.summary(), "per_class": conf.recall(), "positives": conf.positives.tolist(),
            "img_pos": img_pos, "img_tp": img_tp}
