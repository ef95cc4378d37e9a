"""The benchmark scripts still run and write what the docs read (smallest configs, CPU, seconds).

They time nothing here: speed is what the scripts measure, not what tests assert.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


def test_maskembed_step_benchmark_writes_both_paths_and_their_ratio(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert load("maskembed_step").main(["--models", "demo", "--batch", "2", "--steps", "1", "--warmup", "0",
                                        "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    ref, fast, ratio = res["rows"]
    assert (ref["path"], fast["path"], ratio["path"]) == ("reference", "fast", "ratio")
    # same weights, images and masks: the two paths compute the same loss (fp32 on CPU)
    assert fast["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert fast["tflops_per_image"] == ref["tflops_per_image"] > 0
    assert ratio["speedup"] == pytest.approx(fast["images_per_s"] / ref["images_per_s"])
    assert res["device_type"] == "cpu" and ref["peak_mem_gib"] is None
    assert "FLOPs/image = 3·[ViT_L + head]" in capsys.readouterr().out


def test_probe_features_benchmark_projects_the_cache_speedup(tmp_path):
    out = tmp_path / "probe.json"
    assert load("probe_features").main(["--models", "tiny", "--images", "8", "--image-size", "64x48",
                                        "--extract-batch", "4", "--batch-size", "4", "--head-steps", "2",
                                        "--workers", "0", "--device", "cpu", "--tmp", str(tmp_path),
                                        "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["model"] == "tiny" and r["images"] == 8
    for key in ("recompute_img_s", "extract_img_s", "cached_img_s", "head_img_s"):
        assert r[key] > 0, key
    e = 5  # default --epochs
    no_cache = e * (1 / r["recompute_img_s"] + 1 / r["head_img_s"])
    assert r["probe_s_per_image_no_cache"] == pytest.approx(no_cache, rel=1e-4)
    assert r["speedup_probe"] == pytest.approx(no_cache / r["probe_s_per_image_cached"], rel=1e-4)
    assert not any(p.name.startswith("probe-bench-") for p in tmp_path.iterdir())  # temp data removed


@pytest.mark.slow
def test_teacher_bf16_error_benchmark_measures_both_bf16_teachers(tmp_path):
    out = tmp_path / "err.json"
    assert load("teacher_bf16_error").main(["--images", "4", "--out", str(out)]) == 0
    models = json.loads(out.read_text())["models"]
    assert len(models) == 3
    for r in models.values():  # bf16 weights round more than the reference's fp32 weights under autocast
        assert 0 < r["reference_bf16_rel_rms"] < r["ours_bf16_rel_rms"] < 0.05
