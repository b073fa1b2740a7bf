"""Writing files so that a reader never sees half of one: write a temporary sibling, then rename.

Kept apart from the TensorFlow modules so that the CLI can use it before importing them.
"""
import contextlib
import os
import shutil
from pathlib import Path


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
