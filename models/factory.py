"""``build_model``: a timm ViT (any name, size, image size), pretrained weights, one method.

Weights (a file, or hub weights that ``models.pretrained`` resolves) load through timm's own path: ``pretrained=True``
with ``pretrained_cfg_overlay=dict(file=...)``, or ``dict(state_dict=...)`` of the tag whose pretrained_cfg (mean,
std, crop) the model then carries. It accepts DeiT ``{'model': ...}`` .pth, timm .safetensors / .bin, drops a
classifier of another class count and resamples the position embedding to another image size. A checkpoint of
this toolkit is loaded from its own state dict instead, head included when the classes match: timm's path would
re-initialise the head whenever ``num_classes`` differs from the pretrained config's.
"""
import os
from typing import Optional, Tuple, Union

import timm
import torch
from torch import nn

from utils.errors import UserError
from .checkpoint import META_KEYS, is_toolkit_checkpoint, load_toolkit_checkpoint, read_checkpoint, weights_state
from .pretrained import HubWeights, resolve_pretrained
from .registry import apply_method, convert_pretrained, method_name, new_param_prefixes

SIZE_NAMES = {192: 'tiny', 384: 'small', 768: 'base', 1024: 'large', 1280: 'huge'}  # timm's ViT widths


def architecture(state: dict) -> dict:
    """The shape of a ViT that its state dict shows: embed width, depth, MLP width. (The number of heads does
    not show, the fused qkv weight is the same for any; another patch size is resampled by timm.)"""
    state = weights_state(state)
    arch = {}
    if 'patch_embed.proj.weight' in state:
        arch['embed width'] = state['patch_embed.proj.weight'].shape[0]
    blocks = {k.split('.')[1] for k in state if k.startswith('blocks.')}
    if blocks:
        arch['depth'] = len(blocks)
    if 'blocks.0.mlp.fc1.weight' in state:
        arch['MLP width'] = state['blocks.0.mlp.fc1.weight'].shape[0]
    return arch


def architecture_difference(state: dict, own: dict, model_name: str = 'this model') -> str:
    """One short line on how the ViT of ``state`` differs from ``own`` (a state dict), or ''."""
    theirs, ours = architecture(state), architecture(own)
    for key in ('embed width', 'depth', 'MLP width'):
        if key in theirs and key in ours and theirs[key] != ours[key]:
            size = SIZE_NAMES.get(theirs[key]) if key == 'embed width' else None
            return (f"the file holds {key} {theirs[key]}{f' (a *_{size} model)' if size else ''}; "
                    f"{model_name} has {ours[key]}")
    return ''


def _describe_mismatch(model: nn.Module, state: dict, allowed_missing=()) -> str:
    own = model.state_dict()
    cause = architecture_difference(state, own)
    if cause:
        return cause
    wrong = [f'{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}'
             for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.startswith(tuple(allowed_missing))]
    unexpected = [k for k in state if k not in own]
    parts = []
    for label, keys in (('shape differs', wrong), ('missing', missing), ('unexpected', unexpected)):
        if keys:
            parts.append(f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)} keys)")
    return '; '.join(parts)


OWN_MODEL_HINT = ("the checkpoint's weights are not those of the model it names (model_name, model_kwargs): it was "
                  "edited or mixed up; use a best.pth / last.pth as train_gpu.py wrote it")


def load_backbone_state(model: nn.Module, state: dict, source: str, allowed_missing=(),
                        hint: str = 'check --model / --model-kwargs against the file') -> None:
    """Load ``state`` into ``model`` strictly but for ``allowed_missing`` prefixes; explain misfits."""
    problem = _describe_mismatch(model, state, allowed_missing)
    if problem:
        raise UserError(f"weights in '{source}' do not fit this model: {problem}; {hint}")
    model.load_state_dict(state, strict=False)


