"""One MaskEmbed optimiser step: our default (fast) path vs a reference-equivalent path, side by side.

    python benchmarks/maskembed_step.py --models demo vit-b-16-224 --batch 8          # CPU
    python benchmarks/maskembed_step.py --models demo --batch 64 --cpu-bf16            # + CPU bf16 (demo-bf16)
    python benchmarks/maskembed_step.py --models clip-l-336 so400m-384 --batch 32 --max-batch   # GPU
    python benchmarks/maskembed_step.py --models pe-core-l-336 dinov3-l-16 --batch 32           # any align recipe
    python benchmarks/maskembed_step.py --models pe-core-l-336:small dinov3-l-16:small --batch 4 # CPU: 2 blocks, width 64

Models: the names below or any `locality align` recipe (its teacher architecture and timm overrides);
a ``:small`` suffix keeps the family's layout (attention, RoPE, MLP, prefix tokens, patch size) at
width 64, depth 2 and an 8 x 8 patch grid, for CPU runs.

Paths (same model, same masks, same micro-batch):
  fast       teacher weights cast once to bf16 (GPU) and run in one batched pass over all K masked
             views with token-level masking; encoder attention soft-capped with fused FlexAttention
             (GPU; exact math fallback on CPU); optional torch.compile / activation checkpointing.
  reference  what the released code does: teacher in fp32 weights under autocast, pixel masking of
             a K-times repeated image batch, soft-capped attention with materialised logits
             (torch.compile'd too with --compile, as the reference runs).
  fast-bf16  (CPU, --cpu-bf16) the fast path under bf16 autocast with timm's explicit attention in
             teacher and decoder, as the trainer runs `precision=bf16` on a CPU (the `demo-bf16` recipe).

FLOPs are analytic (`maskembed.train_flops_per_image`, formula printed); MFU = achieved / peak,
peak from --peak-tflops or the GPU name (H100/H200: 989 bf16 dense TFLOP/s). Writes JSON.
Random weights: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import copy
import gc
import platform
import re
import sys
import time
from pathlib import Path

import torch

from prismatic_locality import precision as P
from prismatic_locality import vit as V
from prismatic_locality.fileio import write_json
from prismatic_locality.decoder import MaskEmbedDecoder
from prismatic_locality.maskembed import (MaskEmbed, Teacher, default_decoder_config,
                                          make_encoder, peak_tflops, train_flops_per_image)
from prismatic_locality.masks import UniformMaskSampler, step_generator

MODELS = {
    # name: (timm architecture, overrides)
    "demo": ("vit_tiny_patch16_224", dict(img_size=48, patch_size=8, embed_dim=128, depth=4, num_heads=4)),
    "vit-b-16-224": ("vit_base_patch16_clip_quickgelu_224", {}),
    "clip-l-336": ("vit_large_patch14_clip_quickgelu_336", {}),
    "so400m-384": ("vit_so400m_patch14_siglip_384", {}),
}


SMALL = dict(embed_dim=64, depth=2, num_heads=4)


def model_entry(model: str) -> tuple[str, dict]:
    """(timm architecture, overrides) of a benchmark model name, an align recipe, or either with ``:small``."""
    from prismatic_locality.align.config import get_recipe

    base, _, size = model.partition(":")
    if base in MODELS:
        arch, kw = MODELS[base]
    else:
        cfg = get_recipe(base)  # unknown names: one line listing the recipes
        arch, kw = cfg.teacher.model.split(".")[0], dict(cfg.teacher.timm_kwargs)
    if size == "small":
        patch = int(re.search(r"patch(\d+)", arch).group(1)) if re.search(r"patch(\d+)", arch) else 16
        kw = {**kw, **SMALL, "img_size": 8 * patch}
    elif size:
        raise ValueError(f"model '{model}': unknown size suffix '{size}' (small)")
    return arch, kw


def build(model: str, path: str, device: torch.device, compile_: bool, grad_ckpt: bool):
    arch, kw = model_entry(model)
    torch.manual_seed(0)
    vit = V.create_vit(arch, **kw).to(device)
    on_gpu = device.type == "cuda"
    fast = path.startswith("fast")
    teacher = Teacher(copy.deepcopy(vit), masking="token" if fast else "pixel")
    if fast and on_gpu:
        teacher.vit.to(torch.bfloat16)
    encoder = make_encoder(vit, teacher.spec.embed_dim, attn_impl="auto" if fast else "math")
    if grad_ckpt and fast:
        encoder.set_grad_checkpointing(True)
    decoder = MaskEmbedDecoder(default_decoder_config(teacher.spec, V.vit_spec(encoder))).to(device)
    if path == "fast-bf16":  # what align.train does for bf16 on CPU
        P.switch_attention("bf16", device, teacher.vit, decoder)
    model_ = MaskEmbed(encoder, decoder)
    opt = torch.optim.AdamW(model_.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=on_gpu)
    step_fn = torch.compile(model_) if compile_ else model_  # both paths: the reference compiles too
    teacher_fn = torch.compile(teacher) if compile_ else teacher
    return model_, teacher_fn, step_fn, opt


def run_step(model, teacher, step_fn, opt, images, masks, device, bf16: bool):
    with P.autocast("bf16" if bf16 else "fp32", device):
        loss = step_fn(images, masks, teacher(images, masks))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model_name, path, batch, steps, warmup, device, compile_, grad_ckpt):
    model, teacher, step_fn, opt = build(model_name, path, device, compile_, grad_ckpt)
    spec = teacher.spec
    sampler = UniformMaskSampler(spec.num_patches)
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch, 3, spec.img_size, spec.img_size, generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        masks = sampler(batch, step_generator(0, i, device))
        sync(device)
        t0 = time.perf_counter()
        loss = run_step(model, teacher, step_fn, opt, images, masks, device, bf16=device.type == "cuda" or path == "fast-bf16")
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    flops = train_flops_per_image(spec, V.vit_spec(model.encoder), model.decoder.cfg, sampler.masks_per_image)
    step_s = sorted(times)[len(times) // 2]  # median: robust to stragglers
    out = {
        "model": model_name, "path": path, "batch": batch, "step_s": step_s,
        "images_per_s": batch / step_s,
        "tflops_per_image": flops["total"] / 1e12,
        "achieved_tflops": flops["total"] * batch / step_s / 1e12,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "loss": loss.item(),
    }
    del model, step_fn, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def max_batch(model_name, path, device, compile_, grad_ckpt, start: int, limit: int = 4096) -> int:
    """Largest power-of-two micro-batch (from `start`) whose step fits in GPU memory."""
    best, b = 0, start
    while b <= limit:
        try:
            measure(model_name, path, b, steps=1, warmup=0, device=device, compile_=compile_, grad_ckpt=grad_ckpt)
            best, b = b, b * 2
        except Exception as e:  # noqa: BLE001 - only OOM is expected here
            if not is_oom(e):
                raise
            gc.collect()
            torch.cuda.empty_cache()
            break
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["demo", "vit-b-16-224"],
                   help=f"{' | '.join(MODELS)} | an align recipe (e.g. pe-core-l-336), optionally with :small")
    p.add_argument("--batch", type=int, default=8, help="micro-batch (images) for both paths")
    p.add_argument("--fast-batch", type=int, default=None,
                   help="a larger micro-batch for the fast path only (it fits where the reference's does not)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile both paths (the reference uses inductor)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in the fast path's encoder")
    p.add_argument("--max-batch", action="store_true", help="GPU: also find each path's largest micro-batch")
    p.add_argument("--cpu-bf16", action="store_true", help="CPU: also the fast path under bf16 autocast")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results/maskembed_step.json")
    args = p.parse_args(argv)
    for m in args.models:
        try:
            model_entry(m)
        except ValueError as e:
            p.error(str(e))

    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or peak_tflops(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print("FLOPs/image = 3·[ViT_L + head] + K·ViT_{L-1} + 3·K·[decoder + head];"
          " per block 2n(4d² + 2dh) + 4n²d (gated MLP: 3dh); backward = 2 × forward")
    rows = []
    for model_name in args.models:
        pair = {}
        for path in ("reference", "fast") + (("fast-bf16",) if args.cpu_bf16 and device.type == "cpu" else ()):
            batch = args.fast_batch if (path == "fast" and args.fast_batch) else args.batch
            r = measure(model_name, path, batch, args.steps, args.warmup, device, args.compile, args.grad_ckpt)
            r["mfu"] = r["achieved_tflops"] / peak if peak else None
            if args.max_batch and device.type == "cuda":
                r["max_micro_batch"] = max_batch(model_name, path, device, args.compile, args.grad_ckpt, args.batch)
            pair[path] = r
            rows.append(r)
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "n/a"
            print(f"{model_name:>13} {path:>9}: {r['images_per_s']:8.1f} img/s  {r['achieved_tflops']:7.2f} TFLOP/s  "
                  f"MFU {mfu:>6}  peak mem {mem}  ({r['tflops_per_image']:.3f} TFLOP/img, batch {batch})"
                  + (f"  max micro-batch {r['max_micro_batch']}" if "max_micro_batch" in r else ""))
        speedup = pair["fast"]["images_per_s"] / pair["reference"]["images_per_s"]
        print(f"{model_name:>13}   speedup: {speedup:.2f}x")
        rows.append({"model": model_name, "path": "ratio", "speedup": speedup,
                     "max_batch_ratio": (pair["fast"].get("max_micro_batch", 0) / pair["reference"]["max_micro_batch"])
                     if pair["reference"].get("max_micro_batch") else None})
        if "fast-bf16" in pair:
            bf16_speedup = pair["fast-bf16"]["images_per_s"] / pair["fast"]["images_per_s"]
            print(f"{model_name:>13}   bf16 vs fp32 (fast path): {bf16_speedup:.2f}x, CPU has hardware bf16: "
                  f"{V.cpu_has_native_bf16()}")
            rows[-1].update(bf16_speedup_vs_fast=bf16_speedup, cpu_has_native_bf16=V.cpu_has_native_bf16())
    result = {
        "benchmark": "maskembed_step", "device": name, "device_type": device.type, "peak_tflops": peak,
        "torch": torch.__version__, "timm": __import__("timm").__version__, "compile": args.compile,
        "grad_ckpt": args.grad_ckpt, "threads": torch.get_num_threads(), "rows": rows,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out = Path(args.out)
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
