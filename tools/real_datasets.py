"""Small ImageFolders of real pictures, to compare training recipes on data nobody tuned to.

    python tools/real_datasets.py --out data/real            # digits, photos, textures, demo (train/ + val/)

- digits: scikit-learn's 1,797 scanned hand-written digits (8 x 8 grey), 10 classes, enlarged to 64 px.
- photos: 8 photographs of scikit-image (astronaut, cat, coffee, rocket, Hubble field, tissue stain, retina,
  camera man), 200 random crops each (32-160 px sides, any place); the class is the photograph.
- textures: 8 grey pictures of scikit-image (brick, grass, gravel, moon, cells, coins, page, text), 200 crops each.
- demo: the built-in demo's generated textures (4 classes, 100 each; what train_gpu.py trains without --data-root).

photos and textures need scikit-image (``pip install scikit-image``). Each set is split 80/20 per class, with a
fixed seed, so every run sees the same files.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for the demo's generator

PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field', 'immunohistochemistry', 'retina',
          'camera')
TEXTURES = ('brick', 'grass', 'gravel', 'moon', 'cell', 'coins', 'page', 'text')


def save_split(root: Path, name: str, images, val_share: float, rng: np.random.Generator) -> None:
    """Write ``images`` (PIL images of class ``name``) as root/train/name and root/val/name, 80/20."""
    order = rng.permutation(len(images))
    n_val = int(round(len(images) * val_share))
    for rank, i in enumerate(order):
        folder = root / ('val' if rank < n_val else 'train') / name
        folder.mkdir(parents=True, exist_ok=True)
        images[i].save(folder / f'{name}_{i:04d}.png')


def digits(root: Path, size: int, rng: np.random.Generator) -> None:
    from sklearn.datasets import load_digits
    data = load_digits()
    pictures = (255 - data.images * 255 / 16).astype(np.uint8)  # dark ink on white, as scanned
    for label in range(10):
        images = [Image.fromarray(p).resize((size, size), Image.NEAREST).convert('RGB')
                  for p in pictures[data.target == label]]
        save_split(root, str(label), images, 0.2, rng)


def demo(root: Path, size: int, rng: np.random.Generator) -> None:
    from datasets.demo import CLASSES, draw_texture
    for name in CLASSES:
        save_split(root, name, [draw_texture(name, rng, size) for _ in range(100)], 0.2, rng)


def crops(picture: np.ndarray, count: int, size: int, rng: np.random.Generator):
    """``count`` square crops of random side (32-160 px, at most the picture) and place, resized to ``size``."""
    image = Image.fromarray(picture.astype(np.uint8) if picture.dtype != bool else picture.astype(np.uint8) * 255)
    image = image.convert('RGB')
    w, h = image.size
    out = []
    for _ in range(count):
        side = int(rng.integers(32, min(160, w, h) + 1))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        out.append(image.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC))
    return out


def pictures(root: Path, names, size: int, per_class: int, rng: np.random.Generator) -> None:
    try:
        import skimage.data
    except ImportError:
        raise SystemExit('error: the photos and textures sets need scikit-image: pip install scikit-image')
    for name in names:
        save_split(root, name, crops(getattr(skimage.data, name)(), per_class, size, rng), 0.2, rng)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default='data/real', help='folder that receives one folder per set')
    p.add_argument('--sets', nargs='+', default=['digits', 'photos', 'textures', 'demo'],
                   choices=['digits', 'photos', 'textures', 'demo'])
    p.add_argument('--size', type=int, default=64, help='side of the written images in pixels')
    p.add_argument('--per-class', type=int, default=200, help='crops per photograph (photos, textures)')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    for name in args.sets:
        root = Path(args.out) / name
        if root.exists():
            print(f'{root} exists; kept')
            continue
        rng = np.random.default_rng(args.seed)
        if name == 'digits':
            digits(root, args.size, rng)
        elif name == 'demo':
            demo(root, args.size, rng)
        else:
            pictures(root, PHOTOS if name == 'photos' else TEXTURES, args.size, args.per_class, rng)
        print(f'{root}: {sum(1 for _ in root.rglob("*.png"))} images')


if __name__ == '__main__':
    main()
