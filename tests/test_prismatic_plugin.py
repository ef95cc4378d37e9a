"""The plugin inside real Prismatic: registration, backbone, get_vlm with the DecoderProjector, training
step, save -> prismatic.load() round trip, model configs, the pretrain wrapper.

Needs TRI-ML's Prismatic importable (skipped otherwise; see docs/prismatic.md for the stack). The LLM is
a 2-layer Llama with a word-level tokenizer, both written by the test into tmp_path (no hub).
"""
import copy
import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

prismatic = pytest.importorskip("prismatic.models.materialize", reason="TRI-ML Prismatic is not installed (see docs/prismatic.md)")

import draccus  # noqa: E402
import prismatic as prismatic_pkg  # noqa: E402
import prismatic.models.backbones.llm.llama2 as llama2  # noqa: E402
import prismatic.models.materialize as materialize  # noqa: E402
from PIL import Image  # noqa: E402
from prismatic.conf import ModelConfig  # noqa: E402
from prismatic.models.vlms.prismatic import PrismaticVLM  # noqa: E402
from torchvision.transforms import Compose  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast  # noqa: E402

import prismatic_locality.prismatic as plugin  # noqa: E402
from prismatic_locality.prismatic import weights as W  # noqa: E402
from prismatic_locality.prismatic.backbone import AlignedViTBackbone  # noqa: E402
from prismatic_locality.prismatic.features import load_featurizer  # noqa: E402
from prismatic_locality.prismatic.projector import (  # noqa: E402
    DecoderProjector,
    TransformerProjector,
    TruncatedProjector,
)
from prismatic_locality.prismatic.registry import register  # noqa: E402

from conftest import TINY  # noqa: E402
from test_prismatic_modules import make_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.prismatic
REPO = Path(__file__).resolve().parents[1]
TINY_ID = "test-tiny-clip-aligned"
TINY_LLM = "llama2-tiny-test-pure"  # "llama2-*-pure" selects Prismatic's PurePromptBuilder
WORDS = ["True", "False", "Yes", "No", *[chr(ord("A") + i) for i in range(26)], "What", "is", "in", "the", "image", "?", "a", "cat"]


def write_tiny_llama(path: Path) -> Path:
    """A Llama checkpoint + Llama fast tokenizer on disk, in the layout `from_pretrained` reads."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # A word-level vocabulary in Llama's tokenizer class, which prefixes BOS as Prismatic requires.
    LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                       legacy=True).save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A tiny aligned backbone id and a tiny offline Llama registered with Prismatic (undone afterwards)."""
    monkeypatch.setattr(W, "_registered", {})
    monkeypatch.delenv(W.ENV_ROOT, raising=False)
    monkeypatch.setattr(materialize, "VISION_BACKBONES", dict(materialize.VISION_BACKBONES))
    ck = make_tiny_checkpoint(tmp_path / "ckpts" / TINY_ID, "clip")
    plugin.register_aligned_backbone(TINY_ID, 32, checkpoint=ck)
    llm_dir = write_tiny_llama(tmp_path / "llm")
    monkeypatch.setitem(llama2.LLAMA2_MODELS, TINY_LLM,
                        {"llm_family": "llama2", "llm_cls": LlamaForCausalLM, "hf_hub_path": str(llm_dir)})
    # No flash-attn on CPU; upstream's Llama default asks for it.
    monkeypatch.setitem(materialize.LLM_BACKBONES, TINY_LLM,
                        {"cls": llama2.LLaMa2LLMBackbone, "kwargs": {"use_flash_attention_2": False}})
    return tmp_path


def build_vlm(arch="no-align+decoder", backbone_id=TINY_ID):
    vb, transform = materialize.get_vision_backbone_and_transform(backbone_id, "resize-naive")
    llm, tok = materialize.get_llm_backbone_and_tokenizer(TINY_LLM, llm_max_length=64)
    return materialize.get_vlm("aligned-decoder-tiny+test", arch, vb, llm), transform, tok


def batch(transform, tok):
    g = torch.Generator().manual_seed(0)
    pix = torch.stack([transform(Image.fromarray((torch.rand(20, 30, 3, generator=g) * 255).byte().numpy()))
                       for _ in range(2)])
    ids = tok(["What is in the image ? a cat", "What is in the image ? A"], padding=True, return_tensors="pt")
    labels = ids.input_ids.clone()
    labels[:, :1] = -100  # Prismatic's contract: BOS is never a target
    labels[ids.attention_mask == 0] = -100
    return dict(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pix, labels=labels)


# ------------------------------------------------------------------------------------------------


