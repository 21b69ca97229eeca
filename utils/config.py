"""Flags from three places, in rising priority: parser defaults, a resumed run's settings / a YAML
``--config`` file, and the command line itself."""
import argparse
import ast
import json
from pathlib import Path
from typing import List, Optional

import yaml

from utils.errors import UserError


def parse_key_values(items: Optional[List[str]]) -> dict:
    """``['depth=4', 'embed_dim=64']`` -> ``{'depth': 4, 'embed_dim': 64}`` (values as Python literals)."""
    if isinstance(items, dict):  # already parsed (a resumed run's or a YAML file's settings)
        return dict(items)
    out = {}
    for item in items or []:
        key, sep, value = str(item).partition('=')
        if not sep or not key:
            raise UserError(f"'{item}' is not KEY=VALUE (e.g. --model-kwargs depth=6 embed_dim=192)")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def given_flags(make_parser, argv) -> set:
    """Destinations of the flags on the command line ``argv`` of ``make_parser()``'s CLI, whatever their value
    (a flag given at its default value counts)."""
    parser = make_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of flag: value")
    data.pop('run_info', None)  # what a run's config.yaml records about itself, not a setting
    return {k.replace('-', '_'): v for k, v in data.items()}


BOOLEAN_ACTIONS = (argparse.BooleanOptionalAction, argparse._StoreTrueAction, argparse._StoreFalseAction)
KEY_VALUE = 'KEY=VALUE'  # the metavar of a flag of KEY=VALUE items, which a config file may also give as a mapping


class _Mistyped(Exception):
    """A config value that its flag would not take."""


def _element(action: argparse.Action, value):
    """``value`` as one item of ``action``'s type: int (no bool, no 2.0), float (or int), else a string (or scalar)."""
    if isinstance(value, bool):
        raise _Mistyped
    if action.type is int and isinstance(value, int):
        return value
    if action.type is float and isinstance(value, (int, float)):
        return float(value)
    if action.type not in (int, float) and not isinstance(value, (list, tuple, dict, type(None))):
        return str(value)  # a YAML number or date where the flag takes a string: its text
    raise _Mistyped


def _is_list(action: argparse.Action) -> bool:
    return isinstance(action.nargs, int) or action.nargs in ('*', '+')


def _expected(action: argparse.Action) -> str:
    """What ``action`` takes, in words."""
    if isinstance(action, BOOLEAN_ACTIONS):
        return 'true or false'
    if action.metavar == KEY_VALUE:
        return f'a list of {KEY_VALUE} strings, or a mapping'
    one, many = {int: ('an integer', 'integers'), float: ('a number', 'numbers')}.get(action.type,
                                                                                       ('a string', 'strings'))
    if action.choices is not None:
        one = f"one of {', '.join(map(str, action.choices))}"
    if isinstance(action.nargs, int):
        return f'a list of {action.nargs} {many}'
    if action.nargs in ('*', '+'):
        return f"a list of {'one or more ' if action.nargs == '+' else ''}{many}"
    if action.nargs == '?' and isinstance(action.const, bool):
        return f'true, false or {one}'
    return one


def _typed(action: argparse.Action, value):
    """``value`` as ``action`` would store it from the command line; ``_Mistyped`` when it would not take it."""
    if isinstance(action, BOOLEAN_ACTIONS) or (action.nargs == '?' and isinstance(action.const, bool)):
        if isinstance(value, bool):
            return value
        if isinstance(action, BOOLEAN_ACTIONS):
            raise _Mistyped
    if action.metavar == KEY_VALUE and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return dict(value)
    if _is_list(action):
        if not isinstance(value, (list, tuple)) or (action.nargs == '+' and not value) or \
                (isinstance(action.nargs, int) and len(value) != action.nargs):
            raise _Mistyped
        items = [_element(action, v) for v in value]
    else:
        items = [_element(action, value)]
    if action.choices is not None and any(v not in action.choices for v in items):
        raise _Mistyped
    if action.metavar == KEY_VALUE and not all(v.partition('=')[0] and '=' in v for v in items):
        raise _Mistyped
    return items if _is_list(action) else items[0]


def _setting_names(actions) -> dict:
    """Every long name of a flag as a config key -> the setting it stores (``num_classes`` -> ``nb_classes``, for
    ``--nb-classes, --num-classes``), so a file may use either name; the negative ``--no-X`` names are left out."""
    return {option[2:].replace('-', '_'): action.dest for action in actions for option in action.option_strings
            if option.startswith('--') and not (isinstance(action, argparse.BooleanOptionalAction)
                                                and option.startswith('--no-'))}


def check_config(parser: argparse.ArgumentParser, settings: dict, path, nullable=()) -> dict:
    """``settings`` of the config file ``path`` typed as their flags in ``parser`` take them (a number for a float
    flag becomes a float, one for a string flag a string); anything else is a one-line ``UserError`` naming the
    file, the key and the type. An integer flag refuses 2.0, as on its command line; ``null`` is taken where the
    flag's default is None or the key is in ``nullable``. A key may be any long name of its flag (timm's
    ``num_classes`` for ``nb_classes``); the setting's own name is returned. Unknown keys, and those of flags that
    store no setting (--help), are left to ``parse_layered``."""
    actions = {a.dest: a for a in parser._actions if a.nargs != 0 or isinstance(a, BOOLEAN_ACTIONS)}
    names, out, named = _setting_names(actions.values()), {}, {}
    for name, value in settings.items():
        key = names.get(name, name)
        if key in named:
            raise UserError(f"config file '{path}': {named[key]} and {name} are the same setting; keep one")
        named[key] = name
        action = actions.get(key)
        if action is None or (value is None and (action.default is None or key in nullable)):
            out[key] = value
            continue
        try:
            out[key] = _typed(action, value)
        except _Mistyped:
            shown, flag = json.dumps(value, default=str), (action.option_strings or [key])[0]
            raise UserError(f"config file '{path}': {key}: expected {_expected(action)} (as {flag} takes), "
                            f"got {shown[:60]}{'...' if len(shown) > 60 else ''}") from None
    return out


def parse_layered(parser: argparse.ArgumentParser, argv=None, *layers: dict) -> argparse.Namespace:
    """Parse ``argv`` with each mapping in ``layers`` applied over the defaults in turn."""
    known = {a.dest for a in parser._actions}
    for layer in layers:
        unknown = sorted(set(layer) - known)
        if unknown:
            raise UserError(f"unknown setting(s) {', '.join(unknown)} in the config; "
                            f"see --help for the flag names")
        parser.set_defaults(**layer)
    return parser.parse_args(argv)
