"""``train(args)``: set-up, the epoch loop, checkpoints and the final report of one training run.

The CLI (train_gpu.py) only parses flags; everything a run does is here, in the order it happens.
"""
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch import nn

from datasets.demo import make_demo_dataset
from datasets.folder import LoadFailure, Split, make_split
from datasets.transforms import Augmentation, data_config, eval_transform
from models.checkpoint import finite_state, load_resume_checkpoint, make_checkpoint, save_atomic
from models.factory import build_model, check_is_vit, load_backbone_state, model_new_params
from models.pretrained import describe_weights, wants_weights
from models.registry import method_cfg, unwrap, within_budget
from utils import run_files
from utils.cli_args import compile_backend
from utils.curriculum import Curriculum, make_curriculum
from utils.curves import add_curves_to_report, update_curves
from utils.data import class_weights, eval_loader, train_loader
from utils.distillation import load_teacher, make_distillation
from utils.distributed import DistInfo, any_process, barrier, cleanup, gather_lists, init_distributed, on_main_process
from utils.engine import Diverged, StepSettings, amp_settings, evaluate, train_one_epoch
from utils.optim import build_optimizer, resolve_lr
from utils.schedule import lr_schedule, warmup_epochs
from utils.selection import describe, metric_value, rank
from utils.errors import Stopped, UserError
from utils.rng import rng_state, seed_everything, set_rng_state
from utils.stop_signals import stop_on_signals, writes_finish_first
from utils.trackers import Trackers

log = logging.getLogger('train')
REPO = Path(__file__).resolve().parent.parent
DEMO_ROOT = REPO / 'data' / 'demo'


def check_resume_fits(ckpt: dict, args, classes) -> None:
    """A checkpoint from another model, method or class list cannot be resumed on this run, nor one that has
    trained more than --epochs."""
    problems = []
    if ckpt['model_name'] != args.model:
        problems.append(f"model {ckpt['model_name']} (this run: {args.model})")
    if ckpt['method'] != args.method:
        problems.append(f"method {ckpt['method']} (this run: {args.method})")
    if list(ckpt['class_names']) != list(classes):
        problems.append(f"classes {ckpt['class_names'][:6]} (this data: {list(classes)[:6]})")
    if ckpt.get('eval_metric', 'top1') != args.eval_metric:
        problems.append(f"--eval-metric {ckpt.get('eval_metric', 'top1')} (this run: {args.eval_metric})")
    if problems:
        raise UserError(f"cannot resume from '{args.resume}': it was trained with {'; '.join(problems)}; "
                        f"resume with the same settings and data, or start a new run with --pretrained")
    done = ckpt['epoch'] + 1
    if done > args.epochs:  # config.yaml would record an --epochs the run never had (equal: only the report runs)
        raise UserError(f"cannot resume '{args.resume}' with --epochs {args.epochs}: it has trained {done} epochs "
                        f"already; pass --epochs {done + 1} or more to train longer")


def log_epoch(epoch: int, train_stats: dict, val_stats: dict, ema_stats: Optional[dict], num_classes: int) -> None:
    line = (f"epoch {epoch}: train loss {train_stats['train_loss']:.4f}, val loss {val_stats['val_loss']:.4f}, "
            f"top-1 {val_stats['top1']:.2f}%, top-{min(5, num_classes)} {val_stats['top5']:.2f}%, "
            f"{train_stats['train_images_per_s']:.1f} img/s, {train_stats['train_seconds']:.1f}s")
    if ema_stats:
        line += f", EMA top-1 {ema_stats['top1']:.2f}%"
    log.info(line)


def train(args) -> Path:
    """Run the whole training described by ``args``; returns the run folder. SIGTERM / SIGINT stop it cleanly
    (``utils.stop_signals``)."""
    with stop_on_signals():
        info = init_distributed(args.device, args.local_rank, args.dist_timeout)
        try:
            return _train(args, info)
        finally:
            cleanup()


