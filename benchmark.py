"""FLOPs, speed, memory (and accuracy) of token-reduction methods side by side, in one run.

    python benchmark.py --model deit_small_patch16_224 --methods none tome gtp mtvit toe dge
    python benchmark.py --sweep tome.r=8,13,16 gtp.num_prop=4,8,12 mtvit.keep_rate=0.7,0.5
    python benchmark.py --weights runs/NAME/best.pth --data-root DIR --methods tome gtp  # + accuracy
    python benchmark.py --train --sweep toe.stage=0,1,2      # forward + backward cost instead

Writes benchmark.csv, benchmark.md and pareto.png into --output-dir and prints the table.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

from datasets.images import try_load_rgb
from models.registry import available_methods
from utils.atomic_write import replaced_folder
from utils.benchmark import (OUTPUT_FILES, BenchConfig, ModelSource, input_images, markdown_table, parse_sweep,
                             run_rows, stack_token_maps, write_outputs)
from utils.cli_args import HelpFormatter, at_least, compile_flag, device_flag, model_flags, weights_flag
from utils.config import given_flags, parse_key_values
from utils.distributed import pick_device
from utils.errors import UserError, run_cli
from utils.profiling import machine_description
from utils.stop_signals import stop_on_signals


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('benchmark.py', description=__doc__.split('\n\n')[0],
                                formatter_class=HelpFormatter,
                                parents=[model_flags('deit_small_patch16_224'),
                                         weights_flag(required=False, note=': rows use its weights (and model)'),
                                         device_flag(), compile_flag()])
    p.add_argument('--img-size', type=at_least(1), default=224)
    p.add_argument('--methods', nargs='*', default=None,
                   help='methods with their default settings (default: every available one)')
    p.add_argument('--sweep', nargs='*', default=[], metavar='METHOD.KEY=V1,V2',
                   help='one row per value, e.g. tome.r=4,8,13,16 gtp.num_prop=4,8,12')
    p.add_argument('--batch-size', '-b', type=at_least(1), default=64)
    p.add_argument('--amp', action=argparse.BooleanOptionalAction, default=True, help='bf16/fp16 on CUDA')
    p.add_argument('--runs', type=at_least(1), default=10, help='timed runs per row (the median is reported)')
    p.add_argument('--warmup', type=at_least(0), default=3)
    p.add_argument('--mac-images', type=at_least(1), default=2, help='images whose MACs are averaged per row')
    p.add_argument('--threads', type=at_least(1), help='CPU threads (default: torch default)')
    p.add_argument('--train', action='store_true', help='measure training (forward + backward) instead')
    p.add_argument('--runtime', nargs='+', choices=('torch', 'onnxruntime'), default=['torch'],
                   help='onnxruntime: also time each row exported to ONNX (CPU; needs requirements-export.txt)')
    p.add_argument('--data-root', help='labelled folder: adds top-1 and macro F1 per row (needs --weights)')
    p.add_argument('--token-maps', metavar='IMAGE', help='also draw each row\'s token map of this image')
    p.add_argument('--output-dir', default=None, help='default: runs/benchmark-<time>')
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_cli(lambda: run(args, given_flags(get_args_parser, argv)))


def run(args, given=()) -> None:
    ignored = [f"--{name.replace('_', '-')}" for name in ('model', 'model_kwargs', 'img_size') if name in given]
    if args.weights and ignored:
        raise UserError(f"{', '.join(ignored)}: the --weights checkpoint gives the model and its input size; leave "
                        f"them out (or benchmark the timm model alone, without --weights)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile and args.warmup < 1:
        raise UserError('--compile needs --warmup 1 or more: the warm-up runs compile the model, outside the timing')
    if args.data_root and not args.weights:
        raise UserError('--data-root measures accuracy, which needs trained --weights (a best.pth)')
    device = pick_device(args.device)
    if 'onnxruntime' in args.runtime:
        from utils.export import require_onnx
        if args.train:
            raise UserError('--runtime onnxruntime times inference; drop --train')
        require_onnx()
    amp_dtype = None
    if args.amp and device.type == 'cuda':
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    checkpoint = evaluate = None
    img_size, num_classes, model_name = args.img_size, 1000, args.model
    if args.weights:
        from models.checkpoint import load_toolkit_checkpoint
        checkpoint = load_toolkit_checkpoint(args.weights)
        img_size = checkpoint['data_config']['input_size'][-1]
        num_classes, model_name = checkpoint['num_classes'], checkpoint['model_name']
    files = None
    if args.data_root:
        from utils.predictor import accuracy_evaluator, labelled_samples
        samples = labelled_samples(checkpoint, args.data_root)
        evaluate = accuracy_evaluator(checkpoint, samples, device, args.batch_size)
        files = [path for path, _ in samples]
    cfg = BenchConfig(model_name, img_size, args.batch_size, device, amp_dtype, args.runs, args.warmup,
                      args.mac_images, args.train, num_classes, parse_key_values(args.model_kwargs), args.runtime,
                      args.compile)
    methods = available_methods() if args.methods is None and not args.sweep else args.methods
    settings = parse_sweep(args.sweep, methods)
    header = (f"{model_name} at {img_size} px, batch {args.batch_size}, "
              f"{'training (forward + backward)' if args.train else 'inference'}"
              f"{', AMP ' + str(amp_dtype).split('.')[-1] if amp_dtype else ''}{', compiled' if args.compile else ''}; "
              f"{machine_description(device)}")
    print(header)
    images = input_images(cfg, files, checkpoint['data_config'] if files else None)
    out_dir = Path(args.output_dir or Path('runs') / f"benchmark-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.token_maps and (not Path(args.token_maps).is_file() or try_load_rgb(args.token_maps) is None):
        raise UserError(f"--token-maps: '{args.token_maps}' is not an image file that can be read")
    with stop_on_signals(), replaced_folder(out_dir, OUTPUT_FILES, '--output-dir') as staging:  # whole or as it was
        table = run_rows(settings, ModelSource(cfg, checkpoint, args.weights), cfg, images, evaluate, args.token_maps,
                         staging)
        write_outputs(table, header, staging, 'top1' if evaluate else None)
        if args.token_maps:
            stack_token_maps(staging)
    if args.token_maps:
        print(f"token maps: {out_dir / 'token_maps.png'}")
    print(markdown_table(table.drop(columns=['unprofiled_ops'])))
    print(f'written: {out_dir}/benchmark.csv, benchmark.md, pareto.png')


if __name__ == '__main__':
    sys.exit(main())