def test_registration_is_idempotent_and_complete():
    init_before, policy_before = PrismaticVLM.__init__, PrismaticVLM.get_fsdp_wrapping_policy
    register()
    register()
    assert PrismaticVLM.__init__ is init_before
    for bid, size in W.all_backbone_ids().items():
        entry = materialize.VISION_BACKBONES[bid]
        assert entry["cls"] is AlignedViTBackbone and entry["kwargs"] == {"default_image_size": size}
    assert {"clip-l-336-aligned", "siglip-so400m-384-aligned", "clip-b-224-aligned", "siglip-b-224-aligned",
            "clip-vit-l-336px-aligned", "siglip-vit-so400m-384px-aligned", "clip-vit-b-aligned",
            "siglip-vit-b-aligned"} <= set(materialize.VISION_BACKBONES)
    assert materialize.VISION_BACKBONES["clip-vit-l-336px-aligned"]["kwargs"]["default_image_size"] == 336
    assert materialize.VISION_BACKBONES["siglip-vit-b-aligned"]["kwargs"]["default_image_size"] == 224
    for fork_id in ("in1k-vit-l-aligned", "clip-vit-l-aligned", "siglip-vit-so400m-aligned"):  # the fork's 224 px ids
        assert materialize.VISION_BACKBONES[fork_id] == {"cls": AlignedViTBackbone, "kwargs": {"default_image_size": 224}}
    assert PrismaticVLM.get_fsdp_wrapping_policy is policy_before
    for b in W.STOCK_BACKBONES.values():  # the SigLIP 2 / PE-Core baselines Prismatic lacks
        assert materialize.VISION_BACKBONES[b.id] == {"cls": plugin.StockViTBackbone,
                                                      "kwargs": {"default_image_size": b.default_image_size}}
    assert {"siglip2-so400m-384-aligned", "pe-core-l-336-aligned", "siglip2-vit-so400m-384px",
            "pe-core-vit-l-336px"} <= set(materialize.VISION_BACKBONES)
    assert set(plugin.MODEL_CONFIGS) <= set(ModelConfig.get_known_choices())
    # Stock projectors are untouched: the patch only claims its own arch specifiers.
    assert not any(a.endswith(("gelu-mlp", "linear")) for a in [*plugin.registry.DECODER_ARCHS, *plugin.registry.ABLATION_ARCHS])


def test_model_configs_share_one_recipe():
    @dataclass
    class Cfg:
        model: ModelConfig = field(default_factory=ModelConfig.get_choice_class("aligned-decoder-clip-l-336+7b"))

    cfg = draccus.parse(Cfg, args=["--model.type", "aligned-decoder-siglip-so400m-384+7b"])
    m = cfg.model
    assert (m.vision_backbone_id, m.arch_specifier) == ("siglip-so400m-384-aligned", "no-align+decoder")
    assert (m.llm_backbone_id, m.image_resize_strategy, m.finetune_epochs) == ("llama2-7b-pure", "resize-naive", 2)
    assert draccus.encode(cfg)["model"]["type"] == "aligned-decoder-siglip-so400m-384+7b"

    def recipe(cls):
        d = dataclasses.asdict(cls())
        return json.dumps({k: v for k, v in d.items() if k not in ("model_id", "vision_backbone_id", "arch_specifier")})

    configs = plugin.MODEL_CONFIGS
    assert len(configs) == 35 and {recipe(c) for c in configs.values()} == {recipe(configs["baseline-clip-l-336+7b"])}
    # The adapter ablations (paper App. D) for the paper's two backbones, on the same recipe.
    for fam, stock in [("clip-l-336", "clip-vit-l-336px"), ("siglip-so400m-384", "siglip-vit-so400m-384px")]:
        for kind, backbone, arch in [("baseline-transformer", stock, "no-align+transformer"),
                                     ("baseline-truncated", stock, "no-align+truncated"),
                                     ("aligned-truncated", f"{fam}-aligned", "no-align+truncated")]:
            m = configs[f"{kind}-{fam}+7b"]()
            assert (m.vision_backbone_id, m.arch_specifier) == (backbone, arch), (kind, fam)
    assert not any(k.startswith(("baseline-transformer-clip-b", "aligned-truncated-pe")) for k in configs)
    # The paper fork's remaining backbones, under our ids, with their Prismatic baselines.
    assert configs["baseline-in1k-vit-l+7b"]().vision_backbone_id == "in1k-vit-l"
    assert configs["aligned-decoder-clip-l-224+7b"]().vision_backbone_id == "clip-l-224-aligned"
    assert configs["baseline-siglip-so400m-224+7b"]().vision_backbone_id == "siglip-vit-so400m"
    assert configs["baseline-siglip2-so400m-384+7b"]().vision_backbone_id == "siglip2-vit-so400m-384px"
    assert configs["aligned-decoder-pe-core-l-336+7b"]().vision_backbone_id == "pe-core-l-336-aligned"
    assert configs["baseline-pe-core-l-336+7b"]().arch_specifier == "no-align+gelu-mlp"
    assert configs["baseline-dinosiglip-so400m-384+7b"]().vision_backbone_id == "dinosiglip-vit-so-384px"
    assert configs["baseline-dinoclip-l-336+7b"]().arch_specifier == "no-align+fused-gelu-mlp"
    assert configs["aligned-mlp-clip-l-336+7b"]().arch_specifier == "no-align+gelu-mlp"
    assert configs["baseline-clip-l-336+7b"]().vision_backbone_id == "clip-vit-l-336px"


def test_every_vlm_evaluation_config_names_a_registered_model():
    evals = {p.stem for p in (REPO / "vlm-evaluation-configs" / "evaluate").glob("*.yaml")}
    assert {"baseline-transformer-clip-l-336+7b", "aligned-truncated-siglip-so400m-384+7b"} <= evals
    assert evals <= set(plugin.MODEL_CONFIGS)


