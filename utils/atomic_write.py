"""Files and folders that are either whole or untouched: written beside their final name, then renamed."""
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Collection

from utils.errors import UserError


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


def write_failure(err: BaseException) -> str:
    """The cause of a failed write in a few words: the OS's reason where an ``OSError`` is in the chain."""
    cause = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:120]


@contextmanager
def replaced_folder(folder, replaceable: Collection[str], flag: str):
    """Yield a new hidden folder beside ``folder`` to write into; when the block ends it takes ``folder``'s place
    whole. An existing ``folder`` is replaced only when it holds nothing but names in ``replaceable`` (an
    earlier output of the same kind), else refused up front, as is a place that cannot be written (``flag``
    names the option to change). On any failure or interruption ``folder`` is left as it was."""
    folder = Path(folder).resolve() if Path(folder).is_symlink() else Path(folder)  # a link keeps pointing there
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} '{folder}' is a file; pass a folder (new or empty)")
    try:
        others = sorted(set(os.listdir(folder)) - set(replaceable)) if folder.is_dir() else []
    except OSError as err:
        raise UserError(f"cannot read {flag} '{folder}' ({write_failure(err)}); choose another {flag}") from None
    if others:
        raise UserError(f"{flag} '{folder}' holds files other than an earlier output ({', '.join(others[:3])}"
                        f"{' ...' if len(others) > 3 else ''}); choose a new or empty folder (nothing there is "
                        f"changed)")
    staging, old = (folder.with_name(f'.{folder.name}.{kind}-{os.getpid()}') for kind in ('partial', 'old'))
    try:
        try:
            staging.mkdir(parents=True)
        except OSError as err:
            raise UserError(f"cannot write in '{folder.parent}' ({write_failure(err)}); choose another "
                            f"{flag}") from None
        yield staging
        if folder.is_dir():
            os.replace(folder, old)
        try:
            os.replace(staging, folder)
        except OSError:
            if old.is_dir():
                os.replace(old, folder)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as err:  # a full disk, a folder it may not write
        raise UserError(f"cannot write '{folder}' ({write_failure(err)}); it is as it was before; free disk space "
                        f"or choose another {flag}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    sync_folder(folder.parent)
