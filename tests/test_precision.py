"""One precision policy (precision.py) and the stages that use it: probe extraction, heads, align."""
import json

import numpy as np
import pytest
import torch

from prismatic_locality.probe import features as F
from prismatic_locality.probe.backbone import Backbone
from prismatic_locality.probe.datasets import ProbeDataset

from conftest import tiny_vit
from test_probe_e2e import write_demo


class DtypeSeen:
    """Records the dtype of one Linear's output (a forward hook, no monkeypatching)."""

    def __init__(self, module):
        self.dtypes = set()
        module.register_forward_hook(self)

    def __call__(self, _m, _inp, out):
        self.dtypes.add(out.dtype)


def _split(tmp_path, precision, cache="cache"):
    root = tmp_path / "scenes"
    if not root.exists():
        write_demo(root, n_train=4, n_val=2)
    bb = Backbone(tiny_vit("in1k", seed=0), "timm", "tiny")
    seen = DtypeSeen(bb.model.blocks[0].attn.qkv)
    ds = ProbeDataset("demo", root, "val", bb.spec.img_size, bb.spec.patch_size)
    split = F.build_split(ds, bb, tmp_path / cache, batch_size=2, device="cpu", precision=precision)
    return split, seen, bb


def test_bf16_extraction_on_cpu_really_runs_in_bf16_and_says_so(tmp_path, one_thread):
    bf16, seen16, bb = _split(tmp_path, "bf16")
    fp32, seen32, _ = _split(tmp_path, "fp32")
    assert seen16.dtypes == {torch.bfloat16} and seen32.dtypes == {torch.float32}
    assert not np.array_equal(np.asarray(bf16.features), np.asarray(fp32.features))
    meta16 = json.loads((bf16.features_dir / "meta.json").read_text())
    assert meta16["precision"] == "bf16" and meta16["autocast_device"] == "cpu"
    assert bf16.features_dir != fp32.features_dir
    # the switch to timm's explicit attention lasts only for the extraction
    assert all(m.fused_attn for m in bb.model.modules() if hasattr(m, "fused_attn"))


def test_fp32_extraction_is_the_plain_forward(tmp_path, one_thread):
    split, seen, bb = _split(tmp_path, "auto")  # auto on CPU = fp32
    assert seen.dtypes == {torch.float32}
    assert json.loads((split.features_dir / "meta.json").read_text())["precision"] == "fp32"
    ds = split.dataset
    x = torch.stack([torch.as_tensor(ds[i]["image"]) for i in range(len(ds))])
    with torch.no_grad():
        ref = bb.features(bb.normalize(x)).to(torch.float16).numpy()
    assert np.array_equal(np.asarray(split.features), ref)


def test_policy_resolves_per_device_and_names_bad_values():
    from prismatic_locality import precision as P

    assert P.resolve("auto", "cpu") == "fp32" and P.resolve("auto", torch.device("cuda")) == "bf16"
    assert P.resolve("bf16", "cpu") == "bf16" and P.resolve("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match="optim.precision .*'fp16'"):
        P.resolve("fp16", "cpu", "optim.precision")
    # the teacher's weights are bf16 only for a bf16 run on GPU (an fp32 GPU run used to get a bf16 teacher)
    assert P.teacher_dtype("auto", "fp32", "cuda") == torch.float32
    assert P.teacher_dtype("auto", "auto", "cuda") == torch.bfloat16
    assert P.teacher_dtype("auto", "bf16", "cpu") == torch.float32
    assert P.teacher_dtype("bfloat16", "fp32", "cpu") == torch.bfloat16
    with torch.no_grad(), P.autocast("bf16", "cpu"):
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.bfloat16
    with P.autocast("auto", "cpu"):
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.float32


def test_cpu_bf16_attention_switch_is_scoped(one_thread):
    from prismatic_locality import precision as P

    vit = tiny_vit("in1k")
    with P.switched_attention("fp32", "cpu", vit) as n:
        assert n == 0 and all(b.attn.fused_attn for b in vit.blocks)
    with P.switched_attention("bf16", "cpu", vit) as n:
        assert n == len(vit.blocks) and not any(b.attn.fused_attn for b in vit.blocks)
    assert all(b.attn.fused_attn for b in vit.blocks)
    assert P.switch_attention("bf16", "cuda", vit) == 0 and P.switch_attention("bf16", "cpu", vit) == len(vit.blocks)
    assert not any(b.attn.fused_attn for b in vit.blocks)


def test_probe_heads_auto_on_cpu_is_fp32_bit_for_bit(tmp_path, one_thread):
    from prismatic_locality.probe.train import HeadConfig, ProbeOptimConfig, fit_probe

    train, _, _ = _split(tmp_path, "fp32")
    opt = dict(batch_size=2, epochs=1, warmup_steps=1)
    head = HeadConfig(depth=1)
    a, _ = fit_probe(train, train, "local", 3, head, ProbeOptimConfig(precision="fp32", **opt))
    b, _ = fit_probe(train, train, "local", 3, head, ProbeOptimConfig(precision="auto", **opt))
    assert a["epochs"] == b["epochs"] and b["precision"] == "fp32"


def test_probe_names_a_bad_precision_before_extracting(tmp_path):
    from prismatic_locality.probe.run import run_probe
    from test_probe_e2e import tiny_cfg

    root = write_demo(tmp_path / "scenes", n_train=4, n_val=2)
    for field, holder in (("extract_precision", None), ("precision", "optim")):
        cfg = tiny_cfg(root, "demo", tmp_path, task="local", write_outputs=False)
        setattr(cfg if holder is None else cfg.optim, field, "fp16")
        with pytest.raises(ValueError, match=f"{field} must be one of auto .*'fp16'"):
            run_probe(cfg)
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("features-*"))
