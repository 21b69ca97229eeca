"""The files of a run folder besides checkpoints: log.csv, config.yaml, class_indices.json, split lists."""
import csv
import json
import logging
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import yaml


def setup_logging(run_dir, is_main: bool) -> None:
    """Console (and ``train.log`` in the run folder) on the main process; warnings only elsewhere."""
    handlers = [logging.StreamHandler()]
    if is_main and run_dir is not None:
        handlers.append(logging.FileHandler(Path(run_dir) / 'train.log', errors='backslashreplace'))
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format='%(message)s',
                        handlers=handlers, force=True)


def append_log_row(path, row: Dict[str, float]) -> None:
    """Append one epoch to ``log.csv``; a new column (e.g. a method stat) rewrites the header."""
    path = Path(path)
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    rows.append({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in row.items()})
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open('w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_config(path, settings: dict) -> None:
    Path(path).write_text(yaml.safe_dump(settings, sort_keys=False))


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
