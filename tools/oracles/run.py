"""Compare one of our methods with its official code on the same weights and images.

    python tools/oracles/run.py --method tome --official-dir ~/src/ToMe --images digits/ --n-images 64
    python tools/oracles/run.py --method gtp --official-dir ~/src/GTP-ViT --weights deit_small.pth --images DIR
    python tools/oracles/run.py --method toe --official-dir ~/src/TokenExpansion --save-fixture

Prints a markdown row per setting: top-1 agreement, share of images within 1e-3 relative, max relative logit
difference and speed (official seconds / ours, paired per batch). ``--save-fixture`` instead writes the official
logits of the tiny fixed case to tests/fixtures/oracle_<method>.pt for the offline tests.
"""
import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from tools.oracles import common  # noqa: E402
from utils.config import parse_key_values  # noqa: E402
from utils.errors import UserError  # noqa: E402

METHODS = ('tome', 'gtp', 'toe', 'evit', 'mtvit')  # evit: our MTViT without multi-scale, fusion 'fuse'


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--method', choices=METHODS, required=True)
    p.add_argument('--official-dir', required=True, help='folder of the fetched official repository')
    p.add_argument('--model', default='deit_small_patch16_224')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--weights', help='a checkpoint for both sides (default: seeded random weights)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--images', help='a folder of images (default: seeded random inputs)')
    p.add_argument('--n-images', type=int, default=64)
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--setting', action='append', nargs='+', metavar='KEY=VALUE',
                   help="one of our settings to compare (repeatable), e.g. --setting r=8 --setting 'r=(13,-1.0)'; "
                        "default: the method's usual ones")
    p.add_argument('--save-fixture', action='store_true', help='write the tiny case fixture and stop')
    return p


def compare_on(oracle, method: str, official_dir: Path, dense, cfg: dict, images, batch_size: int) -> dict:
    ours = common.our_model(dense, getattr(oracle, 'METHOD', method), cfg, oracle.TRAINING)
    theirs = oracle.official(official_dir, dense, cfg).train(oracle.TRAINING)
    return common.compare(ours, theirs, images, batch_size)


def save_fixture(oracle, method: str, official_dir: Path) -> None:
    dense, images = common.tiny_case(getattr(oracle, 'CASE', common.TINY_CASE))
    logits = []
    for cfg in oracle.FIXTURE_SETTINGS:
        with torch.no_grad():
            logits.append(oracle.official(official_dir, dense, cfg).train(oracle.TRAINING)(images))
        result = compare_on(oracle, method, official_dir, dense, cfg, images, len(images))
        print(common.format_row(str(cfg), result))
    print(f'wrote {common.save_fixture(method, oracle.FIXTURE_SETTINGS, logits)}')


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        oracle = importlib.import_module(f'tools.oracles.{args.method}_oracle')
        official_dir = Path(args.official_dir).expanduser().resolve()
        if not (official_dir / oracle.OFFICIAL_FILE).is_file():
            raise UserError(f"--official-dir '{args.official_dir}' has no {oracle.OFFICIAL_FILE}; pass the folder of "
                            f"the fetched official repository")
        if args.save_fixture:
            save_fixture(oracle, args.method, official_dir)
            return 0
        settings = ({' '.join(items): parse_key_values(items) for items in args.setting} if args.setting
                    else oracle.SETTINGS)
        dense = common.dense_model(args.model, args.num_classes, dict(img_size=args.img_size), args.weights,
                                   args.seed)
        images = common.load_images(args.images, args.n_images, dense, args.img_size, args.seed)
        print(f"{args.method} vs {official_dir.name}: {args.model} at {args.img_size} px, "
              f"{'weights ' + args.weights if args.weights else f'seeded random weights (seed {args.seed})'}, "
              f"{len(images)} {'images from ' + args.images if args.images else 'random inputs'}")
        print(common.HEADER)
        for label, cfg in settings.items():
            print(common.format_row(label, compare_on(oracle, args.method, official_dir, dense, cfg, images,
                                                      args.batch_size)), flush=True)
    except (UserError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