def test_vision_backbone_and_transform(env):
    vb, transform = materialize.get_vision_backbone_and_transform(TINY_ID, "letterbox")
    assert isinstance(vb, AlignedViTBackbone) and isinstance(transform, Compose)
    assert vb.default_image_resolution == (3, 32, 32)
    assert (vb.embed_dim, vb.num_patches, vb.num_prefix_tokens, vb.num_heads) == (48, 16, 1, 3)
    assert vb.half_precision_dtype == torch.bfloat16
    x = transform(Image.new("RGB", (50, 20), (10, 200, 30))).unsqueeze(0)
    assert x.shape == (1, 3, 32, 32)
    from prismatic_locality.checkpoint import load_aligned

    ref = load_aligned(env / "ckpts" / TINY_ID)
    torch.testing.assert_close(vb(x), ref.encoder.forward_features(x))
    # Frozen backbone cast to bf16 (as FSDP setup does) still runs; the projector init is not cast.
    vb.to(dtype=vb.half_precision_dtype)
    assert vb(x.bfloat16()).dtype == torch.bfloat16
    assert vb.projector_init.in_proj["weight"].dtype == torch.float32
    # The state dict holds the featurizer only (no decoder, no encoder head).
    assert all(k.startswith("featurizer.") and ".head." not in k for k in vb.state_dict())


@pytest.mark.parametrize("strategy", ["resize-naive", "resize-crop", "letterbox"])
@pytest.mark.parametrize("kind,name", [("clip", "vit_base_patch16_clip_quickgelu_224.openai"),     # crop_pct 0.9
                                       ("clip", "vit_large_patch14_clip_quickgelu_336.openai"),    # crop_pct 1.0
                                       ("siglip", "vit_base_patch16_siglip_224.webli")])            # resized to S
def test_image_transform_matches_prismatic(env, monkeypatch, kind, name, strategy):
    """The same pixels as Prismatic's own TimmViTBackbone transform for the same timm model, odd
    letterbox differences included."""
    import timm
    from prismatic.models.backbones.vision.base_vision import TimmViTBackbone

    kw = TINY[kind][1]
    size = kw["img_size"]
    ck = make_tiny_checkpoint(env / "ck", kind, model_name=name)
    plugin.register_aligned_backbone("tiny-aligned", size, checkpoint=ck)
    _, ours = materialize.get_vision_backbone_and_transform("tiny-aligned", strategy)
    create, arch = timm.create_model, {k: v for k, v in kw.items() if k != "img_size"}
    monkeypatch.setattr(timm, "create_model", lambda n, pretrained=False, **k: create(n, pretrained=False, **k, **arch))
    theirs = TimmViTBackbone("stock", name, strategy, default_image_size=size).image_transform
    rng = np.random.default_rng(0)
    for w, h in [(50, 21), (21, 50), (40, 20), (33, 33), (7, 90)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert torch.equal(ours(img), theirs(img)), (w, h)


SIGLIP2, PE_CORE = "vit_so400m_patch16_siglip_384.v2_webli", "vit_pe_core_large_patch14_336.fb"


def tiny_timm(monkeypatch, kind="clip"):
    """timm.create_model builds the tiny architecture of TINY[kind] with random weights (no download)."""
    import timm

    create, arch = timm.create_model, {k: v for k, v in TINY[kind][1].items() if k != "img_size"}
    monkeypatch.setattr(timm, "create_model", lambda n, pretrained=False, **k: create(n, pretrained=False, **k, **arch))


def tiny_stock_id(monkeypatch, timm_name):
    """A 32 px stock id for `timm_name`, registered like the real ones (needs the timm that has it)."""
    import timm

    b = next(b for b in W.STOCK_BACKBONES.values() if b.timm_name == timm_name)
    if not timm.is_model(timm_name.split(".")[0]):
        pytest.skip(f"timm {timm.__version__} lacks {timm_name} (needs timm>={b.min_timm})")
    tiny = W.StockBackboneId(f"tiny-{b.id}", 32, timm_name, b.min_timm)
    monkeypatch.setitem(W.STOCK_BACKBONES, tiny.id, tiny)
    monkeypatch.setitem(materialize.VISION_BACKBONES, tiny.id, {"cls": plugin.StockViTBackbone, "kwargs": {"default_image_size": 32}})
    tiny_timm(monkeypatch)
    return tiny.id


def test_stock_siglip2_matches_prismatics_own_backbone(env, monkeypatch):
    """SigLIP 2 is a plain VisionTransformer, so Prismatic's TimmViTBackbone can be built for it: same
    transform pixels, same features (it returns them in a list on timm >= 1.0.3, its issue #34)."""
    from prismatic.models.backbones.vision.base_vision import TimmViTBackbone

    bid = tiny_stock_id(monkeypatch, SIGLIP2)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(50, 21), (21, 50), (40, 40)]]
    for strategy in ("resize-naive", "resize-crop", "letterbox"):
        ours, transform = materialize.get_vision_backbone_and_transform(bid, strategy)
        theirs = TimmViTBackbone("stock", SIGLIP2, strategy, default_image_size=32)
        for img in imgs:
            assert torch.equal(transform(img), theirs.image_transform(img)), strategy
    theirs.featurizer.load_state_dict(ours.featurizer.state_dict())
    x = torch.stack([transform(img) for img in imgs])
    ref = theirs(x)
    ref = ref[0] if isinstance(ref, list) else ref
    assert ours(x).shape == (3, 16, 48) and torch.equal(ours(x), ref)
    assert (ours.embed_dim, ours.num_patches, ours.default_image_resolution) == (48, 16, (3, 32, 32))


