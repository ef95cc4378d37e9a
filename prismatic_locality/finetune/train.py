"""Classification fine-tuning: ``locality finetune`` / ``finetune(cfg)``.

The reference's ImageNet fine-tuning (docs/finetune.md) of any backbone the probe loads, stock or
aligned, with the same new head on both (`model.Classifier`). One optimiser step: for every
micro-batch, timm Mixup/CutMix (soft, smoothed targets), forward under autocast, soft-target cross
entropy, backward; then grad-norm clip, AdamW (timm's factory, optional layer decay), cosine lr with
warmup set per update. Top-1 / top-5 on the val split after every epoch, and the best epoch.

Everything random is a pure function of the seed and the position in the run: data order and
augmentation as in align (`data.GlobalBatchOrder`, `data.SeededImages`), and the global generators
that Mixup and stochastic depth draw from are seeded per step (`data.seeded_globals`). So a killed
run resumed from its last training state reaches bit-identical weights on CPU.

Output: ``{output_dir}/{run_name}/`` with config.yaml, metrics.jsonl (loss, lr, img/s; per epoch
val_loss, top1, top5), state/ (latest training state: weights, AdamW, progress; atomic) and
results.json (every epoch's val metrics, the best and the final). SIGTERM/SIGINT end the run after
the current step with a saved training state.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import precision as P
from .. import vit as V
from ..align import distributed as D
from ..align.checkpointer import resume_source
from ..align.metrics import Metrics
from ..align.optim import lr_at
from ..align.state import config_mismatch, has_state, load_training_state, read_state_info, save_training_state
from ..align.train import (NonFiniteLoss, Stopped, StopSignals, _ignore_stop_signals, clip_grad_norm, non_finite,
                           record_new_files, stopped, write_config)
from ..checkpoint import CheckpointError
from ..data import EvalTransform, GlobalBatchOrder, surface_worker_errors
from ..data.dataset import CROPPED, UNREADABLE
from ..fileio import check_output_dir, write_json
from ..maskembed import peak_tflops
from .config import RESUMABLE_CHANGES, FinetuneConfig, mixing, parse_config, to_dict, validate
from .data import LabeledImages, TrainTransform, build_mixup, check_same_classes, class_folders, collate_labeled, seeded_globals
from .model import Classifier, build_classifier, build_optimizer, set_lr

log = logging.getLogger("prismatic_locality.finetune")

STEP_STREAM = 0x57E9  # seeds the global generators for a step's Mixup draws and stochastic depth


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> List[int]:
    """How many rows have their target among the k highest logits, for each k (k capped at the
    number of classes, so top-5 of a 3-class problem counts every row)."""
    k_max = min(max(ks), logits.shape[1])
    hits = logits.topk(k_max, dim=1).indices.eq(targets[:, None])
    return [int(hits[:, :min(k, k_max)].any(dim=1).sum()) for k in ks]


def train_loss(cfg: FinetuneConfig) -> nn.Module:
    """The reference's choice: soft-target CE under Mixup/CutMix (smoothing is in the targets),
    else label-smoothing CE, else plain CE (timm's losses)."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixing(cfg):
        return SoftTargetCrossEntropy()
    if cfg.mix.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.mix.label_smoothing)
    return nn.CrossEntropyLoss()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, params: List[nn.Parameter],
               micro_batches: Iterator[Tuple[torch.Tensor, torch.Tensor]], num_micro: int, max_norm: float,
               autocast: Callable, loss_fn: nn.Module) -> Tuple[float, float]:
    """One optimiser update on the global batch's (images, targets) micro-batches -> (mean loss, grad
    norm). A non-finite loss or gradient leaves the weights untouched (the caller stops the run)."""
    loss_sum = torch.zeros((), dtype=torch.float64)
    for images, targets in micro_batches:
        with autocast():
            loss = loss_fn(model(images), targets)
        (loss / num_micro).backward()
        loss_sum += loss.detach().double().cpu() / num_micro
    grad_norm = clip_grad_norm(params, max_norm)
    loss, grad_norm = loss_sum.item(), grad_norm.item()
    if math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


