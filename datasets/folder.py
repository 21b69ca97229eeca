"""Image folders: one sub-folder per class; ``train/`` + ``val/`` when present, else a stratified split.

Bad files inside class folders (empty, not an image, unreadable) are skipped with a warning naming each;
files that only fail when decoded (truncated) are skipped at load time by ``SafeImageDataset`` and
``collate_skipping``. Class names and indices come from the folder names, sorted.
"""
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from utils.errors import UserError
from .images import IMAGE_EXTENSIONS, check_image, load_rgb

log = logging.getLogger(__name__)

Sample = Tuple[str, int]


@dataclass
class FolderScan:
    """What a class-folder root holds: usable samples, class names, and the files skipped (with why)."""
    samples: List[Sample]
    classes: List[str]
    skipped: List[Tuple[str, str]] = field(default_factory=list)


def list_images(folder: Path) -> List[Path]:
    """Every file below ``folder`` (recursively), in a stable order; hidden files are ignored."""
    return sorted(p for p in folder.rglob('*') if p.is_file() and not p.name.startswith('.'))


def scan_classes(root, classes: Optional[Sequence[str]] = None, verify: bool = True) -> FolderScan:
    """Scan ``root``/<class>/**; with ``classes`` given, only those folders count (others are reported)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data root '{root}' does not exist or is not a folder; pass --data-root DIR "
                        f"with one sub-folder of images per class")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))
    names = list(classes) if classes is not None else folders
    samples, skipped = [], []
    for index, name in enumerate(names):
        for path in list_images(root / name) if (root / name).is_dir() else []:
            problem = ('not an image file' if path.suffix.lower() not in IMAGE_EXTENSIONS
                       else check_image(path) if verify else '')
            if problem:
                skipped.append((str(path), problem))
            else:
                samples.append((str(path), index))
    for path, problem in skipped:
        log.warning('skipping %s: %s', path, problem)
    return FolderScan(samples, names, skipped)


def scan_training_root(root) -> FolderScan:
    """Scan a training root and check it has at least two classes with images."""
    scan = scan_classes(root)
    counts = torch.bincount(torch.tensor([t for _, t in scan.samples] or [0]), minlength=len(scan.classes))
    kept = [c for c, n in zip(scan.classes, counts.tolist()) if n > 0] if scan.samples else []
    if len(kept) < 2:
        raise UserError(f"'{root}' needs at least 2 class sub-folders with images, found {len(kept)} "
                        f"({', '.join(scan.classes) or 'no folders'}); put each class's images in its own folder")
    if len(kept) < len(scan.classes):
        empty = sorted(set(scan.classes) - set(kept))
        raise UserError(f"class folder(s) {', '.join(empty)} in '{root}' hold no usable images; "
                        f"add images or remove the folder(s)")
    return scan


@dataclass
class Split:
    train: List[Sample]
    val: List[Sample]
    classes: List[str]
    skipped: List[Tuple[str, str]]


def make_split(root, val_split: float = 0.2, seed: int = 0) -> Split:
    """``root/train`` + ``root/val`` when both exist, else a seeded stratified split of ``root``."""
    root = Path(root)
    if (root / 'train').is_dir() and (root / 'val').is_dir():
        train = scan_training_root(root / 'train')
        val_folders = sorted(p.name for p in (root / 'val').iterdir() if p.is_dir() and not p.name.startswith('.'))
        if val_folders != train.classes:
            extra = sorted(set(val_folders) - set(train.classes))
            missing = sorted(set(train.classes) - set(val_folders))
            raise UserError(f"'{root}/val' has other classes than '{root}/train' (only in val: {extra or '-'}; "
                            f"only in train: {missing or '-'}); make both hold the same class folders")
        val = scan_classes(root / 'val', train.classes)
        return Split(train.samples, val.samples, train.classes, train.skipped + val.skipped)
    if not 0 < val_split < 1:
        raise UserError(f'--val-split must be between 0 and 1 (got {val_split}) when the data root has no val/')
    scan = scan_training_root(root)
    targets = [t for _, t in scan.samples]
    try:
        train, val = train_test_split(scan.samples, test_size=val_split, random_state=seed, stratify=targets)
    except ValueError as err:
        raise UserError(f"cannot split '{root}' into train and val ({err}); add images to the small "
                        f"classes, change --val-split, or provide train/ and val/ folders") from None
    return Split(sorted(train), sorted(val), scan.classes, scan.skipped)


class SafeImageDataset(Dataset):
    """(path, target) samples as (image tensor, target, index); ``None`` for a file that fails to decode."""

    def __init__(self, samples: Sequence[Sample], transform=None):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        try:
            img = load_rgb(path)
        except Exception as err:  # truncated or corrupt data only shows when decoded
            log.warning('skipping %s: cannot decode (%s)', path, type(err).__name__)
            return None
        return (self.transform(img) if self.transform else img), target, index


def collate_skipping(batch):
    """Default collate over the samples that loaded; an all-broken batch gives ``None``."""
    batch = [item for item in batch if item is not None]
    return default_collate(batch) if batch else None
