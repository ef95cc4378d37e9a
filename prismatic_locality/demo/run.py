"""`locality demo`: the paper's claim in miniature, end to end on a CPU, nothing downloaded.

    locality demo                 # < 10 min on 2 CPU cores; report in runs/demo/report.md
    locality demo --seed 1        # another seed (scenes, alignment masks/order, probe heads)
    locality demo --quick         # < 90 s smoke run through every stage (numbers meaningless)
    locality demo --objective clipself   # align with CLIPSelf's crop objective instead (demo-clipself)
    locality demo --mim-steps 300        # MIM-tune the teacher first (demo-mim), then MaskEmbed from it

Stages, each the product's own code path:
1. scenes   digit scenes in the probe benchmark's "demo" layout      (demo/scenes.py)
2. teacher  the shipped image-level-label ViT (or `--train-teacher`)  (demo/teacher.py)
3. align    MaskEmbed with the trainer's `demo-bf16` / `demo` recipe  (align.train); with
            --mim-steps N first a MIM run (`demo-mim`) whose model is MaskEmbed's teacher; with
            --objective clipself the `demo-clipself` recipe instead
4. probe    local + global probes of teacher and aligned model        (probe.features / probe.train)
5. report   report.md, results.json, recall.png, qualitative.png     (demo/report.py)

Precision: on a CPU that multiplies bf16 in hardware (AVX512-BF16 / AMX) MaskEmbed and the probe
heads run under bf16 autocast, which is ~1.7x faster, and MaskEmbed aligns on twice the images
(`demo-bf16`: 1200 steps); elsewhere everything is fp32 and MaskEmbed runs 600 steps (`demo`).
The wall time is about the same either way. `--precision fp32|bf16` overrides the choice.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import precision as P
from .. import vit as V
from ..checkpoint import read_config
from . import report as R
from . import scenes as S
from . import teacher as T
from .args import parse

log = logging.getLogger("prismatic_locality.demo")

# The demo's two targets (docs/demo.md), in macro-recall points.
TARGET_LOCAL_GAIN = 2.0
TARGET_GLOBAL_DROP = 1.0


@dataclass(frozen=True)
class Sizes:
    """How much of everything a run uses (the full demo vs the smoke-test `--quick`)."""

    n_train: int            # train scenes: MaskEmbed's images
    n_val: int              # val scenes (unseen digit instances): probe evaluation, target scale
    align_steps: Optional[int]   # None = the recipe's own
    probe_train: int        # the first `probe_train` train scenes train the probe heads
    probe_epochs: dict      # per task: the local probe needs longer to leave the all-background plateau
    probe_batch: int
    probe_warmup: int
    probe_lr: float
    probe_heads: int = 1    # heads per (model, task), averaged: one head's recall varies by ~1 point with its seed
    figure_rows: int = 4
    teacher_steps: int = 0  # only with --train-teacher (0 = TeacherConfig's default)


FULL = Sizes(n_train=8000, n_val=1000, align_steps=None, probe_train=3000, probe_epochs={"local": 10, "global": 4},
             probe_batch=32, probe_warmup=50, probe_lr=2e-3, probe_heads=2)
QUICK = Sizes(n_train=256, n_val=128, align_steps=3, probe_train=256, probe_epochs={"local": 1, "global": 1},
              probe_batch=32, probe_warmup=2, probe_lr=2e-3, probe_heads=2,
              figure_rows=2, teacher_steps=5)


class Stage:
    """Prints a numbered stage header and records its wall time."""

    def __init__(self, timing: dict, key: str, index: int, total: int, what: str):
        self.timing, self.key, self.head = timing, key, f"[{index}/{total}] {what}"

    def __enter__(self):
        print(self.head, flush=True)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.timing[self.key] = round(time.perf_counter() - self.t0, 1)
        if exc[0] is None:
            print(f"      done in {self.timing[self.key]:.0f} s", flush=True)


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def obtain_teacher(args, sizes: Sizes, out: Path, val: S.Scenes) -> tuple[Path, torch.nn.Module, dict]:
    """The teacher's weights file, its ViT with the digit classifier, and facts for the report."""
    if args.train_teacher:
        cfg = T.TeacherConfig(seed=args.seed)
        if sizes.teacher_steps:
            cfg.steps, cfg.num_scenes, cfg.warmup = sizes.teacher_steps, sizes.n_train, 1
        vit, summary = T.train_teacher(cfg)
        path = T.save_teacher(out / "teacher.safetensors", vit, cfg, summary)
        source = f"trained in this run ({cfg.steps} steps, seed {cfg.seed})"
    else:
        path = Path(args.teacher)
        cfg, summary = T.read_teacher_config(path)
        source = f"loaded from `{path.name}` (trained once by `python -m prismatic_locality.demo.teacher`)"
    vit, cfg = T.load_teacher(path, num_classes=10)
    spec = V.vit_spec(vit)
    x, y = S.to_tensor(val.images, spec.mean, spec.std), T.digit_targets(val.labels)
    info = {
        "source": source, "path": str(path), "arch": T.ARCH,
        "shape": f"{cfg.img_size} px, patch {cfg.patch_size}, width {cfg.embed_dim}, depth {cfg.depth}",
        "params": V.count_params(vit), "config": asdict(cfg),
        "own_head_global_recall": T.evaluate(vit, x, y),
        "own_head_global_recall_masked": T.evaluate(vit, x, y, mask_seed=0),
    }
    vit.reset_classifier(0)
    return path, vit.eval(), info


