"""Durable file writes: a crash mid-write never leaves half a checkpoint, manifest or ledger.

A file is written to a temporary name beside its target, flushed to the disk
(``fsync``), renamed over the target, and then the folder itself is flushed, so
the rename survives a power cut too. Without the two flushes a crash shortly
after a "successful" write can leave an empty file under the real name (the
rename reached the disk, the data did not): for a privacy ledger that is spend
forgotten.

A full disk is an ``OSError`` whose text ("No space left on device") does not
say where; ``DiskFull`` says which folder and that the previous version is intact.

Temporary names start with a dot and end in ``.tmp`` (``.ledger.json.1234.tmp``);
``remove_leftovers`` clears those a crashed writer left, for callers that know no
other writer is active (the device store, under its lock).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

FULL = (errno.ENOSPC, errno.EDQUOT)
TMP_GLOB = ".*.tmp"


class DiskFull(OSError):
    """No space left (or quota exceeded) where a file was being written."""


@contextmanager
def reporting_disk_full(path: str | Path) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised inside into a ``DiskFull`` that names ``path``."""
    try:
        yield
    except DiskFull:
        raise
    except OSError as err:
        if err.errno not in FULL:
            raise
        path = Path(path)
        raise DiskFull(err.errno, (
            f"the disk is full: no space left on the disk holding {path.parent} while "
            f"writing {path.name} ({os.strerror(err.errno)}); free some space there and "
            "try again (the previous version was left as it was)")) from err


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it, a new file) to the disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(path)`` and flush the file to the disk (no rename: for files
    inside a temporary folder that is renamed into place as a whole)."""
    path = Path(path)
    with reporting_disk_full(path):
        write(path)
        fsync_file(path)
    return path


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, flush it, move it
    into place and flush the folder. On any error the temporary file is removed
    and ``path`` keeps its previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with reporting_disk_full(path):
            write(tmp)
            fsync_file(tmp)
            tmp.replace(path)
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Remove temporary files and folders (``.*.tmp``) a crashed writer left in
    ``folder``. Only call it when no other writer can be active there."""
    removed = []
    for path in Path(folder).glob(TMP_GLOB):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
