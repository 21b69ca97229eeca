"""A run folder belongs to one run: an exclusive ``flock`` on ``RUN_FOLDER/.lock`` for as long as the run lives.

The kernel holds the lock, so a run that crashes or is killed (even with SIGKILL) releases it with its process:
there is no stale lock to clean up by hand. The file records the holder's process id, host and start time, which
the refusal of a second run names. (On network file systems Linux maps ``flock`` to POSIX record locks, which
NFSv4 honours across machines.)
"""
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Optional

from utils.errors import UserError

LOCK_NAME = '.lock'


class RunLock:
    """The claim of one run folder; ``release()`` (or the process's end) gives it up."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> 'RunLock':
        """Take the lock or refuse in one line naming the process that holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors='replace').strip() or 'another process'
                os.close(fd)
                raise UserError(f"the run folder '{self.path.parent}' is in use by {holder}; wait for that run to "
                                f"end, or pass another --output-dir") from None
            try:  # the holder may have removed the file between our open and our lock: then lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()} (started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file, then unlock (in this order, so no other run can lock a file about to go)."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
