"""Whether the export can write where it publishes, and one-line errors when a write fails.

An export publishes two things, the version folder and its TF Serving view; finding out that the
second cannot be written after the first is published leaves a half-published version behind. So
:func:`check_writable` tries every target folder first (a real probe: ``os.access`` alone trusts
the mode bits, which neither a read-only mount nor root obeys), and :func:`write_failure` turns a
failed write (a full disk, a read-only or unwritable folder, an I/O error) into one
:class:`~micrec_tf.cli.UsageError` line.
"""
from __future__ import annotations

import errno
import os
import shutil

from micrec_tf.cli import UsageError

# errno values that say "this place cannot be written", not "the export has a bug".
WRITE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EIO: "input/output error"}


def check_writable(folders, what: str = "nothing was published") -> None:
    """Creates each of ``folders`` if missing and checks that a folder can be made in it;
    ``UsageError`` ("<folder> is not writable (<why>): <what>") on the first that cannot."""
    for folder in folders:
        probe = os.path.join(folder, f".tmp-probe-{os.getpid()}")
        try:
            os.makedirs(folder, exist_ok=True)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), folder)
            os.mkdir(probe)
            os.rmdir(probe)
        except OSError as err:
            why = err.strerror or str(err)
            raise UsageError(f"{folder} is not writable ({why}): {what}") from err


def disk_full(path: str, needed: int = 1 << 20) -> bool:
    """Whether the file system of ``path`` (or of its nearest existing parent) has less than
    ``needed`` bytes free."""
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    try:
        return shutil.disk_usage(path or ".").free < needed
    except OSError:
        return False


def write_failure(err: BaseException, where: str,
                  what: str = "nothing was published") -> UsageError | None:
    """A one-line ``UsageError`` for ``err`` when it is a write that the place refused (see
    ``WRITE_ERRNOS``; TensorFlow's errors carry the message only); None for any other error."""
    code = getattr(err, "errno", None) if isinstance(err, OSError) else None
    if code not in WRITE_ERRNOS and type(err).__module__.startswith("tensorflow"):
        text = str(err).lower()
        code = next((c for c in WRITE_ERRNOS if os.strerror(c).lower() in text), None)
    if code not in WRITE_ERRNOS:
        return None
    path = getattr(err, "filename", None) or where
    return UsageError(f"{WRITE_ERRNOS[code]} while writing {path}: {what}")
