"""The flags the command-line tools share, each defined once, as parent parsers: a tool lists the ones it takes
in ``argparse.ArgumentParser(parents=[...])``, the way DeiT's scripts reuse ``get_args_parser(add_help=False)``.
Each call builds a new parser, so tools never share an action (``utils.config.given_flags`` changes them)."""
import argparse

from models.registry import METHODS, add_method_args


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def model_flags(default: str) -> argparse.ArgumentParser:
    """--model and --model-kwargs (train_gpu.py, benchmark.py)."""
    p = _parent()
    p.add_argument('--model', default=default, help='any timm ViT name')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='extra timm.create_model arguments, e.g. depth=6 embed_dim=192')
    return p


def method_flags(override: bool) -> argparse.ArgumentParser:
    """--method and every method's own flags: the method to train (train_gpu.py), or one that overrides a
    checkpoint's (``override``: predict.py, export.py)."""
    p = _parent()
    if override:
        p.add_argument('--method', choices=METHODS, help="override the checkpoint's method (e.g. tome on a dense model)")
    else:
        p.add_argument('--method', choices=METHODS, default='none', help='token-reduction method')
    add_method_args(p)
    return p


def weights_flag(required: bool = True) -> argparse.ArgumentParser:
    """--weights, a checkpoint of train_gpu.py (predict.py, export.py; optional in benchmark.py)."""
    p = _parent()
    p.add_argument('--weights', required=required, help='a best.pth / last.pth written by train_gpu.py'
                   + ('' if required else ': rows use its weights (and model)'))
    return p


def device_flag() -> argparse.ArgumentParser:
    """--device (train_gpu.py, predict.py, benchmark.py)."""
    p = _parent()
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    return p


def compile_flag() -> argparse.ArgumentParser:
    """--compile (train_gpu.py, predict.py, benchmark.py)."""
    p = _parent()
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False,
                   help='torch.compile the model (inductor); the first batches of each shape and mode compile it')
    return p
