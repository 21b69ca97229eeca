"""The one exception type for bad input, and the one error path of the command-line tools."""
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and what to do."""


def run_cli(fn: Callable[[], object], interrupted: str = 'interrupted') -> int:
    """Run a CLI's work: 0 when it finishes; one ``error: ...`` line and 2 for bad input (``UserError``, or
    the ``ValueError`` of a bad method setting); ``interrupted`` and 130 on Ctrl-C."""
    try:
        fn()
    except (UserError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    return 0
