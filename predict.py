"""Evaluate a checkpoint on a labelled folder (plots, tables, an HTML page) or classify image files and URLs.

    python predict.py --weights runs/NAME/best.pth --data-root DIR            # report of a labelled folder
    python predict.py --weights best.pth --images a.jpg b.png folder/ --topk 3  # classify files
    python predict.py --weights best.pth --images https://host/cat.jpg --format json  # URLs too; predictions.json
    python predict.py --weights best.pth --data-root DIR --method tome --tome-r 8  # with a method switched on
    python predict.py --model deit_small_patch16_224 --pretrained --images a.jpg   # a timm model, ImageNet classes

Everything about the model comes from the checkpoint, or for --model from timm (its weights' input description,
ImageNet class names when its head has ImageNet's classes).
"""
import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path


from models.registry import method_override
from utils.cli_args import HelpFormatter, at_least, compile_flag, device_flag, method_flags, model_flags, weights_flag
from utils.config import given_flags
from utils.errors import UserError, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('predict.py', description=__doc__.split('\n\n')[0],
                                formatter_class=HelpFormatter,
                                parents=[weights_flag(required=False, note='; or --model'), model_flags(None),
                                         device_flag(), compile_flag(), method_flags(override=True)])
    p.add_argument('--pretrained', nargs='?', const=True, metavar='WEIGHTS',
                   help="with --model, the weights to predict with: not given or alone, the model's default timm "
                        "weights; a timm tag, hf-hub:ORG/NAME or a .pth / .safetensors file (as train_gpu.py's)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument('--data-root', help='labelled folder (class sub-folders, or a root with val/)')
    source.add_argument('--images', nargs='+', help='image files, folders or http(s):// URLs to classify')
    p.add_argument('--output-dir', help='default: predict-<name>-<time> next to the weights (with --model: here)')
    p.add_argument('--topk', type=int, default=5, help='classes listed per image with --images; the top-k '
                   'accuracy and, beyond 20 classes, the label_i / prob_i columns of predictions.csv')
    p.add_argument('--save-probs', action='store_true',
                   help='also write every probability: probabilities.npy (float32) and classes.json')
    p.add_argument('--format', choices=('csv', 'json'), default='csv',
                   help='--images: the predictions file, predictions.csv (every class probability) or '
                        'predictions.json (the top-k per image); the terminal shows the top-k either way')
    p.add_argument('--url-timeout', type=float, default=30.0, help='seconds to wait for an image URL')
    p.add_argument('--amp', action=argparse.BooleanOptionalAction, default=True,
                   help='mixed precision on CUDA (bf16 where supported, else fp16); full precision on the CPU')
    p.add_argument('--batch-size', '-b', type=at_least(1), default=64)
    p.add_argument('--workers', '-j', type=at_least(0), default=2)
    p.add_argument('--token-maps', action='store_true', help='draw what the method did to the tokens')
    p.add_argument('--n-visualization', type=at_least(1), default=16, help='images in the token maps')
    return p


def check_source(args) -> None:
    """One model source: a checkpoint (--weights) or a timm model (--model, its flags only with it)."""
    from models.pretrained import wants_weights
    if bool(args.weights) == bool(args.model):
        raise UserError('give either --weights (a checkpoint of train_gpu.py) or --model (a timm model with its timm '
                        'weights, e.g. --model deit_small_patch16_224 --pretrained)')
    if args.weights and (args.pretrained is not None or args.model_kwargs):
        raise UserError('--pretrained and --model-kwargs go with --model; a --weights checkpoint holds its own')
    if args.model and args.data_root:
        raise UserError('--model classifies --images; a labelled --data-root is scored with --weights, a checkpoint '
                        'of train_gpu.py trained on its classes')
    if args.model and args.pretrained is not None and not wants_weights(args.pretrained):
        raise UserError('--model predicts with trained weights: give --pretrained alone (its timm weights), a tag, '
                        'hf-hub:ORG/NAME or a weights file')
    if args.topk < 1:
        raise UserError(f'--topk must be at least 1 (got {args.topk})')


def load_model(args, method, cfg, device):
    """(model, metadata) of the checkpoint (--weights) or of the timm model with its weights (--model)."""
    if args.weights:
        from models.factory import load_for_inference
        return load_for_inference(args.weights, device, method, cfg, args.compile)
    from models.pretrained import describe_weights
    from utils.config import parse_key_values
    from utils.predictor import load_timm_for_inference
    pretrained = True if args.pretrained is None else args.pretrained
    print(describe_weights(args.model, pretrained), file=sys.stderr)
    return load_timm_for_inference(args.model, pretrained, device, method, cfg, parse_key_values(args.model_kwargs))


def default_output(weights, name: str) -> Path:
    """predict-<name>-<time> next to the checkpoint, or in the current folder for a timm model (--model)."""
    folder = Path(weights).resolve().parent if weights else Path.cwd()
    return folder / f"predict-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_labelled(args, method, cfg, device, amp_dtype) -> None:
    from utils.predictor import scan_labelled, write_report
    from utils.report import per_class_shown, read_report_csv
    if Path(args.data_root).is_file():
        raise UserError(f"--data-root '{args.data_root}' is a file; it takes a folder of class folders. To classify "
                        f"files, use --images {args.data_root}")
    scan = scan_labelled(args.data_root)
    out = Path(args.output_dir) if args.output_dir else default_output(args.weights, Path(args.data_root).name)
    with output_folder(out) as staging:
        summary = write_report(args.weights, scan.samples, scan.classes, staging, device, args.batch_size,
                               args.workers, method, cfg, scan.skipped, topk=args.topk, amp_dtype=amp_dtype,
                               compile_model=args.compile, save_probs=args.save_probs)
        if args.token_maps:
            from utils.report import add_plot
            picked = scan.samples[::max(1, len(scan.samples) // args.n_visualization)][:args.n_visualization]
            draw_token_maps(*load_model(args, method, cfg, device), [p for p, _ in picked], staging,
                            args.n_visualization, out)
            add_plot(staging, 'Token maps', 'token_maps.png')
    table, note = per_class_shown(read_report_csv(out / 'per_class_report.csv'), len(summary['classes_in_data']))
    print(table.to_string(float_format=lambda v: f'{v:.4f}', na_rep='-') + (f'\n{note}' if note else ''))
    print(f"accuracy {summary['accuracy'] * 100:.2f}% on {summary['images']} images "
          f"(top-{summary['top_k']} {summary['top_k_accuracy'] * 100:.2f}%), {summary['skipped_files']} skipped; "
          f"report: {out / 'report.html'}")


def run_images(args, method, cfg, device, amp_dtype) -> None:
    import tempfile
    from datasets.images import check_image
    from utils.image_sources import gather_images
    from utils.predictor import predict, top_classes, write_image_predictions
    out = Path(args.output_dir) if args.output_dir else default_output(args.weights, 'images')
    with tempfile.TemporaryDirectory(prefix='predict-urls-') as fetched, output_folder(out) as staging:
        sources = gather_images(args.images, Path(fetched), args.url_timeout)
        unreadable = {f: why for f in sources.files if (why := check_image(Path(f)))}
        skipped = sources.failed + [(sources.name(f), why) for f, why in unreadable.items()]
        for name, why in skipped:
            print(f'skipping {name}: {why}', file=sys.stderr)
        good = [f for f in sources.files if f not in unreadable]
        if not good:
            raise UserError('none of the --images could be read')
        model, meta = load_model(args, method, cfg, device)
        result = predict(model, [(f, -1) for f in good], meta['data_config'], device, args.batch_size, args.workers,
                         amp_dtype=amp_dtype)
        if not result.paths:
            raise UserError(f'none of the {len(good)} --images could be decoded (truncated or corrupt files)')
        names, shown = meta['class_names'], [sources.name(p) for p in result.paths]
        for name, top in zip(shown, top_classes(result.probs, names, args.topk)):
            print(f"{name}: " + ', '.join(f'{n} {p:.3f}' for n, p in top))
        written = out / write_image_predictions(result.probs, shown, names, staging, args.format, args.topk,
                                                args.save_probs).name
        if args.token_maps:
            draw_token_maps(model, meta, result.paths[:args.n_visualization], staging, args.n_visualization, out)
    count = len(result.paths)
    print(f"{count} image{'' if count == 1 else 's'} classified, {len(skipped) + len(result.failed)} skipped; "
          f"{written}")


@contextmanager
def output_folder(out: Path):
    """The --output-dir, written whole at the end (an earlier output there is replaced, other files refused)."""
    from utils.atomic_write import replaced_folder
    from utils.report import REPORT_FILES
    with replaced_folder(out, REPORT_FILES, '--output-dir') as staging:  # which has listed out
        earlier = out.is_dir() and any(path.name in REPORT_FILES for path in out.iterdir())  # not the staging
        yield staging
    if earlier:
        print(f"(this output replaced the earlier one in '{out}')", file=sys.stderr)


def draw_token_maps(model, meta, files, staging: Path, n: int, out: Path) -> None:
    from utils.token_maps import write_token_maps
    print(f"token maps: {out / write_token_maps(model, files, meta['data_config'], staging, n).name}")


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)

    def run():
        from utils.distributed import pick_device
        from utils.engine import amp_settings
        from utils.stop_signals import stop_on_signals
        check_source(args)
        method, cfg = method_override(args, given_flags(get_args_parser, argv))
        device = pick_device(args.device)
        amp_dtype = amp_settings(args.amp, device)[0]  # None on the CPU
        with stop_on_signals():  # SIGTERM too leaves --output-dir as it was (utils.atomic_write.replaced_folder)
            (run_labelled if args.data_root else run_images)(args, method, cfg, device, amp_dtype)
    return run_cli(run)


if __name__ == '__main__':
    sys.exit(main())