@pytest.mark.parametrize("timm_name", [SIGLIP2, PE_CORE])
def test_stock_baseline_trains_in_prismatic(env, monkeypatch, timm_name):
    """A baseline-<family>+7b model: the stock backbone, Prismatic's MLP projector, a training step."""
    bid = tiny_stock_id(monkeypatch, timm_name)
    vb, transform = materialize.get_vision_backbone_and_transform(bid, "letterbox")
    llm, tok = materialize.get_llm_backbone_and_tokenizer(TINY_LLM, llm_max_length=64)
    vlm = materialize.get_vlm("baseline-tiny+test", "no-align+gelu-mlp", vb, llm)
    vlm.freeze_backbones("finetune")
    policy = vlm.get_fsdp_wrapping_policy()
    wraps = lambda m: policy(module=m, recurse=False, nonwrapped_numel=10**9)  # noqa: E731
    assert wraps(vb.featurizer) and wraps(vb.featurizer.blocks[0])
    b = batch(transform, tok)
    out = vlm(**b)
    assert out.logits.shape[1] == b["input_ids"].shape[1] + 16  # patch tokens only, as Prismatic's baselines
    out.loss.backward()
    assert vlm.projector.projector[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vb.parameters())


def test_prismatic_stock_backbones_return_tensors_on_any_timm(env, monkeypatch):
    """Prismatic's own timm backbones (the paper's baselines) in the timm the new families need: its
    ``get_intermediate_layers`` returns a list on timm >= 1.0.3 (TRI-ML/prismatic-vlms#34), which
    Prismatic's ``unpack_tuple`` leaves packed; with the plugin imported they return the tensor."""
    from prismatic.models.backbones.vision.clip_vit import CLIPViTBackbone
    from prismatic.models.backbones.vision.dinosiglip_vit import DinoSigLIPViTBackbone

    tiny_timm(monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    clip = CLIPViTBackbone("clip-vit-l-336px", "resize-naive", default_image_size=32)
    out = clip(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 16, 48)
    blocks = clip.featurizer.blocks[:-1]
    ref = clip.featurizer.norm_pre(clip.featurizer._pos_embed(clip.featurizer.patch_embed(x)))
    for blk in blocks:
        ref = blk(ref)
    torch.testing.assert_close(out, ref[:, clip.featurizer.num_prefix_tokens:], rtol=0, atol=0)
    fused = DinoSigLIPViTBackbone("dinosiglip-vit-so-384px", "resize-naive", default_image_size=32)
    out = fused({"dino": x, "siglip": x})
    assert isinstance(out, torch.Tensor) and out.shape == (2, 16, 96)


def test_new_family_ids_need_a_newer_timm(env, monkeypatch):
    """On Prismatic's timm 0.9.10 (simulated on a newer one), one line says which timm to install."""
    import timm

    monkeypatch.setattr(timm, "is_model", lambda name: False)
    for bid, v in [("siglip2-vit-so400m-384px", "1.0.15"), ("pe-core-l-336-aligned", "1.0.16")]:
        with pytest.raises(ValueError, match=rf"'{bid}' needs timm>={v}.*pip install 'timm>={v}'"):
            materialize.get_vision_backbone_and_transform(bid, "resize-naive")


@pytest.mark.parametrize("timm_name", [SIGLIP2])
def test_aligned_new_family_in_prismatic(env, timm_name):
    """An aligned SigLIP 2 checkpoint under its id: backbone, DecoderProjector, a forward pass.
    (PE-Core needs the timm adapter's Eva support for its aligned encoder.)"""
    import timm

    if not timm.is_model(timm_name.split(".")[0]):
        pytest.skip(f"timm {timm.__version__} lacks {timm_name} (needs timm>={W.SIGLIP2_TIMM})")
    plugin.register_aligned_backbone("tiny-siglip2-aligned", 32,
                                     checkpoint=make_tiny_checkpoint(env / "s2", "clip", model_name=timm_name))
    vlm, transform, tok = build_vlm(backbone_id="tiny-siglip2-aligned")
    assert isinstance(vlm.projector, DecoderProjector) and vlm.vision_backbone.num_tokens == 16
    b = batch(transform, tok)
    assert vlm(**b).logits.shape[1] == b["input_ids"].shape[1] + 16


def test_real_ids_resolve_from_env_root_and_check_size(env, monkeypatch):
    root = env / "ckpts"
    make_tiny_checkpoint(root / "clip-l-336-aligned", "clip")
    monkeypatch.setenv(W.ENV_ROOT, str(root))
    with pytest.raises(ValueError, match="img_size is 32, but this backbone id expects 336"):
        materialize.get_vision_backbone_and_transform("clip-vit-l-336px-aligned", "resize-naive")
    monkeypatch.delenv(W.ENV_ROOT)
    with pytest.raises(FileNotFoundError, match="'siglip-so400m-384-aligned'.*PRISMATIC_LOCALITY_CKPT_ROOT"):
        materialize.get_vision_backbone_and_transform("siglip-so400m-384-aligned", "resize-naive")


def test_get_vlm_train_step_save_and_load_round_trip(env):
    vlm, transform, tok = build_vlm()
    assert isinstance(vlm.projector, DecoderProjector) and vlm.arch_specifier == "no-align+decoder"
    assert type(vlm.projector.blocks[0].mlp.act).__name__ == "QuickGELU"  # the checkpoint's own activation
    assert torch.equal(vlm.projector.in_proj.weight, vlm.vision_backbone.projector_init.in_proj["weight"])
    vlm.freeze_backbones("finetune")
    vlm.load_from_checkpoint("finetune", env / "runs" / "x+y+stage-finetune+x7")  # no-align: needs nothing

    # The FSDP policy (applied by Prismatic to every module) covers the ViT, its blocks and the projector.
    policy = vlm.get_fsdp_wrapping_policy()
    wraps = lambda m: policy(module=m, recurse=False, nonwrapped_numel=10**9)  # noqa: E731
    assert wraps(vlm.projector) and wraps(vlm.projector.blocks[0]) and wraps(vlm.vision_backbone.featurizer)
    assert wraps(vlm.vision_backbone.featurizer.blocks[0]) and wraps(vlm.llm_backbone.llm.model.layers[0])

    b = batch(transform, tok)
    vlm.train()
    out = vlm(**b)
    n_vis = vlm.vision_backbone.num_tokens
    assert n_vis == 17 and out.logits.shape[1] == b["input_ids"].shape[1] + n_vis  # every token reaches the LLM
    out.loss.backward()
    assert vlm.projector.head.weight.grad.abs().sum() > 0  # zero head, non-zero gradient
    assert vlm.llm_backbone.llm.model.layers[0].mlp.up_proj.weight.grad is not None
    assert all(p.grad is None for p in vlm.vision_backbone.parameters())
    opt = torch.optim.SGD([p for p in vlm.parameters() if p.requires_grad], lr=0.5)
    opt.step()
    assert vlm.projector.head.weight.abs().sum() > 0

    # Save as FSDPStrategy.save_checkpoint does (trainable modules only) and as pretrain.py writes config.json.
    run = env / "runs" / "aligned-decoder-tiny+test+stage-finetune+x7"
    (run / "checkpoints").mkdir(parents=True)
    model_cfg = dataclasses.replace(plugin.MODEL_CONFIGS["aligned-decoder-clip-l-336+7b"](), vision_backbone_id=TINY_ID,
                                    llm_backbone_id=TINY_LLM, llm_max_length=64)
    (run / "config.json").write_text(json.dumps({"model": draccus.encode(model_cfg)}))
    torch.save({"model": {"projector": vlm.projector.state_dict(), "llm_backbone": vlm.llm_backbone.state_dict()}},
               run / "checkpoints" / "latest-checkpoint.pt")

    loaded = prismatic_pkg.load(run)
    assert isinstance(loaded.projector, DecoderProjector) and loaded.arch_specifier == "no-align+decoder"
    vlm.eval()
    with torch.no_grad():
        ref = vlm(**b).logits
        got = loaded(**b).logits
    torch.testing.assert_close(got, ref)
    assert loaded.projector.head.weight.abs().sum() > 0


def fsdp_wraps(vlm):
    policy = vlm.get_fsdp_wrapping_policy()
    return lambda m: policy(module=m, recurse=False, nonwrapped_numel=10**9)


def save_run(env, vlm, name, model_type, **changes):
    """A run dir as Prismatic's pretrain.py + FSDPStrategy.save_checkpoint leave it (trainable modules only)."""
    run = env / "runs" / f"{name}+stage-finetune+x7"
    (run / "checkpoints").mkdir(parents=True)
    model_cfg = dataclasses.replace(plugin.MODEL_CONFIGS[model_type](), llm_backbone_id=TINY_LLM, llm_max_length=64,
                                    **changes)
    (run / "config.json").write_text(json.dumps({"model": draccus.encode(model_cfg)}))
    torch.save({"model": {"projector": vlm.projector.state_dict(), "llm_backbone": vlm.llm_backbone.state_dict()}},
               run / "checkpoints" / "latest-checkpoint.pt")
    return run


def train_step(vlm, b, n_vis):
    """One finetune-stage step: every visual token reaches the LLM, the adapter (only) learns."""
    vlm.freeze_backbones("finetune")
    vlm.train()
    out = vlm(**b)
    assert out.logits.shape[1] == b["input_ids"].shape[1] + n_vis
    out.loss.backward()
    assert all(p.grad is not None for p in vlm.projector.parameters())
    assert all(p.grad is None for p in vlm.vision_backbone.parameters())
    opt = torch.optim.SGD([p for p in vlm.parameters() if p.requires_grad], lr=0.5)
    opt.step()
    opt.zero_grad()


def test_aligned_truncated_adapter_in_prismatic(env):
    """aligned-truncated: the loaded aligned checkpoint's last 2 blocks + final norm + zero Linear as the
    adapter, the backbone 2 blocks shorter; FSDP policy, a training step, save -> prismatic.load()."""
    vlm, transform, tok = build_vlm(arch="no-align+truncated")
    loaded_vit, _, _ = load_featurizer(env / "ckpts" / TINY_ID, 32)
    proj, vb = vlm.projector, vlm.vision_backbone
    assert isinstance(proj, TruncatedProjector) and vlm.arch_specifier == "no-align+truncated"
    assert len(vb.featurizer.blocks) == 1 and isinstance(vb.featurizer.norm, torch.nn.Identity)
    want = {**{f"{i}.{k}": v for i in (0, 1) for k, v in loaded_vit.blocks[1 + i].state_dict().items()},
            **{f"2.{k}": v for k, v in loaded_vit.norm.state_dict().items()}}
    got = {k: v for k, v in proj.state_dict().items() if not k.startswith("3.")}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not proj[3].weight.any() and proj[3].weight.shape == (32, 48)  # zero Linear to the LLM width
    assert not any(p is q for p in proj.parameters() for q in vb.parameters())  # moved, not shared
    wraps = fsdp_wraps(vlm)
    assert wraps(proj) and wraps(proj[0]) and wraps(vb.featurizer) and wraps(vb.featurizer.blocks[0])

    b = batch(transform, tok)
    with torch.no_grad():  # the ViT split in two still computes the aligned features
        torch.testing.assert_close(proj[:3](vb(b["pixel_values"])), loaded_vit(b["pixel_values"]), rtol=0, atol=0)
    train_step(vlm, b, n_vis=17)
    assert proj[3].weight.abs().sum() > 0  # the zero Linear learns first (the blocks get zero gradient at step 0)
    train_step(vlm, b, n_vis=17)
    assert not torch.equal(proj[0].attn.qkv.weight, want["0.attn.qkv.weight"])  # then the moved blocks fine-tune

    run = save_run(env, vlm, "aligned-truncated-tiny+test", "aligned-truncated-clip-l-336+7b", vision_backbone_id=TINY_ID)
    loaded = prismatic_pkg.load(run)
    assert isinstance(loaded.projector, TruncatedProjector) and len(loaded.vision_backbone.featurizer.blocks) == 1
    vlm.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**b).logits, vlm(**b).logits)


