"""Files that are either whole or untouched: written beside their final name, flushed to disk, then renamed."""
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_atomically(path, mode: str = 'wb', **open_kwargs):
    """Yield a file open on ``.NAME.PID.tmp`` beside ``path``; on leaving, flush it to disk and rename it over
    ``path``. On any failure or interruption the temporary file is removed, ``path`` is left as it was, and the
    exception goes on. The process id in the name keeps two writers of one folder apart."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        with tmp.open(mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sync_folder(path.parent)


def sync_folder(folder) -> None:
    """Make a rename in ``folder`` durable (a power loss then keeps the new file, not an empty name)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename itself is still atomic
    finally:
        os.close(fd)
