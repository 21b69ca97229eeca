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


STAGING = '.partial-'  # the name (prefix) of a folder being written; one left by a killed run is replaced too


@contextmanager
def replaced_folder(folder, replaceable: Collection[str], flag: str):
    """Yield a new hidden folder to write into; when the block ends its files take the place of ``folder``'s.

    A new ``folder``: the hidden one is written beside it and renamed to it, whole. An existing ``folder`` stays
    where it is (a mount point, a link, a folder in a place this user may not write): the hidden one is written
    inside it, then the earlier output's files are removed and the new ones renamed into it. It is used only
    when it holds nothing but names in ``replaceable`` (an earlier output of the same kind), else refused up
    front, as is a place that cannot be written (``flag`` names the option to change). On a failure or an
    interruption before the block ends, ``folder`` is left as it was."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} '{folder}' is a file; pass a folder (new or empty)")
    existed = folder.is_dir()
    try:
        earlier = os.listdir(folder) if existed else []
    except OSError as err:
        raise UserError(f"cannot read {flag} '{folder}' ({write_failure(err)}); choose another {flag}") from None
    others = sorted(n for n in earlier if n not in replaceable and not n.startswith(STAGING))
    if others:
        raise UserError(f"{flag} '{folder}' holds files other than an earlier output ({', '.join(others[:3])}"
                        f"{' ...' if len(others) > 3 else ''}); choose a new or empty folder (nothing there is "
                        f"changed)")
    staging = folder / f'{STAGING}{os.getpid()}' if existed else folder.with_name(f'.{folder.name}{STAGING}'
                                                                                  f'{os.getpid()}')
    try:
        try:
            staging.mkdir(parents=True)
        except OSError as err:
            raise UserError(f"cannot write in '{staging.parent}' ({write_failure(err)}); choose another "
                            f"{flag}") from None
        yield staging
        if existed:
            for path in (folder / name for name in earlier):
                (shutil.rmtree if path.is_dir() and not path.is_symlink() else os.remove)(path)
            for entry in staging.iterdir():
                os.replace(entry, folder / entry.name)
        else:
            os.replace(staging, folder)
    except OSError as err:  # a full disk, a folder it may not write
        raise UserError(f"cannot write '{folder}' ({write_failure(err)}); free disk space or choose another "
                        f"{flag}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    sync_folder(folder)
