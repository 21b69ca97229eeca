"""Fine-tune a timm Vision Transformer on an image folder, with or without token reduction.

    python train_gpu.py                                   # the built-in demo, CPU or GPU
    python train_gpu.py --data-root DIR --model deit_small_patch16_224 --pretrained weights/FILE.pth
    python train_gpu.py --data-root DIR --model deit_small_patch16_224 --pretrained   # timm's weights, from the hub
    torchrun --nproc_per_node=2 train_gpu.py --data-root DIR ...
    python train_gpu.py --resume runs/NAME/last.pth       # or --resume auto

Every default lives in ``get_args_parser``; a YAML ``--config`` file can set any flag, and flags given
on the command line win. The training itself is ``utils.trainer.train``.
"""
import argparse
import os
import sys
from pathlib import Path

from models.registry import method_cfg_from_args
from utils.cli_args import HelpFormatter, check_ranges, compile_flag, device_flag, method_flags, model_flags
from utils.config import check_config, load_yaml, parse_key_values, parse_layered
from utils.curriculum import CURRICULA
from utils.distillation import DISTILL_TYPES
from utils.errors import run_cli
from utils.optim import LR_BASE_SCALES
from utils.schedule import SCHEDULES
from utils.selection import EVAL_METRICS
from utils.trackers import TRACKERS

# Without --data-root the built-in demo runs; these settings (under any flag you give) let a ViT learn its
# 64-px pictures from scratch in a few minutes on a CPU.
DEMO_SETTINGS = dict(img_size=64, scale=(0.5, 1.0), epochs=20, batch_size=32, lr=1e-3, pretrained='none')

INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest')
# --recipe: defaults laid under the command line (the parser's own are 'light'); DeiT's main.py values
RECIPES = dict(light={}, deit=dict(aa='rand-m9-mstd0.5-inc1', reprob=0.25, scale=(0.08, 1.0), mixup=0.8, cutmix=1.0,
                                   drop_path=0.1, smoothing=0.1, crop_pct=None, sched='cosine'))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('train_gpu.py', description=__doc__.split('\n\n')[0],
                                formatter_class=HelpFormatter,
                                parents=[model_flags('deit_tiny_patch16_224'), method_flags(override=False),
                                         device_flag(), compile_flag()])
    p.add_argument('--config', help='YAML file of flag: value pairs (command-line flags win)')
    g = p.add_argument_group('data')
    g.add_argument('--data-root', help='folder with one sub-folder of images per class, or with train/ and '
                                       'val/ (or validation/, valid/, test/); default: the built-in demo dataset '
                                       '(made once under data/demo)')
    g.add_argument('--train-dir', help='folder of training class folders, for any other layout (relative to '
                                       '--data-root when given); alone, it is split by --val-split')
    g.add_argument('--val-dir', help='folder of validation class folders (with --train-dir)')
    g.add_argument('--nb-classes', '--num-classes', type=int,
                   help='expected number of classes (a check; the folders decide)')
    g.add_argument('--val-split', type=float, default=0.2, help='validation fraction when there is no val/')
    g.add_argument('--workers', '-j', type=int, default=min(4, os.cpu_count() or 1),
                   help='data-loading processes per GPU/process (default: 4, at most the CPU count: %(default)s here)')
    g.add_argument('--class-balance', choices=('none', 'weights', 'sampler'), default='none',
                   help='for skewed class counts: weight the loss, or sample classes equally')
    g = p.add_argument_group('model')
    g.add_argument('--pretrained', '--initial-checkpoint', nargs='?', const=True, metavar='WEIGHTS',
                   help="the weights to start from: alone (and by default on your data), the --model's default timm "
                        "weights; a timm tag (fb_in1k, deit_small_patch16_224.fb_in1k) or hf-hub:ORG/NAME (fetched once "
                        "into the Hugging Face cache, offline from it with HF_HUB_OFFLINE=1); a local .pth / "
                        ".safetensors / toolkit checkpoint; or none: from scratch (the built-in demo's default)")
    g.add_argument('--img-size', type=int, help="input size (default: the model's own)")
    g.add_argument('--drop-path', type=float, default=0.0, help='stochastic depth rate (DeiT: 0.1)')
    g.add_argument('--grad-checkpointing', action=argparse.BooleanOptionalAction, default=False,
                   help="recompute each block's activations in the backward pass instead of keeping them: less "
                        "memory for a larger batch, for one more forward pass of the blocks per step")
    g = p.add_argument_group('optimisation')
    g.add_argument('--batch-size', '-b', type=int, default=64, help='per process')
    g.add_argument('--epochs', type=int, default=30)
    g.add_argument('--lr', type=float, help='AdamW peak learning rate, as it is (default: from --lr-base)')
    g.add_argument('--lr-base', type=float,
                   help='peak learning rate per --lr-base-size images, scaled by the global batch (batch size x '
                        'processes x accumulation steps) by --lr-base-scale (default: 4e-3 per 512 images, with weights '
                        'or from scratch: 5e-4 at batch 64)')
    g.add_argument('--lr-base-size', type=int, default=512,
                   help="the global batch at which --lr-base is the rate (DeiT's 512; timm's 256)")
    g.add_argument('--lr-base-scale', choices=LR_BASE_SCALES, default='linear',
                   help="how the rate follows the global batch from there: linear (DeiT's) or sqrt (timm's for "
                        "Adam-family optimizers)")
    g.add_argument('--sched', choices=SCHEDULES, default='onecycle',
                   help="learning-rate schedule, per update: onecycle (cosine up from lr/25 and down to --min-lr, "
                        "Adam's beta1 0.95 -> 0.85 -> 0.95 against it, as PyTorch's OneCycleLR) or cosine (linear "
                        "warm-up from lr/1000, then timm's cosine, as DeiT)")
    g.add_argument('--min-lr', type=float, default=1e-6, help='the learning rate at the end of the run')
    g.add_argument('--warmup-epochs', type=int,
                   help='epochs of rising learning rate (default: 30%% of --epochs, as a one-cycle schedule, at '
                        'most 5, as DeiT)')
    g.add_argument('--weight-decay', type=float, default=0.05)
    g.add_argument('--layer-decay', type=float, help='layer-wise lr decay, e.g. 0.75 (off when not given)')
    g.add_argument('--clip-grad', type=float, help='max gradient norm (off when not given)')
    g.add_argument('--accum-steps', '--grad-accum-steps', type=int, default=1, help='gradient accumulation steps')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--recipe', choices=sorted(RECIPES), default='light',
                   help="defaults of the augmentation flags below and of --sched: light (the whole image, flipped, "
                        "onecycle; measured against a plain loop, see README) or deit (DeiT's 300-epoch ImageNet "
                        "recipe: RandAugment, random erasing, Mixup 0.8 / CutMix 1.0, crop area from 0.08, the model's "
                        "crop-pct, cosine); flags given win")
    g.add_argument('--curriculum', choices=CURRICULA, default='none',
                   help="training curriculum: 'efficienttrain' (5 stages: Fourier low-pass crop to 160/224, 160, 160, "
                        "192, 224 of --img-size, RandAugment magnitude 1, 3, 5, 7, 9; see utils/curriculum.py)")
    g.add_argument('--mixup', type=float, default=0.0, help='Mixup alpha (0: off; DeiT uses 0.8)')
    g.add_argument('--cutmix', type=float, default=0.0, help='CutMix alpha (0: off; DeiT uses 1.0)')
    g.add_argument('--scale', type=float, nargs=2, default=(1.0, 1.0), metavar=('MIN', 'MAX'),
                   help='area range of the random resized crop (default: the whole image; DeiT: 0.08 1)')
    g.add_argument('--ratio', type=float, nargs=2, default=(3 / 4, 4 / 3), metavar=('MIN', 'MAX'),
                   help='aspect-ratio range of the random resized crop')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability (0 for text, digits)')
    g.add_argument('--aa', default='', help="RandAugment policy, e.g. rand-m9-mstd0.5-inc1 (DeiT's; '': none)")
    g.add_argument('--color-jitter', type=float, default=0.0,
                   help='colour jitter strength (brightness, contrast, saturation), e.g. 0.4 (0: off)')
    g.add_argument('--reprob', type=float, default=0.0, help='random erasing probability (DeiT: 0.25)')
    g.add_argument('--train-interpolation', choices=INTERPOLATIONS + ('random',),
                   help="resize interpolation in training (default: the model's own)")
    g.add_argument('--crop-pct', type=float, default=1.0,
                   help="evaluation: resize to size / crop-pct, then centre-crop (1: the whole image, as the training "
                        "crops can be; 0: the model's own, 0.875 for DeiT); saved in the checkpoint for "
                        "predict.py and export.py")
    g.add_argument('--interpolation', choices=INTERPOLATIONS,
                   help="evaluation resize interpolation (default: the model's own); saved in the checkpoint")
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=True,
                   help='mixed precision on CUDA (bf16 where supported, else fp16)')
    g.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=False, help='keep an EMA of weights')
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g.add_argument('--model-ema-warmup', action=argparse.BooleanOptionalAction, default=True,
                   help="EMA decay rising from 0 as 1 - (1 + step)^-2/3 up to --model-ema-decay (timm's ModelEmaV3), "
                        "so that a short run's EMA is not mostly its initialisation")
    g.add_argument('--eval-metric', choices=EVAL_METRICS, default='top1',
                   help='validation metric that chooses best.pth (and --early-stop); loss: the lowest')
    g.add_argument('--early-stop', type=int, default=0, help='stop after N epochs without a better --eval-metric (0: off)')
    g.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=False)
    g = p.add_argument_group('distillation (DeiT, Touvron et al. 2021; Hinton et al. 2015; see utils/distillation.py)')
    g.add_argument('--teacher', metavar='TEACHER',
                   help="distil from this teacher's logits: a best.pth of this toolkit on the same classes (e.g. the "
                        "dense run's), a timm MODEL[.TAG] or hf-hub:ORG/NAME (its own weights, or --teacher-weights)")
    g.add_argument('--teacher-weights', metavar='FILE',
                   help='a .pth / .safetensors file of the --teacher MODEL fine-tuned on these classes')
    g.add_argument('--distill-type', choices=DISTILL_TYPES, default='soft',
                   help="soft: KL divergence to the teacher's probabilities at --distill-temperature; hard: "
                        "cross-entropy with the teacher's top class as the label (DeiT's)")
    g.add_argument('--distill-alpha', type=float, default=0.5,
                   help='weight of the distillation term; the labels get 1 - alpha (DeiT: 0.5)')
    g.add_argument('--distill-temperature', type=float, default=1.0, help='softmax temperature of soft (DeiT: 1.0)')
    g = p.add_argument_group('run')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--log-interval', type=int, default=50,
                   help='steps between host syncs: the NaN check and the progress bar loss (as timm)')
    g.add_argument('--output-dir', help='run folder (default: a new runs/<model>-<method>-<time>)')
    g.add_argument('--resume', help="last.pth to continue from, or 'auto' for the newest in --output-dir / runs/")
    g.add_argument('--report', action=argparse.BooleanOptionalAction, default=True,
                   help="write the evaluation report of best.pth on the validation split into report/")
    g.add_argument('--log-to', nargs='*', choices=TRACKERS, default=[], metavar='TRACKER',
                   help="also log to these experiment trackers (tensorboard, mlflow, wandb; none when given alone): "
                        "log.csv's scalars each epoch, the training loss and lr every --log-interval steps, the "
                        "settings, and at the end best.pth's metrics and the report; each needs pip install -r "
                        "requirements-NAME.txt (see utils/trackers.py)")
    g.add_argument('--log-tensorboard', nargs='?', const=True, metavar='DIR',
                   help="--log-to tensorboard, into DIR (default: the run folder's tb/)")
    g.add_argument('--mlflow-uri', help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's own: "
                                        "sqlite:///mlflow.db in the current folder)")
    g.add_argument('--wandb-project', help="W&B project (default: WANDB_PROJECT, else W&B's); offline unless "
                                           "WANDB_MODE is set or you are logged in (wandb login)")
    g.add_argument('--dist-timeout', type=float, default=None, metavar='SECONDS',
                   help="timeout of the collectives of a multi-process training step (default: torch's, 10 min "
                        "under NCCL); waits on process 0's data scan and run folder are not bound by it")
    g.add_argument('--local-rank', '--local_rank', type=int, default=None, help=argparse.SUPPRESS)
    return p


