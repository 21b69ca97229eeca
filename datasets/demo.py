"""A small built-in dataset of generated pictures, so ``python train_gpu.py`` runs with no data at hand.

Four classes of shapes (circle, square, triangle, cross) of random size, place and colour on a noisy
background, 64 x 64 px, 100 per class; the same files for the same seed.
"""
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ('circle', 'cross', 'square', 'triangle')


def draw_shape(kind: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One picture of ``kind``: a filled shape on a noisy background of another colour."""
    background = rng.integers(0, 256, 3)
    pixels = np.clip(background + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    colour = tuple(int(c) for c in (background + 128 + rng.integers(-40, 40, 3)) % 256)
    r = rng.uniform(0.18, 0.35) * size
    cx, cy = rng.uniform(r, size - r, 2)
    if kind == 'circle':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == 'square':
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == 'triangle':
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif kind == 'cross':
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    else:
        raise ValueError(f'unknown shape {kind}')
    return img


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
            draw_shape(kind, rng, size).save(root / kind / f'{kind}_{i:03d}.png')
    done.touch()
    return root