@torch.no_grad()
def evaluate(model: nn.Module, batches, autocast: Callable, device: torch.device, seen: dict) -> dict:
    """Cross-entropy, top-1 and top-5 (in %) over the val split."""
    model.eval()
    loss, correct, n = 0.0, np.zeros(2, dtype=np.int64), 0
    for images, labels, notes in batches:
        for kind, name, message in notes:
            if name not in seen[kind]:
                seen[kind].add(name)
                log.warning("val data: %s", message)
        images, labels = images.to(device), labels.to(device)
        with autocast():
            logits = model(images)
        logits = logits.float()
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += topk_correct(logits, labels)
        n += labels.shape[0]
    model.train()
    return {"val_loss": loss / n, "top1": 100.0 * correct[0] / n, "top5": 100.0 * correct[1] / n, "images": n}


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


@dataclass
class Data:
    train: LabeledImages
    val: LabeledImages
    classes: List[str]
    order: GlobalBatchOrder
    total_steps: int


@dataclass
class Progress:
    step: int = 0
    history: list = field(default_factory=list)   # one val record per evaluation
    best: Optional[dict] = None                    # the val record with the highest top-1
    seen: dict = field(default_factory=lambda: {UNREADABLE: set(), CROPPED: set()})
    wall_before: float = 0.0
    saved: dict = field(default_factory=dict)


def run_dir_of(cfg: FinetuneConfig) -> Path:
    return Path(cfg.output_dir) / (cfg.run_name or f"finetune-{cfg.recipe or 'run'}")


def read_splits(cfg: FinetuneConfig):
    """(train source, labels), (val source, labels), class names; the two splits' classes must agree."""
    root = cfg.data.root
    train_src, train_labels, classes = class_folders(root, cfg.data.train_split)
    val_src, val_labels, val_classes = class_folders(root, cfg.data.val_split)
    check_same_classes(classes, val_classes, Path(root) / cfg.data.train_split, Path(root) / cfg.data.val_split)
    if len(classes) < 2:
        raise ValueError(f"{Path(root) / cfg.data.train_split}: {len(classes)} class folder(s); classification needs 2 or more")
    return (train_src, train_labels), (val_src, val_labels), classes


def build_data(cfg: FinetuneConfig, splits, spec: V.ViTSpec) -> Data:
    (train_src, train_labels), (val_src, val_labels), classes = splits
    size = spec.img_size if isinstance(spec.img_size, int) else spec.img_size[0]
    train = LabeledImages(train_src, train_labels, TrainTransform(cfg, size, spec.mean, spec.std), cfg.seed)
    val_tf = EvalTransform(size, tuple(spec.mean), tuple(spec.std), crop_pct=cfg.data.crop_pct,
                           interpolation=cfg.data.val_interpolation)
    val = LabeledImages(val_src, val_labels, val_tf, cfg.seed)
    order = GlobalBatchOrder(len(train), cfg.global_batch, cfg.micro_batch, 1, 0, cfg.seed)
    total = cfg.max_steps or max(1, round(cfg.epochs * order.steps_per_epoch))
    return Data(train, val, classes, order, total)


def resolve_device(name: str) -> torch.device:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("locality finetune runs in one process; start it without torchrun")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("config field 'device': cuda requested but no GPU is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def restore_or_start(cfg: FinetuneConfig, run_dir: Path, model: Classifier, optimizer, first_save: int
                     ) -> Tuple[Progress, Optional[Path]]:
    path = resume_source(cfg, run_dir, first_save)
    if path is None:
        return Progress(), None
    problem = config_mismatch(read_state_info(path).get("config", {}), to_dict(cfg), str(path / "state.json"),
                              RESUMABLE_CHANGES)
    if problem:
        raise CheckpointError(problem)
    saved = load_training_state(path, model, optimizer)
    c = saved.get("counters", {})
    return Progress(step=saved["step"], history=saved.get("history", []), best=saved.get("best"),
                    seen={UNREADABLE: set(c.get("skipped_files", [])), CROPPED: set(c.get("cropped_files", []))},
                    wall_before=c.get("wall_time_s", 0.0), saved=saved), path