def _train(args, info: DistInfo) -> Path:
    """One run, in the order it happens (each step below is a function of this module). The run folder is
    claimed for this run alone; a divergence or a signal says which checkpoint holds which epoch."""
    seed_everything(args.seed + info.rank)
    trackers = Trackers.from_args(args, info.is_main)  # a tracker's missing package stops the run here
    resume_ckpt = load_resume_checkpoint(args.resume) if args.resume else None
    lr, warmup = resolve_lr(args, info.world_size), warmup_epochs(args)  # a bad flag is refused before the run folder
    check_is_vit(args.model, args.model_kwargs)  # and a model that is not a ViT, before the demo data too
    compile_backend(args.compile)  # and an unknown --compile backend
    teacher = load_teacher(args, info.device)  # and a --teacher that does not load
    run_dir = prepare_run_dir(args, info)
    progress, started, outcome = Progress.of(resume_ckpt, args.resume), False, 'FAILED'
    try:
        split = on_main_process(scan_data, args, resume_ckpt)
        model, meta = build_run_model(args, split.classes, resume_ckpt, info)
        if info.is_main:
            write_run_files(run_dir, args, meta, split, info, lr, warmup)
        curriculum = make_curriculum(args.curriculum, args.epochs, meta['data_config']['input_size'][-1],
                                     model.patch_embed.patch_size[0])
        curriculum.check_model(model, args.method)
        loader, val_loader = make_loaders(args, split, meta['data_config'], info, curriculum)
        opt = build_optimisation(args, model, loader, split, lr.value, warmup, info.device)
        opt.loss_term = make_distillation(teacher, args, split.classes, meta['data_config'], info.device)
        if resume_ckpt:
            resume(resume_ckpt, args, model, opt, progress, info)
        on_main_process(trackers.start, run_dir, progress.start_epoch, progress.num_updates)
        started = True
        run_epochs(run_dir, args, info, split, model, meta, loader, val_loader, opt, progress, trackers, curriculum)
        outcome = 'FINISHED'
    except Diverged as err:
        raise Diverged(f'{err}; {progress.kept(run_dir)}. Lower --lr, or set --clip-grad 1.0 (or --no-amp)') from None
    except Stopped as stop:
        outcome = 'KILLED'
        raise Stopped(f'{stop}: {progress.kept(run_dir)}', stop.exit_code) from None
    finally:
        trackers.close(outcome)
        run_files.release_run_dir(run_dir, started)
    return run_dir