# Prismatic's own stock backbones for the paper's two families, tiny: (class, id, family, prefix, patches)
STOCK_FAMILIES = {
    "clip": ("prismatic.models.backbones.vision.clip_vit:CLIPViTBackbone", "clip-vit-l-336px", "clip-l-336", 1, 16),
    "siglip": ("prismatic.models.backbones.vision.siglip_vit:SigLIPViTBackbone", "siglip-vit-so400m-384px",
               "siglip-so400m-384", 0, 4),
}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("arch", ["no-align+transformer", "no-align+truncated"])
def test_stock_ablation_adapters_in_prismatic(env, monkeypatch, arch, kind):
    """baseline-transformer / baseline-truncated on Prismatic's own CLIP and SigLIP backbones (tiny): the
    stock features (block L-2, no norm) with the prefix tokens kept reach the adapter; truncated takes
    blocks L-3 and L-2 of the loaded ViT. FSDP policy, a training step, save -> prismatic.load()."""
    import importlib

    import timm

    cls_path, bid, fam, prefix, patches = STOCK_FAMILIES[kind]
    module, name = cls_path.split(":")
    tiny_timm(monkeypatch, kind)
    random_vit = timm.create_model
    # The same "pretrained" weights every time the backbone is built (prismatic.load() rebuilds it).
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: (torch.manual_seed(0), random_vit(*a, **k))[1])
    monkeypatch.setitem(materialize.VISION_BACKBONES, bid, {"cls": getattr(importlib.import_module(module), name),
                                                            "kwargs": {"default_image_size": TINY[kind][1]["img_size"]}})
    vb, transform = materialize.get_vision_backbone_and_transform(bid, "resize-naive")
    llm, tok = materialize.get_llm_backbone_and_tokenizer(TINY_LLM, llm_max_length=64)
    b = batch(transform, tok)
    with torch.no_grad():
        stock = vb(b["pixel_values"])  # Prismatic's baseline features: patch tokens only
    assert stock.shape == (2, patches, 48)
    blocks = [copy.deepcopy(blk.state_dict()) for blk in vb.featurizer.blocks]
    vlm = materialize.get_vlm("baseline-ablation-tiny+test", arch, vb, llm)
    proj, feat = vlm.projector, vb.featurizer
    assert isinstance(feat.norm, torch.nn.Identity) and vlm.arch_specifier == arch
    with torch.no_grad():
        mid = vb(b["pixel_values"])
    n_vis = prefix + patches
    assert mid.shape == (2, n_vis, 48)  # prefix tokens kept for the adapter's attention
    if arch == "no-align+truncated":
        assert isinstance(proj, TruncatedProjector) and len(feat.blocks) == 0 and len(proj) == 4
        for i in (0, 1):
            assert all(torch.equal(v, blocks[i][k]) for k, v in proj[i].state_dict().items())
        assert isinstance(proj[2], torch.nn.Identity) and not proj[3].weight.any()
        with torch.no_grad():
            torch.testing.assert_close(proj[:3](mid)[:, prefix:], stock, rtol=0, atol=0)
    else:
        assert isinstance(proj, TransformerProjector) and len(feat.blocks) == 2 and len(proj.blocks) == 2
        assert proj.pos_embed.shape == (1, n_vis, 48) and proj.head.weight.abs().sum() > 0
        torch.testing.assert_close(mid[:, prefix:], stock, rtol=0, atol=0)
    wraps = fsdp_wraps(vlm)
    assert wraps(proj) and wraps(feat) and all(wraps(m) for m in proj.modules() if type(m).__name__ == "Block")
    train_step(vlm, b, n_vis=n_vis)

    model_type = f"baseline-{arch.removeprefix('no-align+')}-{fam}+7b"
    assert plugin.MODEL_CONFIGS[model_type]().vision_backbone_id == bid
    run = save_run(env, vlm, model_type.replace("+7b", ""), model_type)
    loaded = prismatic_pkg.load(run)
    assert type(loaded.projector) is type(proj)
    vlm.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**b).logits, vlm(**b).logits)


