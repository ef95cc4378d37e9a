"""A 2-process gloo DDP run (real torchrun + scripts/align.py) equals a 1-process run at the same
global batch: same data order, augmentation, masks and target scale, gradients averaged the same way."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prismatic_locality.align.config import parse_config
from prismatic_locality.align.train import train
from prismatic_locality.fileio import recover_dir

from test_align_train import TINY, write_tree  # noqa: E402  (tests/ is on sys.path under pytest)

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def args(tmp_path, name, micro):
    return ["--recipe", "demo", "--data.root", str(tmp_path / "data"), "--output_dir", str(tmp_path / "runs"),
            "--run_name", name, "--teacher.timm_kwargs", TINY, "--global_batch", "8", "--micro_batch", str(micro),
            "--max_steps", "3", "--data.val_batch_size", "4", "--log_every", "1", "--save_every", "10",
            "--data.augment", "rkrc", "--optim.lr", "1e-3"]


def test_two_process_ddp_equals_one_process(tmp_path):
    write_tree(tmp_path / "data", n_train=16, n_val=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # 2 processes x micro-batch 2 x 2 accumulation steps (exercises no_sync) = 8
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "scripts" / "align.py"), *args(tmp_path, "ddp", 2)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(parse_config(args(tmp_path, "single", 4)))   # 1 process x 4 x 2 accumulation steps
    finally:
        torch.set_num_threads(n)

    ddp = tmp_path / "runs" / "ddp" / "aligned"
    a, b = load_file(str(single / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |single - ddp| weight difference after 3 steps: {worst:.3g}")
    assert worst < 1e-5, f"max |single - ddp| = {worst}"
    # both logged the same global losses, and they trained
    sa = [json.loads(x) for x in (single.parent / "metrics.jsonl").read_text().splitlines()]
    sb = [json.loads(x) for x in (ddp.parent / "metrics.jsonl").read_text().splitlines()]
    la, lb = [r["loss"] for r in sa if "loss" in r], [r["loss"] for r in sb if "loss" in r]
    assert len(la) == len(lb) == 3 and la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    ta = json.loads((single.parent / "state" / "state.json").read_text())["target_scale"]
    tb = json.loads((ddp.parent / "state" / "state.json").read_text())["target_scale"]
    assert ta["count"] == tb["count"] and ta["scale"] == pytest.approx(tb["scale"], rel=1e-12)
    assert la[-1] < la[0]


def test_sigkilled_run_resumes_bit_identically(tmp_path):
    """A real kill -9 of `scripts/align.py` at an arbitrary step after a few saves, then resume."""
    import signal
    import time

    write_tree(tmp_path / "data", n_train=16, n_val=8)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    argv = args(tmp_path, "killed", 4)
    argv[argv.index("--max_steps") + 1] = "24"
    argv[argv.index("--save_every") + 1] = "1"
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "align.py"), *argv], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = tmp_path / "runs" / "killed" / "state" / "state.json"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    recover_dir(state.parent)   # the kill may have hit the instant inside the state swap (the trainer does this too)
    killed_at = json.loads(state.read_text())["step"]
    assert 3 <= killed_at < 24

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = train(parse_config(argv))                        # auto-resume
        ref_argv = list(argv)
        ref_argv[ref_argv.index("--run_name") + 1] = "uninterrupted"
        ref = train(parse_config(ref_argv))
    finally:
        torch.set_num_threads(n)
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), f"killed at step {killed_at}: weights differ"
