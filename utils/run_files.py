"""The run folder and its files besides checkpoints: log.csv, config.yaml, class_indices.json, split lists."""
import csv
import json
import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import yaml

from utils.errors import UserError

RUN_FILES = ('last.pth', 'best.pth', 'log.csv')  # a folder holding any of these holds a run
NOT_SETTINGS = ('config', 'resume', 'output_dir', 'local_rank', 'method_cfg')  # per invocation, or derived
DERIVED = 'run_info'  # config.yaml's section of facts about the run, which --config ignores


def claim_run_dir(output_dir: Optional[str], resume: Optional[str], data_folders, default: Path) -> Path:
    """Create and return the run folder: ``output_dir``, else the resumed checkpoint's folder, else ``default``
    (with -2, -3, ... when a run started in the same second already took it).

    Refuses a folder that holds another run (unless this run resumes it) and one inside any of ``data_folders``
    (the data root, train and val folders), where its files would become a class of the next run.
    """
    chosen = Path(output_dir) if output_dir else Path(resume).parent if resume else default
    for data in (Path(folder).resolve() for folder in data_folders if folder):
        if chosen.resolve() == data or data in chosen.resolve().parents:
            raise UserError(f"the run folder '{chosen}' is inside the data folder '{data}', where it would become "
                            f"a class of the next run; pass an --output-dir outside the data")
    if chosen != default:
        held = [name for name in RUN_FILES if (chosen / name).exists()]
        resumes_it = resume is not None and Path(resume).resolve().parent == chosen.resolve()
        if held and not resumes_it:
            raise UserError(f"'{chosen}' already holds a run ({', '.join(held)}); continue it with --resume "
                            f"{chosen / 'last.pth'}, or pass a new --output-dir")
        chosen.mkdir(parents=True, exist_ok=True)
        return chosen
    default.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        candidate = default if n == 1 else default.with_name(f'{default.name}-{n}')
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise UserError(f"no free run folder name next to '{default}'; pass --output-dir")


def setup_logging(run_dir, is_main: bool) -> None:
    """Console (and ``train.log`` in the run folder) on the main process; warnings only elsewhere."""
    handlers = [logging.StreamHandler()]
    if is_main and run_dir is not None:
        handlers.append(logging.FileHandler(Path(run_dir) / 'train.log', errors='backslashreplace'))
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format='%(message)s',
                        handlers=handlers, force=True)


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
    tmp = path.with_name(f'.{path.name}.tmp')
    with tmp.open('w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


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


def write_skipped(path, skipped: Iterable[Tuple[str, str]]) -> None:
    with Path(path).open('w', newline='', errors='surrogateescape') as f:  # non-UTF-8 names as their bytes
        writer = csv.writer(f)
        writer.writerow(['file', 'reason'])
        writer.writerows(skipped)
