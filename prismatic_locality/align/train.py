"""The MaskEmbed trainer: ``locality align`` / ``torchrun scripts/align.py`` / ``train(cfg)``.

One optimiser step = one global batch of G images = micro_batch x accumulation x world size.
For every micro-batch: the teacher h computes targets on the masked images, the encoder f_θ runs
once on the clean images, the decoder g_ψ reconstructs the targets from the masked embeddings
(`maskembed.MaskEmbed`); the loss is back-propagated under DDP ``no_sync`` except on the last
micro-batch; then grad-norm clip, AdamW, cosine lr (spec A.0, A.8).

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
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import draccus
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import precision as P
from .. import vit as V
from ..checkpoint import CheckpointError, check_output_dir, recover_dir, save_aligned
from ..data import RKRC, EvalTransform, GlobalBatchOrder, SeededImages, collate, open_source, surface_worker_errors
from ..data.dataset import CROPPED, UNREADABLE
from ..decoder import MaskEmbedDecoder
from ..maskembed import (MaskEmbed, Teacher, default_decoder_config, estimate_target_scale, make_encoder, peak_tflops,
                         train_flops_per_image)
from ..masks import build_mask_sampler, step_generator
from . import distributed as D
from .config import AlignConfig, parse_config, to_dict, validate
from .optim import build_optimizer, lr_at, set_lr
from .state import config_mismatch, has_state, load_state, read_state_info, save_state

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
# Building blocks
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


def build_model(cfg: AlignConfig, device: torch.device) -> MaskEmbed:
    """Teacher h, encoder f_θ (a copy of the teacher) and decoder g_ψ; seeded, so every rank agrees."""
    torch.manual_seed(cfg.seed)
    vit = build_teacher_vit(cfg)
    student = copy.deepcopy(vit)
    teacher = Teacher(vit, target=cfg.teacher.target, masking=cfg.teacher.masking)
    dcfg = default_decoder_config(teacher.spec, V.vit_spec(student), width=cfg.decoder.width,
                                  depth=cfg.decoder.depth, init_values=cfg.decoder.init_values)
    encoder = make_encoder(student, dcfg.width, softcap=cfg.encoder.softcap, attn_impl=cfg.encoder.attn_impl)
    if cfg.encoder.grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    model = MaskEmbed(encoder, MaskEmbedDecoder(dcfg), teacher, loss=cfg.loss).to(device)
    teacher.to(device)
    teacher.vit.to(P.teacher_dtype(cfg.teacher.dtype, cfg.precision, device))  # cast once; the teacher never trains
    return model


def data_transforms(cfg: AlignConfig, teacher: Teacher):
    """Train/eval transforms at the teacher's resolution, normalised with its mean/std (spec A.9)."""
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


