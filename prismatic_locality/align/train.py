"""The MaskEmbed trainer: ``locality align`` / ``torchrun scripts/align.py`` / ``train(cfg)``.

One optimiser step (`train_step`) is Eq. 1 on one global batch of G images = micro_batch x
accumulation x world size: for every micro-batch the frozen teacher h computes the targets on the
masked images, the student (encoder f_θ + decoder g_ψ, `maskembed.MaskEmbed`) reconstructs them from
the clean images' embeddings, the loss is back-propagated (under DDP ``no_sync`` except on the last
micro-batch); then grad-norm clip, AdamW, cosine lr.

``--objective mim|clipself`` trains another (student, teacher) pair with the same step, data,
resume and checkpoints (`objectives.py`; docs/align.md "Objectives").

`train` is set up in named parts, each a function or object below:

    build_model      student (encoder f_θ + decoder g_ψ) and teacher h; seeded
    build_teacher    the teacher ready to run, in one place: frozen, on the device, cast, compiled
    build_data       seeded images, global batch order, mask sampler
    Checkpointer     restore-or-start, should_save, save; aligned exports       (checkpointer.py)
    parallelize      how the student runs: attention kernel → activation checkpointing → DDP → compile
    Metrics          metrics.jsonl (+ wandb) and the log window: loss, img/s, MFU   (metrics.py)
    train_step       one optimiser update
    _loop            steps, logging, validation, saving, stopping

Everything random is a pure function of (seed, step) (see `data.dataset`), so a 2-process run
equals a 1-process run at the same global batch, and a killed run resumed from its last training
state reaches bit-identical weights on CPU.

Output: ``{output_dir}/{run_name}/`` with config.yaml, metrics.jsonl, state/ (latest training
state), aligned/ (the aligned checkpoint, `checkpoint.save_aligned`), epoch-NNN/ (optional).
SIGTERM/SIGINT end the run after the current step with a saved training state (`StopSignals`).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import draccus
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import precision as P
from .. import vit as V
from ..data import RKRC, EvalTransform, GlobalBatchOrder, SeededImages, collate, open_source, surface_worker_errors
from ..data.dataset import CROPPED, UNREADABLE
from ..decoder import MaskEmbedDecoder
from ..fileio import check_output_dir, write_text
from .. import objectives as O
from ..maskembed import (MaskEmbed, Teacher, default_decoder_config, estimate_target_scale, make_encoder, peak_tflops,
                         train_flops_per_image)
from ..masks import MaskSampler, build_mask_sampler, step_generator
from . import distributed as D
from .config import AlignConfig, parse_config, validate
from .checkpointer import Checkpointer, Progress, run_dir_of
from .metrics import Metrics
from .optim import build_optimizer, lr_at, set_lr

log = logging.getLogger("prismatic_locality.align")

TRAIN_STREAM, VAL_STREAM = 0, 1  # mask generator streams (masks.step_generator)


class NonFiniteLoss(FloatingPointError):
    """The loss or gradient became NaN/Inf; the message names the step and the last good state."""


class Stopped(Exception):
    """SIGTERM/SIGINT stopped the run after saving its training state; `signum` is the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """While active, SIGTERM (what schedulers send before a kill) and SIGINT only set `signum`: the
    loop finishes its step, saves the training state and stops. A second SIGINT stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, _frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *_):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process, which saves before it stops
    (a signal sent to the whole process group would otherwise kill them first)."""
    for sig in StopSignals.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


# --------------------------------------------------------------------------------------------
# The step: Eq. 1 on one global batch
# --------------------------------------------------------------------------------------------


def train_step(student: nn.Module, teacher: Callable, optimizer: torch.optim.Optimizer, params: List[nn.Parameter],
               micro_batches: Iterator[Tuple[torch.Tensor, torch.Tensor]], num_micro: int, max_norm: float,
               autocast: Callable, info: D.DistInfo) -> Tuple[float, float]:
    """One optimiser update on the global batch whose (images, masks) micro-batches this rank gets.

    Returns the loss (mean over the global batch) and the gradient norm. A non-finite loss or
    gradient (on any rank) leaves the weights untouched: the caller stops the run."""
    loss_sum = torch.zeros((), device=info.device)
    for j, (images, masks) in enumerate(micro_batches):
        last = j == num_micro - 1
        with contextlib.nullcontext() if last else no_sync(student):  # DDP all-reduces on the last one
            with autocast():
                target = teacher(images, masks)                  # h(x ⊙ m), frozen
                loss = student(images, masks, target)            # ‖g_ψ(f_θ(x) ⊙ m) − h(x ⊙ m)‖²
            (loss / num_micro).backward()
        loss_sum += loss.detach() / num_micro
    grad_norm = clip_grad_norm(params, max_norm)
    loss_sum = D.all_reduce_sum(loss_sum.double().reshape(1), info)  # NaN/Inf on any rank stays so
    loss, grad_norm = loss_sum.item() / info.world_size, grad_norm.item()
    if math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