def run_epochs(run_dir: Path, args, info: DistInfo, split: Split, model, meta: dict, loader, val_loader,
               opt: 'Optimisation', progress: 'Progress', trackers: Trackers, curriculum: Curriculum) -> None:
    """Train (in the curriculum's stage of the epoch) and validate each epoch, write its checkpoints and log row
    (also to curves.png and the trackers); then the final report, and best.pth's row and the report to the
    trackers."""
    train_model, eval_model = wrap_for_training(model, args, info)
    ema_model = compiled(opt.ema.module, args) if opt.ema else None
    settings = StepSettings(info.device, opt.amp_dtype, opt.scaler, args.accum_steps, args.clip_grad,
                            args.channels_last, show_progress=info.is_main, log_interval=args.log_interval)
    for epoch in range(progress.start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        stage = curriculum.set_epoch(epoch)  # before the loader's iterator starts: its workers read the stage
        epoch_start = time.time()
        failed_train, failed_val = [], []
        train_stats = train_one_epoch(train_model, loader, opt.optimizer, opt.loss_fn, settings, epoch,
                                      args.epochs, opt.scheduler, opt.mixup, opt.ema, progress.num_updates,
                                      input_transform=curriculum, failed=failed_train, loss_term=opt.loss_term,
                                      log_step=trackers.log_step if trackers else None)
        train_stats.update(stage)
        if opt.loss_term is not None:
            train_stats.update(opt.loss_term.epoch_stats())
        progress.num_updates = train_stats['num_updates']
        val_stats = evaluate(eval_model, val_loader, settings, len(split.classes), failed_val)
        ema_stats = evaluate(ema_model, val_loader, settings, len(split.classes)) if opt.ema else None
        check_diverged(epoch, val_stats, model, opt.ema)
        if epoch == 0:
            failed_train += load_unmet_files(loader, split, args, info)
        record_load_failures(run_dir, split, failed_train, failed_val, info)
        with writes_finish_first():
            row = end_epoch(run_dir, epoch, time.time() - epoch_start, train_stats, val_stats, ema_stats,
                            args, meta, model, opt, progress, info)
        if info.is_main:
            update_curves(run_dir)
            trackers.log_epoch(row)
        if args.early_stop and epoch - progress.best_epoch >= args.early_stop:
            log.info(f'no better {args.eval_metric} for {args.early_stop} epochs: stopping early '
                     f'(--early-stop {args.early_stop})')
            break
    barrier()
    if info.is_main:
        final_report(run_dir, args, split, progress, info.device)
        trackers.finish(run_dir, progress.best_epoch)


def check_diverged(epoch: int, val_stats: dict, model, ema: Optional[ModelEmaV3]) -> None:
    """Stop before any checkpoint of this epoch is written when its weights (or EMA weights) or its validation
    loss are not finite: the last update can spoil the weights after the last loss was checked."""
    spoiled = [what for what, ok in (('the weights', finite_state(unwrap(model).state_dict())),
                                     ('the EMA weights', ema is None or finite_state(ema.module.state_dict())),
                                     ('the validation loss', math.isfinite(val_stats['val_loss']))) if not ok]
    if any_process(bool(spoiled)):
        raise Diverged(f"{' and '.join(spoiled) or 'the weights on another process'} became NaN or infinite "
                       f"in epoch {epoch}; training stopped before saving them")


def _no_image(img) -> int:
    """A transform that drops the decoded image: ``load_unmet_files`` only asks whether each file loads."""
    return 0


def load_unmet_files(loader, split: Split, args, info: DistInfo) -> list:
    """The ``LoadFailure`` of the training files that the epoch just trained did not draw on any process (a
    dropped last batch, the class-balanced sampler), loaded here once, shared over the processes."""
    drawn = gather_lists(list(loader.sampler)[:len(loader) * loader.batch_size])
    unmet = sorted(set(range(len(split.train))) - set(drawn))
    failed = []
    if unmet:
        for batch in eval_loader([split.train[i] for i in unmet], _no_image, args.batch_size, args.workers,
                                 info.rank, info.world_size):
            failed += [LoadFailure(unmet[f.index], f.problem) for f in batch.failed]
    return failed


def record_load_failures(run_dir: Path, split: Split, failed_train: list, failed_val: list, info: DistInfo) -> None:
    """Files of the split that failed to load this epoch (``LoadFailure`` of any process) join skipped_files.csv
    and ``split.skipped`` (the report lists them), on process 0; by the end of the first epoch every file was met."""
    failed = gather_lists([(split.train[f.index][0], f.problem) for f in failed_train] +
                          [(split.val[f.index][0], f.problem) for f in failed_val])
    if not info.is_main or not failed:
        return
    new = run_files.add_skipped(run_dir / 'skipped_files.csv', failed)
    for file, problem in new:
        log.warning('skipping %s: %s', file, problem)
    if new:
        split.skipped.extend(new)
        log.warning(f"{len(new)} files failed to load (e.g. {new[0][0]}: {new[0][1]}); {len(split.skipped)} files "
                    f"skipped in all, listed in {run_dir / 'skipped_files.csv'}")


def prepare_run_dir(args, info: DistInfo) -> Path:
    """The data root (the built-in demo when none is given) and the run folder, the same on every process;
    the log goes to the run folder's train.log from here on."""
    if args.data_root is None and args.train_dir is None:
        args.data_root = str(make_demo_dataset(DEMO_ROOT)) if info.is_main else str(DEMO_ROOT)
        barrier()
    default = REPO / 'runs' / f"{args.model}-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    base = Path(args.data_root or '.')  # --train-dir / --val-dir are relative to --data-root, as in make_split
    data_folders = [args.data_root] + [base / d for d in (args.train_dir, args.val_dir) if d]
    run_dir = Path(on_main_process(run_files.claim_run_dir, args.output_dir, args.resume, data_folders, default))
    run_files.setup_logging(run_dir, info.is_main)
    return run_dir


def scan_data(args, resume_ckpt: Optional[dict] = None) -> Split:
    """Scan and split the data root (on process 0 only: every process trains on the same file lists); a resumed
    run checks that the data still has its classes and keeps the split it recorded (``run_files.recorded_split``)."""
    split = make_split(args.data_root, args.val_split, args.seed, args.train_dir, args.val_dir)
    classes = split.classes
    if args.nb_classes is not None and args.nb_classes != len(classes):
        raise UserError(f"--nb-classes {args.nb_classes} but '{args.data_root}' has {len(classes)} class "
                        f"folders ({', '.join(classes[:8])}{' ...' if len(classes) > 8 else ''}); "
                        f"drop --nb-classes or fix the folders")
    if resume_ckpt is None:
        return split
    check_resume_fits(resume_ckpt, args, classes)
    return run_files.recorded_split(Path(args.resume).parent, split)


def build_run_model(args, classes, resume_ckpt: Optional[dict], info: DistInfo):
    """The model on its device (pretrained weights unless resuming) and the metadata every checkpoint holds,
    with the line that says what the weights are (``weights``, also in config.yaml). Under a curriculum the model
    takes any input size (timm's ``dynamic_img_size``, which changes no weight); the checkpoints' ``model_kwargs``
    stay the user's, so predict.py and export.py build the plain full-size model."""
    pretrained = None if resume_ckpt else args.pretrained
    weights = f"weights: {args.resume} (resumed)" if resume_ckpt else describe_weights(args.model, pretrained)
    log.info(weights)
    sizes = dict(dynamic_img_size=True) if args.curriculum != 'none' else {}
    model = build_model(args.model, args.method, args.method_cfg, num_classes=len(classes),
                        img_size=args.img_size, pretrained=pretrained, drop_path_rate=args.drop_path,
                        **{**args.model_kwargs, **sizes})
    model.set_grad_checkpointing(args.grad_checkpointing)
    new_params = model_new_params(model)
    if new_params and wants_weights(pretrained):
        log.info(f'{len(new_params)} parameter tensors added by method {args.method} start from their own '
                 f'initialisation ({new_params[0]} ...)')
    meta = dict(model_name=args.model, model_kwargs=args.model_kwargs, method=args.method,
                method_cfg=method_cfg(model), num_classes=len(classes), class_names=list(classes),
                data_config=data_config(model, args.img_size, args.crop_pct, args.interpolation), weights=weights)
    model.to(info.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, meta


def write_run_files(run_dir: Path, args, meta: dict, split: Split, info: DistInfo, lr, warmup: float) -> None:
    """config.yaml, the classes and the exact split (and the files skipped) in the run folder; summary lines.
    The split's files are written once: a resumed run in its own folder keeps them as they are."""
    run_files.write_config(run_dir / 'config.yaml', args,
                           dict(weights=meta['weights'], method_cfg=meta['method_cfg'], lr=lr.value,
                                global_batch=lr.global_batch, warmup_epochs=warmup, **run_files.environment(REPO)))
    if not (run_dir / 'train_files.csv').exists():
        run_files.write_class_indices(run_dir / 'class_indices.json', split.classes)
        run_files.write_file_list(run_dir / 'train_files.csv', split.train, split.classes)
        run_files.write_file_list(run_dir / 'val_files.csv', split.val, split.classes)
        if split.skipped:
            run_files.write_skipped(run_dir / 'skipped_files.csv', split.skipped)
    log.info(f"data: {len(split.train)} train / {len(split.val)} val images, {len(split.classes)} classes, "
             f"{len(split.skipped)} files skipped; model {args.model} + {args.method} "
             f"{meta['method_cfg'] or '(dense)'} on {info.device}, world size {info.world_size}; run folder {run_dir}")
    log.info(f'{args.epochs} epochs, learning rate {lr}, warm-up {warmup:g} epochs')


def make_loaders(args, split: Split, cfg: dict, info: DistInfo, curriculum: Curriculum):
    pin = info.device.type == 'cuda'
    loader = train_loader(split.train, curriculum.train_transform(cfg, Augmentation.from_args(args)), args.batch_size,
                          args.workers, info.rank, info.world_size, args.seed, args.class_balance, pin)
    val_loader = eval_loader(split.val, eval_transform(cfg), args.batch_size, args.workers, info.rank,
                             info.world_size, pin)
    return loader, val_loader


@dataclass
class Optimisation:
    """What turns losses into updates: optimizer, per-step schedule, AMP, EMA, Mixup and the loss (and its term)."""
    optimizer: torch.optim.Optimizer
    scheduler: object
    updates_per_epoch: int
    amp_dtype: Optional[torch.dtype]
    scaler: Optional[torch.amp.GradScaler]
    ema: Optional[ModelEmaV3]
    mixup: Optional[Mixup]
    loss_fn: nn.Module
    loss_term: Optional[Callable] = None  # a term on the same images: a --teacher's (utils.distillation)


def build_optimisation(args, model, loader, split: Split, lr: float, warmup: float,
                       device: torch.device) -> Optimisation:
    optimizer = build_optimizer(model, lr, args.weight_decay, args.layer_decay)
    updates_per_epoch = math.ceil(len(loader) / args.accum_steps)
    scheduler = lr_schedule(optimizer, args.sched, lr, args.epochs, warmup, args.min_lr,
                            updates_per_epoch)
    amp_dtype, scaler = amp_settings(args.amp, device)
    ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) if args.model_ema else None
    num_classes = len(split.classes)
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=num_classes)
    weights = class_weights([t for _, t in split.train], num_classes).to(device) \
        if args.class_balance == 'weights' else None
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=0.0 if mixup else args.smoothing)
    return Optimisation(optimizer, scheduler, updates_per_epoch, amp_dtype, scaler, ema, mixup, loss_fn)


