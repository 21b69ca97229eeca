"""The method registry and the calls the engine makes on any model, whatever its method.

A method is a module in ``models/`` with:
  ``apply(model, **cfg) -> model``   turns a built timm ViT into its variant (in place); unknown keys or
                                     out-of-range values raise ``ValueError`` with a clear message;
  ``add_args(parser)``                its command-line flags (with their defaults);
  ``cfg_from_args(args) -> dict``     the ``method_cfg`` those flags describe (a flag that is None, not given
                                     on a command line that overrides a checkpoint, gives a None value).
It may also have ``convert_pretrained(checkpoint) -> (backbone, own) | None``: for a weights file of the method's
official code (e.g. MTViT's ``pos_embed_list``/``up.*``), timm's backbone state dict and the method's own
parameters, which ``build_model`` loads after ``apply``; None for any other file.
The model it returns carries ``method_name`` and ``method_cfg`` (a plain dict saved in checkpoints), and
``configure(**changes)`` for the settings that may change between forwards. It may also have:
  ``update_schedule(epoch: float, total_epochs: int)``  called by the engine before every training step
                                                       (epoch is fractional: 2.5 = half-way through epoch 2);
  ``extra_loss() -> Tensor | None``                     added to the task loss after each training forward;
  ``method_stats() -> dict``                            floats logged per epoch (keep rate, stage, compute);
  ``within_budget(val_stats: dict) -> bool``            whether an epoch's validation (with its method stats,
                                                       prefixed ``val_``) kept the method's compute budget:
                                                       best.pth prefers such epochs (DGE);
  ``new_param_prefixes``                                state-dict prefixes of parameters the method adds,
                                                       which a dense checkpoint does not have;
  ``new_param_lr_scale``                                learning-rate factor of those new parameters (1.0);
  ``token_maps_in_training``                            True when the method reduces tokens only in training
                                                       (ToE), so token maps run the model in training mode;
  ``record_tokens`` / ``token_record``                  while ``record_tokens`` is True (set by
                                                       ``record_tokens()`` below), forwards append each
                                                       block's provenance to ``token_record`` (models.provenance).
The engine, optimizer and token maps call these through the functions below and never name a method or read its
attributes.
"""
import argparse
import importlib
import inspect
from typing import Dict, List, Optional

import torch
from torch import nn

from utils.errors import MethodConfigError, UserError

METHODS = ('none', 'tome', 'gtp', 'mtvit', 'toe', 'dge')


def method_module(name: str):
    """The module that implements method ``name`` (``none`` has none)."""
    if name not in METHODS:
        raise MethodConfigError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    return None if name == 'none' else importlib.import_module(f'models.{name}')


def available_methods():
    """Methods whose module exists in this checkout."""
    found = []
    for name in METHODS:
        try:
            method_module(name)
        except ModuleNotFoundError:
            continue
        found.append(name)
    return found


def apply_method(model: nn.Module, name: str, cfg: Optional[dict] = None) -> nn.Module:
    """Turn ``model`` into method ``name``'s variant with settings ``cfg``."""
    module = method_module(name)
    if module is None:
        if cfg:
            raise MethodConfigError(f"method 'none' takes no settings, got {sorted(cfg)}")
        return model
    cfg = dict(cfg or {})
    accepted = [p for p in inspect.signature(module.apply).parameters if p != 'model']
    unknown = sorted(set(cfg) - set(accepted))
    if unknown:
        raise MethodConfigError(f"unknown {name} setting(s) {', '.join(unknown)}; {name} takes {', '.join(accepted)}")
    check_setting_types(name, cfg)
    return module.apply(model, **cfg)


def check_setting_types(name: str, cfg: dict) -> None:
    """Refuse a word (a value that is no number, list or bool: ``--sweep tome.r=x``) for a setting of method
    ``name`` that is not a word."""
    parameters = inspect.signature(method_module(name).apply).parameters
    for key, value in cfg.items():
        if key in parameters and isinstance(value, str) and parameters[key].annotation is not str:
            raise MethodConfigError(f"{name} {key}={value!r} is not a value of {key} (default "
                                    f"{parameters[key].default!r}); give a number, or a list such as [8, 4]")


def convert_pretrained(name: str, checkpoint: dict):
    """The method's reading of a foreign weights file as (timm backbone state dict, its own parameters), or None."""
    module = method_module(name)
    hook = getattr(module, 'convert_pretrained', None)
    return None if hook is None else hook(checkpoint)


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """Every method's flags, each in its own argument group."""
    for name in available_methods():
        module = method_module(name)
        if module is not None:
            module.add_args(parser.add_argument_group(f'{name} method'))


