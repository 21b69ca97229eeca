"""AdamW through timm (weight-decay groups, optional layer decay), with a method's new parameters in a group of
their own when the method asks for a larger learning rate (``new_param_lr_scale``, e.g. DGE's routers)."""
import torch
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay

from models.factory import model_new_params
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
