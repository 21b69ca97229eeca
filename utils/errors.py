"""The one exception type for bad input, and the one error path of the command-line tools."""
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and what to do."""


class MethodConfigError(UserError, ValueError):
    """A method setting it cannot take (a ``ValueError`` too, as the methods' callers expect)."""


class Stopped(BaseException):
    """The run was stopped by a signal (``utils.stop_signals``); the message says what is kept. A
    ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` swallows it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run_cli(fn: Callable[[], object], interrupted: str = 'interrupted') -> int:
    """Run a CLI's work: 0 when it finishes; one ``error: ...`` line and 2 for bad input (``UserError``, a bad
    method setting's ``MethodConfigError`` among them; any other exception is a bug and keeps its traceback);
    ``interrupted`` and 130 on Ctrl-C; a ``Stopped`` run's message and the shell's code for its signal. File names
    that are not UTF-8 (surrogate escapes) are printed with their bytes escaped instead of failing to print."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, 'reconfigure'):
            stream.reconfigure(errors='backslashreplace')
    try:
        fn()
    except UserError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    except Stopped as stop:
        print(stop, file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    return 0