@dataclass
class Progress:
    """Where a run stands: the first epoch to train, the schedule's position in updates, best.pth's epoch, its
    value of --eval-metric and whether it kept the method's compute budget, and the last.pth written last."""
    start_epoch: int = 0
    num_updates: int = 0
    best: Optional[float] = None
    best_epoch: int = -1
    best_within_budget: bool = False
    last_epoch: int = -1
    last_path: Optional[Path] = None

    @classmethod
    def of(cls, ckpt: Optional[dict], path: Optional[str]) -> 'Progress':
        """A new run's, or that of the last.pth ``ckpt`` read from ``path`` (its updates: see ``resume``)."""
        if ckpt is None:
            return cls()
        return cls(ckpt['epoch'] + 1, 0, ckpt['best_metric'], ckpt['best_epoch'], ckpt.get('best_within_budget', True),
                   ckpt['epoch'], Path(path))

    def kept(self, run_dir: Path) -> str:
        """Which checkpoints hold which epoch, in words, for a run that stops here."""
        if self.last_path is None:
            return f'no checkpoint was written (epoch {self.start_epoch}, the first, did not finish)'
        best = run_dir / 'best.pth'
        best = f', {best} epoch {self.best_epoch}' if self.best_epoch >= 0 and best.exists() else ''
        return f'{self.last_path} holds epoch {self.last_epoch}{best}; continue with --resume {self.last_path}'


