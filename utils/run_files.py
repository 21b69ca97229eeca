"""The run folder and its files besides checkpoints: log.csv, config.yaml, class_indices.json, split lists."""
import csv
import json
import logging
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import yaml

from datasets.folder import Split
from utils.atomic_write import replaced_atomically, write_failure
from utils.errors import UserError
from utils.run_lock import RunLock

log = logging.getLogger(__name__)

RUN_FILES = ('last.pth', 'best.pth', 'log.csv')  # a folder holding any of these holds a run
NOT_SETTINGS = ('config', 'resume', 'output_dir', 'local_rank', 'method_cfg')  # per invocation, or derived
DERIVED = 'run_info'  # config.yaml's section of facts about the run, which --config ignores
_claims: Dict[Path, Tuple[RunLock, bool]] = {}  # the run folders this process holds, and whether it made them


def claim_run_dir(output_dir: Optional[str], resume: Optional[str], data_folders, default: Path) -> Path:
    """Create, lock (``utils.run_lock``) and return the run folder: ``output_dir``, else the resumed checkpoint's
    folder, else ``default`` (with -2, -3, ... when a run started in the same second already took it).

    Refuses a folder that another live run holds, one that holds another finished run (unless this run resumes
    it) and one inside any of ``data_folders`` (the data root, train and val folders), where its files would
    become a class of the next run. The lock is held until ``release_run_dir``.
    """
    chosen = Path(output_dir) if output_dir else Path(resume).parent if resume else default
    for data in (Path(folder).resolve() for folder in data_folders if folder):
        if chosen.resolve() == data or data in chosen.resolve().parents:
            raise UserError(f"the run folder '{chosen}' is inside the data folder '{data}', where it would become "
                            f"a class of the next run; pass an --output-dir outside the data")
    made = chosen == default or not chosen.exists()
    if chosen.exists() and not chosen.is_dir():
        raise UserError(f"--output-dir '{chosen}' is a file; pass a folder for the run")
    try:
        if chosen == default:
            chosen = new_folder(default)
        else:
            chosen.mkdir(parents=True, exist_ok=True)
        lock = RunLock(chosen).acquire()
    except OSError as err:  # a place this user may not write, a read-only file system
        raise UserError(f"cannot make the run folder '{chosen}' ({write_failure(err)}); choose another "
                        f"--output-dir") from None
    held = [name for name in RUN_FILES if (chosen / name).exists()]
    resumes_it = resume is not None and Path(resume).resolve().parent == chosen.resolve()
    if held and not resumes_it:
        lock.release()
        raise UserError(f"'{chosen}' already holds a run ({', '.join(held)}); continue it with --resume "
                        f"{chosen / 'last.pth'}, or pass a new --output-dir")
    for tmp in chosen.glob('.*.tmp'):  # left by a run killed while saving; the lock says it is gone
        log.warning('removing %s, an unfinished write of a run that was killed', tmp)
        tmp.unlink(missing_ok=True)
    _claims[chosen] = (lock, made)
    return chosen


def new_folder(default: Path) -> Path:
    """``default``, or ``default``-2, -3, ... when taken, created here (``mkdir`` is atomic: one run each)."""
    default.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        candidate = default if n == 1 else default.with_name(f'{default.name}-{n}')
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise UserError(f"no free run folder name next to '{default}'; pass --output-dir")


def release_run_dir(run_dir, started: bool = True) -> None:
    """Give up the lock ``claim_run_dir`` took on ``run_dir`` (nothing when this process holds none). A run that
    failed to start (``started`` False) removes the folder it made: a run folder exists once a run has begun."""
    lock, made = _claims.pop(Path(run_dir), (None, False))
    if lock is None:
        return
    if made and not started:
        for handler in [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]:
            if Path(handler.baseFilename).parent == Path(run_dir).resolve():
                logging.getLogger().removeHandler(handler)
                handler.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    lock.release()


def setup_logging(run_dir, is_main: bool) -> None:
    """Console (and ``train.log`` in the run folder) on the main process; warnings only elsewhere."""
    handlers = [logging.StreamHandler()]
    if is_main and run_dir is not None:
        handlers.append(logging.FileHandler(Path(run_dir) / 'train.log', errors='backslashreplace'))
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format='%(message)s',
                        handlers=handlers, force=True)
    from huggingface_hub.utils import logging as hub_logging
    hub_logging.disable_propagation()  # its warnings (download retries) have their own handler: printed once


def append_log_row(path, row: Dict[str, float]) -> None:
    """Append one epoch to ``log.csv``; a new column (e.g. EMA turned on at a resume) rewrites it atomically."""
    path = Path(path)
    row = {k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in row.items()}
    header = next(csv.reader(path.open(newline='')), []) if path.exists() else []
    if header and set(row) <= set(header):
        with path.open('a', newline='') as f:
            csv.DictWriter(f, fieldnames=header).writerow(row)
        return
    rows = list(csv.DictReader(path.open(newline=''))) + [row] if header else [row]
    with replaced_atomically(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)


