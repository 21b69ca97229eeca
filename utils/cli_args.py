"""The flags the command-line tools share, each defined once, as parent parsers: a tool lists the ones it takes
in ``argparse.ArgumentParser(parents=[...])``, the way DeiT's scripts reuse ``get_args_parser(add_help=False)``.
Each call builds a new parser, so tools never share an action (``utils.config.given_flags`` changes them). The
tools' help goes through ``HelpFormatter``, which states each default once."""
import argparse
from typing import Optional

from models.registry import METHODS, add_method_args
from utils.errors import UserError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each help text, but only where it tells something: not when the text
    already says its default (``default: ...``) and not for a default of None (the text says what leaving the
    flag out does)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        if action.default is None or 'default:' in text or '%(default)' in text:
            return text
        return super()._get_help_string(action)


def check_ranges(args: argparse.Namespace, ranges: dict) -> None:
    """Refuse, in one line, a number outside its flag's interval: ``ranges`` maps a setting to an interval
    written as in maths, '[0, 1)' or '(0, inf)'. Checked after parsing, so that values from a --config file or a
    resumed run are checked too; a setting left unset (None) passes, and each number of a list is checked."""
    for dest, interval in ranges.items():
        low, high = (float(end) for end in interval[1:-1].split(','))
        values = getattr(args, dest)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value is None:
                continue
            above = low <= value if interval[0] == '[' else low < value
            below = value <= high if interval[-1] == ']' else value < high
            if not (above and below):
                raise UserError(f"--{dest.replace('_', '-')} {value} is outside {interval}, the values it can take")


def at_least(least: int):
    """An argparse ``type``: a whole number not below ``least`` (argparse's one-line error otherwise)."""
    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f'must be at least {least} (got {value})')
        return value
    return whole


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False, formatter_class=HelpFormatter)


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


def weights_flag(required: bool = True, note: str = '') -> argparse.ArgumentParser:
    """--weights, a checkpoint of train_gpu.py (export.py; optional in benchmark.py and predict.py, whose ``note``
    says what it does there)."""
    p = _parent()
    p.add_argument('--weights', required=required, help='a best.pth / last.pth written by train_gpu.py' + note)
    return p


def device_flag() -> argparse.ArgumentParser:
    """--device (train_gpu.py, predict.py, benchmark.py)."""
    p = _parent()
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    return p


def compile_flag() -> argparse.ArgumentParser:
    """--compile [BACKEND] (also timm's --torchcompile [BACKEND]) and --no-compile: the value stored is False,
    True (torch's default backend) or a backend name."""
    p = _parent()
    p.add_argument('--compile', '--torchcompile', nargs='?', const=True, default=False, metavar='BACKEND',
                   help="torch.compile the model, with torch's default backend (inductor) or BACKEND (e.g. aot_eager)")
    p.add_argument('--no-compile', dest='compile', action='store_const', const=False, default=argparse.SUPPRESS,
                   help='no torch.compile (over a --config file or a resumed run)')
    return p


def compile_backend(value) -> Optional[str]:
    """The torch.compile backend a --compile value asks for: None (off), 'inductor' (the flag alone, torch's
    default) or the name given, which must be one torch knows."""
    if value is None or value is False:
        return None
    if value is True:
        return 'inductor'
    import torch
    if value not in torch.compiler.list_backends(exclude_tags=()):
        raise UserError(f"--compile {value}: not a torch.compile backend; give e.g. inductor, aot_eager or eager "
                        f"(all: torch.compiler.list_backends(exclude_tags=())), or --compile alone for inductor")
    return value