def _from_toolkit_checkpoint(model: nn.Module, ckpt: dict, source: str) -> None:
    """Load a toolkit checkpoint's backbone into a fresh timm model, for further fine-tuning."""
    from timm.models.vision_transformer import checkpoint_filter_fn
    state = {k: v for k, v in ckpt['model'].items() if k in model.state_dict()}
    state = checkpoint_filter_fn(state, model)  # resamples the position embedding to this image size
    own = model.state_dict()
    head_keys = [k for k in state if k.startswith(('head.', 'head_dist.')) and own[k].shape != state[k].shape]
    for k in head_keys:  # another class count: the head starts fresh, as timm does
        state[k] = own[k]
    load_backbone_state(model, state, source)


def check_is_vit(name: str, model_kwargs: Optional[dict] = None) -> None:
    """Refuse a name timm does not know, a model that is not a ViT (no ``blocks`` of ``patch_embed`` tokens) or
    ``model_kwargs`` it does not take, before anything is built: built on the meta device, it costs neither
    memory nor time."""
    if not timm.is_model(name):
        raise UserError(f"timm has no model '{name}'; use a timm ViT/DeiT name such as deit_small_patch16_224 "
                        f"(timm.list_models('*vit*') lists them)")
    try:
        with torch.device('meta'):
            probe = timm.create_model(name, **(model_kwargs or {}))
    except (TypeError, ValueError, AssertionError) as err:  # an unknown keyword, a value of the wrong type
        given = ' '.join(f'{k}={v}' for k, v in (model_kwargs or {}).items() if k != 'num_classes')
        cause = str(err).strip()[:150] or type(err).__name__
        raise UserError(f"{name} cannot be built with {given} ({cause}); check --model-kwargs: they are "
                        f"timm.create_model arguments of the model, e.g. depth=6 embed_dim=192") from None
    if not hasattr(probe, 'blocks') or not hasattr(probe, 'patch_embed'):
        raise UserError(f"'{name}' is not a Vision Transformer; use a timm ViT/DeiT name such as "
                        f"deit_small_patch16_224")


def build_model(name: str, method: str = 'none', method_cfg: Optional[dict] = None,
                num_classes: int = 1000, img_size: Optional[int] = None,
                pretrained: Union[str, bool, None] = None, **model_kwargs) -> nn.Module:
    """A timm ViT ``name`` with ``num_classes`` outputs, turned into ``method``'s variant.

    pretrained: a local weights file (DeiT/timm .pth, .safetensors, or a toolkit checkpoint), True for the
        model's default timm weights, a timm tag ('fb_in1k', 'deit_small_patch16_224.fb_in1k') or
        'hf-hub:ORG/NAME' (see ``models.pretrained``).
    model_kwargs: passed to ``timm.create_model`` (e.g. depth=4, embed_dim=64 for a tiny test model).
    """
    kwargs = dict(num_classes=num_classes, **model_kwargs)
    if img_size:
        kwargs['img_size'] = img_size
    check_is_vit(name, kwargs)
    weights = resolve_pretrained(name, pretrained)  # None, a file's path, or hub weights
    hub = isinstance(weights, HubWeights)
    label = weights.label if hub else weights
    variant = weights.variant if hub else name  # a tag's variant carries that tag's pretrained_cfg
    ckpt = weights.state_dict() if hub else read_checkpoint(weights) if weights else None
    converted = None  # (backbone, method's own parameters) of a method's official checkpoint
    try:
        if ckpt is not None and not is_toolkit_checkpoint(ckpt):
            converted = convert_pretrained(method, ckpt)
            if converted is not None:
                source = dict(state_dict=converted[0])
            else:
                source = dict(state_dict=ckpt, hf_hub_id=weights.hub_id) if hub else dict(file=os.path.abspath(weights))
            head = weights_state(ckpt if converted is None else converted[0]).get('head.weight')
            if head is not None:  # timm keeps the head when its class count is the one asked for, not the tag's
                source['num_classes'] = head.shape[0]
            with torch.device('meta'):  # the shapes of the model asked for, without memory or time
                own = timm.create_model(name, **kwargs).state_dict()
            cause = architecture_difference(ckpt if converted is None else converted[0], own, name)  # timm would load another depth half-way, silently
            if cause:
                raise UserError(f"weights in '{label}' do not fit model '{name}': {cause}; "
                                f"pass the --model these weights were made for")
            model = timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=source, **kwargs)
            model.pretrained_cfg.pop('state_dict', None)  # timm keeps the overlay there: a second copy of the weights
        else:
            model = timm.create_model(name, **kwargs)
    except RuntimeError as err:
        if ckpt is None:
            raise
        detail = str(err).splitlines()[-1].strip()[:200]
        raise UserError(f"weights in '{label}' do not fit model '{name}': {detail}; "
                        f"pass the --model these weights were made for") from None
    except (KeyError, AssertionError) as err:  # timm's filters raise these on foreign state dicts
        if ckpt is None:
            raise
        raise UserError(f"weights in '{label}' do not fit model '{name}' (key {err}); "
                        f"pass the --model these weights were made for") from None
    if ckpt is not None and is_toolkit_checkpoint(ckpt):
        _from_toolkit_checkpoint(model, ckpt, label)
    model = apply_method(model, method, method_cfg)
    if converted is not None:
        _load_method_params(model, converted[1], label)
    return model


