"""Exclusive locks on the folders jobs own: one training per run folder, one preprocess per
artifacts folder, one export per export folder.

    with locks.folder_lock("runs/x", "training", "wait for it or pick another --run-dir"):
        ...  # the job

The lock is ``fcntl.flock`` on a lock file beside the folder, ``<parent>/.<folder>.lock``:
outside the folder, so a job that replaces its folder (preprocess) never deletes its own lock,
and dot-named, so it is no dataset, run or export name (``config.validate`` refuses names
with a leading dot). The kernel releases the lock when its holder exits or is killed, so a
dead job never leaves a stale lock; the holder removes the file when it releases the lock (a
killed holder leaves it behind, unlocked, and the next job takes it over). The holder writes
``<pid> <job>`` into the file; a second job does not wait: it fails at once with one line
naming that pid (:class:`FolderInUseError`, exit 2 through ``cli.run``).

Locks are advisory: only jobs that take them are kept apart. They hold on one machine (and on
file systems where ``flock`` works across clients; NFS may not), and are not taken for remote
(``gs://``) outputs.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os

from micrec_tf import cli

__all__ = ["FolderInUseError", "folder_lock", "lock_path", "pid_alive"]


class FolderInUseError(cli.UsageError):
    """Another process holds the lock of a folder; the message names it and its pid."""


def lock_path(folder: str) -> str:
    """The lock file of ``folder``: ``<parent>/.<folder name>.lock`` (parent resolved, so every
    spelling of the same folder, relative, absolute or with a trailing slash, shares one)."""
    path = os.path.abspath(folder)
    parent, base = os.path.split(path)
    if not base:  # a file-system root has no parent to hold its lock
        raise cli.UsageError(f"{folder!r} is a file-system root; no job may own it")
    return os.path.join(os.path.realpath(parent), f".{base}.lock")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, under another user
        return True
    return True


def _holder(fd: int) -> tuple:
    """``(pid or None, job or None)`` as the holder wrote them into the lock file."""
    try:
        words = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
    except OSError:
        words = []
    pid = int(words[0]) if words and words[0].isdigit() else None
    return pid, (" ".join(words[1:]) or None)


def _open_locked(path: str, folder: str, job: str, hint: str) -> int:
    """An fd of ``path`` holding its exclusive flock (the file the path names now: a holder that
    unlinked it meanwhile leaves an inode no one else can find, so try again)."""
    while True:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise cli.UsageError(f"cannot create the lock file {path} for {folder}: "
                                 f"{err.strerror}; is {os.path.dirname(path)} writable?") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            pid, holder_job = _holder(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            who = f"pid {pid}" if pid is not None else f"pid unknown, lock file {path}"
            raise FolderInUseError(f"{folder} is in use by another {holder_job or job} ({who}); "
                                   f"{hint}") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str, job: str, hint: str = "wait for it to finish"):
    """Holds the exclusive lock of ``folder`` for the ``with`` block; yields the lock file.

    ``job`` says what holds it ("training", "preprocess", "export"); ``hint`` ends the error
    another job gets meanwhile. Raises :class:`FolderInUseError` at once when another process
    (or another ``folder_lock`` of this one) holds it. The lock file is removed on release (a
    killed holder leaves it behind, unlocked; the next holder takes it over).
    """
    path = lock_path(folder)
    fd = _open_locked(path, folder, job, hint)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {job}\n".encode("utf-8"), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # still held: whoever opened this inode meanwhile retries
        os.close(fd)  # releases the lock
