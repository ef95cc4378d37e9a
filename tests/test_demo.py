"""`locality demo --quick` end to end, and the teacher's training/saving round trip."""
import json

import pytest
import torch

from prismatic_locality.demo import run as D
from prismatic_locality.demo import scenes as S
from prismatic_locality.demo import teacher as T


def _tiny_teacher_cfg(**kw):
    return T.TeacherConfig(embed_dim=32, depth=2, num_heads=2, num_scenes=64, steps=3, batch_size=16, warmup=1, **kw)


def test_teacher_trains_saves_and_loads_through_create_vit(tmp_path):
    cfg = _tiny_teacher_cfg()
    vit, summary = T.train_teacher(cfg, val=S.make_scenes(32, "val", 0, progress=False), progress=False)
    assert 0.0 <= summary["val_global_recall"] <= 1.0 and summary["final_loss"] > 0
    path = T.save_teacher(tmp_path / "t.safetensors", vit, cfg, summary)
    back, cfg2 = T.load_teacher(path)                       # backbone only, via vit.create_vit
    assert cfg2 == cfg and back.num_classes == 0
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    # stored in float16: equal to the trained model up to half-precision rounding of the weights
    torch.testing.assert_close(back.forward_features(x), vit.forward_features(x), atol=2e-2, rtol=2e-2)
    assert back.patch_embed.proj.weight.dtype == torch.float32
    with_head, _ = T.load_teacher(path, num_classes=10)
    torch.testing.assert_close(with_head(x), vit(x), atol=2e-2, rtol=2e-2)
    assert torch.equal(with_head.head.weight, vit.head.weight.half().float())


def test_teacher_training_is_seeded(tmp_path):
    a, _ = T.train_teacher(_tiny_teacher_cfg(), progress=False)
    b, _ = T.train_teacher(_tiny_teacher_cfg(), progress=False)
    c, _ = T.train_teacher(_tiny_teacher_cfg(seed=1), progress=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_not_a_teacher_file_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="bad.safetensors"):
        T.read_teacher_config(bad)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        T.read_teacher_config(tmp_path / "missing.safetensors")


def test_macro_recall_ignores_classes_without_positives():
    target = torch.tensor([[1, 0, 0], [1, 1, 0]])
    pred = torch.tensor([[1, 1, 1], [0, 1, 0]])
    assert T.macro_recall(pred, target) == pytest.approx((0.5 + 1.0) / 2)


@pytest.mark.parametrize("native, precision, recipe", [(True, "bf16", "demo-bf16"), (False, "fp32", "demo")])
def test_demo_uses_bf16_only_on_hardware_bf16(monkeypatch, native, precision, recipe):
    monkeypatch.setattr(D.V, "cpu_has_native_bf16", lambda: native)
    args = D.parse_args([])
    assert (args.precision, args.recipe) == (precision, recipe)
    forced = D.parse_args(["--precision", "fp32"])
    assert (forced.precision, forced.recipe) == ("fp32", "demo")