def _load_method_params(model: nn.Module, state: dict, source: str) -> None:
    """Load the parameters a method's official checkpoint adds (shape fixes are the method's load hooks')."""
    unexpected = sorted(set(state) - set(model.state_dict()))
    if unexpected:
        raise UserError(f"weights in '{source}' hold parameters this {method_name(model)} model lacks "
                        f"({', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}); build it with the "
                        f"settings they were trained with (e.g. --mtvit-multi-scale)")
    model.load_state_dict(state, strict=False)


def model_new_params(model: nn.Module):
    """Names of parameters the method added (they start from their own initialisation)."""
    prefixes = new_param_prefixes(model)
    return [n for n, _ in model.named_parameters() if prefixes and n.startswith(prefixes)]


def model_from_checkpoint(ckpt: dict, source: str = 'checkpoint', method: Optional[str] = None,
                          method_cfg: Optional[dict] = None) -> nn.Module:
    """Rebuild the checkpoint's model with its weights; ``method``/``method_cfg`` may override the method.

    The backbone always loads strictly. Parameters a method added load when the method stays the same;
    another method starts its own new parameters from their initialisation.
    """
    model = build_model(ckpt['model_name'], 'none', None, num_classes=ckpt['num_classes'],
                        img_size=ckpt['data_config']['input_size'][-1], **ckpt['model_kwargs'])
    own = model.state_dict()
    state = ckpt['model']
    load_backbone_state(model, {k: v for k, v in state.items() if k in own}, source, hint=OWN_MODEL_HINT)
    same = method is None or method == ckpt['method']
    cfg = {**ckpt['method_cfg'], **(method_cfg or {})} if same else dict(method_cfg or {})
    model = apply_method(model, ckpt['method'] if same else method, cfg)
    if same:
        load_backbone_state(model, state, source, hint=OWN_MODEL_HINT)
    return model


def load_for_inference(path, device='cpu', method: Optional[str] = None,
                       method_cfg: Optional[dict] = None, compile_model=False) -> Tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, torch.compile'd with ``compile_model``, a --compile value: True or a
    backend; checkpoint metadata) from a toolkit checkpoint."""
    ckpt = load_toolkit_checkpoint(path)
    model = model_from_checkpoint(ckpt, str(path), method, method_cfg).to(device).eval()
    if compile_model:
        from utils.cli_args import compile_backend
        model = torch.compile(model, backend=compile_backend(compile_model))
    meta = {k: ckpt[k] for k in META_KEYS}
    meta.update(epoch=ckpt.get('epoch'), best_metric=ckpt.get('best_metric'))
    return model, meta
