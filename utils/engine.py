"""One training loop and one evaluation for every method (DeiT's engine.py, on timm's pieces).

The loop calls the method hooks through ``models.registry`` (schedule before each step, extra loss after
the forward) and never names a method. Evaluation counts every image exactly once whatever the number of
processes (see ``utils.data.shard_sampler``: no padding on the validation side).
"""
import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from models.registry import extra_loss, method_stats, unwrap, update_schedule
from utils.distributed import all_reduce_sum, any_process
from utils.errors import UserError


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; training stops and the last good checkpoint is kept."""


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


def train_one_epoch(model: nn.Module, loader, optimizer, loss_fn: Callable, settings: StepSettings,
                    epoch: int, total_epochs: int, scheduler=None, mixup=None, ema=None,
                    num_updates: int = 0) -> dict:
    """Train one epoch; returns mean loss, lr, global images/s, updates done, and the method's stats."""
    model.train()
    steps = len(loader)
    loss_sum = seen = 0.0
    start = time.time()
    bar = tqdm(loader, desc=f'epoch {epoch}', disable=not settings.show_progress, leave=False, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(bar):
        # a batch whose files all failed to decode (already warned) is skipped by every process together,
        # so that no process waits alone in a collective
        if any_process(batch is None, settings.device):
            continue
        images, targets = _to_device(batch[0], batch[1], settings)
        n = images.shape[0]
        if mixup is not None:
            images, targets = mix(mixup, images, targets)
        update_schedule(model, epoch + step / steps, total_epochs)
        last_micro = (step + 1) % settings.accum_steps == 0 or step + 1 == steps
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            with autocast(settings):
                loss = loss_fn(model(images), targets)
                added = extra_loss(model)
                if added is not None:
                    loss = loss + added
            if any_process(not torch.isfinite(loss).item(), settings.device):
                raise NonFiniteLoss(f'the loss became {loss.item()} at epoch {epoch}, step {step}; training '
                                    f'stopped and the last good checkpoint is kept. Lower --lr, set '
                                    f'--clip-grad 1.0, or use --no-amp')
            scaled = loss / settings.accum_steps
            if settings.scaler is not None:
                settings.scaler.scale(scaled).backward()
            else:
                scaled.backward()
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
        loss_sum += loss.item() * n
        seen += n
        if settings.show_progress:
            bar.set_postfix(loss=f'{loss.item():.4f}', lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f'{seen * _world_size() / (time.time() - start):.1f}')
    if settings.device.type == 'cuda':
        torch.cuda.synchronize(settings.device)
    elapsed = time.time() - start
    totals = all_reduce_sum([loss_sum, seen], settings.device)
    stats = dict(train_loss=(totals[0] / max(totals[1], 1)).item(), lr=optimizer.param_groups[0]['lr'],
                 train_images_per_s=totals[1].item() / elapsed, train_seconds=elapsed, num_updates=num_updates)
    stats.update({f'train_{k}': v for k, v in method_stats(model).items()})
    return stats


def _world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def evaluate(model: nn.Module, loader, settings: StepSettings, num_classes: int) -> dict:
    """Loss, top-1 and top-k (k = min(5, classes)) accuracy in %, over every image once, all processes."""
    model.eval()
    k = min(5, num_classes)
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, top-1 hits, top-k hits, images
    for batch in tqdm(loader, desc='eval', disable=not settings.show_progress, leave=False, dynamic_ncols=True):
        if batch is None:
            continue
        images, targets = _to_device(batch[0], batch[1], settings)
        with autocast(settings):
            logits = model(images)
        logits = logits.float()
        sums[0] += nn.functional.cross_entropy(logits, targets, reduction='sum').item()
        top = logits.topk(k, dim=1).indices
        hits = top == targets[:, None]
        sums[1] += hits[:, 0].sum().item()
        sums[2] += hits.any(dim=1).sum().item()
        sums[3] += images.shape[0]
    loss, top1, topk, n = all_reduce_sum(sums, settings.device).tolist()
    n_safe = max(n, 1)
    stats = dict(val_loss=loss / n_safe, top1=100 * top1 / n_safe, top5=100 * topk / n_safe, val_images=int(n))
    stats.update({f'val_{k}': v for k, v in method_stats(model).items()})
    return stats