@pytest.mark.slow
def test_quick_demo_writes_a_well_formed_report(tmp_path):
    if not T.SHIPPED_TEACHER.is_file():
        pytest.fail(f"shipped teacher missing: {T.SHIPPED_TEACHER}")
    out = tmp_path / "demo"
    assert D.main(["--quick", "--seed", "3", "--out", str(out)]) == 0
    for name in ("report.md", "results.json", "recall.png", "qualitative.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    for model in ("teacher", "aligned"):
        for task in ("local", "global"):
            assert 0.0 <= res["recall"][model][task] <= 1.0
    heads = res["recall_per_probe_head"]
    for model in ("teacher", "aligned"):
        for task in ("local", "global"):  # --quick trains two heads per cell: the reported recall is their mean
            assert len(heads[model][task]) == res["config"]["probe"]["heads_per_model_and_task"] == 2
            assert res["recall"][model][task] == pytest.approx(sum(heads[model][task]) / 2)
    assert res["config"]["probe"]["head_seeds"] == [3, 1003]
    d = res["delta_points"]
    assert d["local"] == pytest.approx(100 * (res["recall"]["aligned"]["local"] - res["recall"]["teacher"]["local"]), abs=0.01)
    assert res["target_met"] == (d["local"] >= D.TARGET_LOCAL_GAIN and d["global"] >= -D.TARGET_GLOBAL_DROP)
    assert res["config"]["seed"] == 3 and res["config"]["quick"] is True
    assert set(res["timing_s"]) >= {"scenes", "teacher", "align", "probe", "report", "total"}
    md = (out / "report.md").read_text()
    assert f"{100 * res['recall']['teacher']['local']:.1f}" in md and "recall.png" in md
    assert (out / "align" / "aligned" / "model.safetensors").is_file()


def test_demo_softcap_reaches_the_trainer(tmp_path, monkeypatch):
    """`locality demo --softcap 0` aligns without the cap (the trainer's `encoder.softcap`)."""
    import prismatic_locality.align.train as AT

    seen = {}

    class Stop(Exception):
        pass

    def fake_train(cfg):
        seen["softcap"] = cfg.encoder.softcap
        raise Stop

    monkeypatch.setattr(AT, "train", fake_train)
    for argv, cap in (([], 30.0), (["--softcap", "0"], 0.0)):
        with pytest.raises(Stop):
            D.main(["--quick", "--out", str(tmp_path / "demo"), *argv])
        assert seen["softcap"] == cap


def test_demo_objective_and_mim_flags_reach_the_trainer(tmp_path, monkeypatch, capsys):
    """--objective clipself trains `demo-clipself`; --mim-steps N trains `demo-mim` for N steps, then
    MaskEmbed with that run's checkpoint as the teacher (the student still from the original teacher)."""
    import prismatic_locality.align.train as AT

    calls = []

    class Stop(Exception):
        pass

    def fake_train(cfg):
        calls.append(cfg)
        if cfg.objective != "mim":
            raise Stop
        return tmp_path / "mim-ckpt"

    monkeypatch.setattr(AT, "train", fake_train)
    monkeypatch.setattr(D, "read_config", lambda path: {})
    with pytest.raises(Stop):
        D.main(["--quick", "--out", str(tmp_path / "a"), "--objective", "clipself"])
    assert [(c.recipe, c.objective, c.teacher.aligned) for c in calls] == [("demo-clipself", "clipself", None)]

    calls.clear()
    with pytest.raises(Stop):
        D.main(["--quick", "--out", str(tmp_path / "b"), "--mim-steps", "2", "--precision", "fp32"])
    (mim, align) = calls
    assert (mim.recipe, mim.objective, mim.max_steps, mim.teacher.aligned) == ("demo-mim", "mim", 2, None)
    assert (align.recipe, align.objective, align.teacher.aligned) == ("demo", "maskembed", str(tmp_path / "mim-ckpt"))
    assert mim.teacher.weights == align.teacher.weights == str(T.SHIPPED_TEACHER)

    from prismatic_locality.demo.args import main as cli
    with pytest.raises(SystemExit) as e:
        cli(["--mim-steps", "2", "--objective", "clipself"])
    assert e.value.code == 2 and "--mim-steps needs --objective maskembed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # the decoder adapter is MaskEmbed's decoder; clipself trains none
        cli(["--vlm", "--objective", "clipself"])
    assert e.value.code == 2 and "--vlm needs --objective maskembed" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("flags, objective, mim_steps", [(["--objective", "clipself"], "clipself", 0),
                                                         (["--mim-steps", "2"], "maskembed", 2)])
def test_quick_demo_with_another_objective_or_mim_first(tmp_path, flags, objective, mim_steps):
    out = tmp_path / "demo"
    assert D.main(["--quick", "--out", str(out), *flags]) == 0
    res = json.loads((out / "results.json").read_text())
    assert (res["objective"], res["mim_steps"]) == (objective, mim_steps)
    assert (res["config"]["objective"], res["config"]["mim_steps"]) == (objective, mim_steps)
    assert res["align"]["objective"] == objective and all(0 <= res["recall"][m]["local"] <= 1 for m in ("teacher", "aligned"))
    md = (out / "report.md").read_text()
    from prismatic_locality.checkpoint import load_aligned
    if objective == "clipself":
        assert res["align"]["recipe"] == "demo-clipself" and "Objective: CLIPSelf" in md
        assert load_aligned(out / "align" / "aligned").decoder is None
    else:
        assert res["mim"]["recipe"] == "demo-mim" and res["mim"]["steps"] == 2 and "MIM first" in md
        assert res["align"]["teacher_aligned"] == str(out / "mim" / "aligned") and "mim" in res["timing_s"]
        assert load_aligned(out / "mim" / "aligned").config["objective"] == "mim"


def test_demo_align_steps_and_probe_heads_override_the_recipe(tmp_path, monkeypatch, capsys):
    """--align-steps N runs MaskEmbed for N steps instead of the recipe's; --probe-heads K trains K heads
    per (model, task); both default to the recipe's / 2 and are recorded in the command line."""
    import prismatic_locality.align.train as AT

    seen = []

    class Stop(Exception):
        pass

    def fake_train(cfg):
        seen.append(cfg.max_steps)
        raise Stop

    monkeypatch.setattr(AT, "train", fake_train)
    for argv, steps in (([], 600), (["--align-steps", "1200"], 1200)):
        with pytest.raises(Stop):
            D.main(["--precision", "fp32", "--out", str(tmp_path / "demo"), *argv])
        assert seen[-1] == steps
    with pytest.raises(Stop):  # --quick's own 3 steps unless asked otherwise
        D.main(["--quick", "--out", str(tmp_path / "demo")])
    assert seen[-1] == 3

    assert D.sizes_for(D.parse_args([])).probe_heads == 2
    args = D.parse_args(["--probe-heads", "4", "--align-steps", "900", "--precision", "fp32"])
    sizes = D.sizes_for(args)
    assert (sizes.probe_heads, sizes.align_steps) == (4, 900)
    assert D.probe_seeds(5, sizes.probe_heads) == [5, 1005, 2005, 3005]
    assert "--align-steps 900" in D.command_line(args) and "--probe-heads 4" in D.command_line(args)

    from prismatic_locality.demo.args import main as cli
    for flag in ("--align-steps", "--probe-heads"):
        with pytest.raises(SystemExit) as e:
            cli([flag, "-1" if flag == "--probe-heads" else "0"])
        assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err
