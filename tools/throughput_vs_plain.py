"""Training images/s of train_gpu.py against tools/plain_loop.py, the two sides interleaved in one run.

    python tools/throughput_vs_plain.py                      # deit_tiny, 64 px, batch 64, 2 workers, none + tome
    python tools/throughput_vs_plain.py --img-size 128 --rounds 5 --methods none tome gtp

Both sides train the same model (random weights) on the same generated folder with the same work per image:
resize (a crop of the whole image), flip, normalise; AdamW, one-cycle lr, label smoothing 0.1; bf16 autocast on
CUDA; no RandAugment, random erasing, Mixup, CutMix, EMA or drop path. Each run trains --epochs epochs of --steps
steps; the first epoch is warm-up (workers, allocator, cuDNN) and the run's figure is the median images/s of the
others, each measured over the epoch's training loop alone (validation and checkpoints not counted): train_gpu.py's
``train_images_per_s`` of log.csv, and the plain loop's own timer around the same loop. Each round runs every
method on both sides, the side that goes first alternating; the summary gives each method's median ratio
(train_gpu.py / plain) and, for a method, that ratio over the dense one's.
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


def run(command, what: str) -> str:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f'error: {what} failed (exit {done.returncode}):\n{done.stderr[-2000:]}')
    return done.stdout


def toolkit_rate(args, method: str, data: Path, out: Path) -> float:
    """train_gpu.py's median training images/s over the epochs after the first."""
    run([sys.executable, 'train_gpu.py', '--data-root', str(data), '--output-dir', str(out), '--model', args.model,
         '--method', method, '--img-size', str(args.img_size), '--batch-size', str(args.batch_size),
         '--workers', str(args.workers), '--epochs', str(args.epochs), '--lr', '1e-3', '--pretrained', 'none',
         '--scale', '1', '1', '--ratio', '1', '1', '--hflip', '0.5', '--aa', '', '--color-jitter', '0',
         '--reprob', '0', '--mixup', '0', '--cutmix', '0', '--drop-path', '0', '--smoothing', '0.1',
         '--no-model-ema', '--sched', 'onecycle', '--no-report', '--log-interval', str(args.steps)],
        f'train_gpu.py --method {method}')
    with open(out / 'log.csv') as f:
        rows = list(csv.DictReader(f))
    return statistics.median(float(r['train_images_per_s']) for r in rows[1:])


def plain_rate(args, method: str, data: Path) -> float:
    """tools/plain_loop.py's median training images/s over the epochs after the first."""
    out = run([sys.executable, 'tools/plain_loop.py', '--data-root', str(data), '--model', args.model,
               '--method', method, '--img-size', str(args.img_size), '--batch-size', str(args.batch_size),
               '--workers', str(args.workers), '--epochs', str(args.epochs), '--lr', '1e-3', '--amp'],
              f'tools/plain_loop.py --method {method}')
    rates = [float(r) for r in re.findall(r'train ([\d.]+) images/s', out)]
    return statistics.median(rates[1:])


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
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error('--epochs must be at least 2: the first is warm-up')
    with tempfile.TemporaryDirectory() as tmp:
        data = make_folder(Path(tmp) / 'data', args.steps * args.batch_size, args.img_size)
        ratios = {m: [] for m in args.methods}
        print(f'{args.model} at {args.img_size} px, batch {args.batch_size}, {args.workers} workers, '
              f'{args.steps} steps x {args.epochs} epochs (first: warm-up)')
        print('round  method  plain img/s  train_gpu img/s  ratio')
        for round_ in range(args.rounds):
            for method in args.methods:
                sides = [lambda: plain_rate(args, method, data),
                         lambda: toolkit_rate(args, method, data, Path(tmp) / f'run-{round_}-{method}')]
                order = sides if round_ % 2 == 0 else sides[::-1]
                first, second = (side() for side in order)
                plain, toolkit = (first, second) if round_ % 2 == 0 else (second, first)
                ratios[method].append(toolkit / plain)
                print(f'{round_:5d}  {method:6s}  {plain:11.1f}  {toolkit:15.1f}  {toolkit / plain:5.3f}', flush=True)
    dense = statistics.median(ratios[args.methods[0]])
    for method, values in ratios.items():
        median = statistics.median(values)
        relative = f', {median / dense:.3f} of {args.methods[0]}\'s' if method != args.methods[0] else ''
        print(f'{method}: median ratio train_gpu.py / plain {median:.3f} over {len(values)} rounds{relative}')


if __name__ == '__main__':
    main()