def method_cfg_from_args(args: argparse.Namespace) -> dict:
    """The ``method_cfg`` the flags describe; a flag value the method cannot read is a ``UserError``."""
    module = method_module(args.method)
    try:
        return {} if module is None else module.cfg_from_args(args)
    except ValueError as err:
        raise UserError(str(err)) from None


def method_flags() -> Dict[str, tuple]:
    """{flag destination: (method, flag)} of every method's flags."""
    flags = {}
    for name in available_methods():
        module = method_module(name)
        if module is not None:
            parser = argparse.ArgumentParser(add_help=False)
            module.add_args(parser)
            flags.update({a.dest: (name, a.option_strings[0]) for a in parser._actions})
    return flags


def method_cfg_from_given(args: argparse.Namespace, given) -> dict:
    """The ``method_cfg`` keys that the method flags in ``given`` (destinations of the flags on the command
    line) set for ``args.method``, whatever their value; a method flag without its ``--method`` is refused."""
    flags = method_flags()
    used = sorted(dest for dest in given if dest in flags)
    foreign = [flags[dest] for dest in used if flags[dest][0] != args.method]
    if foreign:
        methods = sorted({name for name, _ in foreign})
        named = ', '.join(flag for _, flag in foreign)
        if args.method is None:
            raise MethodConfigError(f"{named}: method flags need their --method; add --method {' / '.join(methods)}")
        raise MethodConfigError(f"{named}: not for --method {args.method} but {' / '.join(methods)}; drop them or "
                         f"change --method")
    if args.method is None:
        return {}
    # a flag not given stands as None, which every method reads as 'not set': the keys it fills are left out
    layered = argparse.Namespace(**{**vars(args), **{dest: None for dest in flags if dest not in given}})
    return {k: v for k, v in method_cfg_from_args(layered).items() if v is not None}


def method_override(args: argparse.Namespace, given):
    """(method, cfg) that a CLI's ``--method`` and the method flags in ``given`` put in place of a checkpoint's,
    or (None, None) without ``--method``."""
    cfg = method_cfg_from_given(args, given)
    return (args.method, cfg or None) if args.method else (None, None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, 'module', None) or getattr(model, '_orig_mod', None)
        if inner is None:
            return model
        model = inner


def method_name(model: nn.Module) -> str:
    return getattr(unwrap(model), 'method_name', 'none')


def method_cfg(model: nn.Module) -> dict:
    return dict(getattr(unwrap(model), 'method_cfg', {}))


def update_schedule(model: nn.Module, epoch: float, total_epochs: int) -> None:
    hook = getattr(unwrap(model), 'update_schedule', None)
    if hook is not None:
        hook(epoch, total_epochs)


def extra_loss(model: nn.Module) -> Optional[torch.Tensor]:
    hook = getattr(unwrap(model), 'extra_loss', None)
    return None if hook is None else hook()


def method_stats(model: nn.Module) -> Dict[str, float]:
    hook = getattr(unwrap(model), 'method_stats', None)
    return {} if hook is None else dict(hook())


def within_budget(model: nn.Module, val_stats: dict) -> bool:
    """Whether an epoch with these validation stats kept the method's compute budget (True without one)."""
    hook = getattr(unwrap(model), 'within_budget', None)
    return True if hook is None else bool(hook(val_stats))


def new_param_prefixes(model: nn.Module):
    return tuple(getattr(unwrap(model), 'new_param_prefixes', ()))


def new_param_lr_scale(model: nn.Module) -> float:
    """Learning-rate factor for the parameters named by ``new_param_prefixes`` (1.0: the base rate)."""
    return float(getattr(unwrap(model), 'new_param_lr_scale', 1.0))


def token_maps_in_training(model: nn.Module) -> bool:
    """Whether the method reduces tokens only in training mode, where token maps must run it."""
    return bool(getattr(unwrap(model), 'token_maps_in_training', False))


@torch.no_grad()
def record_tokens(model: nn.Module, images: torch.Tensor) -> List[dict]:
    """Run ``images`` with provenance recording on; returns the model's per-block records (models.provenance)."""
    model = unwrap(model)
    was_training = model.training
    model.train(token_maps_in_training(model))
    model.record_tokens = True
    try:
        model(images)
        return list(getattr(model, 'token_record', []))
    finally:
        model.record_tokens = False
        model.train(was_training)
