"""Dense, EfficientTrain, ToE and EfficientTrain + ToE on the same data, seeds and settings: a markdown table.

    python tools/real_datasets.py --out data/real --sets digits --size 128
    python tools/efficienttrain_table.py --data data/real/digits --seeds 0 1 2 --epochs 30

Each setting trains the same model from the same flags (``--img-size``, ``--batch-size``, ``--workers``,
``--epochs``, from scratch, DeiT's RandAugment ``rand-m9-mstd0.5-inc1`` and ``--clip-grad 5`` for all four; EfficientTrain
replaces the m per stage) with ``train_gpu.py`` in its own process; ToE uses the EfficientTrain release's DeiT
settings (keep 0.6 / 0.8 / 1.0 from a seed of 0.3, stages at 0, 1/3, 2/3, 2 sub-steps) alone and combined. The
table gives the last epoch's validation top-1 (mean, standard deviation and range over the seeds), the mean wall
time of a whole run (the process, start to end) and the speed-up against dense.
"""
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.training_runs import mean_spread, train  # noqa: E402

TOE = ['--method', 'toe', '--toe-keep-rate', '0.6', '0.8', '1.0', '--toe-init-keep-rate', '0.3',
       '--toe-steps', '0', '0.3333', '0.6667', '--toe-substeps', '2']
SETTINGS = {'dense': [], 'EfficientTrain': ['--curriculum', 'efficienttrain'], 'ToE': TOE,
            'EfficientTrain + ToE': ['--curriculum', 'efficienttrain', *TOE]}


def run(data: Path, out: Path, name: str, seed: int, args) -> tuple:
    """(last epoch's top-1, wall seconds) of one training run."""
    folder = out / f"{name.replace(' + ', '+')}-seed{seed}"
    rows, seconds = train(folder, ['--data-root', str(data), '--model', args.model, '--img-size', str(args.img_size),
                                   '--batch-size', str(args.batch_size), '--workers', str(args.workers),
                                   '--seed', str(seed), '--aa', 'rand-m9-mstd0.5-inc1', '--clip-grad', '5',
                                   '--pretrained', 'none', '--no-report', *SETTINGS[name], *args.extra], args.epochs)
    return float(rows[-1]['top1']), seconds


def table(results: dict) -> str:
    dense = statistics.mean(results['dense'][1])
    lines = ['| setting | top-1 % (mean ± std) | top-1 range | wall time (s) | speed-up vs dense |',
             '|---|---|---|---|---|']
    for name, (top1, seconds) in results.items():
        (mean, spread), wall = mean_spread(top1), statistics.mean(seconds)
        lines.append(f'| {name} | {mean:.2f} ± {spread:.2f} | {min(top1):.2f}-{max(top1):.2f} | '
                     f'{wall:.0f} | {dense / wall:.2f}x |')
    return '\n'.join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', required=True, help='an ImageFolder with train/ and val/ (tools/real_datasets.py)')
    p.add_argument('--out', default='runs/efficienttrain_table', help='folder of the runs')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--epochs', type=int, default=30)
    p.add_argument('--img-size', type=int, default=128)
    p.add_argument('--model', default='deit_tiny_patch16_224')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('extra', nargs=argparse.REMAINDER, help='after --: more train_gpu.py flags for every run')
    args = p.parse_args(argv)
    args.extra = [a for a in args.extra if a != '--']
    results = {name: ([], []) for name in SETTINGS}
    for seed in args.seeds:
        for name in SETTINGS:
            top1, seconds = run(Path(args.data), Path(args.out), name, seed, args)
            results[name][0].append(top1)
            results[name][1].append(seconds)
            print(f'{name}, seed {seed}: top-1 {top1:.2f} %, {seconds:.0f} s', file=sys.stderr, flush=True)
    print(f'{Path(args.data).name}, {args.model} at {args.img_size} px, {args.epochs} epochs, batch '
          f'{args.batch_size}, {args.workers} workers, seeds {args.seeds}\n')
    print(table(results))
    return 0


if __name__ == '__main__':
    sys.exit(main())
