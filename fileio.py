"""Writing files so that a reader never sees half of one: write a temporary sibling, then rename.

Kept apart from the TensorFlow modules so that the CLI can use it before importing them.
"""
import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from config import UserError


def atomic_path(path):
    """A temporary sibling of `path` (hidden, same suffix, so writers still pick the format)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp{path.suffix}")


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path to write; it replaces `path` only once the block ends without error.

    On an error the temporary file (or folder: a SavedModel) is removed and
    `path` keeps its earlier content.
    """
    tmp = atomic_path(path)
    try:
        yield tmp
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


@contextlib.contextmanager
def waiting_lock(path):
    """Hold an exclusive lock on the file `path`, waiting while another process holds it.

    The kernel drops it when the holder ends, however it ends.
    """
    with open(path, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        yield


def new_output(path, endings):
    """`--output` as a Path, refused in one line unless it has one of `endings`
    ("" for a folder) and does not exist yet: an export never replaces a file."""
    path = Path(path)
    if path.suffix not in endings:
        wanted = " or ".join(e for e in endings if e) or "no extension (a folder)"
        raise UserError(f"--output {path} must end in {wanted}")
    if path.exists():
        raise UserError(f"--output {path} already exists; remove it or choose another name")
    return path