def no_sync(model: nn.Module):
    """DDP's "accumulate locally, do not all-reduce" context; nothing for a single process."""
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def clip_grad_norm(params: List[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global grad-norm clip; with max_norm <= 0 only measures the norm."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))


# --------------------------------------------------------------------------------------------
# Setup: model, data, parallelism
# --------------------------------------------------------------------------------------------


def build_teacher_vit(cfg: AlignConfig) -> nn.Module:
    t = cfg.teacher
    pretrained = t.pretrained and t.weights is None
    try:
        vit = V.create_vit(t.model, pretrained=pretrained, weights=t.weights, **t.timm_kwargs)
    except (ValueError, FileNotFoundError):  # a bad local weights file is named by vit.read_state_dict
        raise
    except Exception as e:  # hub / cache failures come in many types
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if t.weights is not None:
            raise ValueError(f"config field 'teacher.weights': cannot load {t.weights} into '{t.model}' ({msg})") from None
        raise ValueError(f"config field 'teacher.model': cannot create '{t.model}' with pretrained weights "
                         f"({msg}); offline? pass a local file with --teacher.weights") from None
    if not pretrained and t.weights is None:
        log.warning("the teacher has random weights (no teacher.weights, teacher.pretrained=false): "
                    "fine for tests, meaningless for alignment")
    return vit


def build_model(cfg: AlignConfig, device: torch.device) -> Tuple[nn.Module, Teacher]:
    """The (student, teacher) pair of `cfg.objective`, seeded, so every rank agrees. MaskEmbed:
    encoder f_θ (a copy of the teacher ViT) + decoder g_ψ, and teacher h; mim / clipself:
    `objectives.build_pair`. With ``teacher.aligned`` the teacher is that checkpoint's encoder.
    The teacher is made ready to run by `build_teacher`."""
    torch.manual_seed(cfg.seed)
    vit = build_teacher_vit(cfg)
    student_vit = copy.deepcopy(vit)
    if cfg.objective != "maskembed":
        student, teacher = O.build_pair(cfg.objective, student_vit, vit, loss=cfg.loss, softcap=cfg.encoder.softcap,
                                        attn_impl=cfg.encoder.attn_impl)
    else:
        teacher = Teacher(vit, target=cfg.teacher.target, masking=cfg.teacher.masking)  # frozen: eval, no grad
        dcfg = default_decoder_config(teacher.spec, V.vit_spec(student_vit), width=cfg.decoder.width,
                                      depth=cfg.decoder.depth, init_values=cfg.decoder.init_values)
        encoder = make_encoder(student_vit, dcfg.width, softcap=cfg.encoder.softcap, attn_impl=cfg.encoder.attn_impl)
        student = MaskEmbed(encoder, MaskEmbedDecoder(dcfg), loss=cfg.loss, pooled_target=cfg.teacher.target == "cls")
    if cfg.teacher.aligned is not None:  # built last: the student's initialisation draws no differently
        teacher = aligned_teacher(cfg, teacher)
    return student.to(device), teacher


def aligned_teacher(cfg: AlignConfig, like: Teacher) -> Teacher:
    """The teacher of the same kind as `like`, its ViT the encoder of the aligned checkpoint
    ``teacher.aligned``, exactly the trained function (`load_aligned`: soft-capped attention, trained
    final norm; its head is not used)."""
    from ..checkpoint import load_aligned

    encoder = load_aligned(cfg.teacher.aligned).encoder
    s, t = V.vit_spec(encoder), like.spec
    if (s.img_size, s.patch_size) != (t.img_size, t.patch_size):
        raise ValueError(f"config field 'teacher.aligned': {cfg.teacher.aligned} is {s.img_size} px with patch "
                         f"{s.patch_size}, the student {t.img_size} px with patch {t.patch_size}")
    # the images are preprocessed as for the student (the original ViT): its resize/crop/mean/std
    encoder.pretrained_cfg = getattr(like.vit, "pretrained_cfg", None) or encoder.pretrained_cfg
    if isinstance(like, O.MIMTeacher):
        return O.MIMTeacher(encoder)
    return Teacher(encoder, target=like.target, masking=like.masking)


def build_teacher(teacher: Teacher, cfg: AlignConfig, device: torch.device) -> Teacher:
    """The teacher, ready to run, in one place: on the device, its weights cast once to the teacher
    dtype (it never trains), the CPU-bf16 attention path, compiled when asked."""
    teacher.to(device)
    teacher.vit.to(P.teacher_dtype(cfg.teacher.dtype, cfg.precision, device))
    P.switch_attention(cfg.precision, device, teacher.vit)
    return torch.compile(teacher) if cfg.compile else teacher  # attributes (scale, spec) pass through


def parallelize(student: MaskEmbed, cfg: AlignConfig, info: D.DistInfo) -> nn.Module:
    """How the student runs, applied in this order (each step wraps the previous one's result):

    1. attention kernel: timm's explicit path in the decoder for bf16 on CPU (the encoder's
       soft-capped attention is explicit there already), `precision.switch_attention`;
    2. activation checkpointing over the encoder blocks (in place: `vit.run_blocks` honours it);
    3. DDP over the processes (gradients all-reduced in backward; buffers are not broadcast);
    4. torch.compile of the DDP-wrapped module: the order torch documents for DDP, so dynamo can
       split the graph at DDP's bucket boundaries and overlap the all-reduce with backward.

    Returns the module the step calls; `student` itself stays the unwrapped module whose
    state_dict is saved."""
    if student.decoder is not None:  # mim / clipself train no decoder
        P.switch_attention(cfg.precision, info.device, student.decoder)
    if cfg.encoder.grad_checkpointing:
        student.encoder.set_grad_checkpointing(True)
    model: nn.Module = student
    if info.distributed:
        model = DDP(model, device_ids=[info.device] if info.device.type == "cuda" else None, broadcast_buffers=False)
    if cfg.compile:
        model = torch.compile(model)
    return model


def data_transforms(cfg: AlignConfig, teacher: Teacher):
    """Train/eval transforms at the teacher's resolution, normalised with its mean/std."""
    s = teacher.spec
    pcfg = getattr(teacher.vit, "pretrained_cfg", None) or {}
    interp = pcfg.get("interpolation", "bicubic")
    evaluate = EvalTransform(s.img_size, s.mean, s.std, crop_pct=pcfg.get("crop_pct", 1.0) or 1.0,
                             interpolation=interp if interp in ("bilinear", "bicubic") else "bicubic")
    if cfg.data.augment == "none":
        return evaluate, evaluate
    d = cfg.data
    train = RKRC(s.img_size, s.mean, s.std, scale=tuple(d.scale), ratio=tuple(d.ratio), hflip=d.hflip,
                 interpolation=d.interpolation)
    return train, evaluate


@dataclass
class Data:
    """What the run reads: seeded train/held-out images, the global batch order, the mask sampler."""
    train: SeededImages
    val: Optional[SeededImages]
    order: GlobalBatchOrder
    sampler: MaskSampler
    total_steps: int


def build_data(cfg: AlignConfig, student: nn.Module, teacher: Teacher, info: D.DistInfo) -> Data:
    if cfg.objective == "clipself":  # one grid-aligned crop window per image
        sampler = O.CropSampler(teacher.spec.grid)
    else:  # maskembed, mim: the MaskEmbed masks
        sampler = build_mask_sampler(cfg.masks.kind, teacher.spec.grid, cfg.masks.complement, cfg.masks.null,
                                     cfg.masks.keep_prob, cfg.masks.block_ratio)
    if sampler.num_patches != V.vit_spec(student.encoder).num_patches:
        raise ValueError("teacher and encoder patch grids differ")
    train_tf, eval_tf = data_transforms(cfg, teacher)
    train_set = SeededImages(open_source(cfg.data.root, cfg.data.train_split, cfg.data.format), train_tf, cfg.seed)
    order = GlobalBatchOrder(len(train_set), cfg.global_batch, cfg.micro_batch, info.world_size, info.rank, cfg.seed)
    val_set = None
    if uses_target_scale(cfg) or cfg.validate:
        val_set = SeededImages(open_source(cfg.data.root, cfg.data.val_split, cfg.data.format), eval_tf, cfg.seed)
    total_steps = cfg.max_steps or max(1, round(cfg.epochs * order.steps_per_epoch))
    return Data(train_set, val_set, order, sampler, total_steps)


def uses_target_scale(cfg: AlignConfig) -> bool:
    return cfg.target_scale == "on" or (cfg.target_scale == "auto" and cfg.loss == "mse")


def train_micro_batches(cfg: AlignConfig, data: Data, start_step: int, device: torch.device) -> Iterator:
    """(images, notes) for this rank's micro-batches, from `start_step` to the end of the run."""
    loader = DataLoader(data.train, batch_sampler=data.order.micro_batches(start_step, data.total_steps),
                        collate_fn=collate, num_workers=cfg.data.workers, pin_memory=device.type == "cuda",
                        worker_init_fn=_ignore_stop_signals)
    return surface_worker_errors(loader)


def step_micro_batches(batches: Iterator, masks: torch.Tensor, order: GlobalBatchOrder, device: torch.device,
                       notes: list) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """One step's (images, masks) micro-batches on the device; the data notes go to `notes`."""
    for j in range(order.accum_steps):
        images, batch_notes = next(batches)
        notes += batch_notes
        yield images.to(device, non_blocking=True), masks[j * order.micro_batch: (j + 1) * order.micro_batch]


def val_batches(cfg: AlignConfig, data: Data, info: D.DistInfo, device: torch.device
                ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the held-out batches (b ≡ rank mod world), masks seeded by batch index,
    so the masks an image gets are the same every epoch and for every world size."""
    dataset = data.val
    n = len(dataset) if cfg.data.val_max_images is None else min(len(dataset), cfg.data.val_max_images)
    vb = cfg.data.val_batch_size
    num_batches = math.ceil(n / vb)
    if num_batches < info.world_size:
        raise ValueError(f"config field 'data.val_batch_size': {n} held-out images make {num_batches} batches of "
                         f"{vb}, fewer than the {info.world_size} processes; lower it")
    mine = [[(0, i) for i in range(b * vb, min(n, (b + 1) * vb))] for b in range(info.rank, num_batches, info.world_size)]
    loader = DataLoader(dataset, batch_sampler=mine, collate_fn=collate, num_workers=cfg.data.workers,
                        pin_memory=device.type == "cuda", worker_init_fn=_ignore_stop_signals)
    for b, (images, notes) in zip(range(info.rank, num_batches, info.world_size), surface_worker_errors(loader)):
        for _, _, message in notes:
            log.warning("held-out data: %s", message)
        masks = data.sampler(images.shape[0], step_generator(cfg.seed, b, device, stream=VAL_STREAM))
        yield images.to(device, non_blocking=True), masks


@torch.no_grad()
def validation_loss(student: MaskEmbed, teacher: Callable, batches, autocast, info: D.DistInfo,
                    device: torch.device) -> float:
    student.eval()
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    for images, masks in batches:
        with autocast():
            loss = student(images, masks, teacher(images, masks))
        acc += torch.stack([loss.double() * images.shape[0], torch.tensor(float(images.shape[0]), dtype=torch.float64, device=device)])
    student.train()
    D.all_reduce_sum(acc, info)
    return (acc[0] / acc[1]).item()


def record_new_files(notes: list, seen: dict, info: D.DistInfo, any_new: bool) -> None:
    """Add the files named in `notes` to `seen` (kind -> set of files), on every rank (the union of
    all ranks' notes when `any_new` says some rank has new ones), and log each file once."""
    new = sorted({(kind, name, msg) for kind, name, msg in notes if name not in seen[kind]})
    if info.distributed and any_new:
        gathered = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, new)
        new = sorted({note for rank_notes in gathered for note in rank_notes})
    for kind, name, message in new:
        if name not in seen[kind]:
            seen[kind].add(name)
            if info.is_main:
                log.warning("%s", message)


def check_before_compute(cfg: AlignConfig) -> None:
    """What would otherwise fail only at the first save, hours in: refused before the teacher is built."""
    check_output_dir(run_dir_of(cfg), "config field 'output_dir'")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def train(cfg: AlignConfig) -> Path:
    """Run (or resume) MaskEmbed training; returns the aligned checkpoint directory."""
    validate(cfg)
    check_before_compute(cfg)
    info = D.setup(cfg.device)
    with contextlib.ExitStack() as cleanup:  # runs on success and on any crash
        cleanup.callback(D.teardown, info)
        return _train(cfg, info, cleanup)


def _train(cfg: AlignConfig, info: D.DistInfo, cleanup: contextlib.ExitStack) -> Path:
    device = info.device
    if device.type == "cuda":  # the reference's settings
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = functools.partial(P.autocast, cfg.precision, device)  # a fresh context per use
    student, teacher = build_model(cfg, device)
    teacher = build_teacher(teacher, cfg, device)
    data = build_data(cfg, student, teacher, info)
    optimizer = build_optimizer(student.named_parameters(), cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas,
                                cfg.optim.eps, cfg.optim.exclude_norm_bias_from_wd, fused=device.type == "cuda")
    ckpt = Checkpointer(cfg, info, student, optimizer, data.order.steps_per_epoch, data.total_steps,
                        teacher.target)
    run = restore_or_start(cfg, ckpt, teacher, data, autocast, info)
    if info.is_main:
        write_config(cfg, ckpt.run_dir)
        o = data.order
        log.info("run %s: %d train images, %d steps (%d/epoch), global batch %d = %d x %d accum x %d procs",
                 ckpt.run_dir, len(data.train), data.total_steps, o.steps_per_epoch, cfg.global_batch,
                 cfg.micro_batch, o.accum_steps, info.world_size)
    metrics = cleanup.enter_context(Metrics(ckpt.run_dir / "metrics.jsonl", info.is_main,
                                            run.step if ckpt.resumed_from else None, cfg,
                                            run.saved.get("wandb_run_id"), run.saved.get("log_window")))
    # analytic cost of one image, for achieved TFLOP/s and MFU in the log line (nanoGPT-style)
    enc_spec, K = V.vit_spec(student.encoder), data.sampler.masks_per_image
    flops = (train_flops_per_image(teacher.spec, enc_spec, student.decoder.cfg, K, teacher.num_blocks)
             if cfg.objective == "maskembed" else O.train_flops_per_image(cfg.objective, teacher.spec, enc_spec, K))
    metrics.cost(cfg.global_batch, flops["total"], info.world_size, peak_tflops(device))
    model = parallelize(student, cfg, info)
    stop = cleanup.enter_context(StopSignals())
    _loop(cfg, info, model, student, teacher, optimizer, data, ckpt, run, metrics, stop, autocast)

    return ckpt.finish(run, metrics)


def restore_or_start(cfg: AlignConfig, ckpt: Checkpointer, teacher: Teacher, data: Data, autocast: Callable,
                     info: D.DistInfo) -> Progress:
    """The saved progress (weights, optimiser, target scale restored), or a fresh start whose target
    scale is estimated on the held-out images."""
    run = ckpt.restore()
    if run is not None:
        if run.scale_stats is not None:
            teacher.scale.fill_(run.scale_stats["scale"])
        log.info("resumed from %s at step %d/%d", ckpt.resumed_from, run.step, data.total_steps)
        return run
    run = Progress()
    if uses_target_scale(cfg):
        with autocast():
            run.scale_stats = s = estimate_target_scale(teacher, val_batches(cfg, data, info, info.device))
        log.info("target scale 1/std = %.6g (mean %.4g, var %.4g over %d values)", s["scale"], s["mean"], s["var"],
                 s["count"])
    return run


def write_config(cfg: AlignConfig, run_dir: Path) -> None:
    """The resolved config as ``config.yaml`` (rerun it with ``--config_path``)."""
    text = io.StringIO()
    draccus.dump(cfg, text)
    write_text(run_dir / "config.yaml", text.getvalue())


def _loop(cfg: AlignConfig, info: D.DistInfo, model: nn.Module, student: MaskEmbed, teacher: Callable,
          optimizer: torch.optim.Optimizer, data: Data, ckpt: Checkpointer, run: Progress, metrics: Metrics,
          stop: StopSignals, autocast: Callable) -> None:
    """Steps from `run.step` to the end: update, log, validate and save at epoch ends, stop on a signal."""
    device, order, total = info.device, data.order, data.total_steps
    params = [p for p in student.parameters() if p.requires_grad]
    batches = train_micro_batches(cfg, data, run.step, device)
    bar = tqdm(total=total, initial=run.step, unit="step", dynamic_ncols=True, disable=not info.is_main,
               desc=f"align {ckpt.run_dir.name}")
    student.train()
    with contextlib.closing(batches):  # stops the DataLoader workers however the loop ends
        while run.step < total:
            o = cfg.optim
            lr = lr_at(run.step, total, o.lr, o.resolved_min_lr, o.warmup_steps, o.resolved_warmup_lr)
            set_lr(optimizer, lr)
            # the whole global batch's masks on every rank, then this rank's slice (masks.step_generator)
            masks = data.sampler(cfg.global_batch, step_generator(cfg.seed, run.step, device, stream=TRAIN_STREAM))
            notes: list = []
            micro = step_micro_batches(batches, masks[order.rank_slice()], order, device, notes)
            loss, grad_norm = train_step(model, teacher, optimizer, params, micro, order.accum_steps, o.clip_grad,
                                         autocast, info)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                bar.close()
                last_good = (f"{ckpt.state_dir} (step {ckpt.last_saved_step})"
                             if ckpt.last_saved_step is not None else None)
                raise non_finite(run.step + 1, loss, grad_norm, last_good, metrics)
            run.step, run.last_loss = run.step + 1, loss
            metrics.add_step(loss)
            bar.update(1)
            stop_requested = _agree_on_files_and_stop(notes, run.seen, stop, info)

            epoch, within = divmod(run.step, order.steps_per_epoch)
            if run.step % cfg.log_every == 0 or run.step == total:
                rec = metrics.log_step(run.step, run.step / order.steps_per_epoch, lr, grad_norm,
                                       skipped=len(run.seen[UNREADABLE]), cropped=len(run.seen[CROPPED]))
                mfu = {"mfu": f"{100 * rec['mfu']:.1f}%"} if rec["mfu"] else {}
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{rec['img_per_s']:.1f}", **mfu,
                                skipped=rec["skipped_images"])
            stopping = stop_requested and run.step < total
            with metrics.aside():
                if within == 0 and cfg.validate:
                    run.val_loss = validation_loss(student, teacher, val_batches(cfg, data, info, device), autocast,
                                                   info, device)
                    metrics.write({"step": run.step, "epoch": epoch, "val_loss": run.val_loss})
                    if info.is_main:
                        bar.write(f"epoch {epoch}: val loss {run.val_loss:.5f}")
                if within == 0 and cfg.save_epoch_checkpoints and info.is_main:
                    ckpt.export(ckpt.run_dir / f"epoch-{epoch:03d}", ckpt.state_info(run, metrics))
                if ckpt.should_save(run.step, stopping):
                    ckpt.save(run, metrics)
            if stopping:
                bar.close()
                raise stopped(stop, run.step, total, ckpt.state_dir)
    bar.close()


def _agree_on_files_and_stop(notes: list, seen: dict, stop: StopSignals, info: D.DistInfo) -> bool:
    """One small all-reduce per step: whether any rank read a data file it had not reported yet
    (then all ranks record the union, `record_new_files`) and whether any rank was asked to stop."""
    new_here = any(name not in seen[kind] for kind, name, _ in notes)
    flags = torch.tensor([float(new_here), float(stop.signum is not None)], dtype=torch.float64, device=info.device)
    any_new, any_stop = D.all_reduce_sum(flags, info).tolist()
    record_new_files(notes, seen, info, any_new > 0)
    return any_stop > 0


def stopped(stop: StopSignals, step: int, total: int, state_dir: Path) -> Stopped:
    """The exception that ends a run stopped by a signal after saving `state_dir` (also `locality finetune`'s)."""
    signum = stop.signum or signal.SIGTERM  # another rank was signalled
    name = signal.Signals(signum).name if stop.signum else "a signal to another process"
    return Stopped(f"stopped by {name} after step {step} of {total}; the training state is saved "
                   f"in {state_dir}; rerun the same command to resume", signum)


def non_finite(step: int, loss: float, grad_norm: float, last_good: Optional[str], metrics: Metrics) -> NonFiniteLoss:
    """Log the failed step (numbered as in metrics.jsonl: step k = the k-th update) and name the last good
    state (`last_good`, None when nothing was saved yet); also `locality finetune`'s."""
    metrics.write({"step": step, "event": "non_finite", "loss": loss, "grad_norm": grad_norm})
    where = f"the last good training state is {last_good}" if last_good else "no training state had been saved yet"
    return NonFiniteLoss(f"non-finite loss/gradient at step {step} (loss {loss}, grad norm {grad_norm}); "
                         f"stopped before that update; {where}")


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_config(argv)
        out = train(cfg)
    except (ValueError, FileNotFoundError, NonFiniteLoss) as e:  # CheckpointError is a ValueError
        print(f"locality align: error: {e}", file=sys.stderr)
        return 1
    except Stopped as e:
        if rank == 0:
            print(f"locality align: {e}", file=sys.stderr)
        return 128 + e.signum  # the shell's convention for "ended by this signal"
    if rank == 0:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