def align(args, sizes: Sizes, out: Path, scenes_root: Path, teacher_path: Path,
          run_name: str = "align", recipe: Optional[str] = None, steps: Optional[int] = None,
          teacher_aligned: Optional[Path] = None) -> tuple[Path, dict]:
    """The trainer with `recipe` (default the run's: `demo-bf16`, `demo` or `demo-clipself`), pointed at
    this run's scenes and teacher; `teacher_aligned` makes an aligned checkpoint (the MIM model) the teacher."""
    from ..align.config import get_recipe
    from ..align.train import train

    cfg = get_recipe(recipe or args.recipe)
    cfg.teacher.weights = str(teacher_path)
    cfg.teacher.aligned = None if teacher_aligned is None else str(teacher_aligned)
    cfg.data.root = str(scenes_root)
    cfg.seed = args.seed
    cfg.output_dir, cfg.run_name, cfg.resume = str(out), run_name, "never"
    cfg.device = "cpu"
    cfg.encoder.softcap = args.softcap  # 30 as the recipe; 0 = MaskEmbed without the cap (docs/use.md)
    steps = steps if steps is not None else sizes.align_steps
    if steps is not None:
        cfg.max_steps = steps
        cfg.save_every = steps
    ckpt = train(cfg)
    training = read_config(ckpt).get("training", {})
    return ckpt, {"checkpoint": str(ckpt), "recipe": cfg.recipe, "objective": cfg.objective, "precision": cfg.precision,
                  "teacher_aligned": cfg.teacher.aligned,
                  "softcap": cfg.encoder.softcap,
                  "steps": cfg.max_steps, "batch": cfg.global_batch, "lr": cfg.optim.lr,
                  "last_loss": training.get("last_loss"), "val_loss": training.get("val_loss")}


def probe_seeds(seed: int, n: int) -> list[int]:
    """The probe heads' seeds for run seed `seed`: the run seed first, then seed + 1000·k."""
    return [seed + 1000 * k for k in range(n)]


def probe_both(args, sizes: Sizes, scenes_root: Path, backbones: dict, out: Path) -> tuple[dict, dict, dict]:
    """Local and global probes for each backbone with the benchmark's code; same settings for all.

    Each (backbone, task) trains `sizes.probe_heads` heads that differ only in their seed (init and
    batch order). Returns (per-head recalls, curves, predictions); curves and figure predictions
    are the first head's."""
    from ..probe.datasets import ProbeDataset
    from ..probe.features import build_split
    from ..probe.train import HeadConfig, ProbeOptimConfig, fit_probe, predict

    per_head, curves, preds = {}, {}, {}
    for name, backbone in backbones.items():
        spec = backbone.spec
        limits = {"train": sizes.probe_train, "val": None}
        splits = {split: build_split(ProbeDataset("demo", scenes_root, split, spec.img_size, spec.patch_size,
                                                  limit=limits[split]),
                                     backbone, out / "cache", batch_size=256, num_workers=0,
                                     device=torch.device("cpu"), precision="fp32", desc=f"{name} {split}")
                  for split in S.SPLITS}
        per_head[name], curves[name] = {}, {}
        for task in R.TASKS:
            optim = ProbeOptimConfig(lr=sizes.probe_lr, epochs=sizes.probe_epochs[task], batch_size=sizes.probe_batch,
                                warmup_steps=sizes.probe_warmup, precision=args.precision)
            per_head[name][task] = []
            for k, seed in enumerate(probe_seeds(args.seed, sizes.probe_heads)):
                r, head = fit_probe(splits["train"], splits["val"], task, spec.num_heads, HeadConfig(), optim,
                                    seed, torch.device("cpu"), desc=f"{name} [{k + 1}/{sizes.probe_heads}] ")
                per_head[name][task].append(float(r["macro_recall"]))
                if k == 0:
                    curves[name][task] = [float(e["macro_recall"]) if isinstance(e, dict) else float(e)
                                          for e in r["epochs"]]
                    if task == "local":
                        x = torch.from_numpy(np.array(splits["val"].features[: sizes.figure_rows], dtype=np.float32))
                        with torch.no_grad():
                            preds[name] = predict(head.eval(), x).numpy().astype(bool)
    return per_head, curves, preds


