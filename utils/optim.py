"""AdamW through timm (weight-decay groups, optional layer decay), with a method's new parameters in a group of
their own when the method asks for a larger learning rate (``new_param_lr_scale``, e.g. DGE's routers); the peak
learning rate from ``--lr`` or ``--lr-base`` scaled by the global batch."""
from dataclasses import dataclass
from typing import Optional

import torch
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay

from models.factory import model_new_params
from models.registry import new_param_lr_scale
from utils.errors import UserError


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, layer_decay=None):
    new = set(model_new_params(model))
    scale = new_param_lr_scale(model)
    if not new or scale == 1.0:
        return create_optimizer_v2(model, opt='adamw', lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)

    def groups(m):
        skip = m.no_weight_decay() if hasattr(m, 'no_weight_decay') else set()
        base = (param_groups_layer_decay(m, weight_decay=weight_decay, no_weight_decay_list=skip,
                                         layer_decay=layer_decay) if layer_decay
                else param_groups_weight_decay(m, weight_decay=weight_decay, no_weight_decay_list=skip))
        name_of = {id(p): n for n, p in m.named_parameters()}
        for group in base:
            group['params'] = [p for p in group['params'] if name_of[id(p)] not in new]
        own = dict(params=[p for n, p in m.named_parameters() if n in new], weight_decay=0.0, lr_scale=scale)
        return [g for g in base if g['params']] + [own]

    return create_optimizer_v2(model, opt='adamw', lr=lr, weight_decay=weight_decay, param_group_fn=groups)


LR_BASE = 4e-3  # per 512 images (DeiT's reference batch): 5e-4 at batch 64, with weights or from scratch (docs/recipe.md)
LR_BASE_REFERENCE = 512
LR_BASE_SCALES = ('linear', 'sqrt')


@dataclass
class LearningRate:
    """The peak learning rate and where it came from: ``--lr`` as given, or ``--lr-base`` at ``--lr-base-size``
    images scaled to the global batch."""
    value: float
    global_batch: int
    base: Optional[float] = None
    base_size: int = LR_BASE_REFERENCE
    scale: str = 'linear'

    def __str__(self) -> str:
        if self.base is None:
            return f'{self.value:.3g} (--lr; global batch {self.global_batch})'
        ratio = f'global batch {self.global_batch} / {self.base_size}'
        return f"{self.value:.3g} (--lr-base {self.base:.3g} x {f'sqrt({ratio})' if self.scale == 'sqrt' else ratio})"


def resolve_lr(args, world_size: int) -> LearningRate:
    """``--lr`` when given; else ``--lr-base`` times the global batch (per-process batch x processes x accumulation
    steps) over ``--lr-base-size``, to the power 1 (``--lr-base-scale linear``, DeiT's main.py) or 1/2 (``sqrt``,
    timm's train.py for Adam-family optimizers). The default ``--lr-base`` (LR_BASE) is per 512 images, restated per
    ``--lr-base-size`` images, so that at a global batch of ``--lr-base-size`` either scale gives the rate the
    linear rule gives there."""
    global_batch = args.batch_size * world_size * args.accum_steps
    if args.lr is not None:
        return LearningRate(args.lr, global_batch)
    if args.lr_base_size < 1:
        raise UserError(f'--lr-base-size {args.lr_base_size}: give the reference global batch, e.g. 512 or 256')
    base = args.lr_base if args.lr_base is not None else LR_BASE * args.lr_base_size / LR_BASE_REFERENCE
    ratio = global_batch / args.lr_base_size
    value = base * (ratio ** 0.5 if args.lr_base_scale == 'sqrt' else ratio)
    return LearningRate(value, global_batch, base, args.lr_base_size, args.lr_base_scale)
