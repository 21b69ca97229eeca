"""``train(args)``: set-up, the epoch loop, checkpoints and the final report of one training run.

The CLI (train_gpu.py) only parses flags; everything a run does is here, in the order it happens.
"""
import logging
import math
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from timm.data import Mixup
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn

from datasets.demo import make_demo_dataset
from datasets.folder import make_split
from datasets.transforms import data_config, eval_transform, train_transform
from models.factory import build_model, model_new_params
from models.registry import method_cfg, unwrap
from utils import run_files
from utils.checkpoint import (load_backbone_state, load_toolkit_checkpoint, make_checkpoint, rng_state,
                              save_atomic, set_rng_state)
from utils.data import class_weights, eval_loader, train_loader
from utils.distributed import DistInfo, barrier, broadcast_object, cleanup, init_distributed
from utils.engine import StepSettings, evaluate, train_one_epoch
from utils.optim import build_optimizer
from utils.errors import UserError

log = logging.getLogger('train')
REPO = Path(__file__).resolve().parent.parent
DEMO_ROOT = REPO / 'data' / 'demo'


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_run_dir(args, info: DistInfo) -> Path:
    """``--output-dir`` itself, the resumed checkpoint's folder, or a new runs/<model>-<method>-<time>."""
    if args.output_dir:
        run_dir = Path(args.output_dir)
    elif args.resume:
        run_dir = Path(args.resume).parent
    else:
        stamp = time.strftime('%Y%m%d-%H%M%S')
        run_dir = REPO / 'runs' / f'{args.model}-{args.method}-{stamp}'
    run_dir = Path(broadcast_object(str(run_dir)))
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    return run_dir


def amp_settings(enabled: bool, device: torch.device):
    """bf16 where the GPU supports it, else fp16 with a grad scaler; full precision on the CPU."""
    if not enabled or device.type != 'cuda':
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler('cuda')


def check_resume_fits(ckpt: dict, args, classes) -> None:
    """A checkpoint from another model, method or class list cannot be resumed on this run."""
    problems = []
    if ckpt['model_name'] != args.model:
        problems.append(f"model {ckpt['model_name']} (this run: {args.model})")
    if ckpt['method'] != args.method:
        problems.append(f"method {ckpt['method']} (this run: {args.method})")
    if list(ckpt['class_names']) != list(classes):
        problems.append(f"classes {ckpt['class_names'][:6]} (this data: {list(classes)[:6]})")
    if problems:
        raise UserError(f"cannot resume from '{args.resume}': it was trained with {'; '.join(problems)}; "
                        f"resume with the same settings and data, or start a new run with --pretrained")


def log_epoch(epoch: int, train_stats: dict, val_stats: dict, ema_stats: Optional[dict]) -> None:
    line = (f"epoch {epoch}: train loss {train_stats['train_loss']:.4f}, val loss {val_stats['val_loss']:.4f}, "
            f"top-1 {val_stats['top1']:.2f}%, top-5 {val_stats['top5']:.2f}%, "
            f"{train_stats['train_images_per_s']:.1f} img/s, {train_stats['train_seconds']:.1f}s")
    if ema_stats:
        line += f", EMA top-1 {ema_stats['top1']:.2f}%"
    log.info(line)


def train(args) -> Path:
    """Run the whole training described by ``args``; returns the run folder."""
    info = init_distributed(args.device, args.local_rank)
    try:
        return _train(args, info)
    finally:
        cleanup()