@pytest.mark.parametrize("arch", ["no-align+truncated", "no-align+transformer"])
def test_fsdp_wraps_the_ablation_adapters_and_trains(env, monkeypatch, arch):
    """Prismatic's FSDP setup (one CPU/gloo rank): the backbone cast to bf16 first, the VLM's policy,
    bf16 MixedPrecision, use_orig_params. The adapter is its own FSDP unit (its blocks too), so its fp32
    weights never share a flat parameter with the bf16 backbone, and a bf16 step trains it."""
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        vlm, transform, tok = build_vlm(arch=arch)
        vlm.freeze_backbones("finetune")
        vlm.vision_backbone.to(dtype=vlm.vision_backbone.half_precision_dtype)
        assert all(p.dtype == torch.float32 for p in vlm.projector.parameters())  # not cast with the backbone
        bf16 = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16)
        model = FSDP(vlm, auto_wrap_policy=vlm.get_fsdp_wrapping_policy(), mixed_precision=bf16,
                     use_orig_params=True, device_id=torch.device("cpu"))
        units = {n.replace("_fsdp_wrapped_module.", "") for n, m in model.named_modules() if isinstance(m, FSDP)}
        assert {"projector", "vision_backbone.featurizer"} <= units
        assert {"projector.0", "projector.1"} <= units or {"projector.blocks.0", "projector.blocks.1"} <= units
        b = batch(transform, tok)
        b["pixel_values"] = b["pixel_values"].bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**b).loss
        loss.backward()
        assert torch.isfinite(loss)
        head = vlm.projector[-1] if arch.endswith("truncated") else vlm.projector.head
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    finally:
        dist.destroy_process_group()


