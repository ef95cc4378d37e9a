"""`locality vlm-compare`, the vlm-evaluation configs and the evaluate/score wrappers.

Result trees are written here in vlm-evaluation's layout
(<results>/<dataset_family>/<dataset_id>/<model_id>/metrics.json, as its scripts/score.py writes
them) with hand-picked numbers, so every expected value below is worked out by hand."""
from __future__ import annotations

import json
import math
import os
import runpy
import subprocess
import sys
import types
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Optional, Union

import draccus
import numpy as np
import pytest

from prismatic_locality import vlm_compare as VC

REPO = Path(__file__).resolve().parents[1]
FULL = {b.dataset_id: (b.family, b.expected) for b in VC.BENCHMARKS}


def write_metrics(root: Path, dataset_id: str, model: str, summary: dict, n: int | None = None,
                  n_scored: int | None = None) -> Path:
    """A metrics.json as vlm-evaluation's score.py lays it out (each per-example output a stub)."""
    family, expected = FULL[dataset_id]
    n = expected if n is None else n
    path = root / family / dataset_id / model / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # score.py stores every example; a dict of the right length stands in for them.
    examples = {str(i): {"model_output": "x"} for i in range(n if n_scored is None else n_scored)}
    path.write_text(json.dumps({"dataset": dataset_id, "n_examples": n, "model": model,
                                "experiment_tags": {}, "summary": summary, "examples": examples}))
    return path


def refcoco(a: float, plus: float = 0.4, g: float = 0.45) -> dict:
    return {"accuracy__RefCOCO": a, "accuracy__RefCOCO+": plus, "accuracy__RefCOCOg": g}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Three models. RefCOCO (fractions): 0.50/0.60/0.70 -> 50/60/70 %. VSR: 0.60/0.64 and missing
    for `fused`. GQA (already percent): 52/55/58. AI2D: only per-rank outputs for `aligned`
    (evaluated, not scored). Every other benchmark has no results at all."""
    root = tmp_path / "results"
    for model, rc, vsr, gqa in [("baseline", 0.50, 0.60, 52.0), ("aligned", 0.60, 0.64, 55.0),
                                ("fused", 0.70, None, 58.0)]:
        write_metrics(root, "refcoco-full", model, refcoco(rc))
        write_metrics(root, "gqa-full", model, {"accuracy": gqa})
        if vsr is not None:
            write_metrics(root, "vsr-full", model,
                          {"accuracy__VSR-ExactMatch": vsr, "accuracy__VSR-AUCROC": 0.7, "accuracy__VSR-AUCPR": 0.7})
    rank = root / "ai2d" / "ai2d-full" / "aligned" / "results+rank-0.json"
    rank.parent.mkdir(parents=True)
    rank.write_text("{}")
    return root


def col(name: str) -> int:
    return [b.name for b in VC.BENCHMARKS].index(name)


def table_row(md: str, section: str, model: str) -> list[str]:
    """Cells of `model`'s row in the table under `## {section}...`."""
    block = md.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    for line in block.splitlines():
        if line.startswith(f"| {model} |"):
            return [c.strip() for c in line.strip("|").split("|")][1:]
    raise AssertionError(f"no row for {model} under {section}")


# --- reading ----------------------------------------------------------------------------------

def test_load_results_scales_to_percent_and_keeps_missing(tree):
    r = VC.load_results(tree)
    assert r.models == ["aligned", "baseline", "fused"]
    v = dict(zip(r.models, r.values))
    assert v["baseline"][col("RefCOCO")] == pytest.approx(50.0)
    assert v["fused"][col("RefCOCO+")] == pytest.approx(40.0)
    assert v["aligned"][col("GQA")] == pytest.approx(55.0)      # already percent: not scaled again
    assert v["aligned"][col("VSR")] == pytest.approx(64.0)
    assert math.isnan(v["fused"][col("VSR")])                   # missing task, not 0
    assert math.isnan(v["aligned"][col("AI2D")])                # evaluated but not scored
    assert np.isnan(r.values[:, col("VQAv2")]).all()
    assert any(m == "aligned" and "ai2d-full" in why and "not scored" in why for m, why in r.notes)


