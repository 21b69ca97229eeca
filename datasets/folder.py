"""Image folders: one sub-folder per class, in one of the layouts below; ``make_split`` reads them.

  ROOT/<class>/...                              a seeded stratified split (``val_split`` of each class)
  ROOT/train/<class>/... + ROOT/val/<class>/... the given split; ``validation/``, ``valid/`` or ``test/``
                                                serve as val too (in that order of preference)
  train_dir / val_dir                           any other pair of folders

Below a class folder, files at any depth count, symlinked folders included (each real folder once).
Folders the toolkit writes (run folders, ``predict-*`` reports) are never scanned as data. Bad files
(empty, not an image, unreadable, too large to decode) and folders this user may not read are skipped with a
warning naming each and the cause; files that only fail when decoded (truncated) are skipped at load time by
``SafeImageDataset`` and ``collate_skipping``. Class names and indices come from the folder names, sorted.
"""
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from utils.errors import UserError
from .images import IMAGE_EXTENSIONS, cannot_read, check_image, try_load_rgb

log = logging.getLogger(__name__)

Sample = Tuple[str, int]
VAL_NAMES = ('val', 'validation', 'valid', 'test')  # validation split folder names, preferred first
SPLIT_NAMES = ('train',) + VAL_NAMES
# a folder holding one of these sets of files was written by this toolkit (a run folder, from its first
# epoch or its first files; a predict.py report or --images output; a benchmark.py folder)
TOOLKIT_MARKS = (('last.pth',), ('best.pth',), ('config.yaml', 'class_indices.json'), ('report.html', 'summary.json'),
                 ('predictions.csv', 'confusion_matrix.csv'), ('predictions.csv', 'token_maps.png'),
                 ('benchmark.csv', 'benchmark.md'))


@dataclass
class FolderScan:
    """What a class-folder root holds: usable samples, class names, and the files skipped (with why)."""
    samples: List[Sample]
    classes: List[str]
    skipped: List[Tuple[str, str]] = field(default_factory=list)


def is_toolkit_output(folder) -> bool:
    """Whether ``folder`` was written by train_gpu.py, predict.py or benchmark.py (never data to scan)."""
    return any(all(os.path.isfile(os.path.join(folder, name)) for name in mark) for mark in TOOLKIT_MARKS)


def holds_only_toolkit_outputs(folder) -> bool:
    """Whether ``folder`` is a toolkit output or a folder of them only (e.g. ``runs/``); False when it cannot
    be listed (``list_images`` reports it)."""
    try:
        entries = [e for e in os.scandir(folder) if not e.name.startswith('.')]
    except OSError:
        return False
    return is_toolkit_output(folder) or bool(entries) and all(e.is_dir() and is_toolkit_output(e.path)
                                                               for e in entries)


def existing_folder(path, what: str = 'data root') -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{what} '{path}' does not exist or is not a folder; pass a folder with one "
                        f"sub-folder of images per class")
    return path


def sub_folders(root: Path) -> List[str]:
    """The visible sub-folders of ``root`` (symlinks followed); toolkit outputs are left out with a warning."""
    names = []
    try:
        paths = sorted(existing_folder(root).iterdir())
    except OSError as err:
        raise UserError(f"cannot list '{root}': {cannot_read(err, 'folder')}; make it readable by this user") from None
    for p in paths:
        if p.name.startswith('.') or not p.is_dir():
            continue
        if holds_only_toolkit_outputs(p):
            log.warning('not scanning %s: a run folder or report of this toolkit, not a class', p)
            continue
        names.append(p.name)
    return names


def list_images(folder: Path, skipped: Optional[List[Tuple[str, str]]] = None) -> List[Path]:
    """Every file below ``folder`` (at any depth, through symlinked folders, each real folder once), in a
    stable order; hidden files and folders, and toolkit outputs, are left out. A folder (``folder`` itself
    included) or file this user may not reach is added to ``skipped`` with the cause, or without
    ``skipped``, named in a warning."""
    seen, found, unreadable = set(), [], []
    for top, dirs, files in os.walk(folder, onerror=lambda err: unreadable.append((err.filename, err)),
                                    followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a symlink loop, or a second link to a folder already listed
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith('.') and not is_toolkit_output(os.path.join(top, d))]
        for name in files:
            path = os.path.join(top, name)
            try:
                if not name.startswith('.') and stat.S_ISREG(os.stat(path).st_mode):
                    found.append(Path(path))
            except PermissionError as err:  # a folder listed but not searchable
                unreadable.append((path, err))
            except OSError:  # a broken symlink
                pass
    problems = [(str(path), cannot_read(err, 'folder')) for path, err in unreadable]
    if skipped is None:
        for path, problem in problems:
            log.warning('skipping %s: %s', path, problem)
    else:
        skipped += problems
    return sorted(found)


def scan_classes(root, classes: Optional[Sequence[str]] = None, verify: bool = True) -> FolderScan:
    """Scan ``root``/<class>/**; with ``classes`` given, only those folders count (others are reported)."""
    root = existing_folder(root)
    names = list(classes) if classes is not None else sub_folders(root)
    samples, skipped = [], []
    for index, name in enumerate(names):
        for path in list_images(root / name, skipped) if (root / name).is_dir() else []:
            problem = ('not an image file' if path.suffix.lower() not in IMAGE_EXTENSIONS
                       else check_image(path) if verify else '')
            if problem:
                skipped.append((str(path), problem))
            else:
                samples.append((str(path), index))
    for path, problem in skipped:
        log.warning('skipping %s: %s', path, problem)
    return FolderScan(samples, names, skipped)


def scan_training_root(root, classes: Optional[Sequence[str]] = None) -> FolderScan:
    """Scan a training root (its class folders, or ``classes``) and check it has 2+ classes with images."""
    scan = scan_classes(root, classes)
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