# the values a numeric setting can take (``utils.cli_args.check_ranges``); the others are checked where they are used
RANGES = dict(workers='[0, inf)', drop_path='[0, 1]', batch_size='[1, inf)', epochs='[1, inf)', lr='[0, inf)',
              lr_base='[0, inf)', min_lr='[0, inf)', warmup_epochs='[0, inf)', weight_decay='[0, inf)',
              layer_decay='(0, 1]', clip_grad='[0, inf)', accum_steps='[1, inf)', smoothing='[0, 1)',
              mixup='[0, inf)', cutmix='[0, inf)', scale='[0, 1]', ratio='(0, inf)', hflip='[0, 1]',
              color_jitter='[0, inf)', reprob='[0, 1]', model_ema_decay='[0, 1)', early_stop='[0, inf)',
              distill_alpha='[0, 1]', distill_temperature='(0, inf)', log_interval='[1, inf)',
              dist_timeout='(0, inf)')


def find_latest_checkpoint(output_dir):
    """The newest last.pth (by modification time) in ``output_dir`` or a folder below it (default: runs/)."""
    root = Path(output_dir) if output_dir else Path(__file__).resolve().parent / 'runs'
    found = [*root.glob('last.pth'), *root.glob('*/last.pth')]
    return str(max(found, key=lambda f: f.stat().st_mtime)) if found else None


