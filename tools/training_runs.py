"""What the comparison tools share: one train_gpu.py run in its own process, and a mean with its spread.

A run whose folder already holds a finished log (as many rows as epochs) is not trained again, so a table that
was interrupted continues where it stopped.
"""
import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

REPO = Path(__file__).resolve().parents[1]


def log_rows(folder: Path) -> List[dict]:
    log = folder / 'log.csv'
    return list(csv.DictReader(log.open())) if log.exists() else []


def train(folder: Path, flags: List[str], epochs: int, start: bool = True) -> Tuple[List[dict], float]:
    """(log.csv rows, wall seconds of the process) of ``train_gpu.py --output-dir folder --epochs epochs flags``.

    A finished run found in ``folder`` is read back with the seconds it recorded (0.0 when it recorded none); an
    unfinished one is trained only with ``start`` (else ([], 0.0)).
    """
    done = folder / 'wall_seconds.txt'
    if len(log_rows(folder)) == epochs and done.exists():
        return log_rows(folder), float(done.read_text())
    if not start:
        return [], 0.0
    command = [sys.executable, str(REPO / 'train_gpu.py'), '--output-dir', str(folder), '--epochs', str(epochs),
               *flags]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    done.write_text(f'{seconds:.1f}\n')
    return log_rows(folder), seconds


def mean_spread(values: List[float]) -> Tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