def resume(ckpt: dict, args, model, opt: Optimisation, progress: Progress, info: DistInfo) -> None:
    """Restore weights, optimizer, scaler, EMA and RNG from a last.pth; the lr schedule is rebuilt from the
    epoch, so a resume on another number of processes, --batch-size or --accum-steps keeps it in epochs."""
    load_backbone_state(model, ckpt['model'], args.resume)
    opt.optimizer.load_state_dict(ckpt['optimizer'])
    if opt.scaler is not None and ckpt.get('scaler'):
        opt.scaler.load_state_dict(ckpt['scaler'])
    if opt.ema is not None and ckpt.get('model_ema'):
        opt.ema.module.load_state_dict(ckpt['model_ema'])
    if ckpt['rng']:
        set_rng_state(ckpt['rng'][min(info.rank, len(ckpt['rng']) - 1)])
    progress.num_updates = progress.start_epoch * opt.updates_per_epoch
    opt.scheduler.step_update(progress.num_updates)
    log.info(f"resumed from '{args.resume}' at epoch {progress.start_epoch} "
             f"(best {describe(progress.best, args.eval_metric)} at epoch {progress.best_epoch})")


def compiled(model: nn.Module, args) -> nn.Module:
    """``model`` under torch.compile with --compile (its backend). The compiled module shares ``model``'s weights;
    checkpoints save ``model``'s own state dict (a compiled one's keys would start with ``_orig_mod.``)."""
    return torch.compile(model, backend=compile_backend(args.compile)) if args.compile else model


def wrap_for_training(model, args, info: DistInfo) -> Tuple[nn.Module, nn.Module]:
    """The model as the training step calls it (compiled and/or in DistributedDataParallel) and as evaluation
    calls it: the same compiled module, never in DDP (each process evaluates its own shard of the images)."""
    model = compiled(model, args)
    if not info.distributed:
        return model, model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[info.device.index] if info.device.type == 'cuda' else None), model