def vlm_stage(out: Path, scenes: dict, backbones: dict, checkpoint: Path, probe_train: int, seed: int,
              quick: bool, n_seeds: int = 2) -> dict:
    """The VLM miniature (`demo/vlm.py`) on this run's scenes, teacher, aligned checkpoint and feature cache.

    Train questions are about the scenes whose features the probe cached (the first `probe_train`),
    val questions about the val scenes (unseen digit instances)."""
    from ..probe.datasets import ProbeDataset
    from ..probe.features import build_split
    from . import questions as Q
    from . import vlm as M

    load0 = os.getloadavg()[0]
    sizes = replace(M.QUICK if quick else M.FULL, seeds=tuple(probe_seeds(seed, n_seeds)))
    features = {}
    for name, backbone in backbones.items():
        spec = backbone.spec
        limits = {"train": probe_train, "val": None}
        features[name] = {
            split: torch.from_numpy(np.asarray(build_split(
                ProbeDataset("demo", out / "scenes", split, spec.img_size, spec.patch_size, limit=limits[split]),
                backbone, out / "cache", batch_size=256, num_workers=0, device=torch.device("cpu"),
                precision="fp32", desc=f"{name} {split}").features, dtype=np.float32))
            for split in S.SPLITS}
    questions = {}
    for k, split in enumerate(S.SPLITS):
        n = len(features["teacher"][split])
        sc = scenes[split]
        questions[split] = Q.make_questions(sc.labels[:n], Q.placed_digits(sc.digits[:n]), seed=(seed, k),
                                            per_answer=getattr(sizes, f"{split}_per_answer"))
    vlm = M.run_stage(features, questions, sizes, checkpoint)
    vlm["load_average"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    vlm["cpu_count"] = os.cpu_count()
    return vlm


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


def parse_args(argv):
    args = parse(argv)
    args.teacher = args.teacher or str(T.SHIPPED_TEACHER)
    if args.precision == "auto":
        args.precision = P.fastest("cpu")
    # Same wall time either way: bf16 autocast is ~1.7x faster where the CPU multiplies bf16 in
    # hardware, and there MaskEmbed aligns on twice the images (align/config.py: demo_bf16_recipe).
    args.recipe = {"bf16": "demo-bf16", "fp32": "demo"}[args.precision]
    if args.objective == "clipself":  # the fp32 demo recipe with CLIPSelf's crop objective
        args.recipe = "demo-clipself"
    return args


def sizes_for(args) -> Sizes:
    """The run's sizes: `--quick` or the full demo, with `--align-steps` / `--probe-heads` applied."""
    sizes = QUICK if args.quick else FULL
    if args.align_steps:
        sizes = replace(sizes, align_steps=args.align_steps)
    if args.probe_heads:
        sizes = replace(sizes, probe_heads=args.probe_heads)
    return sizes


def command_line(args) -> str:
    """The `locality demo` command that reproduces this run (recorded in results.json)."""
    return "locality demo" + (f" --seed {args.seed}" if args.seed else "") + (" --quick" if args.quick else "") \
        + (" --vlm" if args.vlm else "") + f" --precision {args.precision}" \
        + (f" --softcap {args.softcap:g}" if args.softcap != 30.0 else "") \
        + (f" --objective {args.objective}" if args.objective != "maskembed" else "") \
        + (f" --mim-steps {args.mim_steps}" if args.mim_steps else "") \
        + (f" --align-steps {args.align_steps}" if args.align_steps else "") \
        + (f" --probe-heads {args.probe_heads}" if args.probe_heads else "")


def run(args) -> dict:
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sizes = sizes_for(args)
    if args.vlm:
        from .vlm import require_transformers

        require_transformers()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timing: dict = {}
    n = 5 + bool(args.mim_steps) + bool(args.vlm)
    cmd = command_line(args)

    with Stage(timing, "scenes", 1, n, f"digit scenes: {sizes.n_train} train / {sizes.n_val} val"):
        scenes_root = out / "scenes"
        scenes = S.build_dataset(scenes_root, sizes.n_train, sizes.n_val, seed=args.seed)
    with Stage(timing, "teacher", 2, n, "teacher (image-level labels only)"):
        teacher_path, teacher_vit, teacher_info = obtain_teacher(args, sizes, out, scenes["val"])
        print(f"      its own head: {100 * teacher_info['own_head_global_recall']:.1f}% global macro recall "
              f"({100 * teacher_info['own_head_global_recall_masked']:.1f}% on randomly masked scenes)")
    k = 3
    mim_ckpt, mim_info = None, None
    if args.mim_steps:
        with Stage(timing, "mim", k, n, f"MIM-tuning the teacher, {args.mim_steps} steps (trainer, `demo-mim` recipe)"):
            mim_ckpt, mim_info = align(args, sizes, out, scenes_root, teacher_path, run_name="mim", recipe="demo-mim",
                                       steps=args.mim_steps)
        k += 1
    what = "CLIPSelf alignment" if args.objective == "clipself" else "MaskEmbed alignment" + (
        " from the MIM-tuned teacher" if mim_ckpt else "")
    with Stage(timing, "align", k, n, f"{what} (trainer, `{args.recipe}` recipe)"):
        ckpt, align_info = align(args, sizes, out, scenes_root, teacher_path, teacher_aligned=mim_ckpt)
    # the probes compare the ORIGINAL teacher with the final model (the MIM model is not probed: a third
    # backbone would add a third of the probe stage's time)
    with Stage(timing, "probe", k + 1, n, "probing teacher and aligned model (local + global)"):
        from ..probe.backbone import Backbone, BackboneConfig, load_backbone

        backbones = {"teacher": Backbone(teacher_vit, "timm", "teacher"),
                     "aligned": load_backbone(BackboneConfig(name=str(ckpt)), "cpu")}
        per_head, curves, preds = probe_both(args, sizes, scenes_root, backbones, out)

    if args.vlm:
        with Stage(timing, "vlm", k + 2, n, "VLM miniature: 3 configurations x 2 training seeds"):
            vlm = vlm_stage(out, scenes, backbones, ckpt, sizes.probe_train, args.seed, args.quick)

    recall = {m: {t: float(np.mean(heads)) for t, heads in tasks.items()} for m, tasks in per_head.items()}
    delta = {t: round(100 * (recall["aligned"][t] - recall["teacher"][t]), 2) for t in R.TASKS}
    spec = V.vit_spec(teacher_vit)
    results = {
        "command": cmd,
        "recall": recall,
        "delta_points": delta,
        "recall_per_probe_head": per_head,
        "delta_points_per_probe_head": {t: [round(100 * (a - b), 2) for a, b in zip(per_head["aligned"][t], per_head["teacher"][t])]
                                        for t in R.TASKS},
        "target": {"local_gain_points": TARGET_LOCAL_GAIN, "max_global_drop_points": TARGET_GLOBAL_DROP},
        "target_met": bool(delta["local"] >= TARGET_LOCAL_GAIN and delta["global"] >= -TARGET_GLOBAL_DROP),
        "probe_curves": curves,
        "teacher": teacher_info,
        "align": align_info,
        "objective": args.objective,
        "mim_steps": args.mim_steps,
        "mim": mim_info,
        "config": {"seed": args.seed, "quick": args.quick, "objective": args.objective, "mim_steps": args.mim_steps,
                   "scenes": {"n_train": sizes.n_train, "n_val": sizes.n_val, **asdict(S.SceneConfig())},
                   "align": {k: align_info[k] for k in ("recipe", "precision", "steps", "batch", "lr")},
                   "probe": {"train_scenes": sizes.probe_train, "epochs": sizes.probe_epochs, "lr": sizes.probe_lr, "batch_size": sizes.probe_batch,
                             "heads_per_model_and_task": sizes.probe_heads, "head_seeds": probe_seeds(args.seed, sizes.probe_heads),
                             "warmup_steps": sizes.probe_warmup, "precision": args.precision,
                             "head": "transformer, 2 blocks"}},
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                    "platform": platform.platform(), "python": platform.python_version()},
    }
    if args.vlm:
        results["vlm"] = vlm
    with Stage(timing, "report", n, n, f"report in {out}"):
        rows = sizes.figure_rows
        truth = S.patch_labels(scenes["val"].labels[:rows], spec.patch_size).numpy()
        timing["total"] = round(time.perf_counter() - t_start, 1)
        results["timing_s"] = timing
        R.write_all(out, results, list(scenes["val"].images[:rows]), truth, preds, spec.grid)
    timing["total"] = round(time.perf_counter() - t_start, 1)
    R.write_json(out / "results.json", results)  # final timing, report stage included
    return results


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a finished `locality demo` directory ({what})")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object ({what})")
    return obj


