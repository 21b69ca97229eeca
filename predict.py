"""Evaluate a checkpoint on a labelled folder (plots, tables, an HTML page) or classify image files.

    python predict.py --weights runs/NAME/best.pth --data-root DIR            # report of a labelled folder
    python predict.py --weights best.pth --images a.jpg b.png folder/ --topk 3  # classify files
    python predict.py --weights best.pth --data-root DIR --method tome --tome-r 8  # with a method switched on

Everything about the model comes from the checkpoint.
"""
import argparse
import sys
import time
from pathlib import Path


from models.registry import method_override
from utils.cli_args import device_flag, method_flags, weights_flag
from utils.config import given_flags
from utils.errors import UserError, run_cli


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('predict.py', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                parents=[weights_flag(), device_flag(), method_flags(override=True)])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument('--data-root', help='labelled folder (class sub-folders, or a root with val/)')
    source.add_argument('--images', nargs='+', help='image files or folders to classify')
    p.add_argument('--output-dir', help='default: predict-<name>-<time> next to the weights')
    p.add_argument('--topk', type=int, default=5, help='classes listed per image with --images; the top-k '
                   'accuracy and, beyond 20 classes, the label_i / prob_i columns of predictions.csv')
    p.add_argument('--save-probs', action='store_true',
                   help='also write every probability: probabilities.npy (float32) and classes.json')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--token-maps', action='store_true', help='draw what the method did to the tokens')
    p.add_argument('--n-visualization', type=int, default=16, help='images in the token maps')
    return p


def default_output(weights: str, name: str) -> Path:
    return Path(weights).resolve().parent / f"predict-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_labelled(args, method, cfg, device) -> None:
    from datasets.folder import labelled_root, scan_classes
    from utils.predictor import write_report
    from utils.report import per_class_shown, read_report_csv
    root = labelled_root(args.data_root)
    if root != Path(args.data_root):
        print(f"scoring '{root}', the validation split of '{args.data_root}'")
    scan = scan_classes(root)
    if not scan.samples:
        raise UserError(f"no readable images in class folders under '{root}'; expected {root}/<class>/<image>")
    out = Path(args.output_dir) if args.output_dir else default_output(args.weights, Path(args.data_root).name)
    summary = write_report(args.weights, scan.samples, scan.classes, out, device, args.batch_size, args.workers,
                           method, cfg, scan.skipped, topk=args.topk, save_probs=args.save_probs)
    if args.token_maps:
        from utils.report import add_plot
        picked = scan.samples[::max(1, len(scan.samples) // args.n_visualization)][:args.n_visualization]
        draw_token_maps(args, method, cfg, device, [p for p, _ in picked], out)
        add_plot(out, 'Token maps', 'token_maps.png')
    table, note = per_class_shown(read_report_csv(out / 'per_class_report.csv'), len(summary['classes_in_data']))
    print(table.to_string(float_format=lambda v: f'{v:.4f}') + (f'\n{note}' if note else ''))
    print(f"accuracy {summary['accuracy'] * 100:.2f}% on {summary['images']} images "
          f"(top-{summary['top_k']} {summary['top_k_accuracy'] * 100:.2f}%), {summary['skipped_files']} skipped; "
          f"report: {out / 'report.html'}")


def run_images(args, method, cfg, device) -> None:
    from datasets.images import check_image
    from models.factory import load_for_inference
    from utils.predictor import predict
    from utils.report import predictions_table, write_predictions, write_probabilities
    from datasets.folder import image_files
    files = image_files(args.images)
    bad = [(f, why) for f in files if (why := check_image(Path(f)))]
    for f, why in bad:
        print(f'skipping {f}: {why}', file=sys.stderr)
    good = [f for f in files if f not in dict(bad)]
    if not good:
        raise UserError('none of the --images could be read')
    model, meta = load_for_inference(args.weights, device, method, cfg)
    result = predict(model, [(f, -1) for f in good], meta['data_config'], device, args.batch_size, args.workers)
    if not result.paths:
        raise UserError(f'none of the {len(files)} --images could be decoded (truncated or corrupt files)')
    names = meta['class_names']
    k = min(args.topk, len(names))
    for path, p in zip(result.paths, result.probs):
        top = p.argsort()[::-1][:k]
        print(f"{path}: " + ', '.join(f'{names[i]} {p[i]:.3f}' for i in top))
    out = Path(args.output_dir) if args.output_dir else default_output(args.weights, 'images')
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(predictions_table(result.probs, result.targets, result.paths, names, k).drop(columns=['true']),
                      out / 'predictions.csv')
    if args.save_probs:
        write_probabilities(result.probs, names, out)
    if args.token_maps:
        draw_token_maps(args, method, cfg, device, result.paths[:args.n_visualization], out)
    print(f"{len(result.paths)} images classified, {len(bad) + len(result.failed)} skipped; {out / 'predictions.csv'}")


def draw_token_maps(args, method, cfg, device, files, out: Path) -> None:
    from models.factory import load_for_inference
    from utils.token_maps import write_token_maps
    model, meta = load_for_inference(args.weights, device, method, cfg)
    print(f"token maps: {write_token_maps(model, files, meta['data_config'], out, args.n_visualization)}")


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)

    def run():
        from utils.distributed import pick_device
        if args.topk < 1:
            raise UserError(f'--topk must be 1 or more (got {args.topk})')
        method, cfg = method_override(args, given_flags(get_args_parser, argv))
        (run_labelled if args.data_root else run_images)(args, method, cfg, pick_device(args.device))
    return run_cli(run)


if __name__ == '__main__':
    sys.exit(main())
