"""AdamW through timm (weight-decay groups, optional layer decay), with a method's new parameters in a group of
their own when the method asks for a larger learning rate (``new_param_lr_scale``, e.g. DGE's routers); the peak
learning rate from ``--lr`` or ``--lr-base`` scaled by the global batch."""
from dataclasses import dataclass
from typing import Optional

import torch
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay

from models.factory import model_new_params
from models.pretrained import wants_weights
from models.registry import new_param_lr_scale


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


LR_BASE_SIZE = 512  # DeiT's and timm's reference batch for --lr-base
LR_BASE = dict(pretrained=5e-4, scratch=4e-3)  # per 512 images: DeiT's fine-tuning figure; 5e-4 at batch 64


@dataclass
class LearningRate:
    """The peak learning rate and where it came from: ``--lr`` as given, or ``--lr-base`` x global batch / 512."""
    value: float
    global_batch: int
    base: Optional[float] = None

    def __str__(self) -> str:
        if self.base is None:
            return f'{self.value:.3g} (--lr; global batch {self.global_batch})'
        return f'{self.value:.3g} (--lr-base {self.base:.3g} x global batch {self.global_batch} / {LR_BASE_SIZE})'


def resolve_lr(args, world_size: int) -> LearningRate:
    """``--lr`` when given; else ``--lr-base`` (default: LR_BASE for --pretrained or from scratch) scaled
    linearly by the global batch (per-process batch x processes x accumulation steps), as DeiT's main.py."""
    global_batch = args.batch_size * world_size * args.accum_steps
    if args.lr is not None:
        return LearningRate(args.lr, global_batch)
    default = LR_BASE['pretrained' if wants_weights(args.pretrained) else 'scratch']
    base = args.lr_base if args.lr_base is not None else default
    return LearningRate(base * global_batch / LR_BASE_SIZE, global_batch, base)
