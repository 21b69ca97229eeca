"""One training loop and one evaluation for every method (DeiT's engine.py, on timm's pieces).

The loop calls the method hooks through ``models.registry`` (schedule before each step, extra loss after
the forward) and a run's per-batch input transform (a curriculum's, ``utils.curriculum``), and never names a
method or a curriculum. Evaluation counts every image exactly once whatever the number of
processes (see ``utils.data.shard_sampler``: no padding on the validation side).
"""
import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from models.registry import extra_loss, method_stats, unwrap, update_schedule
from utils.distributed import all_reduce_sum, any_process
from utils.errors import UserError


class Diverged(UserError):
    """The loss, the weights or the validation loss became NaN or infinite; the run stops before saving them."""


@dataclass
class StepSettings:
    """How a training step runs: precision, accumulation, clipping."""
    device: torch.device
    amp_dtype: Optional[torch.dtype] = None
    scaler: Optional[torch.amp.GradScaler] = None
    accum_steps: int = 1
    clip_grad: Optional[float] = None
    channels_last: bool = False
    show_progress: bool = True
    log_interval: int = 50  # steps between host syncs (loss check, progress bar), as timm's --log-interval


def amp_settings(enabled: bool, device: torch.device):
    """bf16 where the GPU supports it, else fp16 with a grad scaler; full precision on the CPU."""
    if not enabled or device.type != 'cuda':
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler('cuda')


def autocast(settings: StepSettings):
    if settings.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(settings.device.type, dtype=settings.amp_dtype)


def _to_device(images, targets, settings: StepSettings):
    images = images.to(settings.device, non_blocking=True)
    if settings.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(settings.device, non_blocking=True)


def mix(mixup, images, targets):
    """timm's Mixup / CutMix on any batch size: an odd batch (an odd --batch-size, or a file that failed to
    decode) gets its last image once more, as timm pairs images two by two. No batch is dropped, so every
    process still takes the same number of steps."""
    if len(images) % 2:
        images, targets = torch.cat([images, images[-1:]]), torch.cat([targets, targets[-1:]])
    return mixup(images, targets)


def check_finite(loss_sum: torch.Tensor, epoch: int, first: int, last: int) -> float:
    """Stop the run when a loss of steps ``first``..``last`` was NaN or infinite on any process: the epoch's running
    sum of the losses (on the device) turns NaN or infinite with the first such loss and stays so. Checked every
    ``log_interval`` steps and at the end of the epoch (one host sync each), so the run stops before any checkpoint
    of the damaged weights is written. Returns the sum (the host sync's value, for the step's log)."""
    value = loss_sum.item()
    if any_process(not math.isfinite(value)):
        raise Diverged(f'the loss became {value if not math.isfinite(value) else "non-finite on another process"} '
                       f'at epoch {epoch}, steps {first}-{last}; training stopped')
    return value


