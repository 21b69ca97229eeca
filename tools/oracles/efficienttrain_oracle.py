"""EfficientTrain's curriculum (utils/curriculum.py) against the official code in Osilly/TokenExpansion's
ToE/EfficientTrain: its ``utils.freq_crop`` on the same batches, and the stage schedule that ``ET_training.py``
launches (each stage's ``--end_epoch``, ``--input_size`` from its ``b_list`` and ``--aa rand-m{2k+1}``).

    python tools/oracles/efficienttrain_oracle.py --official-dir ~/src/TokenExpansion
    python tools/oracles/efficienttrain_oracle.py --official-dir ~/src/TokenExpansion --save-fixture

Prints the largest relative difference (max |ours - official| / max |official| per image) of the crop at each
band, and whether the per-epoch stage, band and magnitude equal the official for each --epochs. ``--save-fixture``
also writes tests/fixtures/oracle_efficienttrain.pt (small batches, the official crops and schedules) for the
offline test. ``ET_training.py`` is run with ``os.system`` captured, so nothing is launched.
"""
import argparse
import contextlib
import io
import re
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from tools.oracles.common import FIXTURES, load_official_file  # noqa: E402
from utils.curriculum import band_size, freq_crop, magnitude, stage_of  # noqa: E402
from utils.errors import UserError  # noqa: E402

FOLDER = Path('ToE') / 'EfficientTrain'
FLAGS = (r'--end_epoch (\d+)', r'--input_size (\d+)', r'--aa rand-m(\d+)-mstd0\.5-inc1')  # a stage's command
FIXTURE_EPOCHS = (300, 10, 7)
FIXTURE_BANDS = (12, 8)  # of two 16-px images


def official_freq_crop(official_dir: Path):
    """The official ``freq_crop`` (its utils.py imported with torch._six's ``inf`` from math, no tensorboardX)."""
    def edit(text):
        return text.replace('from torch._six import inf', 'from math import inf').replace(
            'from tensorboardX import SummaryWriter', 'SummaryWriter = None')
    return load_official_file(official_dir / FOLDER / 'utils.py', 'efficienttrain_official_utils', edit).freq_crop


def official_schedule(official_dir: Path, epochs: int):
    """[(stage, band, magnitude)] per epoch, from the commands ET_training.py would launch for DeiT-S."""
    script = official_dir / FOLDER / 'ET_training.py'
    if not script.is_file():
        raise UserError(f"'{script}' not found; pass --official-dir, the folder of the fetched official repository")
    argv = ['ET_training.py', '--data_path', 'x', '--model', 'deit_small_patch16_224', '--epochs', str(epochs)]
    commands = []
    with mock.patch.object(sys, 'argv', argv), mock.patch('os.system', lambda c: commands.append(c) or 0), \
            contextlib.redirect_stdout(io.StringIO()):
        exec(compile(script.read_text(), str(script), 'exec'), {'__name__': '__main__'})
    schedule, start = [], 0
    for k, command in enumerate(commands):
        end, band, m = (int(re.search(flag, command).group(1)) for flag in FLAGS)
        schedule += [(k, band, m)] * (end - start)
        start = end
    return schedule


def our_schedule(epochs: int, img_size: int = 224, patch_size: int = 16):
    return [(k, band_size(k, img_size, patch_size), magnitude(k)) for k in (stage_of(e, epochs) for e in range(epochs))]


def max_relative(ours: torch.Tensor, official: torch.Tensor) -> float:
    return ((ours - official).flatten(1).abs().amax(1) / official.flatten(1).abs().amax(1)).max().item()


def inputs(size: int, count: int, seed: int) -> torch.Tensor:
    """Seeded inputs like a normalised batch: smooth images plus noise."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.randn(count, 3, 4, 4, generator=generator)
    smooth = torch.nn.functional.interpolate(low, size=(size, size), mode='bicubic', align_corners=False)
    return smooth + 0.3 * torch.randn(count, 3, size, size, generator=generator)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--official-dir', required=True, help='folder of the fetched Osilly/TokenExpansion')
    p.add_argument('--batches', type=int, default=4, help='batches of 16 images at 224 px per band')
    p.add_argument('--save-fixture', action='store_true', help='also write tests/fixtures/oracle_efficienttrain.pt')
    args = p.parse_args(argv)
    try:
        official_dir = Path(args.official_dir).expanduser().resolve()
        crop = official_freq_crop(official_dir)
        print('| input | band | batches | max rel diff |\n|---|---|---|---|')
        worst = 0.0
        for band in (160, 192):
            diffs = [max_relative(freq_crop(x, band), crop(x, band))
                     for x in (inputs(224, 16, seed) for seed in range(args.batches))]
            worst = max(worst, *diffs)
            print(f'| 16 x 3 x 224 x 224 | {band} | {args.batches} | {max(diffs):.1e} |')
        same = True
        for epochs in (300, 10, 7, 23):
            equal = our_schedule(epochs) == official_schedule(official_dir, epochs)
            same &= equal
            print(f'schedule over {epochs} epochs (stage, band, magnitude per epoch): '
                  f"{'equal' if equal else 'DIFFERENT'}")
        if args.save_fixture:
            x = inputs(16, 2, 100)
            crops = [dict(images=x, band=band, official=crop(x, band)) for band in FIXTURE_BANDS]
            schedules = {epochs: torch.tensor(official_schedule(official_dir, epochs), dtype=torch.int16)
                         for epochs in FIXTURE_EPOCHS}
            FIXTURES.mkdir(parents=True, exist_ok=True)
            path = FIXTURES / 'oracle_efficienttrain.pt'
            torch.save(dict(crops=crops, schedules=schedules), path)
            print(f'wrote {path}')
    except UserError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    return 0 if worst <= 1e-5 and same else 1


if __name__ == '__main__':
    sys.exit(main())
