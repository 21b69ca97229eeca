"""Shared fixtures: tiny timm ViTs that build in milliseconds and run on the CPU."""
import pytest
import torch

TINY = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