def test_ablation_archs_need_one_vit_featurizer(env):
    class Fused:  # e.g. the DINOv2-fused backbones: two featurizers
        identifier = "dinosiglip-vit-so-384px"
        dino_featurizer = None

    llm, _ = materialize.get_llm_backbone_and_tokenizer(TINY_LLM, llm_max_length=64)
    for arch in ("no-align+transformer", "no-align+truncated"):
        with pytest.raises(ValueError, match="one timm VisionTransformer featurizer; 'dinosiglip-vit-so-384px' has none"):
            materialize.get_vlm("m", arch, Fused(), llm)


def test_fork_arch_specifier_reloads_with_gelu(env):
    vlm, _, _ = build_vlm(arch="no-align+pretrained-decoder")
    assert vlm.arch_specifier == "no-align+pretrained-decoder"
    assert type(vlm.projector.blocks[0].mlp.act) is torch.nn.GELU
    assert {k.split(".")[0] for k in vlm.projector.state_dict()} == {"in_proj", "pos_embed", "blocks", "norm", "head"}


def test_decoder_arch_needs_an_aligned_backbone(env):
    class Stock:
        identifier = "clip-vit-l-336px"

    llm, _ = materialize.get_llm_backbone_and_tokenizer(TINY_LLM, llm_max_length=64)
    with pytest.raises(ValueError, match="needs an aligned vision backbone.*got 'clip-vit-l-336px'"):
        materialize.get_vlm("m", "no-align+decoder", Stock(), llm)


UPSTREAM_PRETRAIN = Path(prismatic_pkg.__file__).resolve().parents[1] / "scripts" / "pretrain.py"
needs_upstream_script = pytest.mark.skipif(not UPSTREAM_PRETRAIN.is_file(),
                                           reason=f"Prismatic's scripts/pretrain.py not found at {UPSTREAM_PRETRAIN} (not a source install)")


@pytest.fixture(scope="module")
def pretrain_config_cls():
    """The PretrainConfig of Prismatic's own scripts/pretrain.py (its module body only; nothing runs)."""
    import runpy

    return runpy.run_path(str(UPSTREAM_PRETRAIN), run_name="prismatic_pretrain")["PretrainConfig"]