def _check_labels(root: Path, split: str, labels: np.ndarray) -> None:
    """The regenerated scenes must be the ones on disk: compare their label maps with the PNGs."""
    from PIL import Image

    for i in range(len(labels)):
        path = root / split / "labels" / f"{i:06d}.png"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the demo's scenes are incomplete")
        if not np.array_equal(np.asarray(Image.open(path)), labels[i]):
            raise ValueError(f"{path}: differs from the scene its manifest {root / S.MANIFEST} regenerates "
                             "(scenes edited, or made by another version of the demo)")


def run_vlm_on_dir(args) -> dict:
    """`locality demo-vlm`: the VLM stage on a finished demo directory; adds `vlm` to its results.json
    (other keys unchanged) and the VLM section to its report.md."""
    if args.threads:
        torch.set_num_threads(args.threads)
    from .vlm import require_transformers

    require_transformers()
    out = Path(args.demo_dir)
    results = _read_json(out / "results.json", "results.json")
    manifest = _read_json(out / "scenes" / S.MANIFEST, "scene manifest")
    try:
        cfg = results["config"]
        probe_train, seed, quick = int(cfg["probe"]["train_scenes"]), int(cfg["seed"]), bool(cfg["quick"])
        teacher_path = Path(results["teacher"]["path"])
        scene_cfg = S.SceneConfig(**manifest["config"])
        n_scenes = {"train": int(manifest["n_train"]), "val": int(manifest["n_val"])}
        scene_seed = int(manifest["seed"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{out / 'results.json'} or {out / 'scenes' / S.MANIFEST}: missing field {e}") from None
    ckpt = out / "align" / "aligned"
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt}/config.json not found: the demo's aligned checkpoint is missing")
    t0 = time.perf_counter()
    print(f"[1/3] scenes and backbones of {out} (seed {seed})", flush=True)
    scenes = {split: S.make_scenes(n, split, scene_seed, scene_cfg) for split, n in n_scenes.items()}
    _check_labels(out / "scenes", "train", scenes["train"].labels[:probe_train])
    _check_labels(out / "scenes", "val", scenes["val"].labels)
    from ..probe.backbone import Backbone, BackboneConfig, load_backbone

    teacher_vit, _ = T.load_teacher(teacher_path)
    backbones = {"teacher": Backbone(teacher_vit, "timm", "teacher"),
                 "aligned": load_backbone(BackboneConfig(name=str(ckpt)), "cpu")}
    print("[2/3] VLM miniature: 3 configurations x 2 training seeds", flush=True)
    results["vlm"] = vlm_stage(out, scenes, backbones, ckpt, probe_train, seed, quick or args.quick)
    results.setdefault("timing_s", {})["vlm"] = round(time.perf_counter() - t0, 1)
    print(f"[3/3] report in {out}", flush=True)
    from .report import vlm_chart

    vlm_chart(out / "vlm.png", results["vlm"], f"seed {seed}: VLM miniature")
    R.write_json(out / "results.json", results)
    R.write_report(out, results)
    return results


def print_vlm(vlm: dict) -> None:
    from .report import VLM_COLUMNS

    print(f"{'val accuracy (%)':<20}" + "".join(f"{c:>10}" for c in VLM_COLUMNS))
    for name, acc in [("majority answer", vlm["majority_baseline"]), *vlm["accuracy"].items()]:
        print(f"{name:<20}" + "".join(f"{100 * acc[c]:>10.1f}" for c in VLM_COLUMNS))


def main_vlm(argv: Optional[list[str]] = None) -> int:
    from .vlm_args import build_parser as vlm_parser

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = vlm_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        res = run_vlm_on_dir(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"locality demo-vlm: error: {e}", file=sys.stderr)
        return 2
    print_vlm(res["vlm"])
    print(f"{res['timing_s']['vlm']:.0f} s; report: {Path(args.demo_dir) / 'report.md'}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        res = run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"locality demo: error: {e}", file=sys.stderr)
        return 2
    r, d = res["recall"], res["delta_points"]
    print(f"teacher  local {100 * r['teacher']['local']:.1f}%  global {100 * r['teacher']['global']:.1f}%")
    print(f"aligned  local {100 * r['aligned']['local']:.1f}%  global {100 * r['aligned']['global']:.1f}%")
    print(f"change   local {d['local']:+.2f} pts  global {d['global']:+.2f} pts  "
          f"(target {'not evaluated: quick mode, smoke-test sizes' if args.quick else 'met' if res['target_met'] else 'not met'}); "
          f"{res['timing_s']['total']:.0f} s")
    if "vlm" in res:
        print_vlm(res["vlm"])
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
