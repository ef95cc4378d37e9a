"""`--encoder.softcap 0`: MaskEmbed trains with timm's own attention and the checkpoint says so."""
import pytest
import timm
import torch

from prismatic_locality import vit as V
from prismatic_locality.align.train import train
from prismatic_locality.checkpoint import load_aligned, read_config, split_state
from prismatic_locality.maskembed import aligned_features

from test_align_train import tiny_cfg, write_tree

pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_without_the_cap_writes_a_plain_attention_checkpoint(tmp_path):
    write_tree(tmp_path / "data")
    out = train(tiny_cfg(tmp_path, "--max_steps", "4", "--encoder.softcap", "0"))
    assert read_config(out)["encoder"]["softcap"] == 0
    assert read_config(out)["align_config"]["encoder"]["softcap"] == 0
    enc = load_aligned(out).encoder
    assert not any(isinstance(m, V.SoftCapAttention) for m in enc.modules())
    assert V.softcap_of(enc) == 0.0
    # the same function as a stock timm model of the teacher's architecture holding these weights
    # (up to the final norm's eps, the one setting of the re-initialised norm a stock model lacks)
    from safetensors.torch import load_file
    state, _ = split_state(load_file(str(out / "model.safetensors")))
    stock = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                              num_classes=state["head.weight"].shape[0], global_pool="")
    stock.norm.eps = read_config(out)["encoder"]["norm_eps"]
    stock.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(stock.eval().forward_features(x), aligned_features(enc, x), atol=1e-5, rtol=1e-5)
