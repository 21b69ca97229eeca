"""A small built-in dataset of generated pictures, so ``python train_gpu.py`` runs with no data at hand.

Four classes of textures (horizontal stripes, vertical stripes, checkerboard, dots) with random colours,
period and phase on a noisy ground, 64 x 64 px, 100 per class: every patch carries its class, so a ViT
trained from scratch learns them in minutes on a CPU. The same files come out for the same seed.
"""
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ('checker', 'dots', 'stripes_h', 'stripes_v')


def draw_texture(kind: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One picture of texture ``kind`` in two random colours with noise."""
    period = rng.uniform(10, 18) * size / 64
    y, x = np.mgrid[0:size, 0:size] + rng.uniform(0, period, 2)[:, None, None]
    on_x, on_y = (x % period) < period / 2, (y % period) < period / 2
    if kind == 'stripes_h':
        mask = on_y
    elif kind == 'stripes_v':
        mask = on_x
    elif kind == 'checker':
        mask = on_x ^ on_y
    elif kind == 'dots':
        mask = ((x % period - period / 2) ** 2 + (y % period - period / 2) ** 2) < (period / 3.5) ** 2
    else:
        raise ValueError(f'unknown texture {kind}; choose from {CLASSES}')
    ground, ink = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ink = np.where(np.abs(ink - ground) < 80, (ink + 128) % 256, ink)
    pixels = np.where(mask[..., None], ink, ground) + rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_demo_dataset(root, per_class: int = 100, seed: int = 0, size: int = 64) -> Path:
    """Write the demo dataset under ``root`` (once: an existing complete one is kept) and return it."""
    root = Path(root)
    done = root / '.complete'
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_texture(kind, rng, size).save(root / kind / f'{kind}_{i:03d}.png')
    done.touch()
    return root