class Metrics:
    """metrics.jsonl (+ wandb when enabled and installed), main process only.

    A resumed run continues the same wandb run: its id is kept in the training state. Steps the
    crashed run had already logged past its last saved state are not logged again (wandb keeps
    the first copy, which an exact resume reproduces anyway). Closed by the run's exit stack, so a
    crash still finishes the wandb run (marked failed) and a later run in the process starts afresh.
    """

    def __init__(self, path: Path, enabled: bool, resume_step: Optional[int], cfg: AlignConfig,
                 wandb_run_id: Optional[str] = None):
        self.path, self.enabled, self.wandb = path, enabled, None
        if not enabled:
            return
        if resume_step is None:
            path.unlink(missing_ok=True)
        elif path.exists():  # drop what the interrupted run logged after its last saved state
            keep = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, path)
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                log.warning("wandb is enabled but not installed (pip install wandb); logging to %s only", path)
            else:
                self.wandb = wandb.init(project=cfg.wandb_project, name=path.parent.name, config=to_dict(cfg),
                                        id=wandb_run_id, resume="allow")

    @property
    def wandb_run_id(self) -> Optional[str]:
        return self.wandb.id if self.wandb is not None else None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        # strict JSON: a NaN/Inf value is written as null, and named with its value in "non_finite"
        bad = {k: str(v) for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
        line = {**record, **dict.fromkeys(bad), **({"non_finite": bad} if bad else {})}
        with open(self.path, "a") as f:
            f.write(json.dumps(line, allow_nan=False) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def close(self, failed: bool = False):
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.close(failed=exc_type is not None)


def read_metrics(path: Path) -> List[dict]:
    """The records of a metrics.jsonl. A torn last line (what a kill or a full disk leaves) is
    dropped with a warning; any other line that is not JSON is an error naming the file and line."""
    lines = path.read_text().split("\n")  # a complete file ends with "\n": the last item is ""
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):
                log.warning("%s: dropping its torn last line (%d bytes; the previous run was interrupted while "
                            "writing it)", path, len(line))
                continue
            raise ValueError(f"{path}: line {i} is not JSON ({e.msg}); repair or delete that line, or pass "
                             f"--resume never to start the run over") from None
    return records


# --------------------------------------------------------------------------------------------
# Held-out data: target scale and validation loss
# --------------------------------------------------------------------------------------------


def val_batches(cfg: AlignConfig, dataset: SeededImages, sampler, info: D.DistInfo, device: torch.device
                ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the held-out batches (b ≡ rank mod world), masks seeded by batch index,
    so the masks an image gets are the same every epoch and for every world size (spec A.1)."""
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
        masks = sampler(images.shape[0], step_generator(cfg.seed, b, device, stream=VAL_STREAM))
        yield images.to(device, non_blocking=True), masks


@torch.no_grad()
def validation_loss(model: MaskEmbed, batches, autocast, info: D.DistInfo, device: torch.device) -> float:
    model.eval()
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    for images, masks in batches:
        with autocast():
            loss = model(images, masks)
        acc += torch.stack([loss.double() * images.shape[0], torch.tensor(float(images.shape[0]), dtype=torch.float64, device=device)])
    model.train()
    D.all_reduce_sum(acc, info)
    return (acc[0] / acc[1]).item()


def accumulate_gradients(forward, ddp: Optional[DDP], batches, masks: torch.Tensor, order: GlobalBatchOrder,
                         autocast, device: torch.device) -> Tuple[torch.Tensor, list]:
    """Forward/backward this rank's micro-batches of one step (DDP syncs on the last one only).
    Returns the rank's mean loss (no host sync) and the data notes (unreadable/cropped files)."""
    loss_sum = torch.zeros((), device=device)
    notes = []
    for j in range(order.accum_steps):
        images, batch_notes = next(batches)
        notes += batch_notes
        images = images.to(device, non_blocking=True)
        m = masks[j * order.micro_batch: (j + 1) * order.micro_batch]
        sync = ddp is None or j == order.accum_steps - 1
        with contextlib.nullcontext() if sync else ddp.no_sync():
            with autocast():
                loss = forward(images, m)
            (loss / order.accum_steps).backward()
        loss_sum += loss.detach() / order.accum_steps
    return loss_sum, notes


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


def clip_grad_norm(params: List[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global grad-norm clip (spec A.8); with max_norm <= 0 only measures the norm."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run_dir_of(cfg: AlignConfig) -> Path:
    return Path(cfg.output_dir) / (cfg.run_name or cfg.recipe or "align")


def _resume_source(cfg: AlignConfig, run_dir: Path, first_save: int) -> Optional[Path]:
    """The training state to resume from (main process only: it may repair the run directory).
    `first_save` is the first step at which a training state is written."""
    if cfg.resume == "never":
        return None
    path = run_dir / "state" if cfg.resume == "auto" else Path(cfg.resume)
    recovered = recover_dir(path)  # a kill inside the state swap leaves complete copies beside it
    if recovered:
        log.warning("%s", recovered)
    if cfg.resume == "auto":
        if has_state(path):
            return path
        restart = "pass --resume never to start the run over, or choose another --run_name"
        if path.exists():
            raise CheckpointError(f"{path}: has no state.json, so the run cannot resume; {restart}")
        log_file = run_dir / "metrics.jsonl"
        steps = [r["step"] for r in read_metrics(log_file) if "loss" in r] if log_file.is_file() else []
        if steps and max(steps) >= first_save:  # a state was saved once: never restart silently
            raise CheckpointError(f"{log_file}: logs training up to step {max(steps)}, but its training state "
                                  f"{path} is missing, so the run cannot resume; {restart}")
        return None
    if not has_state(path):
        raise FileNotFoundError(f"config field 'resume': no training state at {path} (expected {path / 'state.json'})")
    return path


def check_before_compute(cfg: AlignConfig) -> None:
    """What would otherwise fail only at the first save, hours in: refused before the teacher is built."""
    check_output_dir(run_dir_of(cfg), "config field 'output_dir'")


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
    if device.type == "cuda":  # the reference's settings (spec A.10)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run_dir = run_dir_of(cfg)
    state_dir = run_dir / "state"
    t_start = time.time()

    model = build_model(cfg, device)
    teacher = model.teacher
    precision = P.resolve(cfg.precision, device)
    autocast = functools.partial(P.autocast, precision, device)  # a fresh context per use
    # the encoder's soft-capped attention is explicit on CPU already
    P.switch_attention(precision, device, teacher.vit, model.decoder)
    sampler = build_mask_sampler(cfg.masks.kind, teacher.spec.grid, cfg.masks.complement, cfg.masks.null,
                                 cfg.masks.keep_prob, cfg.masks.block_ratio)
    if sampler.num_patches != V.vit_spec(model.encoder).num_patches:
        raise ValueError("teacher and encoder patch grids differ")

    # Data
    train_tf, eval_tf = data_transforms(cfg, teacher)
    train_set = SeededImages(open_source(cfg.data.root, cfg.data.train_split, cfg.data.format), train_tf, cfg.seed)
    order = GlobalBatchOrder(len(train_set), cfg.global_batch, cfg.micro_batch, info.world_size, info.rank, cfg.seed)
    total_steps = cfg.max_steps or max(1, round(cfg.epochs * order.steps_per_epoch))
    use_scale = cfg.target_scale == "on" or (cfg.target_scale == "auto" and cfg.loss == "mse")
    val_set = None
    if use_scale or cfg.validate:
        val_set = SeededImages(open_source(cfg.data.root, cfg.data.val_split, cfg.data.format), eval_tf, cfg.seed)

    optimizer = build_optimizer(model.named_parameters(), cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas,
                                cfg.optim.eps, cfg.optim.exclude_norm_bias_from_wd, fused=device.type == "cuda")

    # Resume or start (rank 0 decides; an error is raised on every rank)
    try:
        first_save = min(cfg.save_every, order.steps_per_epoch, total_steps)
        decision = (_resume_source(cfg, run_dir, first_save) if info.is_main else None, None)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        decision = (None, e)
    resume_from, problem = D.broadcast_object(decision, info)
    if problem is not None:
        raise problem
    cfg_dict = to_dict(cfg)
    if resume_from is not None:
        saved = read_state_info(resume_from)
        problem = config_mismatch(saved.get("config", {}), cfg_dict, str(resume_from / "state.json"))
        if problem:
            raise CheckpointError(problem)
        saved = load_state(resume_from, model, optimizer)
        step, scale_stats = saved["step"], saved.get("target_scale")
        counters = saved.get("counters", {})
        if scale_stats is not None:
            teacher.scale.fill_(scale_stats["scale"])
        log.info("resumed from %s at step %d/%d", resume_from, step, total_steps)
    else:
        step, scale_stats, counters, saved = 0, None, {}, {}
        if use_scale:
            with autocast():
                scale_stats = estimate_target_scale(teacher, val_batches(cfg, val_set, sampler, info, device))
            log.info("target scale 1/std = %.6g (mean %.4g, var %.4g over %d values)", scale_stats["scale"],
                     scale_stats["mean"], scale_stats["var"], scale_stats["count"])
    # files reported by the dataset, each counted once (restored, so a resumed run counts the same)
    seen = {UNREADABLE: set(counters.get("skipped_files", [])), CROPPED: set(counters.get("cropped_files", []))}
    wall_before = counters.get("wall_time_s", 0.0)
    last_saved_step = step if resume_from is not None else None

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / ".config.yaml.tmp", "w") as f:
            draccus.dump(cfg, f)
        os.replace(run_dir / ".config.yaml.tmp", run_dir / "config.yaml")
    metrics = cleanup.enter_context(Metrics(run_dir / "metrics.jsonl", info.is_main,
                                            step if resume_from is not None else None, cfg, saved.get("wandb_run_id")))
    if info.is_main:
        log.info("run %s: %d train images, %d steps (%d/epoch), global batch %d = %d x %d accum x %d procs",
                 run_dir, len(train_set), total_steps, order.steps_per_epoch, cfg.global_batch, cfg.micro_batch,
                 order.accum_steps, info.world_size)

    ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False) if info.distributed else None
    forward = ddp if ddp is not None else model
    if cfg.compile:
        forward = torch.compile(forward)
        object.__setattr__(model, "teacher", torch.compile(teacher))
    params = [p for p in model.parameters() if p.requires_grad]
    # analytic cost of one image, for achieved TFLOP/s and MFU in the log line (nanoGPT-style)
    flops_per_image = train_flops_per_image(teacher.spec, V.vit_spec(model.encoder), model.decoder.cfg,
                                            sampler.masks_per_image, teacher.num_blocks)["total"]
    peak = peak_tflops(device)

    def state_info(last_loss, val_loss) -> dict:
        return {"step": step, "epoch": step / order.steps_per_epoch, "total_steps": total_steps,
                "target_scale": scale_stats, "config": cfg_dict, "world_size": info.world_size,
                "last_loss": last_loss, "val_loss": val_loss,
                "wandb_run_id": metrics.wandb_run_id or saved.get("wandb_run_id"),
                "counters": {"skipped_images": len(seen[UNREADABLE]), "cropped_images": len(seen[CROPPED]),
                             "skipped_files": sorted(seen[UNREADABLE]), "cropped_files": sorted(seen[CROPPED]),
                             "wall_time_s": wall_before + time.time() - t_start},
                # the open log window, so the first record after a resume averages the same steps
                "log_window": {"steps": window_steps, "loss": window_loss, "seconds": time.time() - window_t}}

    def save(last_loss, val_loss):
        nonlocal last_saved_step
        if info.is_main:
            save_state(state_dir, model, optimizer, state_info(last_loss, val_loss))
        D.barrier(info)
        last_saved_step = step

    loader = DataLoader(train_set, batch_sampler=order.micro_batches(step, total_steps), collate_fn=collate,
                        num_workers=cfg.data.workers, pin_memory=device.type == "cuda",
                        worker_init_fn=_ignore_stop_signals)
    batches = surface_worker_errors(loader)
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, disable=not info.is_main,
               desc=f"align {run_dir.name}")
    last_loss = val_loss = None
    window = saved.get("log_window") or {"steps": 0, "loss": 0.0, "seconds": 0.0}
    window_t, window_steps, window_loss = time.time() - window["seconds"], window["steps"], window["loss"]
    rs = order.rank_slice()
    stop = cleanup.enter_context(StopSignals())
    model.train()
    while step < total_steps:
        lr = lr_at(step, total_steps, cfg.optim.lr, cfg.optim.resolved_min_lr, cfg.optim.warmup_steps,
                   cfg.optim.resolved_warmup_lr)
        set_lr(optimizer, lr)
        # the whole global batch's masks on every rank, then this rank's slice (masks.step_generator)
        masks = sampler(cfg.global_batch, step_generator(cfg.seed, step, device, stream=TRAIN_STREAM))[rs]
        loss_sum, notes = accumulate_gradients(forward, ddp, batches, masks, order, autocast, device)
        grad_norm = clip_grad_norm(params, cfg.optim.clip_grad)
        # one small all-reduce per step: mean loss for logging, a global non-finite flag, whether any
        # rank saw a file it had not reported yet, whether any rank was asked to stop
        new_here = any(name not in seen[kind] for kind, name, _ in notes)
        flags = torch.tensor([float(new_here), float(stop.signum is not None)], dtype=torch.float64, device=device)
        stats = torch.cat([torch.stack([loss_sum.double(), (~torch.isfinite(loss_sum)).double()]), flags])
        D.all_reduce_sum(stats, info)
        record_new_files(notes, seen, info, stats[2].item() > 0)
        step_loss = stats[0].item() / info.world_size
        gn = grad_norm.item()
        if stats[1].item() > 0 or not math.isfinite(gn):
            optimizer.zero_grad(set_to_none=True)
            where = (f"the last good training state is {state_dir} (step {last_saved_step})" if last_saved_step is not None
                     else "no training state had been saved yet")
            # steps are numbered as in metrics.jsonl: step k = the k-th optimiser update
            metrics.write({"step": step + 1, "event": "non_finite", "loss": step_loss, "grad_norm": gn})
            bar.close()
            raise NonFiniteLoss(f"non-finite loss/gradient at step {step + 1} (loss {step_loss}, grad norm {gn}); "
                                f"stopped before that update; {where}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        skipped_total = len(seen[UNREADABLE])
        last_loss = step_loss
        window_steps += 1
        window_loss += step_loss
        bar.update(1)

        if step % cfg.log_every == 0 or step == total_steps:
            elapsed = max(time.time() - window_t, 1e-9)
            rate = window_steps * cfg.global_batch / elapsed
            tflops = rate * flops_per_image / info.world_size / 1e12  # per process
            rec = {"step": step, "epoch": round(step / order.steps_per_epoch, 4), "loss": window_loss / window_steps,
                   "lr": lr, "grad_norm": gn, "img_per_s": rate, "tflops_per_proc": tflops,
                   "mfu": tflops / peak if peak else None, "skipped_images": skipped_total,
                   **({"cropped_images": len(seen[CROPPED])} if seen[CROPPED] else {})}
            metrics.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}",
                            **({"mfu": f"{100 * rec['mfu']:.1f}%"} if peak else {}), skipped=skipped_total)
            window_t, window_steps, window_loss = time.time(), 0, 0.0

        end_of_epoch = step % order.steps_per_epoch == 0
        t_aside = time.time()  # validation and saving are not training throughput
        if end_of_epoch and cfg.validate:
            val_loss = validation_loss(model, val_batches(cfg, val_set, sampler, info, device), autocast, info, device)
            metrics.write({"step": step, "epoch": step // order.steps_per_epoch, "val_loss": val_loss})
            if info.is_main:
                bar.write(f"epoch {step // order.steps_per_epoch}: val loss {val_loss:.5f}")
        if end_of_epoch and cfg.save_epoch_checkpoints and info.is_main:
            _save_aligned(run_dir / f"epoch-{step // order.steps_per_epoch:03d}", model, cfg, cfg_dict,
                          state_info(last_loss, val_loss))
        stopping = stats[3].item() > 0 and step < total_steps
        if step % cfg.save_every == 0 or end_of_epoch or step == total_steps or stopping:
            save(last_loss, val_loss)
        window_t += time.time() - t_aside
        if stopping:
            bar.close()
            signum = stop.signum or signal.SIGTERM  # another rank was signalled
            name = signal.Signals(signum).name if stop.signum else "a signal to another process"
            raise Stopped(f"stopped by {name} after step {step} of {total_steps}; the training state is saved "
                          f"in {state_dir}; rerun the same command to resume", signum)
    bar.close()

    if last_saved_step != step:  # a resumed, already finished run
        save(last_loss, val_loss)
    out = run_dir / "aligned"
    if info.is_main:
        summary = state_info(last_loss, val_loss)
        if resume_from is not None and last_loss is None:
            summary.update(last_loss=saved.get("last_loss"), val_loss=saved.get("val_loss"))
        _save_aligned(out, model, cfg, cfg_dict, summary)
        log.info("aligned checkpoint: %s", out)
    D.barrier(info)
    return out


def _save_aligned(out: Path, model: MaskEmbed, cfg: AlignConfig, cfg_dict: dict, summary: dict) -> None:
    t = cfg.teacher
    training = {k: v for k, v in summary.items() if k != "config"}
    save_aligned(out, model.encoder, model.decoder, model_name=t.model, softcap=cfg.encoder.softcap,
                 timm_kwargs=t.timm_kwargs,
                 extra={"teacher": {"model": t.model, "weights": t.weights, "target": t.target, "masking": t.masking},
                        "target": t.target, "recipe": cfg.recipe, "align_config": cfg_dict, "training": training})


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
