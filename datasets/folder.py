"""Image folders: one sub-folder per class, in one of the layouts below; ``make_split`` reads them.

  ROOT/<class>/...                              a seeded stratified split (``val_split`` of each class)
  ROOT/train/<class>/... + ROOT/val/<class>/... the given split; ``training/`` serves as train, and
                                                ``validation/``, ``valid/``, ``test/`` or ``testing/`` as val
                                                (in that order of preference)
  train_dir / val_dir                           any other pair of folders

Below a class folder, files at any depth count, symlinked folders included (each real folder once; a link to a
folder above it is a loop, skipped and named, as is a broken symlink); hidden files and folders and __MACOSX
are left out.
Folders the toolkit writes (run folders, ``predict-*`` reports) are never scanned as data. A scan is a listing:
files without an image extension and folders this user may not read are skipped with a warning naming each and
the cause, and each class's files are header-checked only until a first readable one (so a class, or a
validation split, of broken files is refused up front). Any other bad file (empty, not an image, unreadable,
truncated, too large to decode) is skipped when loaded, by ``SafeImageDataset`` and ``collate_skipping``, which
hand its index and cause to the loop (training lists it in skipped_files.csv). Class names and indices come
from the folder names, sorted.
"""
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate
from tqdm import tqdm

from utils.errors import UserError
from .images import IMAGE_EXTENSIONS, cannot_read, check_image, load_problem, load_rgb

log = logging.getLogger(__name__)

Sample = Tuple[str, int]
TRAIN_NAMES = ('train', 'training')  # split folder names (any case), preferred first
VAL_NAMES = ('val', 'validation', 'valid', 'test', 'testing')
SPLIT_NAMES = TRAIN_NAMES + VAL_NAMES
# a folder holding one of these sets of files was written by this toolkit (a run folder, from its first
# epoch or its first files; a predict.py report or --images output; a benchmark.py folder)
TOOLKIT_MARKS = (('last.pth',), ('best.pth',), ('config.yaml', 'class_indices.json'), ('report.html', 'summary.json'),
                 ('predictions.csv', 'confusion_matrix.csv'), ('predictions.csv', 'token_maps.png'),
                 ('benchmark.csv', 'benchmark.md'))
SCAN_PROGRESS_DELAY = 3  # seconds of scanning before a progress bar (a file count) shows


@dataclass
class FolderScan:
    """What a class-folder root holds: usable samples, class names, and the files skipped (with why)."""
    samples: List[Sample]
    classes: List[str]
    skipped: List[Tuple[str, str]] = field(default_factory=list)


def hidden(name: str) -> bool:
    """Hidden files and folders (.DS_Store, .ipynb_checkpoints), and the __MACOSX folder of a zip made on a Mac."""
    return name.startswith('.') or name == '__MACOSX'


def is_toolkit_output(folder, names=None) -> bool:
    """Whether ``folder`` was written by train_gpu.py, predict.py or benchmark.py (never data to scan);
    ``names``: what it holds, when already listed."""
    marks = TOOLKIT_MARKS if names is None else [m for m in TOOLKIT_MARKS if set(names).issuperset(m)]
    return any(all(os.path.isfile(os.path.join(folder, name)) for name in mark) for mark in marks)


def holds_only_toolkit_outputs(folder) -> bool:
    """Whether ``folder`` is a toolkit output or a folder of them only (e.g. ``runs/``); False when it cannot
    be listed (``list_images`` reports it)."""
    try:
        names = [name for name in os.listdir(folder) if not hidden(name)]
    except OSError:
        return False
    paths = (os.path.join(folder, name) for name in names)
    return is_toolkit_output(folder, names) or bool(names) and all(os.path.isdir(p) and is_toolkit_output(p)
                                                                   for p in paths)


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
        with os.scandir(existing_folder(root)) as listing:
            entries = sorted((e.name, e.path) for e in listing if not hidden(e.name) and e.is_dir())
    except OSError as err:
        raise UserError(f"cannot list '{root}': {cannot_read(err, 'folder')}; make it readable by this user") from None
    for name, path in entries:
        if holds_only_toolkit_outputs(path):
            log.warning('not scanning %s: a run folder or report of this toolkit, not a class', path)
            continue
        names.append(name)
    return names