def end_epoch(run_dir: Path, epoch: int, seconds: float, train_stats: dict, val_stats: dict,
              ema_stats: Optional[dict], args, meta: dict, model, opt: Optimisation, progress: Progress,
              info: DistInfo) -> Optional[dict]:
    """Track the best epoch (``utils.selection``), then write best.pth (when better), last.pth, and a row of
    log.csv, in this order: a crash between two writes never leaves last.pth or the log ahead of best.pth (and a
    signal waits for all three: ``writes_finish_first``). Returns the row (None off the main process)."""
    metric = args.eval_metric
    candidates = [(val_stats, model)] + ([(ema_stats, opt.ema.module)] if ema_stats is not None else [])
    ranked = [(rank(metric_value(stats, metric), metric, within_budget(m, stats)), stats) for stats, m in candidates]
    (eligible, _), chosen = max(ranked, key=lambda pair: pair[0])  # the first (not the EMA) on a tie
    use_ema = chosen is ema_stats
    value = metric_value(chosen, metric)
    improved = progress.best is None or \
        rank(value, metric, eligible) > rank(progress.best, metric, progress.best_within_budget)
    if improved:
        progress.best, progress.best_epoch, progress.best_within_budget = value, epoch, eligible
        if not eligible:
            log.warning(f'epoch {epoch} is over the compute budget ({describe(progress.best, metric)}); it is best.pth '
                        f'only until an epoch within the budget comes')
    rngs = gather_rng_states(rng_state(), info)
    if info.is_main:
        meta['method_cfg'] = method_cfg(model)
        if improved:
            weights = (opt.ema.module if use_ema else unwrap(model)).state_dict()
            save_atomic(make_checkpoint(meta, weights, epoch=epoch, best_metric=progress.best, best_epoch=epoch,
                                        eval_metric=metric, ema_weights=use_ema, args=plain_args(args), val=chosen),
                        run_dir / 'best.pth')
        state = dict(epoch=epoch, num_updates=progress.num_updates, best_metric=progress.best,
                     best_epoch=progress.best_epoch, best_within_budget=progress.best_within_budget,
                     eval_metric=metric, optimizer=opt.optimizer.state_dict(),
                     scaler=opt.scaler.state_dict() if opt.scaler is not None else None,
                     model_ema=opt.ema.module.state_dict() if opt.ema is not None else None,
                     args=plain_args(args), rng=rngs, val=val_stats)
        save_atomic(make_checkpoint(meta, unwrap(model).state_dict(), **state), run_dir / 'last.pth')
        row = log_row(epoch, seconds, train_stats, val_stats, ema_stats)
        run_files.append_log_row(run_dir / 'log.csv', row)
    progress.last_epoch, progress.last_path = epoch, run_dir / 'last.pth'
    log_epoch(epoch, train_stats, val_stats, ema_stats, meta['num_classes'])
    return row if info.is_main else None


def log_row(epoch: int, seconds: float, train_stats: dict, val_stats: dict, ema_stats: Optional[dict]) -> dict:
    row = dict(epoch=epoch, lr=train_stats['lr'], train_loss=train_stats['train_loss'],
               val_loss=val_stats['val_loss'], top1=val_stats['top1'], top5=val_stats['top5'],
               macro_f1=val_stats['macro_f1'], epoch_seconds=seconds, train_images_per_s=train_stats['train_images_per_s'])
    row.update({k: v for k, v in train_stats.items() if k.startswith('train_') and k not in row
                and k != 'train_seconds'})
    row.update({k: v for k, v in val_stats.items() if k.startswith('val_') and k not in row and k != 'val_images'})
    if ema_stats is not None:
        row.update(ema_top1=ema_stats['top1'], ema_top5=ema_stats['top5'], ema_macro_f1=ema_stats['macro_f1'])
    return row


def final_report(run_dir: Path, args, split: Split, progress: Progress, device: torch.device) -> None:
    """The evaluation report of best.pth on the validation split (unless --no-report)."""
    log.info(f'best {describe(progress.best, args.eval_metric)} at epoch {progress.best_epoch}; checkpoints and '
             f'log in {run_dir}')
    if args.report and (run_dir / 'best.pth').exists():
        from utils.predictor import write_report
        summary = write_report(run_dir / 'best.pth', split.val, split.classes, run_dir / 'report', device=device,
                               batch_size=args.batch_size, workers=args.workers, skipped=split.skipped)
        add_curves_to_report(run_dir, run_dir / 'report')
        log.info(f"report of best.pth on the validation split (top-1 {summary['accuracy'] * 100:.2f}%): "
                 f"{run_dir / 'report' / 'report.html'}")


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
