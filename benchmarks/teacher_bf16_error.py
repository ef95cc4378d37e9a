"""How far bf16 MaskEmbed targets are from fp32 ones: the reference's bf16 vs ours.

    python benchmarks/teacher_bf16_error.py [--device cuda] [--out benchmarks/results/cpu_teacher_bf16_error.json]

The penultimate-layer targets h(x ⊙ m) (three uniform masks per image, `Teacher`) are computed in
three ways:

  fp32          fp32 weights, no autocast: the exact target;
  reference     fp32 weights under bf16 autocast (the reference on GPU): matmuls in bf16, the
                residual stream stays fp32;
  ours          weights cast once to bf16, under bf16 autocast (`align` with `teacher.dtype auto`
                on GPU): the residual stream is bf16 too, except after a LayerNorm that autocast
                runs in fp32, i.e. from the start for teachers with a pre-norm (CLIP's ln_pre).

and the error of each is reported as RMS(target − fp32) / std(fp32 target). Models: the demo's
shipped teacher (a trained 4-block ViT, 48 px, width 128, on its digit scenes) and tiny random
ViTs in the CLIP (pre-norm) and IN1k (no pre-norm) layouts on Gaussian images. Writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform

import torch

from prismatic_locality import precision as P
from prismatic_locality import vit as V
from prismatic_locality.fileio import write_json
from prismatic_locality.demo import scenes as S
from prismatic_locality.demo import teacher as T
from prismatic_locality.maskembed import Teacher
from prismatic_locality.masks import UniformMaskSampler, step_generator

TINY = {  # (timm name, overrides): the test suite's tiny layouts, a little deeper
    "tiny-clip (pre-norm)": ("vit_base_patch16_clip_quickgelu_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=6, num_heads=3)),
    "tiny-in1k (no pre-norm)": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=6, num_heads=3)),
}


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref).pow(2).mean().sqrt() / ref.std()).item()


@torch.no_grad()
def measure(vit, images: torch.Tensor, device: torch.device) -> dict:
    s = V.vit_spec(vit)
    masks = UniformMaskSampler(s.num_patches)(len(images), step_generator(0, 0)).to(device)
    images = images.to(device)
    teacher = Teacher(vit.to(device))
    exact = teacher(images, masks).float()
    with P.autocast("bf16", device):
        reference = teacher(images, masks)
    teacher.vit.to(torch.bfloat16)
    with P.autocast("bf16", device):
        ours = teacher(images, masks)
    r, o = rel_rms(reference, exact), rel_rms(ours, exact)
    return {"pre_norm": not isinstance(vit.norm_pre, torch.nn.Identity), "targets": list(exact.shape),
            "reference_bf16_rel_rms": r, "ours_bf16_rel_rms": o, "ratio": o / r}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/cpu_teacher_bf16_error.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = {}
    vit, cfg = T.load_teacher()
    sc = S.make_scenes(args.images, "val", seed=0, progress=False)
    s = V.vit_spec(vit)
    rows["demo teacher (trained, 4 blocks, width 128)"] = measure(vit, S.to_tensor(sc.images, s.mean, s.std), device)
    for name, (arch, kw) in TINY.items():
        torch.manual_seed(0)
        vit = V.create_vit(arch, **kw)
        rows[name] = measure(vit, torch.randn(args.images, 3, kw["img_size"], kw["img_size"]), device)
    for name, r in rows.items():
        print(f"{name:45s} reference {r['reference_bf16_rel_rms']:.2e}  ours {r['ours_bf16_rel_rms']:.2e}  "
              f"ratio {r['ratio']:.2f}")
    write_json(args.out, {"device": str(device), "torch": torch.__version__, "machine": platform.processor(),
                          "images": args.images, "models": rows})
    print(json.dumps({"written": args.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