def split_folders(root: Path, folders: Sequence[str]) -> Tuple[Optional[Path], Optional[Path]]:
    """(train, val) of a ``root/train`` + ``root/val|validation|valid|test`` layout (``folders`` are the
    sub-folders of ``root``), or (None, None) for a root of class folders. Split names that do not pair up
    are refused: they are not classes."""
    by_name = {name.lower(): name for name in folders}
    vals = [by_name[n] for n in VAL_NAMES if n in by_name]
    other_layout = 'or pass --train-dir DIR --val-dir DIR for another layout'
    if 'train' in by_name and vals:
        others = [f for f in folders if f not in (by_name['train'], vals[0])]
        log.info(f"data: '{by_name['train']}/' for training, '{vals[0]}/' for validation"
                 + (f"; ignoring {', '.join(f + '/' for f in others)}" if others else ''))
        return root / by_name['train'], root / vals[0]
    if 'train' in by_name:
        raise UserError(f"'{root}' has train/ but no validation folder ({', '.join(n + '/' for n in VAL_NAMES)}); "
                        f"add one, pass --data-root {root / by_name['train']} to split train/ by --val-split, "
                        f"{other_layout}")
    if folders and all(name.lower() in SPLIT_NAMES for name in folders):
        raise UserError(f"'{root}' holds only {', '.join(f + '/' for f in folders)} and no train/; "
                        f"add train/ with the same class folders, {other_layout}")
    return None, None


@dataclass
class Split:
    train: List[Sample]
    val: List[Sample]
    classes: List[str]
    skipped: List[Tuple[str, str]]


def given_split(train_root: Path, val_root: Path) -> Split:
    """Training and validation from two folders of the same class sub-folders."""
    train = scan_training_root(train_root)
    val_folders = sub_folders(existing_folder(val_root, 'validation folder'))
    if val_folders != train.classes:
        extra = sorted(set(val_folders) - set(train.classes))
        missing = sorted(set(train.classes) - set(val_folders))
        raise UserError(f"'{val_root}' has other classes than '{train_root}' (only in validation: {extra or '-'}; "
                        f"only in training: {missing or '-'}); make both hold the same class folders")
    val = scan_classes(val_root, train.classes)
    if not val.samples:
        raise UserError(f"validation folder '{val_root}' holds no readable images ({len(val.skipped)} files "
                        f"skipped); put images in its class folders, or pass --data-root {train_root} alone "
                        f"to split it by --val-split")
    return Split(train.samples, val.samples, train.classes, train.skipped + val.skipped)


def make_split(root=None, val_split: float = 0.2, seed: int = 0, train_dir=None, val_dir=None) -> Split:
    """The training and validation samples of a data root in any layout of the module docstring.

    ``train_dir`` / ``val_dir`` (relative to ``root`` when given) override the layout: both give the split,
    ``train_dir`` alone is split by ``val_split``.
    """
    base = Path(root) if root is not None else Path('.')
    if val_dir is not None:
        if train_dir is None:
            raise UserError('--val-dir needs --train-dir (the folder of the training class folders) too')
        return given_split(base / train_dir, base / val_dir)
    root = base / train_dir if train_dir is not None else base
    folders = sub_folders(root)
    if train_dir is None:
        train_root, val_root = split_folders(root, folders)
        if train_root is not None:
            return given_split(train_root, val_root)
    if not 0 < val_split < 1:
        raise UserError(f'--val-split must be between 0 and 1 (got {val_split}) when there is no validation folder')
    scan = scan_training_root(root, folders)
    targets = [t for _, t in scan.samples]
    try:
        train, val = train_test_split(scan.samples, test_size=val_split, random_state=seed, stratify=targets)
    except ValueError as err:
        raise UserError(f"cannot split '{root}' into train and val ({err}); add images to the small "
                        f"classes, change --val-split, or provide train/ and val/ folders") from None
    return Split(sorted(train), sorted(val), scan.classes, scan.skipped)


def labelled_root(root) -> Path:
    """The folder of class folders to score in ``root``: the validation split of a split layout (picked as
    for training: val, validation, valid, test), else ``root`` itself."""
    root = existing_folder(root)
    folders = sub_folders(root)
    by_name = {name.lower(): name for name in folders}
    vals = [by_name[n] for n in VAL_NAMES if n in by_name]
    if vals and ('train' in by_name or all(name.lower() in SPLIT_NAMES for name in folders)):
        return root / vals[0]
    return root


class SafeImageDataset(Dataset):
    """(path, target) samples as (image tensor, target, index); ``None`` for a file that fails to decode."""

    def __init__(self, samples: Sequence[Sample], transform=None):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        img = try_load_rgb(path)
        if img is None:
            return None
        return (self.transform(img) if self.transform else img), target, index


def collate_skipping(batch):
    """Default collate over the samples that loaded; an all-broken batch gives ``None``."""
    batch = [item for item in batch if item is not None]
    return default_collate(batch) if batch else None


def image_files(paths: Sequence[str], flag: str = '--images') -> List[str]:
    """Every image file named in ``paths`` or found (recursively) in the folders named, in order."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise UserError(f"{flag}: {', '.join(missing)} not found; check the paths")
    files, skipped = [], []
    for p in map(Path, paths):
        found = [f for f in list_images(p, skipped) if f.suffix.lower() in IMAGE_EXTENSIONS] if p.is_dir() else [p]
        files += [str(f) for f in found]
    for path, problem in skipped:
        log.warning('skipping %s: %s', path, problem)
    if not files:
        unread = f' ({len(skipped)} unreadable, named above; make them readable)' if skipped else ''
        raise UserError(f"{flag}: no image files in {', '.join(paths)}{unread}")
    return files
