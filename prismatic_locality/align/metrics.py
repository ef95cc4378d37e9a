"""The run's metrics: ``metrics.jsonl`` (+ Weights & Biases when enabled and installed) and the log
window whose mean loss and throughput each record reports."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import List, Optional

from ..fileio import write_text
from .config import AlignConfig, to_dict

log = logging.getLogger("prismatic_locality.align")


class Metrics:
    """metrics.jsonl (+ wandb when enabled and installed), main process only, and the log window:
    the steps since the last record, whose mean loss and throughput (img/s, TFLOP/s, MFU) the next
    record reports. Validation and saving are set aside (`aside`), not counted as training time.

    A resumed run continues the same wandb run: its id is kept in the training state. Steps the
    crashed run had already logged past its last saved state are not logged again (wandb keeps
    the first copy, which an exact resume reproduces anyway). Closed by the run's exit stack, so a
    crash still finishes the wandb run (marked failed) and a later run in the process starts afresh.
    """

    def __init__(self, path: Path, enabled: bool, resume_step: Optional[int], cfg: AlignConfig,
                 wandb_run_id: Optional[str] = None, window: Optional[dict] = None):
        self.path, self.enabled, self.wandb = path, enabled, None
        # the log window open when the state was saved, so the first record after a resume averages the same steps
        window = window or {"steps": 0, "loss": 0.0, "seconds": 0.0}
        self.window_t, self.window_steps, self.window_loss = time.time() - window["seconds"], window["steps"], window["loss"]
        if not enabled:
            return
        if resume_step is None:
            path.unlink(missing_ok=True)
        elif path.exists():  # drop what the interrupted run logged after its last saved state
            keep = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
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

    def add_step(self, loss: float) -> None:
        self.window_steps += 1
        self.window_loss += loss

    def cost(self, images_per_step: int, flops_per_image: float, world_size: int, peak_tflops: Optional[float]):
        """What throughput is computed from: images per optimiser step, analytic FLOPs per image, the
        number of processes, and the device's nominal peak (None: no MFU)."""
        self.images_per_step, self.flops_per_image, self.world_size, self.peak = (
            images_per_step, flops_per_image, world_size, peak_tflops)

    def log_step(self, step: int, epoch: float, lr: float, grad_norm: float, skipped: int, cropped: int) -> dict:
        """Write the record of the window ending at `step` (its mean loss and throughput); start the next window."""
        elapsed = max(time.time() - self.window_t, 1e-9)
        rate = self.window_steps * self.images_per_step / elapsed
        tflops = rate * self.flops_per_image / self.world_size / 1e12  # per process
        rec = {"step": step, "epoch": round(epoch, 4), "loss": self.window_loss / self.window_steps, "lr": lr,
               "grad_norm": grad_norm, "img_per_s": rate, "tflops_per_proc": tflops,
               "mfu": tflops / self.peak if self.peak else None, "skipped_images": skipped,
               **({"cropped_images": cropped} if cropped else {})}
        self.write(rec)
        self.window_t, self.window_steps, self.window_loss = time.time(), 0, 0.0
        return rec

    def window_state(self) -> dict:
        return {"steps": self.window_steps, "loss": self.window_loss, "seconds": time.time() - self.window_t}

    @contextlib.contextmanager
    def aside(self):
        """Time spent in the block (validation, saving) is not training throughput."""
        t = time.time()
        try:
            yield
        finally:
            self.window_t += time.time() - t

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
