"""Flags from three places, in rising priority: parser defaults, a resumed run's settings / a YAML
``--config`` file, and the command line itself."""
import argparse
import ast
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
