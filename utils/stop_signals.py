"""SIGTERM (what schedulers send before they preempt a job) and SIGINT (Ctrl-C) stop a run cleanly.

While ``stop_on_signals`` is active, the first of them raises ``Stopped`` in the main thread, and the trainer
says which checkpoint holds which epoch; the CLI exits with the shell's code for the signal (130 for SIGINT,
143 for SIGTERM). Inside ``writes_finish_first`` (the end of an epoch: best.pth, last.pth, the log row) the
signal waits until the block is done, so a run never stops with half its epoch's files written; ``torch.save``
would not pass an exception raised inside its writer on anyway. Later signals are ignored while the run
stops. The data loader's worker processes ignore both (``ignore_in_worker``; PyTorch's own SIGTERM handler
would end them, and the main process with a DataLoader error): the main process shuts them down.
"""
import os
import signal
import threading
from contextlib import contextmanager
from typing import List, Optional

from utils.errors import Stopped

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _SignalStop:
    """The state of the active ``stop_on_signals``: the signal received, and whether it must wait."""

    def __init__(self):
        self.owner = os.getpid()
        self.received: List[int] = []
        self.deferring = False

    def handle(self, signum, frame) -> None:
        if os.getpid() != self.owner or self.received:  # a forked process, or a second signal while stopping
            return
        self.received.append(signum)
        if not self.deferring:
            self.stop()

    def stop(self) -> None:
        signum = self.received[0]
        raise Stopped(f'stopped by {signal.Signals(signum).name}', 128 + signum)


_active: Optional[_SignalStop] = None


@contextmanager
def stop_on_signals():
    """Turn SIGINT / SIGTERM into ``Stopped`` inside the block (only the main thread can take signals)."""
    global _active
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state, outer = _SignalStop(), _active
    previous = {sig: signal.signal(sig, state.handle) for sig in STOP_SIGNALS}
    _active = state
    try:
        yield
    finally:
        _active = outer
        for sig, old in previous.items():
            signal.signal(sig, old)


def ignore_in_worker(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker leaves SIGINT / SIGTERM to the main process."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextmanager
def writes_finish_first():
    """A signal that comes inside the block stops the run when the block has finished."""
    state = _active
    if state is None or state.deferring:
        yield
        return
    state.deferring = True
    try:
        yield
    finally:
        state.deferring = False
    if state.received:
        state.stop()
