"""Accuracy at fewer MACs, measured the way users fine-tune: a markdown table of every method against dense.

    python tools/real_datasets.py --out data/real --sets photos textures --size 128
    python train_gpu.py --data-root data/real/textures --model deit_tiny_patch16_224 --model-kwargs depth=6 \
        --img-size 128 --epochs 8 --pretrained none --output-dir runs/textures6
    python tools/accuracy_at_macs.py --data data/real/photos --init runs/textures6/best.pth \
        --seeds 0 1 2 -- --model-kwargs depth=6

Per seed, the parent: the dense model fine-tuned from ``--init`` (weights trained on another set, the stand-in for
ImageNet weights) for ``--parent-epochs``. From the parent's best.pth, ``--epochs`` more for each row: the dense
model again (the reference, fine-tuned the same way), and each method at its setting (near 0.65x the dense MACs;
ToE is a plain ViT at inference), with and without ``--teacher`` = the parent's best.pth. ToMe and GTP are also
switched on in the parent without training (off the shelf). Top-1: best.pth's, on val/ (the highest validation
top-1 of the run). MAC ratio, images/s and speed-up: benchmark.py on seed 0's best.pth of each row against the same
weights dense in the same run, the MACs averaged over ``--mac-images`` validation images (DGE's depend on the
image). ``--finished-only`` prints the table of the runs finished so far without training.
"""
import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.training_runs import REPO, mean_spread, train  # noqa: E402

METHODS = {'tome': ['--tome-r', '8'], 'gtp': ['--gtp-num-prop', '8'], 'mtvit': ['--mtvit-keep-rate', '0.5'],
           'dge': ['--dge-budget', '0.65'], 'toe': []}
OFF_THE_SHELF = {'tome': 'tome.r=8', 'gtp': 'gtp.num_prop=8'}


def best_top1(rows):
    return max(float(r['top1']) for r in rows) if rows else None


def benchmark(weights: Path, out: Path, sweep, args, methods=()) -> pd.DataFrame:
    """benchmark.py's table for ``weights``: dense, the rows of ``sweep`` and ``methods``, top-1 on val/ included."""
    if not (out / 'benchmark.csv').exists():
        command = [sys.executable, str(REPO / 'benchmark.py'), '--weights', str(weights), '--methods', 'none', *methods,
                   '--sweep', *sweep, '--data-root', str(args.data / 'val'), '--batch-size', '64',
                   '--runs', str(args.runs), '--mac-images', str(args.mac_images), '--output-dir', str(out)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return pd.read_csv(out / 'benchmark.csv')


def row_name(method: str, teacher: bool) -> str:
    setting = f" ({' '.join(METHODS[method])})" if METHODS[method] else ''
    return f"{method}{setting}" + (' + teacher' if teacher else '')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', type=Path, required=True, help='an ImageFolder with train/ and val/')
    p.add_argument('--init', required=True, help='weights trained on another set (the parents start from them)')
    p.add_argument('--out', type=Path, default=Path('runs/accuracy_at_macs'), help='folder of the runs')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--parent-epochs', type=int, default=4)
    p.add_argument('--epochs', type=int, default=3, help='epochs of every row fine-tuned from the parent')
    p.add_argument('--model', default='deit_tiny_patch16_224')
    p.add_argument('--img-size', type=int, default=128)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--runs', type=int, default=5, help='timed benchmark runs per row')
    p.add_argument('--mac-images', type=int, default=32)
    p.add_argument('--finished-only', action='store_true', help='the table of the runs finished so far; train none')
    p.add_argument('extra', nargs=argparse.REMAINDER, help='after --: more train_gpu.py flags for every run')
    args = p.parse_args(argv)
    common = ['--data-root', str(args.data), '--model', args.model, '--img-size', str(args.img_size),
              '--batch-size', str(args.batch_size), '--no-report', *[a for a in args.extra if a != '--']]
    top1, folders = {}, {}  # row -> top-1 per seed; row -> seed 0's run folder

    def record(name, value, folder=None):
        if value is None:  # a run not finished (--finished-only)
            return
        top1.setdefault(name, []).append(value)
        if folder is not None:
            folders.setdefault(name, folder)

    start = not args.finished_only
    starts = {}  # seed -> the flags of a run fine-tuned from that seed's parent
    for seed in args.seeds:
        seeded = [*common, '--seed', str(seed)]
        parent = args.out / f'parent-seed{seed}'
        record('dense (the parent)', best_top1(train(parent, [*seeded, '--pretrained', args.init],
                                                     args.parent_epochs, start)[0]), parent)
        starts[seed] = [*seeded, '--pretrained', str(parent / 'best.pth')]
        again = args.out / f'dense-seed{seed}'
        record('dense, fine-tuned again', best_top1(train(again, starts[seed], args.epochs, start)[0]), again)
        if not (parent / 'best.pth').exists():
            continue
        shelf = benchmark(parent / 'best.pth', args.out / f'shelf-seed{seed}', OFF_THE_SHELF.values(), args)
        for method, sweep in OFF_THE_SHELF.items():
            record(f'{method} {sweep.split(".")[1]}, off the shelf',
                   float(shelf.loc[shelf['method'] == method, 'top1'].iloc[0]))
    for teacher in (False, True):  # every seed without the teacher first
        for seed in starts:
            for method, flags in METHODS.items():
                folder = args.out / f"{method}{'-teacher' if teacher else ''}-seed{seed}"
                extra = ['--teacher', str(args.out / f'parent-seed{seed}' / 'best.pth')] if teacher else []
                rows, _ = train(folder, [*starts[seed], '--method', method, *flags, *extra], args.epochs, start)
                record(row_name(method, teacher), best_top1(rows), folder)
                if rows:
                    print(f'{row_name(method, teacher)}, seed {seed}: {best_top1(rows):.2f}', file=sys.stderr,
                          flush=True)

    lines = ['| row | top-1 % (mean ± std over seeds) | per seed | vs dense fine-tuned again | MAC ratio | images/s '
             '| speed-up vs dense |', '|---|---|---|---|---|---|---|']
    reference = statistics.mean(top1['dense, fine-tuned again'])
    shelf = benchmark(args.out / 'parent-seed0' / 'best.pth', args.out / 'shelf-seed0', OFF_THE_SHELF.values(), args)
    for name, values in top1.items():
        method = name.split()[0]
        if name.startswith('dense'):
            cost = shelf.iloc[0]
        elif name.endswith('off the shelf'):
            cost = shelf[shelf['method'] == method].iloc[0]
        else:  # the run's own method and setting, against the same weights dense
            cost = benchmark(folders[name] / 'best.pth', folders[name] / 'benchmark', [], args,
                             methods=[method]).iloc[-1]
        mean, spread = mean_spread(values)
        lines.append(f"| {name} | {mean:.2f} ± {spread:.2f} | {' / '.join(f'{v:.2f}' for v in values)} | "
                     f"{mean - reference:+.2f} | {cost['mac_ratio']:.2f} | {cost['images_per_s']:.0f} | "
                     f"{cost['speedup']:.2f}x |")
    print(f'{args.data.name}, {args.model} {" ".join(common[10:])} at {args.img_size} px, parents {args.parent_epochs} '
          f'epochs from {args.init}, rows {args.epochs} epochs, seeds {args.seeds}\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
