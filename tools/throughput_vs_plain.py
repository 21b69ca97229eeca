"""Training images/s of train_gpu.py against tools/plain_loop.py, the two sides interleaved in one run.

    python tools/throughput_vs_plain.py                      # deit_tiny, 64 px, batch 64, 2 workers, none + tome
    python tools/throughput_vs_plain.py --img-size 128 --rounds 5 --methods none tome gtp

Both sides train the same model (random weights) on the same generated folder with the same work per image:
resize (a crop of the whole image), flip, normalise; AdamW, one-cycle lr, label smoothing 0.1; bf16 autocast on
CUDA; no RandAugment, random erasing, Mixup, CutMix, EMA or drop path. Each run trains --epochs epochs of --steps
steps; the first epoch is warm-up (workers, allocator, cuDNN) and the run's figure is the median images/s of the
others, each measured over the epoch's training loop alone (validation and checkpoints not counted): train_gpu.py's
``train_images_per_s`` of log.csv, and the plain loop's own timer around the same loop. Each round runs every
method on both sides, the side that goes first alternating (or, with --together on a busy CPU machine, both at once,
under the same load); the summary gives each method's median ratio (train_gpu.py / plain) and, for a method, that
ratio over the dense one's.
"""
import argparse
import csv
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datasets.demo import CLASSES, draw_texture  # noqa: E402
from tools.real_datasets import save_split  # noqa: E402

VAL_SHARE = 0.05  # validation is not timed: a few batches


def make_folder(root: Path, images: int, size: int) -> Path:
    """train/ and val/ of the demo's textures at ``size`` px, ``images`` training images in all."""
    rng = np.random.default_rng(0)
    per_class = -(-images // (len(CLASSES) * (1 - VAL_SHARE)))
    for name in CLASSES:
        save_split(root, name, [draw_texture(name, rng, size) for _ in range(int(per_class) + 1)], VAL_SHARE, rng)
    return root


def toolkit_command(args, method: str, data: Path, out: Path) -> list:
    return [sys.executable, 'train_gpu.py', '--data-root', str(data), '--output-dir', str(out), '--model', args.model,
            '--method', method, '--img-size', str(args.img_size), '--batch-size', str(args.batch_size),
            '--workers', str(args.workers), '--epochs', str(args.epochs), '--lr', '1e-3', '--pretrained', 'none',
            '--scale', '1', '1', '--ratio', '1', '1', '--hflip', '0.5', '--aa', '', '--color-jitter', '0',
            '--reprob', '0', '--mixup', '0', '--cutmix', '0', '--drop-path', '0', '--smoothing', '0.1',
            '--no-model-ema', '--sched', 'onecycle', '--no-report', '--log-interval', str(args.steps)]


def plain_command(args, method: str, data: Path) -> list:
    return [sys.executable, 'tools/plain_loop.py', '--data-root', str(data), '--model', args.model,
            '--method', method, '--img-size', str(args.img_size), '--batch-size', str(args.batch_size),
            '--workers', str(args.workers), '--epochs', str(args.epochs), '--lr', '1e-3', '--amp']


def run(commands, logs: Path, together: bool) -> list:
    """The output of each command, run one after the other, or all at once with ``together``. Each writes into a
    file in ``logs``, not a pipe: a pipe nobody reads while the other side runs would stall it."""
    def start(index: int, command):
        with open(logs / f'{index}.log', 'w') as f:
            return subprocess.Popen(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)

    def finish(index: int, process) -> str:
        code = process.wait()
        text = (logs / f'{index}.log').read_text()
        if code:
            raise SystemExit(f"error: {' '.join(commands[index][1:3])} failed (exit {code}):\n{text[-2000:]}")
        return text
    if together:
        return [finish(i, process) for i, process in enumerate([start(i, c) for i, c in enumerate(commands)])]
    return [finish(i, start(i, c)) for i, c in enumerate(commands)]


def toolkit_rate(out: Path) -> float:
    """train_gpu.py's median training images/s over the epochs after the first (log.csv)."""
    with open(out / 'log.csv') as f:
        return statistics.median(float(row['train_images_per_s']) for row in list(csv.DictReader(f))[1:])


def plain_rate(stdout: str) -> float:
    """tools/plain_loop.py's median training images/s over the epochs after the first."""
    return statistics.median(float(r) for r in re.findall(r'train ([\d.]+) images/s', stdout)[1:])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='deit_tiny_patch16_224')
    p.add_argument('--methods', nargs='+', default=['none', 'tome'], help='none first: the reference of the others')
    p.add_argument('--img-size', type=int, default=64)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--steps', type=int, default=20, help='training steps per epoch (sets the data size)')
    p.add_argument('--epochs', type=int, default=3, help='per run; the first is warm-up')
    p.add_argument('--rounds', type=int, default=3, help='runs of each side per method, interleaved')
    p.add_argument('--together', action='store_true',
                   help='run the two sides of a round at the same time, so that they share the same load of a busy '
                        'CPU machine (never on one GPU: they would share it)')
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error('--epochs must be at least 2: the first is warm-up')
    with tempfile.TemporaryDirectory() as tmp:
        data = make_folder(Path(tmp) / 'data', args.steps * args.batch_size, args.img_size)
        ratios = {m: [] for m in args.methods}
        print(f'{args.model} at {args.img_size} px, batch {args.batch_size}, {args.workers} workers, '
              f"{args.steps} steps x {args.epochs} epochs (first: warm-up){', sides together' if args.together else ''}")
        print('round  method  plain img/s  train_gpu img/s  ratio')
        for round_ in range(args.rounds):
            for method in args.methods:
                out = Path(tmp) / f'run-{round_}-{method}'
                commands = [plain_command(args, method, data), toolkit_command(args, method, data, out)]
                flip = round_ % 2 == 1  # the side that goes first alternates
                outputs = run(commands[::-1] if flip else commands, Path(tmp), args.together)
                plain, toolkit = plain_rate(outputs[-1 if flip else 0]), toolkit_rate(out)
                ratios[method].append(toolkit / plain)
                print(f'{round_:5d}  {method:6s}  {plain:11.1f}  {toolkit:15.1f}  {toolkit / plain:5.3f}', flush=True)
    dense = statistics.median(ratios[args.methods[0]])
    for method, values in ratios.items():
        median = statistics.median(values)
        relative = f', {median / dense:.3f} of {args.methods[0]}\'s' if method != args.methods[0] else ''
        print(f'{method}: median ratio train_gpu.py / plain {median:.3f} over {len(values)} rounds{relative}')


if __name__ == '__main__':
    main()
