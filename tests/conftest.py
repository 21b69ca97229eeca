"""Shared fixtures: tiny timm ViTs that build in milliseconds and run on the CPU."""
import pytest
import torch

TINY = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _offline_hub(tmp_path_factory, monkeypatch):
    """Nothing downloads in a test: the Hugging Face hub is off and its cache is an empty folder (tests that need
    hub weights write them into a cache of their own, see test_hub_weights.py)."""
    from huggingface_hub import constants
    cache = tmp_path_factory.getbasetemp() / 'empty-hf-cache'
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))


def put_hub_weights(cache, repo_id: str, state: dict) -> None:
    """Write ``state`` into the Hugging Face cache folder ``cache`` as repository ``repo_id``'s model.safetensors:
    refs/main and snapshots/<commit>/, all that timm's load_state_dict_from_hf reads offline."""
    from pathlib import Path
    from safetensors.torch import save_file
    repo, commit = Path(cache) / f"models--{repo_id.replace('/', '--')}", 'c0ffee' * 6 + 'c0de'
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    (repo / 'snapshots' / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / 'snapshots' / commit / 'model.safetensors'))


def use_hub_cache(monkeypatch, cache) -> None:
    """Point huggingface_hub at the cache folder ``cache``, offline."""
    from huggingface_hub import constants
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))  # read when huggingface_hub is imported
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)


def make_image_folder(root, classes=('checker', 'stripes_h', 'stripes_v'), per_class=20, size=32, seed=0):
    """Write ``root/<class>/*.png`` of generated textures (learnable: the class is the texture)."""
    import numpy as np
    from pathlib import Path
    from datasets.demo import draw_texture
    rng = np.random.default_rng(seed)
    root = Path(root)
    for kind in classes:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_texture(kind, rng, size).save(root / kind / f'{i:03d}.png')
    return root


TINY_FLAGS = ['--model', 'vit_tiny_patch16_224', '--img-size', '32', '--model-kwargs', 'patch_size=8', 'depth=4',
              'embed_dim=64', 'num_heads=2', '--workers', '0', '--no-report', '--batch-size', '16',
              '--lr', '1e-3', '--aa', '', '--reprob', '0', '--drop-path', '0', '--scale', '0.8', '1',
              '--pretrained', 'none']


def tokens_per_block(model, x):
    """Tokens each block outputs for input ``x`` (blocks may return a tuple whose first item is the tokens)."""
    import torch
    counts = []
    hooks = [blk.register_forward_hook(lambda m, i, o: counts.append((o[0] if isinstance(o, tuple) else o).shape[1]))
             for blk in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return counts