def state_info(cfg: FinetuneConfig, run: Progress, data: Data, metrics: Metrics, t_start: float) -> dict:
    seen = run.seen
    return {"step": run.step, "epoch": run.step / data.order.steps_per_epoch, "total_steps": data.total_steps,
            "config": to_dict(cfg), "classes": data.classes, "history": run.history, "best": run.best,
            "wandb_run_id": metrics.wandb_run_id or run.saved.get("wandb_run_id"),
            "counters": {"skipped_images": len(seen[UNREADABLE]), "cropped_images": len(seen[CROPPED]),
                         "skipped_files": sorted(seen[UNREADABLE]), "cropped_files": sorted(seen[CROPPED]),
                         "wall_time_s": run.wall_before + time.time() - t_start},
            "log_window": metrics.window_state()}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def finetune(cfg: FinetuneConfig) -> Path:
    """Run (or resume) fine-tuning; returns the run directory (results.json, state/, metrics.jsonl)."""
    validate(cfg)
    run_dir = run_dir_of(cfg)
    check_output_dir(run_dir, "config field 'output_dir'")
    device = resolve_device(cfg.device)
    splits = read_splits(cfg)           # before the backbone: a bad data folder fails in a second
    model = build_classifier(cfg.model, len(splits[2]), device)
    data = build_data(cfg, splits, model.spec)
    o = cfg.optim
    optimizer = build_optimizer(model, o.lr, o.weight_decay, o.layer_decay, o.betas, o.eps)
    first_save = min(cfg.save_every, data.order.steps_per_epoch, data.total_steps)
    run, resumed_from = restore_or_start(cfg, run_dir, model, optimizer, first_save)
    write_config(cfg, run_dir)
    log.info("run %s: %s backbone %s, %d classes, %d train / %d val images, %d steps (%d/epoch), global batch %d = "
             "%d x %d accum", run_dir, model.kind, cfg.model.backbone, len(data.classes), len(data.train),
             len(data.val), data.total_steps, data.order.steps_per_epoch, cfg.global_batch, cfg.micro_batch,
             data.order.accum_steps)
    if resumed_from is not None:
        log.info("resumed from %s at step %d/%d", resumed_from, run.step, data.total_steps)
    autocast = functools.partial(P.autocast, cfg.precision, device)
    with contextlib.ExitStack() as stack:
        metrics = stack.enter_context(Metrics(run_dir / "metrics.jsonl", True, run.step if resumed_from else None, cfg,
                                              run.saved.get("wandb_run_id"), run.saved.get("log_window")))
        # forward + backward ~ 3x the forward FLOPs (the new head is negligible)
        metrics.cost(cfg.global_batch, 3 * V.vit_flops_per_image(model.spec), 1, peak_tflops(device))
        stop = stack.enter_context(StopSignals())
        _loop(cfg, model, optimizer, data, run, metrics, stop, autocast, device, run_dir)
    results = {"backbone": cfg.model.backbone, "kind": model.kind, "head": cfg.model.head, "recipe": cfg.recipe,
               "classes": data.classes, "steps": run.step, "epochs": run.history, "best": run.best,
               "final": run.history[-1] if run.history else None,
               "skipped_images": len(run.seen[UNREADABLE])}
    write_json(run_dir / "results.json", results)
    if run.best is not None:
        log.info("best top-1 %.2f%% (top-5 %.2f%%) at epoch %s; results: %s", run.best["top1"], run.best["top5"],
                 run.best["epoch"], run_dir / "results.json")
    return run_dir


def _micro_batches(cfg: FinetuneConfig, batches: Iterator, order: GlobalBatchOrder, mixup, device: torch.device,
                   notes: list) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    for _ in range(order.accum_steps):
        images, labels, batch_notes = next(batches)
        notes += batch_notes
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        yield mixup(images, labels) if mixup is not None else (images, labels)


def _val_batches(cfg: FinetuneConfig, data: Data, device: torch.device) -> Iterator:
    n, vb = len(data.val), cfg.data.val_batch_size
    batches = [[(0, i) for i in range(b, min(n, b + vb))] for b in range(0, n, vb)]
    loader = DataLoader(data.val, batch_sampler=batches, collate_fn=collate_labeled, num_workers=cfg.data.workers,
                        pin_memory=device.type == "cuda", worker_init_fn=_ignore_stop_signals)
    return surface_worker_errors(loader)