def pretrain_commands(doc: Path) -> list[list[str]]:
    """The argument lists of every ``scripts/pretrain.py`` command in a doc's bash blocks."""
    import re
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            if "scripts/pretrain.py" in cmd and not cmd.lstrip().startswith("#"):
                words = shlex.split(cmd, comments=True)
                commands.append(words[words.index("scripts/pretrain.py") + 1:])
    return commands


@needs_upstream_script
@pytest.mark.parametrize("group,field,value", [("model", "vision_backbone_id", "siglip-so400m-384-aligned"),
                                                ("dataset", "dataset_root_dir", Path("/data/llava"))])
def test_pretrain_field_without_type_is_the_default_config_with_that_field(pretrain_config_cls, group, field, value):
    """``--model.vision_backbone_id X`` alone = Prismatic's default model config with X (draccus from PyPI
    otherwise refuses it: "Expected a dict with a 'type' key")."""
    cfg = draccus.parse(pretrain_config_cls, args=[f"--{group}.{field}", str(value)])
    default = pretrain_config_cls.__dataclass_fields__[group].default_factory()
    got = getattr(cfg, group)
    assert type(got) is type(default) and getattr(got, field) == value
    assert dataclasses.replace(default, **{field: value}) == got
    # An explicit type still wins.
    cfg = draccus.parse(pretrain_config_cls, args=["--model.type", "aligned-mlp-clip-l-336+7b", "--model.llm_max_length", "64"])
    assert (cfg.model.model_id, cfg.model.llm_max_length) == ("aligned-mlp-clip-l-336+7b", 64)


@needs_upstream_script
@pytest.mark.parametrize("doc", ["README.md", "docs/prismatic.md"])
def test_documented_pretrain_commands_parse(pretrain_config_cls, doc):
    """Every documented training command parses with Prismatic's own PretrainConfig, names one of our
    aligned backbones, and logs to jsonl only (upstream's default also starts wandb under its authors' entity)."""
    commands = pretrain_commands(REPO / doc)
    assert len(commands) >= 2, f"{doc}: expected both forms (--model.type and --model.vision_backbone_id)"
    forms = set()
    for args in commands:
        cfg = draccus.parse(pretrain_config_cls, args=args)
        assert cfg.trackers == ("jsonl",), (doc, args)
        assert cfg.model.vision_backbone_id in W.all_backbone_ids(), (doc, args)
        forms.add("--model.type" in args)
    assert forms == {True, False}, f"{doc}: document both forms"


@pytest.mark.slow
def test_pretrain_wrapper_imports_plugin_then_runs_upstream_script(tmp_path):
    """scripts/pretrain.py in a fresh process: plugin registered before the upstream script runs as __main__,
    and the issue's command (a backbone without --model.type) parses there."""
    fake = tmp_path / "pretrain.py"
    report = tmp_path / "report.json"
    fake.write_text(
        "import json, sys\n"
        "from dataclasses import dataclass, field\n"
        "import draccus\n"
        "import prismatic.models.materialize as m\n"
        "from prismatic.conf import ModelConfig, ModelRegistry\n"
        "@dataclass\n"
        "class PretrainConfig:  # upstream's model field and its default\n"
        "    model: ModelConfig = field(default_factory=ModelConfig.get_choice_class(ModelRegistry.PRISM_DINOSIGLIP_7B.model_id))\n"
        "    stage: str = 'align'\n"
        "cfg = draccus.parse(PretrainConfig)\n"
        f"json.dump({{'name': __name__, 'argv': sys.argv, 'backbone': 'clip-l-336-aligned' in m.VISION_BACKBONES,"
        f" 'config': 'aligned-decoder-clip-l-336+7b' in ModelConfig.get_known_choices(),"
        f" 'model': [cfg.model.model_id, cfg.model.vision_backbone_id, cfg.stage]}}, open({str(report)!r}, 'w'))\n"
    )
    env = dict(os.environ, PRISMATIC_PRETRAIN_SCRIPT=str(fake), HF_HUB_OFFLINE="1")
    args = ["--model.vision_backbone_id", "siglip-so400m-384-aligned", "--stage", "finetune"]
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "pretrain.py"), *args], env=env, capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(report.read_text())
    assert got == {"name": "__main__", "argv": [str(fake), *args], "backbone": True, "config": True,
                   "model": ["prism-dinosiglip+7b", "siglip-so400m-384-aligned", "finetune"]}


def test_pretrain_wrapper_names_the_missing_script(tmp_path, monkeypatch):
    import runpy

    wrapper = runpy.run_path(str(REPO / "scripts" / "pretrain.py"), run_name="not_main")
    monkeypatch.setenv("PRISMATIC_PRETRAIN_SCRIPT", str(tmp_path / "missing.py"))
    with pytest.raises(SystemExit, match="missing.py.*PRISMATIC_PRETRAIN_SCRIPT"):
        wrapper["upstream_script"]()
    monkeypatch.delenv("PRISMATIC_PRETRAIN_SCRIPT")
    found = Path(prismatic_pkg.__file__).resolve().parents[1] / "scripts" / "pretrain.py"
    if found.is_file():  # editable install: the checkout's script
        assert wrapper["upstream_script"]() == found
    else:
        with pytest.raises(SystemExit, match=str(found)):
            wrapper["upstream_script"]()