def list_images(folder, skipped: Optional[List[Tuple[str, str]]] = None) -> List[str]:
    """Every file below ``folder`` (at any depth, through symlinked folders, each real folder once), sorted by
    path parts; hidden files and folders, and toolkit outputs, are left out. A folder (``folder`` itself
    included) this user may not list, or whose files it may not reach, is added to ``skipped`` with the cause
    (each unreachable file), or without ``skipped``, named in a warning. A listing: no file is opened or stat'ed
    (but a symlink, and one file per folder to see that its files can be reached)."""
    seen, found, unreadable, links = set(), [], [], []
    pending = [os.fspath(folder)]
    real_folder = os.path.realpath(folder)
    while pending:
        top = pending.pop()
        try:
            st = os.stat(top)
            if (st.st_dev, st.st_ino) in seen:  # a symlink loop, or a second link to a folder already listed
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(top) as listing:
                entries = [e for e in listing if not hidden(e.name)]
        except OSError as err:
            unreadable.append((top, err))
            continue
        files = []
        for entry in entries:
            if entry.is_dir():
                if entry.is_symlink() and encloses(os.path.realpath(entry.path), real_folder):
                    links.append((entry.path, 'a symlink to a folder above it (a loop); not followed'))
                elif not is_toolkit_output(entry.path):
                    pending.append(entry.path)
            elif entry.is_file():
                files.append(entry.path)
            elif entry.is_symlink():  # neither file nor folder: its target is gone
                links.append((entry.path, 'a broken symlink (its target does not exist)'))
        if files:
            try:
                os.stat(files[0])
            except PermissionError as err:  # a folder listed but not searchable
                unreadable += [(path, err) for path in files]
                files = []
            except OSError:
                pass
        found += files
    problems = links + [(path, cannot_read(err, 'folder')) for path, err in unreadable]
    if skipped is None:
        for path, problem in problems:
            log.warning('skipping %s: %s', path, problem)
    else:
        skipped += problems
    if len(seen) == 1:  # one folder: names sort as paths do
        return sorted(found)
    return sorted(found, key=lambda path: path.split(os.sep))