def test_partial_metrics_are_missing_not_zero(tree):
    # A metrics.json that covers only part of the full split (wrong n_examples, or fewer examples).
    write_metrics(tree, "pope-full", "baseline", {"accuracy__POPE-final-Accuracy": 0.85}, n=3000)
    write_metrics(tree, "pope-full", "aligned", {"accuracy__POPE-final-Accuracy": 0.86}, n_scored=10)
    write_metrics(tree, "pope-full", "fused", {"accuracy__POPE-final-Accuracy": 0.80})
    r = VC.load_results(tree)
    pope = dict(zip(r.models, r.values[:, col("POPE")]))
    assert math.isnan(pope["baseline"]) and math.isnan(pope["aligned"])
    assert pope["fused"] == pytest.approx(80.0)
    z = VC.zscores(r.values)[:, col("POPE")]
    assert z[r.models.index("fused")] == 0.0                    # a lone score is the pool mean
    assert np.isnan(z[r.models.index("baseline")])
    whys = " ".join(why for _, why in r.notes)
    assert "n_examples=3000" in whys and "10 of 9000 examples" in whys


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "not a vlm-evaluation metrics.json"),
    (json.dumps({"dataset": "gqa-full", "model": "baseline", "n_examples": 12578}), "not a vlm-evaluation metrics.json"),
    (json.dumps({"dataset": "gqa-full", "model": "other", "n_examples": 12578, "summary": {"accuracy": 1.0}}),
     "field 'model' is 'other'"),
    (json.dumps({"dataset": "vsr-full", "model": "baseline", "n_examples": 12578, "summary": {"accuracy": 1.0}}),
     "field 'dataset' is 'vsr-full'"),
    (json.dumps({"dataset": "gqa-full", "model": "baseline", "n_examples": 12578, "summary": {"acc": 1.0}}),
     "'summary' has no 'accuracy'"),
    (json.dumps({"dataset": "gqa-full", "model": "baseline", "n_examples": 12578, "summary": {"accuracy": "55"}}),
     "must be a number"),
])
def test_bad_layout_fails_naming_the_file(tree, capsys, content, fragment):
    bad = tree / "gqa" / "gqa-full" / "baseline" / "metrics.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match=fragment) as e:
        VC.load_results(tree)
    assert str(bad) in str(e.value)
    # Through the CLI: exit code 2, one line on stderr naming the file, nothing written.
    assert VC.main([str(tree)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and fragment.split("'")[0] in err
    assert not (tree / "vlm-compare").exists()


def test_empty_or_absent_results_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such results directory"):
        VC.load_results(tmp_path / "nope")
    (tmp_path / "refcoco" / "refcoco-slim" / "m").mkdir(parents=True)    # slim splits are not read
    with pytest.raises(ValueError, match="no vlm-evaluation results found"):
        VC.load_results(tmp_path)


# --- numbers ----------------------------------------------------------------------------------

def test_zscores_exact_on_hand_numbers():
    nan = np.nan
    values = np.array([[50.0, 60.0, 7.0, nan],
                       [60.0, 64.0, 7.0, nan],
                       [70.0, nan, 7.0, 3.0]])
    z = VC.zscores(values)
    s = math.sqrt(200 / 3)                        # population std of 50, 60, 70
    np.testing.assert_allclose(z[:, 0], [-10 / s, 0.0, 10 / s])
    np.testing.assert_allclose(z[:2, 1], [-1.0, 1.0])  # mean 62, std 2 over the two present models
    assert np.isnan(z[2, 1])                      # missing stays missing and is not in mean/std
    np.testing.assert_array_equal(z[:, 2], [0.0, 0.0, 0.0])   # no spread: everyone at the mean
    assert np.isnan(z[:2, 3]).all() and z[2, 3] == 0.0


def test_deltas_propagate_missing():
    values = np.array([[50.0, 60.0, np.nan], [60.0, np.nan, 1.0], [45.5, 61.0, 2.0]])
    d = VC.deltas(values, 0)
    np.testing.assert_allclose(d[1, 0], 10.0)
    np.testing.assert_allclose(d[2, :2], [-4.5, 1.0])
    assert np.isnan(d[1, 1]) and np.isnan(d[1:, 2]).all()


# --- the command ------------------------------------------------------------------------------

def test_cli_writes_table_deltas_zscores_and_chart(tree, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert VC.main([str(tree), "--baseline", "baseline", "--out", str(out)]) == 0
    md = (out / "vlm-compare.md").read_text()
    assert md in capsys.readouterr().out

    # Table: models x benchmarks, percent with one decimal, "—" for missing.
    header = md.split("## Scores", 1)[1].split("\n")[2]
    assert header.startswith("| model | RefCOCO | RefCOCO+ |") and "| POPE |" in header
    row = table_row(md, "Scores", "fused")
    assert row[col("RefCOCO")] == "70.0" and row[col("GQA")] == "58.0"
    assert row[col("VSR")] == "—" and row[col("AI2D")] == "—" and "0.0" not in row
    assert table_row(md, "Scores", "aligned")[col("VSR")] == "64.0"

    # Deltas against the baseline; the baseline itself has no delta row.
    d = table_row(md, "Deltas", "fused")
    assert d[col("RefCOCO")] == "+20.0" and d[col("GQA")] == "+6.0" and d[col("VSR")] == "—"
    assert table_row(md, "Deltas", "aligned")[col("VSR")] == "+4.0"
    with pytest.raises(AssertionError):
        table_row(md, "Deltas", "baseline")

    # z-scores, two decimals: RefCOCO 50/60/70 -> -1.22/0/+1.22; VSR over two models -> -1/+1.
    assert table_row(md, "z-scores", "baseline")[col("RefCOCO")] == "-1.22"
    assert table_row(md, "z-scores", "aligned")[col("VSR")] == "+1.00"
    assert table_row(md, "z-scores", "fused")[col("VSR")] == "—"
    assert "aligned` ai2d-full: evaluated but not scored" in md

    js = json.loads((out / "vlm-compare.json").read_text())
    assert js["pool"] == ["aligned", "baseline", "fused"] and js["baseline"] == "baseline"
    assert js["models"] == ["baseline", "aligned", "fused"]      # the reference row first
    assert js["scores"]["fused"]["VSR"] is None and js["scores"]["baseline"]["GQA"] == 52.0
    assert js["deltas"]["aligned"]["RefCOCO"] == pytest.approx(10.0)
    assert js["deltas"]["baseline"]["GQA"] == 0.0
    assert js["zscores"]["fused"]["RefCOCO"] == pytest.approx(10 / math.sqrt(200 / 3))
    assert js["zscores"]["baseline"]["VSR"] == pytest.approx(-1.0)

    png = (out / "radar.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert sorted(p.name for p in out.iterdir()) == ["radar.png", "vlm-compare.json", "vlm-compare.md"]


def test_models_subset_is_still_scored_against_the_whole_pool(tree, tmp_path):
    out = tmp_path / "cmp"
    assert VC.main([str(tree), "--models", "fused", "--baseline", "aligned", "--out", str(out)]) == 0
    js = json.loads((out / "vlm-compare.json").read_text())
    assert js["models"] == ["aligned", "fused"]                 # baseline joins the shown models
    assert js["pool"] == ["aligned", "baseline", "fused"]
    assert js["zscores"]["fused"]["RefCOCO"] == pytest.approx(10 / math.sqrt(200 / 3))
    assert "baseline" not in js["scores"]
    assert (out / "radar.png").stat().st_size > 0


def test_unknown_baseline_is_an_error(tree, capsys):
    assert VC.main([str(tree), "--baseline", "prism-clip+7b"]) == 2
    err = capsys.readouterr().err
    assert "'prism-clip+7b' has no results" in err and "aligned, baseline, fused" in err


def test_registered_in_cli():
    from prismatic_locality import cli
    assert cli.COMMANDS["vlm-compare"][0] == "prismatic_locality.vlm_compare"


# --- vlm-evaluation-configs/ ------------------------------------------------------------------

CONFIGS = REPO / "vlm-evaluation-configs"


# vlm-evaluation's two draccus configs, field for field (names, types, the `dataset` choice), to
# parse our YAML files the way its scripts will. Module level: draccus resolves the annotations.
@dataclass
class DatasetConfig(draccus.ChoiceRegistry):
    dataset_family: str
    dataset_id: str
    root_dir: Path


for _b in VC.BENCHMARKS:
    if _b.dataset_id not in DatasetConfig.get_known_choices():
        DatasetConfig.register_subclass(_b.dataset_id, make_dataclass(
            "Dataset_" + _b.family.replace("-", "_"),
            [("dataset_family", str, field(default=_b.family)), ("dataset_id", str, field(default=_b.dataset_id)),
             ("root_dir", Path, field(default=Path("../../datasets/vlm-evaluation")))],
            bases=(DatasetConfig,)))


@dataclass
class EvaluationConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig.get_choice_class("ai2d-full"))
    model_family: str = "prismatic"
    model_id: Optional[str] = "prism-clip+7b"
    model_dir: Optional[Path] = None
    device_batch_size: int = 1
    num_workers: int = 2
    results_dir: Path = Path("results")
    hf_token: Union[str, Path] = Path(".hf_token")
    seed: int = 21


@dataclass
class ScoreConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig.get_choice_class("ai2d-full"))
    model_id: str = "prism-clip+7b"
    config_yaml: Optional[Path] = None
    results_dir: Path = Path("results")


def expected_models() -> set[str]:
    """The plugin's naming (prismatic_locality/prismatic/configs.py) for the paper's two backbones and
    the SigLIP 2 / PE-Core ones, and the paper's adapter ablations."""
    from prismatic_locality.prismatic.weights import ALIGNED_BACKBONES
    fams = [b.id.removesuffix("-aligned") for b in ALIGNED_BACKBONES.values()
            if b.id in ("clip-l-336-aligned", "siglip-so400m-384-aligned", "siglip2-so400m-384-aligned",
                        "pe-core-l-336-aligned")]
    assert len(fams) == 4
    out = {f"{kind}-{fam}+7b" for fam in fams for kind in ("aligned-decoder", "aligned-mlp", "baseline")}
    # The adapter ablations (paper App. D) on the paper's two backbones.
    out |= {f"{kind}-{fam}+7b" for fam in ("clip-l-336", "siglip-so400m-384")
            for kind in ("baseline-transformer", "baseline-truncated", "aligned-truncated")}
    return out | {"baseline-dinoclip-l-336+7b", "baseline-dinosiglip-so400m-384+7b"}


def test_tasks_are_the_full_splits_vlm_compare_reads():
    lines = [l.strip() for l in (CONFIGS / "tasks.txt").read_text().splitlines()]
    tasks = [l for l in lines if l and not l.startswith("#")]
    assert tasks[:5] == ["refcoco-full", "ocid-ref-full", "tally-qa-full", "vsr-full", "ai2d-full"]
    assert sorted(tasks) == sorted({b.dataset_id for b in VC.BENCHMARKS})


def test_configs_parse_as_the_harness_parses_them():
    evals = {p.stem: p for p in (CONFIGS / "evaluate").glob("*.yaml")}
    scores = {p.stem: p for p in (CONFIGS / "score").glob("*.yaml")}
    assert set(evals) == set(scores) == expected_models()
    for model, path in evals.items():
        cfg = draccus.parse(EvaluationConfig, config_path=str(path),
                            args=["--dataset.type", "vsr-full", "--dataset.root_dir", "/data/vlm-eval"])
        assert cfg.model_family == "prismatic" and cfg.model_id == model
        assert cfg.model_dir == Path(f"runs/{model}+stage-finetune+x7")     # Prismatic's run-id rule
        assert cfg.dataset.dataset_id == "vsr-full" and cfg.dataset.root_dir == Path("/data/vlm-eval")
        assert cfg.hf_token == "HF_TOKEN"       # a str is read as an environment variable name
        sc = draccus.parse(ScoreConfig, config_path=str(scores[model]), args=["--dataset.type", "vsr-full"])
        assert sc.model_id == model and sc.results_dir == cfg.results_dir


def test_run_all_loops_models_by_tasks(tmp_path):
    log = tmp_path / "calls.txt"
    rec = tmp_path / "record"
    rec.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    rec.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "LAUNCH": str(rec), "PYTHON": str(rec)}
    model = "aligned-decoder-clip-l-336+7b"
    r = subprocess.run(["bash", str(CONFIGS / "run_all.sh"), "/data/vlm-eval", model],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 2 * 10
    first, second = calls[0].split(), calls[1].split()
    assert first[0].endswith("scripts/evaluate.py") and second[0].endswith("scripts/score.py")
    assert first[first.index("--config_path") + 1] == str(CONFIGS / "evaluate" / f"{model}.yaml")
    assert second[second.index("--config_path") + 1] == str(CONFIGS / "score" / f"{model}.yaml")
    assert [c.split()[c.split().index("--dataset.type") + 1] for c in calls[::2]][:2] == ["refcoco-full", "ocid-ref-full"]
    assert all("--dataset.root_dir /data/vlm-eval" in c for c in calls)

    r = subprocess.run(["bash", str(CONFIGS / "run_all.sh"), "/data", "no-such-model+7b"],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "no-such-model+7b.yaml" in r.stderr


# --- scripts/evaluate.py and scripts/score.py -------------------------------------------------

@pytest.fixture
def fake_harness(tmp_path, monkeypatch):
    """A vlm-evaluation clone whose scripts record how they were run, and a registered plugin stub."""
    clone = tmp_path / "vlm-evaluation"
    (clone / "scripts").mkdir(parents=True)
    for name in ("evaluate.py", "score.py"):
        (clone / "scripts" / name).write_text(
            "import json, sys\n"
            "from pathlib import Path\n"
            f"Path({str(tmp_path / name)!r} + '.json').write_text(json.dumps({{'argv': sys.argv,"
            " 'name': __name__, 'path0': sys.path[0], 'path1': sys.path[1],"
            " 'plugin': 'prismatic_locality.prismatic' in sys.modules}))\n")
    plugin = types.ModuleType("prismatic_locality.prismatic")
    plugin.PRISMATIC_AVAILABLE = True
    monkeypatch.setitem(sys.modules, "prismatic_locality.prismatic", plugin)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("VLM_EVAL_ROOT", str(clone))
    before = set(sys.modules)
    yield clone, plugin
    for mod in [m for m in sys.modules if m.split(".")[0] == "llava" and m not in before]:
        del sys.modules[mod]     # the wrapper's LLaVA placeholders, when LLaVA is not installed


def run_wrapper(name: str, argv: list[str], monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(REPO / "scripts" / name), *argv])
    runpy.run_path(str(REPO / "scripts" / name), run_name="__main__")


@pytest.mark.parametrize("name", ["evaluate.py", "score.py"])
def test_wrapper_runs_upstream_script_with_plugin_and_same_cli(fake_harness, tmp_path, monkeypatch, name):
    clone, _ = fake_harness
    args = ["--config_path", "x.yaml", "--dataset.type", "refcoco-full"]
    run_wrapper(name, args, monkeypatch)
    seen = json.loads((tmp_path / f"{name}.json").read_text())
    assert seen["argv"] == [str(clone / "scripts" / name), *args]
    assert seen["name"] == "__main__" and seen["plugin"]
    # As if run as `python <clone>/scripts/<name>`, with the bare clone importable.
    assert seen["path0"] == str(clone / "scripts") and seen["path1"] == str(clone)
    assert str(REPO / "scripts") not in sys.path


def test_wrapper_errors_are_clear(fake_harness, tmp_path, monkeypatch):
    clone, plugin = fake_harness
    monkeypatch.setenv("VLM_EVAL_ROOT", str(tmp_path / "elsewhere"))
    with pytest.raises(SystemExit, match=r"VLM_EVAL_ROOT=.*elsewhere.*scripts/evaluate.py does not exist"):
        run_wrapper("evaluate.py", [], monkeypatch)

    monkeypatch.delenv("VLM_EVAL_ROOT")
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "vlm_eval" else real_find_spec(n, *a))
    with pytest.raises(SystemExit, match="vlm-evaluation is not installed: .*VLM_EVAL_ROOT"):
        run_wrapper("score.py", [], monkeypatch)

    monkeypatch.setenv("VLM_EVAL_ROOT", str(clone))
    plugin.PRISMATIC_AVAILABLE = False
    with pytest.raises(SystemExit, match="Prismatic is not installed"):
        run_wrapper("evaluate.py", [], monkeypatch)
    assert not (tmp_path / "evaluate.py.json").exists()
    run_wrapper("score.py", ["--model_id", "m"], monkeypatch)     # scoring loads no model
    assert json.loads((tmp_path / "score.py.json").read_text())["argv"][1:] == ["--model_id", "m"]


def test_missing_llava_is_stubbed_until_used(fake_harness, monkeypatch):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llava" else real_find_spec(n, *a))
    for mod in [m for m in sys.modules if m.split(".")[0] == "llava"]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import _vlm_eval
    _vlm_eval.stub_llava_if_missing()
    # The names vlm_eval/models/llava.py imports at module level resolve ...
    from llava.constants import DEFAULT_IMAGE_TOKEN  # noqa: F401
    from llava.conversation import conv_templates
    from llava.model import LlavaLlamaForCausalLM
    import llava.model
    assert isinstance(llava.model, types.ModuleType)
    assert not hasattr(LlavaLlamaForCausalLM, "__wrapped__")   # introspection is not an error
    # ... and fail, saying why, only when a LLaVA model is actually used.
    with pytest.raises(ModuleNotFoundError, match="llava.model.LlavaLlamaForCausalLM: the LLaVA package is not installed"):
        LlavaLlamaForCausalLM.from_pretrained("liuhaotian/llava-v1.5-7b")
    with pytest.raises(ModuleNotFoundError, match="conv_templates"):
        conv_templates["llava_v1"]


def test_vlm_compare_imports_no_torch():
    """It reads and writes JSON only: importing it (and the file I/O it uses) must not pull in torch."""
    code = "import sys, prismatic_locality.vlm_compare; print('torch' in sys.modules, 'timm' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"], r.stdout
