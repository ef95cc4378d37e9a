"""Trainer configuration: recipes, recipe < YAML < CLI layering, fail-fast errors, schedule, optimiser."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from prismatic_locality.align.config import RECIPES, AlignConfig, get_recipe, parse_config, to_dict, validate
from prismatic_locality.align.optim import build_optimizer, load_optimizer_state, lr_at
from prismatic_locality.align.state import config_mismatch
from prismatic_locality.align.train import main

SPEC_A12 = {  # recipe: (teacher, lr, micro-batch per GPU)
    "clip-l-336": ("vit_large_patch14_clip_quickgelu_336.openai", 2e-4, 32),
    "siglip-so400m-384": ("vit_so400m_patch14_siglip_384", 2e-4, 16),
    "clip-b-224": ("vit_base_patch16_clip_quickgelu_224.openai", 3e-4, 256),
    "siglip-b-224": ("vit_base_patch16_siglip_224", 3e-4, 256),
    "in1k-vit-b": ("vit_base_patch16_224.augreg_in21k_ft_in1k", 3e-4, 256),
}


@pytest.mark.parametrize("name", sorted(SPEC_A12))
def test_recipes_carry_the_reference_hyperparameters(name):
    cfg = parse_config(["--recipe", name, "--data.root", "/data/imagenet21k"])
    teacher, lr, micro = SPEC_A12[name]
    assert (cfg.recipe, cfg.teacher.model, cfg.optim.lr, cfg.micro_batch) == (name, teacher, lr, micro)
    assert cfg.global_batch == 1024 and cfg.epochs == 5 and cfg.optim.warmup_steps == 0
    assert cfg.optim.resolved_min_lr == pytest.approx(lr / 10)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.01 and cfg.optim.clip_grad == 1.0
    assert (cfg.teacher.target, cfg.loss, cfg.masks.kind, cfg.encoder.softcap) == ("penultimate", "mse", "uniform", 30.0)
    assert cfg.data.augment == "rkrc" and cfg.data.root == "/data/imagenet21k"
    validate(cfg)


def test_demo_recipe_is_tiny_and_cpu():
    cfg = get_recipe("demo")
    assert cfg.teacher.timm_kwargs["img_size"] == 48 and cfg.teacher.timm_kwargs["patch_size"] == 8
    assert cfg.device == "cpu" and cfg.global_batch % cfg.micro_batch == 0
    assert set(RECIPES) >= set(SPEC_A12) | {"demo"}


def test_demo_bf16_recipe_is_the_demo_with_bf16_and_twice_the_steps():
    fp32, bf16 = to_dict(get_recipe("demo")), to_dict(get_recipe("demo-bf16"))
    assert (fp32["precision"], bf16["precision"]) == ("auto", "bf16")
    assert bf16["max_steps"] == 2 * fp32["max_steps"]
    differ = {k for k in fp32 if fp32[k] != bf16[k]}
    assert differ == {"recipe", "precision", "max_steps"}


def test_yaml_overrides_the_recipe_and_cli_overrides_yaml(tmp_path):
    y = tmp_path / "x.yaml"
    y.write_text("optim:\n  lr: 1.0e-4\n  warmup_steps: 50\nteacher:\n  target: last\n"
                 "data:\n  root: /from/yaml\nmicro_batch: 8\n")
    cfg = parse_config(["--recipe", "clip-l-336", "--config_path", str(y), "--micro_batch", "16"])
    assert cfg.teacher.model == "vit_large_patch14_clip_quickgelu_336.openai"   # recipe
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.teacher.target) == (1e-4, 50, "last")  # yaml
    assert cfg.optim.resolved_min_lr == pytest.approx(1e-5)                    # follows the new lr
    assert cfg.micro_batch == 16 and cfg.data.root == "/from/yaml"             # cli > yaml
    # a recipe named inside the YAML works too
    y2 = tmp_path / "y.yaml"
    y2.write_text("recipe: siglip-b-224\ndata:\n  root: /d\n")
    assert parse_config(["--config_path", str(y2)]).teacher.model == "vit_base_patch16_siglip_224"


def test_timm_kwargs_from_the_cli():
    cfg = parse_config(["--data.root", "/d", "--teacher.model", "vit_tiny_patch16_224",
                        "--teacher.timm_kwargs", '{"img_size": 32, "depth": 2}'])
    assert cfg.teacher.timm_kwargs == {"img_size": 32, "depth": 2}


@pytest.mark.parametrize("argv, match", [
    (["--recipe", "clip-xxl"], "unknown recipe 'clip-xxl'"),
    (["--data.root", "/d", "--optim.lrr", "1"], "--optim.lrr"),
    (["--data.root", "/d", "--optim.lr", "fast"], "optim.lr"),
])
def test_bad_recipe_or_field_fails_with_one_line_naming_it(argv, match):
    with pytest.raises(ValueError, match=match) as e:
        parse_config(argv)
    assert "\n" not in str(e.value)


def test_bad_yaml_field_names_the_file_and_field(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("optim:\n  learning_rate: 1.0\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown config field 'optim.learning_rate'"):
        parse_config(["--config_path", str(y)])


@pytest.mark.parametrize("field, value, match", [
    ("teacher.target", "middle", "teacher.target"),
    ("loss", "huber", "'loss'"),
    ("masks.kind", "random", "masks.kind"),
    ("micro_batch", 0, "micro_batch"),
])
def test_validate_names_the_bad_field(field, value, match):
    cfg = get_recipe("in1k-vit-b")
    cfg.data.root = "/d"
    obj, *path = [cfg] + field.split(".")
    for p in path[:-1]:
        obj = getattr(obj, p)
    setattr(obj, path[-1], value)
    with pytest.raises(ValueError, match=match):
        validate(cfg)


def test_missing_data_root_fails_fast():
    with pytest.raises(ValueError, match="data.root"):
        validate(AlignConfig())


def test_main_prints_one_line_and_returns_1(capsys):
    assert main(["--recipe", "nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown recipe 'nope'" in err


def test_cosine_schedule_values():
    lr, mn, T = 3e-4, 3e-5, 100
    assert lr_at(0, T, lr, mn) == pytest.approx(lr)
    assert lr_at(50, T, lr, mn) == pytest.approx((lr + mn) / 2)
    assert lr_at(25, T, lr, mn) == pytest.approx(mn + 0.5 * (lr - mn) * (1 + math.cos(math.pi / 4)))
    assert lr_at(T, T, lr, mn) == pytest.approx(mn)
    # warmup counts inside the horizon (timm warmup_prefix=False)
    assert lr_at(0, T, lr, mn, warmup_steps=10, warmup_lr=mn) == pytest.approx(mn)
    assert lr_at(5, T, lr, mn, warmup_steps=10, warmup_lr=mn) == pytest.approx((lr + mn) / 2)
    assert lr_at(10, T, lr, mn, warmup_steps=10) == pytest.approx(mn + 0.5 * (lr - mn) * (1 + math.cos(math.pi * 0.1)))
    vals = [lr_at(t, T, lr, mn) for t in range(T)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_cosine_schedule_matches_timm():
    from timm.scheduler import CosineLRScheduler

    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=3e-4)
    sched = CosineLRScheduler(opt, t_initial=40, lr_min=3e-5, warmup_t=5, warmup_lr_init=3e-5, t_in_epochs=False)
    for t in range(40):
        sched.step_update(t)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(t, 40, 3e-4, 3e-5, 5, 3e-5), rel=1e-9)


def test_weight_decay_hits_every_parameter_unless_excluded():
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    ref = build_optimizer(m.named_parameters(), 1e-3, 0.01, (0.9, 0.95), 1e-8)
    assert len(ref.param_groups) == 1 and ref.param_groups[0]["weight_decay"] == 0.01
    assert len(ref.param_groups[0]["params"]) == 4 and ref.defaults["betas"] == (0.9, 0.95)
    ex = build_optimizer(m.named_parameters(), 1e-3, 0.01, (0.9, 0.95), 1e-8, exclude_norm_bias=True)
    decayed, free = ex.param_groups
    assert len(decayed["params"]) == 1 and decayed["params"][0] is m[0].weight and free["weight_decay"] == 0.0


def test_optimizer_state_moves_between_fused_and_unfused_kernels():
    # a GPU run saves with fused=True; resumed elsewhere, the state (moments, step) must come
    # back while the kernel choice stays the loading run's (and `step` lives where it expects)
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    fused = build_optimizer(m.named_parameters(), 1e-2, 0.01, (0.9, 0.95), 1e-8, fused=True)
    assert fused.param_groups[0]["fused"] is True
    for _ in range(3):
        m(torch.randn(5, 4)).square().sum().backward()
        fused.step()
        fused.zero_grad()
    saved = fused.state_dict()
    plain = build_optimizer(m.named_parameters(), 1e-3, 0.0, (0.5, 0.5), 1.0)
    load_optimizer_state(plain, saved)
    g = plain.param_groups[0]
    assert not g["fused"] and (g["lr"], g["weight_decay"], g["betas"]) == (1e-2, 0.01, (0.9, 0.95))
    for i, p in enumerate(m.parameters()):
        a, b = plain.state[p], saved["state"][i]
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert float(a["step"]) == 3.0
    w = m.weight.detach().clone()
    m(torch.randn(5, 4)).square().sum().backward()
    plain.step()  # the loaded state drives a normal update
    assert not torch.equal(w, m.weight)
    with pytest.raises(ValueError, match="parameter groups"):
        load_optimizer_state(build_optimizer(m.named_parameters(), 1e-3, 0.01, (0.9, 0.95), 1e-8,
                                             exclude_norm_bias=True), saved)


def test_config_mismatch_names_the_field_and_allows_operational_changes():
    a = {"optim": {"lr": 1e-4}, "micro_batch": 4, "output_dir": "x"}
    assert config_mismatch(a, {"optim": {"lr": 1e-4}, "micro_batch": 8, "output_dir": "y"}, "s.json") is None
    msg = config_mismatch(a, {"optim": {"lr": 2e-4}, "micro_batch": 4, "output_dir": "x"}, "s.json")
    assert msg.startswith("s.json: config field 'optim.lr' differs") and "\n" not in msg


def test_locality_align_command_routes_to_the_trainer(capsys):
    from prismatic_locality.cli import main as cli_main

    assert cli_main(["align", "--recipe", "siglip-b-224", "--data.format", "zip", "--data.root", "/d"]) == 1
    assert "config field 'data.format'" in capsys.readouterr().err


def test_every_config_field_is_classified_for_resume():
    """A new AlignConfig field must be added to one of state.py's lists: resumable (where/how it runs)
    or result-defining (a resume refuses a change)."""
    from prismatic_locality.align.state import RESULT_FIELDS, RESUMABLE_CHANGES, config_fields

    names = config_fields(to_dict(AlignConfig()))
    assert not set(RESUMABLE_CHANGES) & set(RESULT_FIELDS)
    assert sorted(names) == sorted(RESUMABLE_CHANGES + RESULT_FIELDS), (
        f"unclassified: {sorted(set(names) - set(RESUMABLE_CHANGES + RESULT_FIELDS))}, "
        f"unknown: {sorted(set(RESUMABLE_CHANGES + RESULT_FIELDS) - set(names))}")
