"""The trainer end to end on a tiny random ViT (CPU, seconds): loss falls, checkpoints load, a crashed
run resumes bit-identically, NaN stops with the last good state kept, corrupt images and tar shards."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import prismatic_locality.fileio as FIO
import prismatic_locality.maskembed as ME
from prismatic_locality.align.config import parse_config
from prismatic_locality.align.train import NonFiniteLoss, main, train
from prismatic_locality.checkpoint import CheckpointError, load_aligned, read_config

TINY = '{"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}'


def write_tree(root, n_train=16, n_val=8, seed=0):
    """Demo-scenes layout: {root}/{split}/images/*.png, smooth blobs so there is something to learn."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:36, 0:36]
    for split, n in (("train", n_train), ("val", n_val)):
        d = root / split / "images"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.zeros((36, 36, 3))
            for _ in range(3):
                cy, cx, r = rng.uniform(0, 36, 2).tolist() + [rng.uniform(4, 10)]
                img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)[..., None] * rng.uniform(0, 1, 3)
            Image.fromarray((255 * img / img.max()).astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


def tiny_args(tmp_path, *extra):
    return [
        "--recipe", "demo", "--data.root", str(tmp_path / "data"), "--output_dir", str(tmp_path / "runs"),
        "--teacher.timm_kwargs", TINY, "--global_batch", "8", "--micro_batch", "4", "--max_steps", "6",
        "--data.val_batch_size", "4", "--log_every", "1", "--save_every", "2", "--optim.lr", "1e-3",
        "--data.augment", "rkrc", "--teacher.target", "penultimate",
        "--data.train_split", "train", "--data.val_split", "val", *extra,
    ]


def tiny_cfg(tmp_path, *extra):
    return parse_config(tiny_args(tmp_path, *extra))


def strict_json(line: str):
    """What a strict JSON parser accepts (no NaN/Infinity)."""
    def reject(c):
        raise ValueError(f"not JSON: {c}")
    return json.loads(line, parse_constant=reject)


def metrics(run_dir):
    return [strict_json(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


TIMING = ("img_per_s", "tflops_per_proc", "mfu")


def logged(run_dir):
    """metrics.jsonl without the wall-clock fields: what two runs of the same config must agree on."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(run_dir)]


def same_weights(a_dir, b_dir) -> bool:
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def count_loss_calls(monkeypatch) -> dict:
    real, calls = ME.reconstruction_loss, {"n": 0}

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(ME, "reconstruction_loss", counting)
    return calls


class Crash(Exception):
    pass


def crash_at_loss_call(monkeypatch, n: int):
    """Make the n-th reconstruction loss of this process raise Crash (a simulated kill); returns the
    real loss function to restore. The tiny runs make 2 loss calls per step (micro-batch 4 of 8)."""
    real = ME.reconstruction_loss
    calls = {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(ME, "reconstruction_loss", crashing)
    return real


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data(tmp_path):
    return write_tree(tmp_path / "data")


def test_tiny_run_loss_falls_and_writes_a_loadable_aligned_checkpoint(tmp_path, data):
    out = train(tiny_cfg(tmp_path, "--max_steps", "8"))
    run = tmp_path / "runs" / "demo"
    assert out == run / "aligned"
    rows = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], [r["loss"] for r in rows]
    assert all(k in rows[0] for k in ("lr", "grad_norm", "img_per_s", "skipped_images"))
    assert rows[0]["lr"] == pytest.approx(1e-3) and rows[-1]["lr"] < rows[0]["lr"]
    vals = [r["val_loss"] for r in metrics(run) if "val_loss" in r]
    assert len(vals) == 4 and vals[-1] < vals[0]                    # 2 steps/epoch, 4 epochs
    cfg = read_config(out)
    assert cfg["recipe"] == "demo" and cfg["target"] == "penultimate"
    assert cfg["teacher"]["model"] == "vit_tiny_patch16_224" and cfg["training"]["step"] == 8
    assert cfg["align_config"]["optim"]["lr"] == 1e-3 and cfg["training"]["target_scale"]["scale"] > 0
    model = load_aligned(out)
    assert model.spec.embed_dim == 48 and model.spec.depth == 2
    feats = model.encoder.forward_features(torch.zeros(1, 3, 32, 32))
    assert feats.shape == (1, 17, 48) and torch.isfinite(feats).all()
    assert (run / "config.yaml").is_file() and (run / "state" / "state.json").is_file()


def test_bf16_autocast_on_cpu_trains(tmp_path, data):
    """The demo-bf16 recipe's path: CPU bf16 autocast (emulated where the CPU lacks bf16), explicit attention."""
    out = train(tiny_cfg(tmp_path, "--max_steps", "8", "--precision", "bf16"))
    losses = [r["loss"] for r in metrics(tmp_path / "runs" / "demo") if "loss" in r]
    assert len(losses) == 8 and all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
    assert read_config(out)["align_config"]["precision"] == "bf16"


def test_killed_run_resumes_bit_identically(tmp_path, data, monkeypatch):
    ref = train(tiny_cfg(tmp_path, "--run_name", "ref"))

    real = crash_at_loss_call(monkeypatch, 7)  # step 3's 2nd micro-batch (state saved at step 2)
    with pytest.raises(Crash):
        train(tiny_cfg(tmp_path, "--run_name", "crash"))
    run = tmp_path / "runs" / "crash"
    assert json.loads((run / "state" / "state.json").read_text())["step"] == 2
    assert not (run / "aligned").exists()
    monkeypatch.setattr(ME, "reconstruction_loss", real)

    out = train(tiny_cfg(tmp_path, "--run_name", "crash"))          # auto-resume from the run dir
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    oa = torch.load(ref.parent / "state" / "optimizer.pt", weights_only=True)
    ob = torch.load(out.parent / "state" / "optimizer.pt", weights_only=True)
    assert all(torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"]) for i in oa["state"])
    # the log has each step once, and the same losses as the uninterrupted run
    ra = [r["loss"] for r in metrics(ref.parent) if "loss" in r]
    rb = [r["loss"] for r in metrics(run) if "loss" in r]
    assert ra == rb and len(rb) == 6


class FakeWandb:
    """Records what the trainer asks of `wandb` (not a CI dependency): init, log, finish."""

    def __init__(self):
        self.runs = []

    def init(self, **kw):
        run = types.SimpleNamespace(id=kw["id"] or f"run{len(self.runs)}", kw=kw, logged=[], exit_code=None)
        run.log = lambda d, step=None: run.logged.append((step, d))
        run.finish = lambda exit_code=0: setattr(run, "exit_code", exit_code)
        self.runs.append(run)
        return run


def test_wandb_run_is_finished_on_a_crash_and_continued_on_resume(tmp_path, data, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    real = crash_at_loss_call(monkeypatch, 7)  # in step 3 (state saved at step 2)
    with pytest.raises(Crash):
        train(tiny_cfg(tmp_path, "--wandb", "true", "--wandb_project", "p"))
    first = fake.runs[0]
    assert first.kw["id"] is None and first.kw["project"] == "p" and first.exit_code == 1
    assert [s for s, d in first.logged if "loss" in d] == [1, 2]
    state = json.loads((tmp_path / "runs" / "demo" / "state" / "state.json").read_text())
    assert state["wandb_run_id"] == "run0"

    monkeypatch.setattr(ME, "reconstruction_loss", real)
    out = train(tiny_cfg(tmp_path, "--wandb", "true", "--wandb_project", "p"))
    second = fake.runs[1]
    assert second.kw["id"] == "run0" and second.kw["resume"] == "allow" and second.exit_code == 0
    assert [s for s, d in second.logged if "loss" in d] == [3, 4, 5, 6]
    assert all(isinstance(v, (int, float)) for _, d in second.logged for v in d.values())
    assert read_config(out)["training"]["wandb_run_id"] == "run0"


def test_resume_with_a_different_config_fails_naming_the_field(tmp_path, data):
    train(tiny_cfg(tmp_path, "--max_steps", "2"))
    with pytest.raises(CheckpointError, match=r"config field 'optim.lr' differs"):
        train(tiny_cfg(tmp_path, "--max_steps", "2", "--optim.lr", "5e-4"))
    # operational fields may change: a finished run resumed with another micro-batch just re-exports
    out = train(tiny_cfg(tmp_path, "--max_steps", "2", "--micro_batch", "8", "--log_every", "5"))
    assert read_config(out)["training"]["step"] == 2


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    write_tree(tmp_path / "data", n_train=32)                       # 4 steps per epoch
    real = ME.reconstruction_loss
    calls = {"n": 0}

    def nan_from_step_4(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] > 6 else loss      # 2 calls per step: calls 7+ = 4th step

    monkeypatch.setattr(ME, "reconstruction_loss", nan_from_step_4)
    cfg = tiny_cfg(tmp_path, "--save_every", "3", "--validate", "false", "--max_steps", "7")
    with pytest.raises(NonFiniteLoss, match=r"at step 4 .*state .*\(step 3\)"):
        train(cfg)
    state = tmp_path / "runs" / "demo" / "state"
    assert json.loads((state / "state.json").read_text())["step"] == 3    # save_every 3
    assert all(torch.isfinite(t).all() for t in load_file(str(state / "model.safetensors")).values())
    last = metrics(state.parent)[-1]              # strict JSON: NaN is written as null and flagged
    assert last == {**last, "step": 4, "event": "non_finite", "loss": None} and "loss" in last["non_finite"]


def test_corrupt_images_are_skipped_counted_and_the_run_continues(tmp_path, data):
    d = tmp_path / "data" / "train" / "images"
    (d / "003.png").write_bytes(b"not a png at all")
    raw = (d / "004.png").read_bytes()
    (d / "004.png").unlink()
    buf = io.BytesIO()
    Image.open(io.BytesIO(raw)).convert("RGB").save(buf, format="JPEG")
    (d / "004.jpg").write_bytes(buf.getvalue()[:300])               # truncated JPEG
    Image.new("RGB", (600, 2), (200, 10, 10)).save(d / "005.png")   # extreme aspect ratio: cropped, counted
    out = train(tiny_cfg(tmp_path, "--max_steps", "4"))
    rows = [r for r in metrics(out.parent) if "loss" in r]
    assert len(rows) == 4 and rows[-1]["skipped_images"] == 2        # files, not skip events (2 epochs)
    assert rows[-1]["cropped_images"] == 1
    counters = read_config(out)["training"]["counters"]
    assert counters["skipped_images"] == rows[-1]["skipped_images"] and counters["cropped_images"] == 1
    assert sorted(Path(f).name for f in counters["skipped_files"]) == ["003.png", "004.jpg"]


def test_trains_from_webdataset_shards(tmp_path):
    src = write_tree(tmp_path / "tree", n_train=16, n_val=4)
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
        files = sorted((src / split / "images").glob("*.png"))
        for s in range(2):
            with tarfile.open(tmp_path / "data" / split / f"{split}-{s:06d}.tar", "w") as tar:
                for f in files[s::2]:
                    tar.add(f, arcname=f"{f.stem}.png")
                    info = tarfile.TarInfo(f"{f.stem}.cls")
                    info.size = 1
                    tar.addfile(info, io.BytesIO(b"0"))
    out = train(tiny_cfg(tmp_path, "--max_steps", "2", "--data.format", "wds"))
    rows = [r for r in metrics(out.parent) if "loss" in r]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    assert load_aligned(out).spec.num_tokens == 17


@pytest.mark.slow
def test_a_kill_inside_the_state_swap_resumes_from_the_complete_copy(tmp_path, data, monkeypatch):
    """A kill between the renames that replace state/ (no state/ on disk for an instant)."""
    ref = train(tiny_cfg(tmp_path, "--run_name", "ref"))
    state = tmp_path / "runs" / "crash" / "state"
    real, puts = os.replace, {"n": 0}

    def replace(src, dst):
        if Path(dst) == state:
            puts["n"] += 1
            if puts["n"] == 2:                   # the save at step 4, before state/ is back in place
                raise Crash("killed between the renames")
        return real(src, dst)

    monkeypatch.setattr(FIO.os, "replace", replace)
    with pytest.raises(Crash):
        train(tiny_cfg(tmp_path, "--run_name", "crash"))
    monkeypatch.setattr(FIO.os, "replace", real)
    assert not state.exists()
    calls = count_loss_calls(monkeypatch)
    out = train(tiny_cfg(tmp_path, "--run_name", "crash"))
    assert calls["n"] == 2 * 2 + 2                # steps 5-6 (2 micro-batches each) + validation: resumed at 4
    assert same_weights(ref, out) and logged(ref.parent) == logged(out.parent)
    assert sorted(p.name for p in state.parent.iterdir() if p.name.startswith(".state")) == []


def test_a_run_with_a_history_but_no_state_is_not_silently_restarted(tmp_path, data):
    train(tiny_cfg(tmp_path, "--max_steps", "4"))
    run = tmp_path / "runs" / "demo"
    shutil.rmtree(run / "state")
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=r"metrics.jsonl.*step 4.*--resume never"):
        train(tiny_cfg(tmp_path, "--max_steps", "4"))
    assert (run / "metrics.jsonl").read_text() == before  # nothing overwritten
    train(tiny_cfg(tmp_path, "--max_steps", "4", "--resume", "never"))   # the explicit way to start over


@pytest.mark.slow
def test_a_torn_last_metrics_line_is_dropped_and_other_damage_names_the_file(tmp_path, data, monkeypatch):
    ref = train(tiny_cfg(tmp_path, "--run_name", "ref"))
    real = crash_at_loss_call(monkeypatch, 7)    # in step 3, state saved at step 2
    with pytest.raises(Crash):
        train(tiny_cfg(tmp_path, "--run_name", "crash"))
    monkeypatch.setattr(ME, "reconstruction_loss", real)
    log_file = tmp_path / "runs" / "crash" / "metrics.jsonl"
    with open(log_file, "a") as f:
        f.write('{"step": 3, "epoch": 1.5, "lo')  # what a kill or a full disk leaves
    out = train(tiny_cfg(tmp_path, "--run_name", "crash"))
    assert logged(ref.parent) == logged(out.parent)

    lines = log_file.read_text().splitlines()
    log_file.write_text("\n".join(lines[:2] + ["{garbage"] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 3 is not JSON"):
        train(tiny_cfg(tmp_path, "--run_name", "crash"))


@pytest.mark.slow
def test_the_logged_loss_window_after_a_resume_equals_an_uninterrupted_run(tmp_path, data, monkeypatch):
    ref = train(tiny_cfg(tmp_path, "--run_name", "ref", "--log_every", "3"))
    real = crash_at_loss_call(monkeypatch, 7)    # in step 3; resumes at step 2, the log at 3 covers 1-3
    with pytest.raises(Crash):
        train(tiny_cfg(tmp_path, "--run_name", "crash", "--log_every", "3"))
    monkeypatch.setattr(ME, "reconstruction_loss", real)
    out = train(tiny_cfg(tmp_path, "--run_name", "crash", "--log_every", "3"))
    assert [r["step"] for r in metrics(ref.parent) if "loss" in r] == [3, 6]
    assert logged(ref.parent) == logged(out.parent) and same_weights(ref, out)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_state_and_exits_with_one_line(tmp_path, data, monkeypatch, capsys, sig):
    ref = train(tiny_cfg(tmp_path, "--run_name", "ref"))
    real, calls = ME.reconstruction_loss, {"n": 0}

    def signalling(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:                      # during step 3 (the state was saved at step 2)
            os.kill(os.getpid(), sig)
        return real(*a, **k)

    def unhandled(*_):
        raise Crash("the trainer did not handle the signal")

    previous = signal.signal(sig, unhandled)
    try:
        monkeypatch.setattr(ME, "reconstruction_loss", signalling)
        rc = main(tiny_args(tmp_path, "--run_name", "crash"))
        assert signal.getsignal(sig) is unhandled            # the trainer's handler is removed again
    finally:
        signal.signal(sig, previous)
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("locality align")]   # besides tqdm's bar
    assert rc == 128 + sig and "Traceback" not in err and len(said) == 1, err
    assert signal.Signals(sig).name in said[0] and "step 3" in said[0] and "resume" in said[0]
    state = tmp_path / "runs" / "crash" / "state"
    assert json.loads((state / "state.json").read_text())["step"] == 3
    monkeypatch.setattr(ME, "reconstruction_loss", real)
    out = train(tiny_cfg(tmp_path, "--run_name", "crash"))
    assert same_weights(ref, out) and logged(ref.parent) == logged(out.parent)


def test_train_step_is_equation_1_by_hand():
    """`train_step` = target = teacher(x, m); loss = student(x, m, target); backward; clip; AdamW step:
    the same weights as those lines written out, with two micro-batches accumulated."""
    import contextlib
    import copy

    import torch.nn.functional as F

    from prismatic_locality import vit as V
    from prismatic_locality.align import distributed as D
    from prismatic_locality.align.train import train_step
    from prismatic_locality.decoder import MaskEmbedDecoder
    from prismatic_locality.masks import UniformMaskSampler, step_generator

    torch.manual_seed(0)
    vit = V.create_vit("vit_tiny_patch16_224", **json.loads(TINY))
    teacher = ME.Teacher(copy.deepcopy(vit))
    encoder = ME.make_encoder(copy.deepcopy(vit), 48)
    with torch.no_grad():
        encoder.head.weight.normal_(0, 0.05)   # a non-zero head, so the encoder gets gradients too
    student = ME.MaskEmbed(encoder, MaskEmbedDecoder(ME.default_decoder_config(teacher.spec, V.vit_spec(encoder))))
    twin = copy.deepcopy(student)
    s = teacher.spec
    x = torch.randn(4, 3, s.img_size, s.img_size, generator=torch.Generator().manual_seed(1))
    masks = UniformMaskSampler(s.num_patches)(4, step_generator(0, 0))
    info = D.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), owns_process_group=False)

    def adamw(m):
        return torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)

    opt = adamw(student)
    micro = iter([(x[:2], masks[:2]), (x[2:], masks[2:])])
    loss, grad_norm = train_step(student, teacher, opt, list(student.parameters()), micro, 2, 0.5,
                                 contextlib.nullcontext, info)

    opt2, total = adamw(twin), 0.0
    for xs, ms in ((x[:2], masks[:2]), (x[2:], masks[2:])):
        K = ms.shape[1]
        pred = twin.decoder(ME.encode(twin.encoder, xs).repeat_interleave(K, 0), ms.flatten(0, 1))
        part = F.mse_loss(pred, teacher(xs, ms))
        (part / 2).backward()
        total += part.item() / 2
    norm = torch.nn.utils.clip_grad_norm_(list(twin.parameters()), 0.5)
    opt2.step()
    assert loss == pytest.approx(total, rel=1e-6) and grad_norm == pytest.approx(norm.item(), rel=1e-6)
    for (name, a), b in zip(student.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(p.grad is None for p in student.parameters())  # zeroed for the next step