def environment(repo: Path) -> dict:
    """Python, torch and timm versions, and the git commit of ``repo`` when it is a git checkout."""
    import timm
    import torch
    info = dict(python=platform.python_version(), torch=str(torch.__version__), timm=timm.__version__)
    try:
        commit = subprocess.run(['git', '-C', str(repo), 'rev-parse', 'HEAD'], capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.SubprocessError):
        return info
    if commit.returncode == 0:
        info['git_commit'] = commit.stdout.strip()
    return info


def write_config(path, args, run_info: dict) -> None:
    """config.yaml: every setting of ``args`` as ``--config`` reads it back, then ``run_info`` (ignored there)."""
    settings = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}
    settings['model_kwargs'] = [f'{k}={v!r}' for k, v in settings.get('model_kwargs', {}).items()]
    settings = {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                for k, v in settings.items()}
    header = (f'# the settings of this run: train_gpu.py --config {Path(path).name} --output-dir NEW repeats it;\n'
              f'# {DERIVED} (method settings in force, versions) is a record that --config ignores\n')
    Path(path).write_text(header + yaml.safe_dump({**settings, DERIVED: run_info}, sort_keys=False))


def write_class_indices(path, classes: List[str]) -> None:
    Path(path).write_text(json.dumps({str(i): name for i, name in enumerate(classes)}, indent=2))


def write_file_list(path, samples: Iterable[Tuple[str, int]], classes: List[str]) -> None:
    with Path(path).open('w', newline='', errors='surrogateescape') as f:  # non-UTF-8 names as their bytes
        writer = csv.writer(f)
        writer.writerow(['file', 'class'])
        writer.writerows((p, classes[t]) for p, t in samples)


def read_file_list(path, classes: List[str]) -> List[Tuple[str, int]]:
    """The (file, class index) rows of a ``write_file_list`` file; rows of a class not in ``classes`` are left out."""
    index = {name: i for i, name in enumerate(classes)}
    with Path(path).open(newline='', errors='surrogateescape') as f:
        return [(row['file'], index[row['class']]) for row in csv.DictReader(f) if row['class'] in index]


def recorded_split(run_dir, fresh: Split) -> Split:
    """The split a run trained on, from its ``train_files.csv`` / ``val_files.csv``, for a resume: images added to
    the data since are ignored and images gone (removed, or unreadable now) are left out, each counted in one
    warning; ``fresh`` is a new scan of the data, used only for that count and the classes."""
    lists = [Path(run_dir) / name for name in ('train_files.csv', 'val_files.csv')]
    missing = [str(p) for p in lists if not p.is_file()]
    if missing:
        raise UserError(f"cannot resume: {', '.join(missing)} (the files this run trained and validated on) is "
                        f"missing; put the run folder's files back beside its last.pth")
    train, val = (read_file_list(p, fresh.classes) for p in lists)
    now = {path for path, _ in fresh.train + fresh.val}
    added = len(now - {path for path, _ in train + val})
    gone = [path for path, _ in train + val if path not in now]
    if added:
        log.warning(f'{added} image(s) added to the data since this run began are ignored: a resumed run keeps its '
                    f'split (start a new run to train on them)')
    if gone:
        log.warning(f"{len(gone)} image(s) of this run's split are gone or unreadable now (e.g. {gone[0]}); "
                    f"the run goes on without them")
        train, val = ([s for s in side if s[0] in now] for side in (train, val))
    for name, side in (('training', train), ('validation', val)):
        if not side:
            raise UserError(f"cannot resume: none of the {name} images this run recorded in '{run_dir}' can be found "
                            f"now; resume from the folder the run was started in, with its data in place")
    return Split(train, val, fresh.classes, fresh.skipped)


def write_skipped(path, skipped: Iterable[Tuple[str, str]]) -> None:
    with replaced_atomically(path, 'w', newline='', errors='surrogateescape') as f:  # non-UTF-8 names as bytes
        writer = csv.writer(f)
        writer.writerow(['file', 'reason'])
        writer.writerows(skipped)


def add_skipped(path, skipped: Iterable[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """Add the (file, reason) rows of ``skipped`` that ``path`` (a ``write_skipped`` file) lacks; returns them."""
    path = Path(path)
    rows = []
    if path.exists():
        with path.open(newline='', errors='surrogateescape') as f:
            rows = [(row['file'], row['reason']) for row in csv.DictReader(f)]
    known = {file for file, _ in rows}
    new = list({file: (file, reason) for file, reason in skipped if file not in known}.values())
    if new:
        write_skipped(path, rows + new)
    return new