def resume_layer(path: str, parser) -> dict:
    """The resumed run's own settings, so ``--resume X`` alone continues it as it was."""
    from models.checkpoint import load_resume_checkpoint
    saved = load_resume_checkpoint(path).get('args', {})
    saved.setdefault('sched', 'cosine')  # a run from before --sched continues on the schedule it began with
    known = {a.dest for a in parser._actions} - {'resume', 'config', 'output_dir', 'local_rank', 'help'}
    return {k: v for k, v in saved.items() if k in known}


def parse_args(argv=None) -> argparse.Namespace:
    parser = get_args_parser()
    first = parser.parse_args(argv)
    layers = []
    auto = first.resume == 'auto'
    if auto:
        first.resume = find_latest_checkpoint(first.output_dir)
        print(f"--resume auto: {first.resume or 'no last.pth found, starting a new run'}")
    if first.resume:
        layers.append(resume_layer(first.resume, parser))
    if first.config:
        nullable = {key for recipe in RECIPES.values() for key, value in recipe.items() if value is None}
        layers.append(check_config(parser, load_yaml(first.config), first.config, nullable))
    if not any(source.get(key) for source in (vars(first), *layers) for key in ('data_root', 'train_dir')):
        layers.insert(0, DEMO_SETTINGS)
    recipe = (parse_layered(parser, argv, *layers) if layers else first).recipe
    if RECIPES[recipe]:
        layers.insert(0, RECIPES[recipe])
    args = parse_layered(get_args_parser(), argv, *layers) if layers else first
    args.resume = first.resume
    if args.pretrained is None and not args.resume:  # fine-tuning your data starts from the model's timm weights
        args.pretrained = True
    if auto and args.resume:  # the run found continues in its own folder
        args.output_dir = str(Path(args.resume).parent)
    check_ranges(args, RANGES)
    args.model_kwargs = parse_key_values(args.model_kwargs)
    args.method_cfg = method_cfg_from_args(args)
    return args


def main(argv=None) -> int:
    from utils.trainer import train
    return run_cli(lambda: train(parse_args(argv)), 'interrupted: last.pth holds the last finished epoch')


if __name__ == '__main__':
    sys.exit(main())