def _save(cfg, run_dir, model, optimizer, run, data, metrics, t_start) -> None:
    save_training_state(run_dir / "state", model, optimizer, state_info(cfg, run, data, metrics, t_start))


def _loop(cfg: FinetuneConfig, model: Classifier, optimizer, data: Data, run: Progress, metrics: Metrics,
          stop: StopSignals, autocast: Callable, device: torch.device, run_dir: Path) -> None:
    order, total, o = data.order, data.total_steps, cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    warmup = round(o.warmup_epochs * order.steps_per_epoch)
    mixup, loss_fn = build_mixup(cfg, len(data.classes)), train_loss(cfg)
    info = D.DistInfo(0, 1, 0, device, False)
    t_start = time.time()
    # its own generator: the loader draws its workers' base seed when first iterated, which happens inside
    # a step's seeded context, and must not shift that step's stochastic-depth draws (resume = no resume)
    loader = DataLoader(data.train, batch_sampler=order.micro_batches(run.step, total), collate_fn=collate_labeled,
                        num_workers=cfg.data.workers, pin_memory=device.type == "cuda",
                        worker_init_fn=_ignore_stop_signals, generator=torch.Generator().manual_seed(cfg.seed))
    batches = surface_worker_errors(loader)
    bar = tqdm(total=total, initial=run.step, unit="step", dynamic_ncols=True, desc=f"finetune {run_dir.name}")
    model.train()
    with contextlib.closing(batches):
        while run.step < total:
            lr = lr_at(run.step, total, o.lr, o.min_lr, warmup, o.warmup_lr)
            set_lr(optimizer, lr)
            notes: list = []
            # Mixup's draws (numpy) and stochastic depth (torch) come from the step's seeded generators
            with seeded_globals([cfg.seed, run.step, STEP_STREAM]):
                micro = _micro_batches(cfg, batches, order, mixup, device, notes)
                loss, grad_norm = train_step(model, optimizer, params, micro, order.accum_steps, o.clip_grad,
                                             autocast, loss_fn)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                bar.close()
                last_good = str(run_dir / "state") if has_state(run_dir / "state") else None
                raise non_finite(run.step + 1, loss, grad_norm, last_good, metrics)
            run.step += 1
            metrics.add_step(loss)
            bar.update(1)
            record_new_files(notes, run.seen, info, any_new=False)
            if run.step % cfg.log_every == 0 or run.step == total:
                rec = metrics.log_step(run.step, run.step / order.steps_per_epoch, lr, grad_norm,
                                       skipped=len(run.seen[UNREADABLE]), cropped=len(run.seen[CROPPED]))
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{rec['img_per_s']:.1f}",
                                skipped=rec["skipped_images"])
            epoch, within = divmod(run.step, order.steps_per_epoch)
            stopping = stop.signum is not None and run.step < total
            with metrics.aside():
                if within == 0 or run.step == total:
                    rec = {"step": run.step, "epoch": round(run.step / order.steps_per_epoch, 4),
                           **evaluate(model, _val_batches(cfg, data, device), autocast, device, run.seen)}
                    run.history.append(rec)
                    if run.best is None or rec["top1"] > run.best["top1"]:
                        run.best = rec
                    metrics.write(rec)
                    bar.write(f"epoch {rec['epoch']:g}: val top-1 {rec['top1']:.2f}% top-5 {rec['top5']:.2f}% "
                              f"loss {rec['val_loss']:.4f} (best top-1 {run.best['top1']:.2f}%)")
                if run.step % cfg.save_every == 0 or within == 0 or run.step == total or stopping:
                    _save(cfg, run_dir, model, optimizer, run, data, metrics, t_start)
            if stopping:
                bar.close()
                raise stopped(stop, run.step, total, run_dir / "state")
    bar.close()


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        out = finetune(parse_config(argv))
    except (ValueError, FileNotFoundError, NonFiniteLoss) as e:  # CheckpointError is a ValueError
        print(f"locality finetune: error: {e}", file=sys.stderr)
        return 1
    except Stopped as e:
        print(f"locality finetune: {e}", file=sys.stderr)
        return 128 + e.signum
    print(out / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
