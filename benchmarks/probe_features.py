"""Probing feature supply: recomputing the frozen backbone every epoch (the reference) vs our cache.

    python benchmarks/probe_features.py --models demo vit-b-16-224 --images 512           # CPU
    python benchmarks/probe_features.py --models vit-b-16-224 clip-l-336 so400m-384 --images 4096 --workers 8   # GPU

A synthetic dataset in the demo layout is written to a temp dir (JPEG-sized images by default,
640x480 like COCO, so decode + centre crop + resize are part of the cost). Per model it measures
images/s of

  recompute  one pass of decode + preprocess + backbone forward, no writes: what every epoch
             costs when features are not cached (the reference recomputes them at every step);
  extract    the first pass that also writes the fp16 cache (`features.build_split`);
  cached     an epoch of head-training batches gathered from the cache (memory-mapped, gathered
             per batch as `train._Source` does in its memory-map mode, moved to the device);
  head       one transformer-head training step per batch (to put the supply cost in context);

(with the CPU time per image of this process, which is stabler than wall time on a shared
machine; it excludes DataLoader worker processes) and projects a probe of `--epochs` epochs: without cache = epochs x (recompute + head), with cache =
extract + epochs x (cached + head). Random weights: speed does not depend on them. Writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from prismatic_locality import vit as V
from prismatic_locality.fileio import write_json
from prismatic_locality.probe.backbone import Backbone
from prismatic_locality.probe.datasets import ProbeDataset
from prismatic_locality import precision as P
from prismatic_locality.probe.features import build_split
from prismatic_locality.probe.heads import build_head
from prismatic_locality.probe.labels import unpack

MODELS = {
    # name: (timm architecture, overrides)
    "tiny": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)),
    "demo": ("vit_tiny_patch16_224", dict(img_size=48, patch_size=8, embed_dim=128, depth=4, num_heads=4)),
    "vit-b-16-224": ("vit_base_patch16_clip_quickgelu_224", {}),
    "clip-l-336": ("vit_large_patch14_clip_quickgelu_336", {}),
    "so400m-384": ("vit_so400m_patch14_siglip_384", {}),
}


def write_images(root: Path, n: int, w: int, h: int, num_classes: int = 11) -> None:
    rng = np.random.RandomState(0)
    root.mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps([f"c{i}" for i in range(num_classes)]))
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
    for i in range(n):
        img = rng.randint(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)  # smooth-ish content, realistic JPEG size
        Image.fromarray(img).resize((w, h), Image.BILINEAR).save(root / "train" / "images" / f"{i:06d}.jpg", quality=90)
        lbl = np.kron(rng.randint(0, num_classes, (h // 16, w // 16)), np.ones((16, 16), dtype=np.int64)).astype(np.uint8)
        Image.fromarray(lbl).save(root / "train" / "labels" / f"{i:06d}.png")
    shutil.copy(root / "train" / "images" / "000000.jpg", root / "val" / "images" / "000000.jpg")
    shutil.copy(root / "train" / "labels" / "000000.png", root / "val" / "labels" / "000000.png")


def rates(n: int, t0: float, c0: float) -> tuple[float, float]:
    """(images/s of wall time, CPU ms per image of this process: stabler on a shared machine)."""
    return n / (time.perf_counter() - t0), 1000 * (time.process_time() - c0) / n


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_model(name: str, data_root: Path, args, device: torch.device) -> dict:
    arch, kw = MODELS[name]
    torch.manual_seed(0)
    bb = Backbone(V.create_vit(arch, **kw).to(device), "timm", name)
    s = bb.spec
    ds = ProbeDataset("demo", data_root, "train", s.img_size, s.patch_size)
    n = len(ds)
    precision = P.resolve(args.precision, device, "--precision")
    autocast = P.autocast(precision, device)
    out = {"model": name, "arch": arch, "img_size": s.img_size, "tokens": s.num_tokens, "embed_dim": s.embed_dim,
           "depth": s.depth, "params_M": round(V.count_params(bb.model) / 1e6, 2), "images": n, "precision": precision}

    # recompute: decode + preprocess + forward, nothing written (one warm-up batch first)
    ds.with_labels = False
    loader = DataLoader(ds, batch_size=args.extract_batch, num_workers=args.workers, pin_memory=device.type == "cuda")
    with torch.no_grad(), autocast:
        bb.features(bb.normalize(torch.zeros(2, 3, s.img_size, s.img_size, dtype=torch.uint8, device=device)))
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        for batch in loader:
            f = bb.features(bb.normalize(batch["image"].to(device, non_blocking=True)))
            f.to(torch.float16).cpu()
        sync(device)
    out["recompute_img_s"], out["recompute_cpu_ms_per_img"] = rates(n, t, c)
    ds.with_labels = True

    # extract: the first pass that writes the cache (features + labels)
    cache = Path(tempfile.mkdtemp(prefix="probe-bench-cache-", dir=args.tmp))
    try:
        t, c = time.perf_counter(), time.process_time()
        split = build_split(ds, bb, cache, batch_size=args.extract_batch, num_workers=args.workers,
                            device=device, precision=args.precision, desc=name)
        sync(device)
        out["extract_img_s"], out["extract_cpu_ms_per_img"] = rates(n, t, c)
        out["cache_MB"] = round(split.features.nbytes / 2**20, 1)

        # cached: gather shuffled training batches from the memory map and move them to the device
        perm = np.random.RandomState(0).permutation(n)
        bs = args.batch_size
        feats, targets = split.features, np.asarray(split.patch)
        t, c = time.perf_counter(), time.process_time()
        for lo in range(0, n - bs + 1, bs):
            idx = np.sort(perm[lo:lo + bs])
            x = torch.from_numpy(np.ascontiguousarray(feats[idx])).to(device).float()
            y = unpack(torch.from_numpy(targets[idx]).to(device), split.num_classes)
        sync(device)
        out["cached_img_s"], out["cached_cpu_ms_per_img"] = rates((n // bs) * bs, t, c)

        # head: transformer-head training steps on one cached batch (fp32, as train.py)
        head = build_head("transformer", "local", num_tokens=s.num_tokens, num_prefix=s.num_prefix_tokens,
                          dim=s.embed_dim, num_heads=s.num_heads, num_classes=split.num_classes).to(device)
        opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
        steps = args.head_steps

        def step():
            loss = F.binary_cross_entropy_with_logits(head(x), y.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        sync(device)
        out["head_img_s"], out["head_cpu_ms_per_img"] = rates(steps * bs, t, c)
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    # a probe of E epochs over the same images (seconds per image, so the numbers scale to any N)
    E = args.epochs
    no_cache = E * (1 / out["recompute_img_s"] + 1 / out["head_img_s"])
    with_cache = 1 / out["extract_img_s"] + E * (1 / out["cached_img_s"] + 1 / out["head_img_s"])
    out["probe_s_per_image_no_cache"] = no_cache
    out["probe_s_per_image_cached"] = with_cache
    out["speedup_feature_supply"] = (E / out["recompute_img_s"]) / (1 / out["extract_img_s"] + E / out["cached_img_s"])
    out["speedup_probe"] = no_cache / with_cache
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["demo", "vit-b-16-224"], choices=list(MODELS))
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--image-size", default="640x480", help="WxH of the synthetic JPEGs")
    ap.add_argument("--extract-batch", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32, help="head training batch")
    ap.add_argument("--head-steps", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--tmp", default=None, help="where to write the synthetic data and caches")
    ap.add_argument("--out", default=None, help="JSON path (default runs/benchmarks/probe_features-<device>.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    w, h = (int(v) for v in args.image_size.lower().split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="probe-bench-", dir=args.tmp))
    try:
        t = time.perf_counter()
        write_images(tmp / "data", args.images, w, h)
        print(f"wrote {args.images} {w}x{h} JPEGs in {time.perf_counter() - t:.1f} s", flush=True)
        results = []
        for name in args.models:
            r = bench_model(name, tmp / "data", args, device)
            results.append(r)
            print(f"{name:>14}: recompute {r['recompute_img_s']:9.1f} img/s | extract {r['extract_img_s']:9.1f} | "
                  f"cached {r['cached_img_s']:10.1f} | head {r['head_img_s']:9.1f} | "
                  f"{args.epochs}-epoch speedup: features {r['speedup_feature_supply']:.1f}x, probe {r['speedup_probe']:.1f}x",
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "workers": args.workers,
           "python": sys.version.split()[0]}
    out = Path(args.out) if args.out else Path("runs/benchmarks") / f"probe_features-{device.type}.json"
    write_json(out, {"env": env, "args": vars(args), "results": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
