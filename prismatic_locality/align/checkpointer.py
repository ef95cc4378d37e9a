"""The run's checkpoints: restore-or-start, when to save, the training state (`state.py`) and the
aligned exports (`checkpoint.save_aligned`)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import CheckpointError, save_aligned
from ..data.dataset import CROPPED, UNREADABLE
from ..fileio import recover_dir
from ..maskembed import MaskEmbed
from . import distributed as D
from .config import AlignConfig, to_dict
from .metrics import Metrics, read_metrics
from .state import config_mismatch, has_state, load_training_state, read_state_info, save_training_state

log = logging.getLogger("prismatic_locality.align")


@dataclass
class Progress:
    """Where the run is: what the training state records besides the weights and the optimiser."""
    step: int = 0
    scale_stats: Optional[dict] = None           # the target scale estimate (estimate_target_scale)
    seen: dict = field(default_factory=lambda: {UNREADABLE: set(), CROPPED: set()})  # files reported, by kind
    wall_before: float = 0.0                     # wall time of the runs this one resumes
    last_loss: Optional[float] = None
    val_loss: Optional[float] = None
    saved: dict = field(default_factory=dict)    # the restored state.json ({} for a fresh run)


class Checkpointer:
    """The run's training state in ``{run_dir}/state`` (`state.py`) and its aligned checkpoints."""

    def __init__(self, cfg: AlignConfig, info: D.DistInfo, student: MaskEmbed, optimizer: torch.optim.Optimizer,
                 steps_per_epoch: int, total_steps: int, target: str):
        self.cfg, self.info, self.student, self.optimizer = cfg, info, student, optimizer
        self.target = target  # the teacher output the student was trained on, recorded in config.json
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.run_dir = run_dir_of(cfg)
        self.state_dir = self.run_dir / "state"
        self.cfg_dict = to_dict(cfg)
        self.resumed_from: Optional[Path] = None
        self.last_saved_step: Optional[int] = None
        self.t_start = time.time()

    def restore(self) -> Optional[Progress]:
        """The saved progress, weights and optimiser loaded, or None to start afresh. Rank 0 decides
        (it may repair the run directory); an error is raised on every rank."""
        try:
            first_save = min(self.cfg.save_every, self.steps_per_epoch, self.total_steps)
            decision = (resume_source(self.cfg, self.run_dir, first_save) if self.info.is_main else None, None)
        except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
            decision = (None, e)
        path, problem = D.broadcast_object(decision, self.info)
        if problem is not None:
            raise problem
        if path is None:
            return None
        problem = config_mismatch(read_state_info(path).get("config", {}), self.cfg_dict, str(path / "state.json"))
        if problem:
            raise CheckpointError(problem)
        saved = load_training_state(path, self.student, self.optimizer)
        counters = saved.get("counters", {})
        self.resumed_from, self.last_saved_step = path, saved["step"]
        return Progress(step=saved["step"], scale_stats=saved.get("target_scale"),
                        seen={UNREADABLE: set(counters.get("skipped_files", [])),
                              CROPPED: set(counters.get("cropped_files", []))},
                        wall_before=counters.get("wall_time_s", 0.0), saved=saved)

    def should_save(self, step: int, stopping: bool) -> bool:
        epoch_end = step % self.steps_per_epoch == 0
        return step % self.cfg.save_every == 0 or epoch_end or step == self.total_steps or stopping

    def state_info(self, run: Progress, metrics: Metrics) -> dict:
        seen = run.seen
        return {"step": run.step, "epoch": run.step / self.steps_per_epoch,
                "total_steps": self.total_steps, "target_scale": run.scale_stats, "config": self.cfg_dict,
                "world_size": self.info.world_size, "last_loss": run.last_loss, "val_loss": run.val_loss,
                "wandb_run_id": metrics.wandb_run_id or run.saved.get("wandb_run_id"),
                "counters": {"skipped_images": len(seen[UNREADABLE]), "cropped_images": len(seen[CROPPED]),
                             "skipped_files": sorted(seen[UNREADABLE]), "cropped_files": sorted(seen[CROPPED]),
                             "wall_time_s": run.wall_before + time.time() - self.t_start},
                "log_window": metrics.window_state()}

    def save(self, run: Progress, metrics: Metrics) -> None:
        if self.info.is_main:
            save_training_state(self.state_dir, self.student, self.optimizer, self.state_info(run, metrics))
        D.barrier(self.info)
        self.last_saved_step = run.step

    def finish(self, run: Progress, metrics: Metrics) -> Path:
        """The last training state (unless just saved) and the aligned checkpoint ``{run_dir}/aligned``."""
        if self.last_saved_step != run.step:  # a resumed, already finished run
            self.save(run, metrics)
        out = self.run_dir / "aligned"
        if self.info.is_main:
            summary = self.state_info(run, metrics)
            if self.resumed_from is not None and run.last_loss is None:
                summary.update(last_loss=run.saved.get("last_loss"), val_loss=run.saved.get("val_loss"))
            self.export(out, summary)
            log.info("aligned checkpoint: %s", out)
        D.barrier(self.info)
        return out

    def export(self, out: Path, summary: dict) -> None:
        """An aligned checkpoint (main process only): the encoder and decoder, and how they were trained."""
        t = self.cfg.teacher
        training = {k: v for k, v in summary.items() if k != "config"}
        target = self.target  # the objective's teacher decides it (mim: last, clipself: cls)
        teacher = {"model": t.model, "weights": t.weights, "target": target, "masking": t.masking,
                   **({"aligned": t.aligned} if t.aligned is not None else {})}
        save_aligned(out, self.student.encoder, self.student.decoder, model_name=t.model,
                     softcap=self.cfg.encoder.softcap, timm_kwargs=t.timm_kwargs,
                     extra={"objective": self.cfg.objective, "teacher": teacher,
                            "target": target, "recipe": self.cfg.recipe, "align_config": self.cfg_dict,
                            "training": training})


def run_dir_of(cfg: AlignConfig) -> Path:
    return Path(cfg.output_dir) / (cfg.run_name or cfg.recipe or "align")


def resume_source(cfg: AlignConfig, run_dir: Path, first_save: int) -> Optional[Path]:
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