def encloses(outer: str, inner: str) -> bool:
    """Whether the real path ``outer`` is ``inner`` or a folder above it."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def scan_classes(root, classes: Optional[Sequence[str]] = None) -> FolderScan:
    """Scan ``root``/<class>/**; with ``classes`` given, only those folders count (others are reported). A listing:
    files without an image extension are skipped, no file is opened. A scan of more than
    ``SCAN_PROGRESS_DELAY`` seconds shows a progress bar."""
    root = existing_folder(root)
    names = list(classes) if classes is not None else sub_folders(root)
    samples, skipped = [], []
    with tqdm(desc=f'scanning {root}', unit=' files', delay=SCAN_PROGRESS_DELAY, leave=False,
              dynamic_ncols=True) as bar:
        for index, name in enumerate(names):
            folder = os.path.join(root, name)
            paths = list_images(folder, skipped) if os.path.isdir(folder) else []
            for path in paths:
                if path.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((path, index))
                else:
                    skipped.append((path, 'not an image file'))
            bar.update(len(paths))
    for path, problem in skipped:
        log.warning('skipping %s: %s', path, problem)
    return FolderScan(samples, names, skipped)


def until_readable(samples: List[Sample], skipped: List[Tuple[str, str]]) -> List[Sample]:
    """``samples`` from the first that passes ``check_image`` (header checks in order); the broken ones before
    it join ``skipped`` with a warning. Empty when none is readable."""
    for i, (path, _) in enumerate(samples):
        problem = check_image(path)
        if not problem:
            return samples[i:]
        log.warning('skipping %s: %s', path, problem)
        skipped.append((path, problem))
    return []


def scan_training_root(root, classes: Optional[Sequence[str]] = None) -> FolderScan:
    """Scan a training root (its class folders, or ``classes``) and check it has 2+ classes with images."""
    scan = scan_classes(root, classes)
    scan.samples = until_readable(scan.samples, scan.skipped)
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
    trains = [by_name[n] for n in TRAIN_NAMES if n in by_name]
    vals = [by_name[n] for n in VAL_NAMES if n in by_name]
    other_layout = 'or pass --train-dir DIR --val-dir DIR for another layout'
    if trains and vals:
        others = [f for f in folders if f not in (trains[0], vals[0])]
        log.info(f"data: '{trains[0]}/' for training, '{vals[0]}/' for validation"
                 + (f"; ignoring {', '.join(f + '/' for f in others)}" if others else ''))
        return root / trains[0], root / vals[0]
    if trains:
        names = ', '.join(n + '/' for n in VAL_NAMES)
        raise UserError(f"'{root}' has {trains[0]}/ but no validation folder ({names}); add one, "
                        f"pass --data-root {root / trains[0]} to split it by --val-split, {other_layout}")
    splits = [name for name in folders if name.lower() in SPLIT_NAMES]
    if splits and len(splits) == len(folders):
        raise UserError(f"'{root}' holds only {', '.join(f + '/' for f in folders)} and no train/; "
                        f"add train/ with the same class folders, {other_layout}")
    if splits:
        others = [f for f in folders if f not in splits]
        raise UserError(f"'{root}' holds the split folder {splits[0]}/ beside {', '.join(f + '/' for f in others[:3])}"
                        f"{' ...' if len(others) > 3 else ''}: a split name is not a class; put the class folders "
                        f"in train/, {other_layout}")
    words = {f: set(re.split('[^a-z]+', f.lower())) for f in folders}  # seg_train, seg_test (a Kaggle layout)
    named_train = [f for f in folders if words[f] & set(TRAIN_NAMES)]
    named_val = [f for f in folders if words[f] & set(VAL_NAMES)]
    if named_train and named_val:  # a warning only: classes may be named so (train_station, test_tube)
        log.warning(f"the class folders {named_train[0]}/ and {named_val[0]}/ look like a train and a validation "
                    f"split; if they are, pass --train-dir and --val-dir (the folders that hold the class folders)")
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
    val.samples = until_readable(val.samples, val.skipped)
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
    counts = torch.bincount(torch.tensor(targets), minlength=len(scan.classes)).tolist()
    single = [c for c, n in zip(scan.classes, counts) if n < 2]
    if single:  # scikit-learn's message names them by index
        raise UserError(f"cannot split '{root}' into train and val: class folder(s) {', '.join(single[:5])} hold a "
                        f"single image; add images to them, or provide train/ and val/ folders")
    try:
        train, val = train_test_split(scan.samples, test_size=val_split, random_state=seed, stratify=targets)
    except ValueError as err:
        raise UserError(f"cannot split '{root}' into train and val ({err}); add images to the small "
                        f"classes, change --val-split, or provide train/ and val/ folders") from None
    val = until_readable(sorted(val), scan.skipped)
    if not val:
        raise UserError(f"none of the validation images split from '{root}' is readable; remove the broken "
                        f"files, or provide train/ and val/ folders")
    return Split(sorted(train), val, scan.classes, scan.skipped)


def labelled_root(root) -> Path:
    """The folder of class folders to score in ``root``: the validation split of a split layout (picked as
    for training: val, validation, valid, test), else ``root`` itself."""
    root = existing_folder(root)
    folders = sub_folders(root)
    by_name = {name.lower(): name for name in folders}
    vals = [by_name[n] for n in VAL_NAMES if n in by_name]
    if vals and (any(n in by_name for n in TRAIN_NAMES) or all(name.lower() in SPLIT_NAMES for name in folders)):
        return root / vals[0]
    return root


class LoadFailure(NamedTuple):
    """What ``SafeImageDataset`` gives for a file that fails to load: its sample index and the cause."""
    index: int
    problem: str


class SafeImageDataset(Dataset):
    """(path, target) samples as (image, target, index); a ``LoadFailure`` for a file that fails to load (empty,
    not an image, unreadable, truncated, too large to decode), which the caller names in a warning once (a worker
    would repeat it every epoch)."""

    def __init__(self, samples: Sequence[Sample], transform=None):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        try:
            img = load_rgb(path)
        except Exception as err:  # truncated or corrupt data only shows when decoded; PIL raises many types
            return LoadFailure(index, load_problem(path, err))
        return (self.transform(img) if self.transform else img), target, index


class Batch(NamedTuple):
    """A collated batch: images, targets and sample indices of the files that loaded (``None`` each when none
    did), and the ``LoadFailure`` of each that did not (the loop gathers them: DataLoader workers are processes)."""
    images: Optional[torch.Tensor]
    targets: Optional[torch.Tensor]
    indices: Optional[torch.Tensor]
    failed: List[LoadFailure]


def collate_skipping(items) -> Batch:
    """Default collate over the samples that loaded, with the failures of the others."""
    failed = [item for item in items if isinstance(item, LoadFailure)]
    loaded = [item for item in items if not isinstance(item, LoadFailure)]
    return Batch(*(default_collate(loaded) if loaded else (None, None, None)), failed)


def image_files(paths: Sequence[str], flag: str = '--images') -> List[str]:
    """Every image file named in ``paths`` or found (recursively) in the folders named, in order."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise UserError(f"{flag}: {', '.join(missing)} not found; check the paths")
    files, skipped = [], []
    for p in map(Path, paths):
        files += [f for f in list_images(p, skipped) if f.lower().endswith(IMAGE_EXTENSIONS)] if p.is_dir() else [str(p)]
    for path, problem in skipped:
        log.warning('skipping %s: %s', path, problem)
    if not files:
        unread = f' ({len(skipped)} unreadable, named above; make them readable)' if skipped else ''
        raise UserError(f"{flag}: no image files in {', '.join(paths)}{unread}")
    return files