def train_one_epoch(model: nn.Module, loader, optimizer, loss_fn: Callable, settings: StepSettings,
                    epoch: int, total_epochs: int, scheduler=None, mixup=None, ema=None,
                    num_updates: int = 0, input_transform: Optional[Callable] = None,
                    failed: Optional[list] = None, loss_term: Optional[Callable] = None,
                    log_step: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Train one epoch; returns mean loss, lr, global images/s, updates done, and the method's stats.
    ``input_transform`` changes each batch of images on the device, before Mixup (a curriculum's crop). The
    ``LoadFailure`` of each file that failed to load (on this process) is added to ``failed``.
    ``loss_term(images, logits, loss)`` returns the loss with a run's term on the same images (a teacher's
    distillation, ``utils.distillation``). ``log_step(updates, {'loss': ..., 'lr': ...})`` gets, every
    ``log_interval`` steps, the mean loss of this process's images since its last call (experiment trackers)."""
    model.train()
    steps = len(loader)
    seen = 0
    start = time.time()
    bar = tqdm(loader, desc=f'epoch {epoch}', disable=not settings.show_progress, leave=False, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=settings.device)  # on the device: no host sync per step
    first_unchecked = 0
    logged = (0.0, 0)  # loss_sum and seen at the last log_step
    for step, batch in enumerate(bar):
        if failed is not None:
            failed += batch.failed
        # a batch whose files all failed to decode (already warned) is skipped by every process together,
        # so that no process waits alone in a collective
        if any_process(batch.images is None):
            continue
        images, targets = _to_device(batch.images, batch.targets, settings)
        n = images.shape[0]
        if input_transform is not None:
            images = input_transform(images)
        if mixup is not None:
            images, targets = mix(mixup, images, targets)
        update_schedule(model, epoch + step / steps, total_epochs)
        last_micro = (step + 1) % settings.accum_steps == 0 or step + 1 == steps
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            with autocast(settings):
                logits = model(images)
                loss = loss_fn(logits, targets)
                if loss_term is not None:
                    loss = loss_term(images, logits, loss)
                added = extra_loss(model)
                if added is not None:
                    loss = loss + added
            scaled = loss / settings.accum_steps if settings.accum_steps > 1 else loss
            if settings.scaler is not None:
                settings.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        loss_sum.add_(loss.detach().float(), alpha=n)  # one kernel a step: the mean loss and the NaN check
        if (step + 1) % settings.log_interval == 0:
            checked_sum = check_finite(loss_sum, epoch, first_unchecked, step)
            first_unchecked = step + 1
            if settings.show_progress:
                bar.set_postfix(loss=f'{loss.item():.4f}', lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                img_s=f'{(seen + n) * _world_size() / (time.time() - start):.1f}')
        if last_micro:
            if settings.clip_grad:
                if settings.scaler is not None:
                    settings.scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
            if settings.scaler is not None:
                settings.scaler.step(optimizer)
                settings.scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=num_updates)
            if ema is not None:
                ema.update(unwrap(model), step=num_updates)
        seen += n
        if log_step is not None and (step + 1) % settings.log_interval == 0:
            log_step(num_updates, dict(loss=(checked_sum - logged[0]) / max(seen - logged[1], 1),
                                       lr=optimizer.param_groups[0]['lr']))
            logged = (checked_sum, seen)  # the sum the check above read: no second host sync
    epoch_sum = check_finite(loss_sum, epoch, first_unchecked, steps - 1)
    if settings.device.type == 'cuda':
        torch.cuda.synchronize(settings.device)
    elapsed = time.time() - start
    totals = all_reduce_sum([epoch_sum, seen], settings.device)
    stats = dict(train_loss=(totals[0] / max(totals[1], 1)).item(), lr=optimizer.param_groups[0]['lr'],
                 train_images_per_s=totals[1].item() / elapsed, train_seconds=elapsed, num_updates=num_updates)
    stats.update({f'train_{k}': v for k, v in method_stats(model).items()})
    return stats


def _world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def evaluate(model: nn.Module, loader, settings: StepSettings, num_classes: int, failed: Optional[list] = None) -> dict:
    """Loss, top-1 and top-k (k = min(5, classes)) accuracy in % and macro F1 in % (scikit-learn's: the mean
    over the classes that occur in the targets or the predictions), over every image once, all processes. The
    ``LoadFailure`` of each file that failed to load (on this process) is added to ``failed``."""
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64, device=settings.device)  # loss, top-1 hits, top-k hits, images
    counts = torch.zeros(3, num_classes, dtype=torch.float64, device=settings.device)  # hits, predicted, true
    for batch in tqdm(loader, desc='eval', disable=not settings.show_progress, leave=False, dynamic_ncols=True):
        if failed is not None:
            failed += batch.failed
        if batch.images is None:
            continue
        images, targets = _to_device(batch.images, batch.targets, settings)
        with autocast(settings):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(k, dim=1).indices
        hits = top == targets[:, None]
        sums += torch.stack([nn.functional.cross_entropy(logits, targets, reduction='sum'), hits[:, 0].sum(),
                             hits.any(dim=1).sum(), torch.tensor(len(targets), device=targets.device)]).double()
        predicted = top[:, 0]
        for row, labels in enumerate((predicted[hits[:, 0]], predicted, targets)):
            counts[row] += torch.bincount(labels, minlength=num_classes).double()
    loss, top1, topk, n = all_reduce_sum(sums.tolist(), settings.device).tolist()
    hits, predicted, true = all_reduce_sum(counts.tolist(), settings.device)
    present = (predicted + true) > 0
    f1 = (2 * hits[present] / (predicted + true)[present]).mean().item() if present.any() else 0.0
    n_safe = max(n, 1)
    stats = dict(val_loss=loss / n_safe, top1=100 * top1 / n_safe, top5=100 * topk / n_safe, macro_f1=100 * f1,
                 val_images=int(n))
    stats.update({f'val_{k}': v for k, v in method_stats(model).items()})
    return stats
