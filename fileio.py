"""Writing files so that nothing is lost or written elsewhere: temporary sibling then rename,
one line for a failed write of any library, locks the kernel drops when a process dies, and
the checks every user-named output gets.

Kept apart from the TensorFlow modules so that the CLI can use it before importing them.
"""
import contextlib
import errno
import fcntl
import os
import shutil
import time
from pathlib import Path

from config import UserError, one_line


def atomic_path(path):
    """A temporary sibling of `path` (hidden, same suffix, so writers still pick the format)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp{path.suffix}")


def remove(path):
    """Delete a file, link or folder at `path` without following a link; no error if absent."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


# Why a write failed, by errno. Libraries other than Python's own (TensorFlow, h5py, PyAV)
# raise errors of their own types, whose messages quote the system's words for these.
WRITE_CAUSES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EROFS: "a read-only file system", errno.ENAMETOOLONG: "the name is too long",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.EFBIG: "the file is too large for its file system or limits"}
# A failed write of unclear cause, with less than this free where it went, is put down to a full
# disk: less than the largest file written in one go (an official generator's .h5, 45 MB).
NEARLY_FULL_BYTES = 64 * 2 ** 20


def free_bytes(path):
    """Bytes free for this user on the file system of `path` (or of its nearest existing folder)."""
    for folder in (Path(path), *Path(path).absolute().parents):
        with contextlib.suppress(OSError):
            stat = os.statvfs(folder)
            return stat.f_bavail * stat.f_frsize
    return None


def stated_cause(error):
    """The WRITE_CAUSES an error of any library names, by its errno or in its message; or None."""
    if isinstance(error, OSError) and error.errno in WRITE_CAUSES:
        return WRITE_CAUSES[error.errno]
    message = str(error)
    return next((cause for number, cause in WRITE_CAUSES.items()
                 if os.strerror(number) in message), None)


def write_cause(path, error):
    """Why writing `path` failed with `error`, of any library, in a few words; None where
    `error` is not a failed write (a bug, a refusal of our own)."""
    if isinstance(error, UserError) or not isinstance(error, Exception):
        return None
    if stated_cause(error):
        return stated_cause(error)
    free = free_bytes(path)
    if free is not None and free < NEARLY_FULL_BYTES:
        return f"the disk is full: {free / 2 ** 20:.1f} MB free"
    if isinstance(error, OSError):
        return error.strerror or one_line(error)
    return None


def cannot_write(path, error, written=None):
    """The one line for `error` failing to write `path`; None where it is no failed write.
    `written`: the path the writer used (a temporary sibling), whose file system is asked."""
    cause = write_cause(written or path, error)
    return UserError(f"cannot write {path} ({cause})") if cause else None


@contextlib.contextmanager
def writing(path):
    """A block that writes `path` (a file or a folder): a failed write, whichever library
    raised it, is one line naming `path` and why; other errors pass."""
    try:
        yield
    except Exception as error:
        failed = cannot_write(path, error)
        if failed is None:
            raise
        raise failed from None


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path to write; it replaces `path` only once the block ends without error.

    Whatever stands at the temporary name beforehand (a planted link, say)
    is removed first, so a write never goes through it; `path` itself is
    replaced, never written through. On an error the temporary file (or
    folder: a SavedModel) is removed, `path` keeps its earlier content, and
    a failed write, whichever library raised it, is one line.
    """
    tmp = atomic_path(path)
    try:
        remove(tmp)
        yield tmp
        os.replace(tmp, path)
    except BaseException as error:
        # Asked before the clean-up frees the space a full disk's write took.
        failed = cannot_write(path, error, tmp)
        with contextlib.suppress(OSError):  # the clean-up never hides the first error
            remove(tmp)
        if failed:
            raise failed from None
        raise


class FileLock:
    """An exclusive lock on the file `path`, never through a link; the kernel drops it when
    the holder ends, however it ends. The holder's pid is written into the file.

    `wait` seconds: how long to wait for another holder (0: refuse at once),
    saying once whom it waits for; Ctrl-C ends the wait.
    """

    def __init__(self, path, busy_message, wait=0):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise UserError(f"{self.path} is a link; a lock is never taken through one: "
                                "remove it") from None
            raise cannot_write(self.path, error) from None
        deadline = time.monotonic() + wait
        told = False
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise UserError(busy_message.format(pid=holder)) from None
                if not told:
                    print(f"Waiting for process {holder}, which holds {self.path} ...", flush=True)
                    told = True
                time.sleep(0.2)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self):
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# A dataset being fetched or generated by another process is waited for this long at most.
DATASET_LOCK_WAIT_S = 3600


def waiting_lock(path):
    """The lock of one dataset in the cache: a second process waits for the first to finish."""
    return FileLock(path, "another process (pid {pid}) has been preparing this dataset for an "
                          f"hour ({path}); stop it or try again later", wait=DATASET_LOCK_WAIT_S)


def checked_output(path, endings=None, overwrite=False, flag="--output"):
    """A user-named output `path` as a Path, checked before any work is done; its folder made.

    Refused in one line: a name without one of `endings` ("" for a folder),
    a link, a folder where a file goes, an existing output without
    `overwrite` (a folder output is never replaced), an unwritable place.
    """
    path = Path(path)
    if endings is not None and path.suffix not in endings:
        wanted = " or ".join(e for e in endings if e) or "no extension (a folder)"
        raise UserError(f"{flag} {path} must end in {wanted}")
    folder_output = endings is not None and "" in endings
    if path.is_symlink():
        raise UserError(f"{flag} {path} is a link; outputs are never written through one")
    if path.is_dir() and not folder_output:
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and (folder_output or not overwrite):
        hint = "" if folder_output else "pass --overwrite to replace it, or "
        raise UserError(f"{flag} {path} already exists; {hint}choose another name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise cannot_write(path.parent, error) from None
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"cannot write {path} ({path.parent} is not writable)")
    return path


@contextlib.contextmanager
def user_output(path, endings=None, overwrite=False, flag="--output"):
    """checked_output, then atomic_write: the one way a user-named output is written."""
    with atomic_write(checked_output(path, endings, overwrite, flag)) as tmp:
        yield tmp
