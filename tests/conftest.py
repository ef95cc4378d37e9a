import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup would stall ~50 s before failing

import pytest
import torch

from prismatic_locality import vit as V

# Tiny architectures with the real timm model classes: (timm name, overrides).
TINY = {
    "clip": ("vit_base_patch16_clip_quickgelu_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)),
    "siglip": ("vit_base_patch16_siglip_224", dict(img_size=28, patch_size=14, embed_dim=48, depth=3, num_heads=3)),
    "in1k": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)),
}


def tiny_vit(kind: str = "clip", seed: int = 0):
    name, kw = TINY[kind]
    torch.manual_seed(seed)
    return V.create_vit(name, **kw)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core box: OpenMP threads spin-waiting on each other cost 10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