def _train(args, info: DistInfo) -> Path:
    device = info.device
    seed_everything(args.seed + info.rank)
    if args.data_root is None and args.train_dir is None:
        args.data_root = str(make_demo_dataset(DEMO_ROOT)) if info.is_main else str(DEMO_ROOT)
        barrier()
    run_dir = resolve_run_dir(args, info)
    run_files.setup_logging(run_dir, info.is_main)

    split = make_split(args.data_root, args.val_split, args.seed, args.train_dir, args.val_dir)
    classes = split.classes
    if args.nb_classes is not None and args.nb_classes != len(classes):
        raise UserError(f"--nb-classes {args.nb_classes} but '{args.data_root}' has {len(classes)} class "
                        f"folders ({', '.join(classes[:8])}{' ...' if len(classes) > 8 else ''}); "
                        f"drop --nb-classes or fix the folders")
    resume_ckpt = load_toolkit_checkpoint(args.resume) if args.resume else None
    if resume_ckpt is not None:
        check_resume_fits(resume_ckpt, args, classes)

    model = build_model(args.model, args.method, args.method_cfg, num_classes=len(classes),
                        img_size=args.img_size, pretrained=None if resume_ckpt else args.pretrained,
                        drop_path_rate=args.drop_path, **args.model_kwargs)
    new_params = model_new_params(model)
    if new_params and args.pretrained and not resume_ckpt:
        log.info(f'{len(new_params)} parameter tensors added by method {args.method} start from their own '
                 f'initialisation ({new_params[0]} ...)')
    cfg = data_config(model, args.img_size)
    meta = dict(model_name=args.model, model_kwargs=args.model_kwargs, method=args.method,
                method_cfg=method_cfg(model), num_classes=len(classes), class_names=list(classes),
                data_config=cfg)
    if info.is_main:
        run_files.write_config(run_dir / 'config.yaml', {**vars(args), 'method_cfg': meta['method_cfg']})
        run_files.write_class_indices(run_dir / 'class_indices.json', classes)
        run_files.write_file_list(run_dir / 'train_files.csv', split.train, classes)
        run_files.write_file_list(run_dir / 'val_files.csv', split.val, classes)
        if split.skipped:
            run_files.write_skipped(run_dir / 'skipped_files.csv', split.skipped)
    log.info(f"data: {len(split.train)} train / {len(split.val)} val images, {len(classes)} classes, "
             f"{len(split.skipped)} files skipped; model {args.model} + {args.method} "
             f"{meta['method_cfg'] or '(dense)'} on {device}, world size {info.world_size}; run folder {run_dir}")

    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    pin = device.type == 'cuda'
    loader = train_loader(split.train, train_transform(cfg, args.aa, args.reprob, args.scale, args.hflip), args.batch_size,
                          args.workers, info.rank, info.world_size, args.seed, args.class_balance, pin)
    val_loader = eval_loader(split.val, eval_transform(cfg), args.batch_size, args.workers, info.rank,
                             info.world_size, pin)

    optimizer = build_optimizer(model, args.lr, args.weight_decay, args.layer_decay)
    updates_per_epoch = math.ceil(len(loader) / args.accum_steps)
    scheduler = create_scheduler_v2(optimizer, sched='cosine', num_epochs=args.epochs, min_lr=args.min_lr,
                                    warmup_epochs=args.warmup_epochs, warmup_lr=args.lr * 1e-3,
                                    step_on_epochs=False, updates_per_epoch=updates_per_epoch)[0]
    amp_dtype, scaler = amp_settings(args.amp, device)
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=len(classes))
    weights = class_weights([t for _, t in split.train], len(classes)).to(device) \
        if args.class_balance == 'weights' else None
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=0.0 if mixup else args.smoothing)

    start_epoch, num_updates, best, best_epoch = 0, 0, -1.0, -1
    if resume_ckpt is not None:
        load_backbone_state(model, resume_ckpt['model'], args.resume)
        optimizer.load_state_dict(resume_ckpt['optimizer'])
        if resume_ckpt['args'].get('epochs') == args.epochs:
            scheduler.load_state_dict(resume_ckpt['scheduler'])
        if scaler is not None and resume_ckpt.get('scaler'):
            scaler.load_state_dict(resume_ckpt['scaler'])
        if ema is not None and resume_ckpt.get('model_ema'):
            ema.module.load_state_dict(resume_ckpt['model_ema'])
        start_epoch, num_updates = resume_ckpt['epoch'] + 1, resume_ckpt['num_updates']
        best, best_epoch = resume_ckpt['best_metric'], resume_ckpt['best_epoch']
        if resume_ckpt['rng']:
            set_rng_state(resume_ckpt['rng'][min(info.rank, len(resume_ckpt['rng']) - 1)])
        scheduler.step(start_epoch, None)
        scheduler.step_update(num_updates)
        log.info(f"resumed from '{args.resume}' at epoch {start_epoch} (best top-1 {best:.2f}% at epoch {best_epoch})")

    train_model = model
    if args.compile:
        train_model = torch.compile(train_model)
    if info.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == 'cuda' else None)
    settings = StepSettings(device, amp_dtype, scaler, args.accum_steps, args.clip_grad, args.channels_last,
                            show_progress=info.is_main)

    stale = 0
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        epoch_start = time.time()
        train_stats = train_one_epoch(train_model, loader, optimizer, loss_fn, settings, epoch, args.epochs,
                                      scheduler, mixup, ema, num_updates)
        num_updates = train_stats['num_updates']
        scheduler.step(epoch + 1, None)
        val_stats = evaluate(model, val_loader, settings, len(classes))
        ema_stats = evaluate(ema.module, val_loader, settings, len(classes)) if ema is not None else None
        use_ema = ema_stats is not None and ema_stats['top1'] > val_stats['top1']
        score = ema_stats['top1'] if use_ema else val_stats['top1']
        improved = score > best
        if improved:
            best, best_epoch, stale = score, epoch, 0
        else:
            stale += 1
        rngs = gather_rng_states(rng_state(), info)
        if info.is_main:
            row = dict(epoch=epoch, lr=train_stats['lr'], train_loss=train_stats['train_loss'],
                       val_loss=val_stats['val_loss'], top1=val_stats['top1'], top5=val_stats['top5'],
                       epoch_seconds=time.time() - epoch_start,
                       train_images_per_s=train_stats['train_images_per_s'])
            row.update({k: v for k, v in train_stats.items() if k.startswith('train_') and k not in row
                        and k != 'train_seconds'})
            row.update({k: v for k, v in val_stats.items() if k.startswith('val_') and k not in row
                        and k != 'val_images'})
            if ema_stats is not None:
                row.update(ema_top1=ema_stats['top1'], ema_top5=ema_stats['top5'])
            run_files.append_log_row(run_dir / 'log.csv', row)
            meta['method_cfg'] = method_cfg(model)
            state = dict(epoch=epoch, num_updates=num_updates, best_metric=best, best_epoch=best_epoch,
                         optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         scaler=scaler.state_dict() if scaler is not None else None,
                         model_ema=ema.module.state_dict() if ema is not None else None,
                         args=plain_args(args), rng=rngs, val=val_stats)
            save_atomic(make_checkpoint(meta, unwrap(model).state_dict(), **state), run_dir / 'last.pth')
            if improved:
                weights_state = (ema.module if use_ema else unwrap(model)).state_dict()
                save_atomic(make_checkpoint(meta, weights_state, epoch=epoch, best_metric=best, best_epoch=epoch,
                                            ema_weights=use_ema, args=plain_args(args),
                                            val=ema_stats if use_ema else val_stats), run_dir / 'best.pth')
        log_epoch(epoch, train_stats, val_stats, ema_stats)
        if args.early_stop and stale >= args.early_stop:
            log.info(f'no better top-1 for {stale} epochs: stopping early (--early-stop {args.early_stop})')
            break
    barrier()
    if info.is_main:
        log.info(f'best top-1 {best:.2f}% at epoch {best_epoch}; checkpoints and log in {run_dir}')
        if args.report and (run_dir / 'best.pth').exists():
            from utils.predictor import write_report
            summary = write_report(run_dir / 'best.pth', split.val, classes, run_dir / 'report', device=device,
                                   batch_size=args.batch_size, workers=args.workers, skipped=split.skipped)
            log.info(f"report of best.pth on the validation split (top-1 {summary['accuracy'] * 100:.2f}%): "
                     f"{run_dir / 'report' / 'report.html'}")
    return run_dir


def gather_rng_states(state: dict, info: DistInfo) -> list:
    """Every process's RNG state, gathered on all (so a resume restores each process's own)."""
    if not info.distributed:
        return [state]
    import torch.distributed as dist
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def plain_args(args) -> dict:
    """The run's settings as plain values (safe for ``torch.load(weights_only=True)``)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
