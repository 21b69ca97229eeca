"""Export a trained checkpoint, token reduction included, to a file a serving stack runs (ONNX, TorchScript)
or to a Hugging Face hub model folder.

    python export.py --weights runs/NAME/best.pth                          # best.onnx + best.onnx.json
    python export.py --weights best.pth --method tome --tome-r 8 --dynamic-batch --output model.onnx
    python export.py --weights best.pth --format torchscript --check-images DIR
    python export.py --weights best.pth --format hub --output DIR [--push-to-hub ORG/NAME]

The file takes a float32 batch [B, 3, H, W] normalised as the .json beside it says and returns the logits.
After writing, it is run on the check images beside the PyTorch model and their largest difference is printed.
A hub folder (config.json, weights, README.md model card) is loaded back the way its card says and checked the same.
"""
import argparse
import sys

from models.registry import method_override
from utils.cli_args import HelpFormatter, at_least, method_flags, weights_flag
from utils.config import given_flags
from utils.errors import UserError, run_cli
from utils.export import FORMATS, OPSET


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('export.py', description=__doc__.split('\n\n')[0],
                                formatter_class=HelpFormatter,
                                parents=[weights_flag(), method_flags(override=True)])
    p.add_argument('--format', choices=FORMATS + ('hub',), default='onnx',
                   help=f'onnx (opset {OPSET}), torchscript, or hub (a Hugging Face model folder)')
    p.add_argument('--output', help='default: the weights file with .onnx / .pt, or the folder <weights>-hub')
    p.add_argument('--push-to-hub', metavar='ORG/NAME', help='with --format hub: upload the folder to this hub '
                                                            'repository (needs a network and `hf auth login`)')
    shape = p.add_mutually_exclusive_group()  # graph settings: onnx and torchscript
    shape.add_argument('--batch-size', '-b', type=at_least(1), default=1, help='the fixed batch size of the graph')
    shape.add_argument('--dynamic-batch', action='store_true', help='any batch size')
    p.add_argument('--img-size', type=at_least(1), help="input size (default: the checkpoint's)")
    p.add_argument('--check-images', nargs='*', default=[], help='image files or folders to check the file on '
                                                                 '(default: 8 random normalised inputs)')
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)

    def run():
        from datasets.folder import image_files
        from utils.export import export_checkpoint
        from utils.stop_signals import stop_on_signals
        method, cfg = method_override(args, given_flags(get_args_parser, argv))
        files = image_files(args.check_images, '--check-images') if args.check_images else []
        with stop_on_signals():  # SIGTERM too leaves an existing --output as it was
            if args.format == 'hub' or args.push_to_hub:
                return export_to_hub(args, method, cfg, files)
            info = export_checkpoint(args.weights, args.format, args.output, method, cfg, args.batch_size,
                                     args.dynamic_batch, args.img_size, files)
        check = info['check']
        print(f"{info['file']}: {info['model']} + {info['method']} {info['method_cfg'] or '(dense)'}, input "
              f"{info['batch_size']} x {'x'.join(map(str, info['input_size']))}; checked on {check['images']} "
              f"images against PyTorch: max probability difference {check['max_prob_diff']:.2e}, top-1 "
              f"agreement {check['top1_agreement'] * 100:.1f}%; input description in {info['sidecar']}")
    return run_cli(run)


def export_to_hub(args, method, cfg, files) -> None:
    from utils.hub_export import export_hub
    if args.format != 'hub':
        raise UserError('--push-to-hub uploads a hub folder: add --format hub')
    if args.img_size:
        raise UserError("--format hub writes the model at the checkpoint's input size: leave out --img-size")
    info = export_hub(args.weights, args.output, method, cfg, files, push_to=args.push_to_hub)
    loads = 'timm.create_model(hf-hub:...)' if info['plain'] else 'this toolkit (predict.py --weights)'
    print(f"{info['folder']}: {info['model']} + {info['method']} {info['method_cfg'] or '(dense)'} as "
          f"{', '.join(info['files'])}, for {loads}; loaded back and checked on {info['check']}; MAC ratio "
          f"{info['mac_ratio']:.2f}" + (f"; pushed to {info['url']}" if 'url' in info else ''))


if __name__ == '__main__':
    sys.exit(main())
