"""Atomic publishing of a folder: build it under a temporary sibling name, then rename it into place.

Readers never see a half-written folder: they only look at the final name, and ``os.rename``
within one file system is atomic. Two ways to publish:

* :func:`replace_dir` -- the folder has one fixed name (``artifacts/<name>/``,
  ``title_neighbours/``): the previous folder is renamed aside, the new one renamed in, the old
  one removed.
* :func:`publish_numbered` -- versions side by side (``exports/<name>/<version>/``): the new
  folder takes the first free number from ``version`` on; nothing is replaced.

Build the temporary folder at :func:`tmp_sibling` (same parent, so the rename stays on one file
system; readers look only at the final name, never at ``<final>.tmp-<pid>-<id>``). A killed job
leaves its temporary behind; :func:`sweep_stale_siblings` removes those whose pid no longer runs
(call it while holding the folder's lock, :mod:`micrec_tf.locks`).

Safety: a job renames or deletes only the folder it owns. :func:`check_owned_dir` (resolved
path) refuses a file-system root, the home folder, the repository, the current folder, or an
ancestor of any of them; :func:`replace_dir` applies it, takes only its own temporary sibling,
and with ``expect`` replaces an existing folder only when it holds one of the expected files.
"""
from __future__ import annotations

import os
import re
import shutil
import uuid

from micrec_tf import cli
from micrec_tf.locks import pid_alive

__all__ = ["UnsafePathError", "check_owned_dir", "check_replaceable", "tmp_sibling",
           "replace_dir", "sweep_stale_siblings", "publish_numbered"]

# The source checkout this package runs from (its parent folder).
_CODE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UnsafePathError(cli.UsageError):
    """A job was asked to write, replace or delete a folder it does not own."""


def _within(inner: str, outer: str) -> bool:
    """Whether resolved path ``inner`` is ``outer`` or lies inside it."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_owned_dir(path: str, what: str = "the output folder") -> str:
    """The resolved ``path``, after checking that a job may replace or delete things there.

    Raises :class:`UnsafePathError` (one line, naming ``what`` and the path) when ``path``
    resolves to a file-system root, a repository (the one this code runs from, or any folder
    holding ``.git``), the home folder, the current folder, or an ancestor of one of them.
    """
    real = os.path.realpath(path)
    shown = repr(path) if os.path.abspath(path) == real else f"{path!r} (= {real!r})"
    reason = None
    if os.path.dirname(real) == real:
        reason = "a file-system root"
    elif _within(os.path.realpath(_CODE_ROOT), real):
        reason = "the repository this code runs from, or a folder above it"
    elif os.path.lexists(os.path.join(real, ".git")):
        reason = "a repository (it holds .git)"
    elif _within(os.path.realpath(os.path.expanduser("~")), real):
        reason = "the home folder, or a folder above it"
    elif _within(os.path.realpath(os.getcwd()), real):
        reason = "the current folder, or a folder above it"
    if reason:
        raise UnsafePathError(f"{what} {shown} is {reason}; refusing to write or delete there: "
                              f"check the config's name and folders, or the command line")
    return real


def check_replaceable(final: str, expect=None, what: str = "the output folder") -> str:
    """:func:`check_owned_dir`, and, with ``expect`` (file names), an existing non-empty
    ``final`` must hold one of them: a previous run's output, not some other folder."""
    real = check_owned_dir(final, what)
    if expect and os.path.isdir(real):
        entries = os.listdir(real)
        if entries and not any(name in entries for name in expect):
            raise UnsafePathError(
                f"{what} {final!r} holds something else ({len(entries)} entries, no "
                f"{' or '.join(expect)}); refusing to replace it: move it away or pick another "
                f"folder")
    return real


def tmp_sibling(final: str) -> str:
    """A fresh ``<final>.tmp-<pid>-<8 hex>`` path next to ``final`` (not created)."""
    return f"{final.rstrip(os.sep)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _sibling_pattern(final: str, kind: str) -> re.Pattern:
    base = os.path.basename(os.path.abspath(final))
    return re.compile(re.escape(base) + rf"\.{kind}-(\d+)-[0-9a-f]+")


def replace_dir(tmp_dir: str, final: str, expect=None) -> None:
    """Publishes ``tmp_dir`` as ``final``, replacing what was there (renamed aside to
    ``<final>.old-<pid>-<id>`` first, removed after the new folder is in place).

    ``final`` must pass :func:`check_replaceable` (with ``expect``) and ``tmp_dir`` must be its
    own temporary sibling (:func:`tmp_sibling`); otherwise :class:`UnsafePathError`, nothing
    moved.
    """
    final = os.path.abspath(final)
    check_replaceable(final, expect)
    tmp_abs = os.path.abspath(tmp_dir)
    if (os.path.realpath(os.path.dirname(tmp_abs)) != os.path.realpath(os.path.dirname(final))
            or not _sibling_pattern(final, "tmp").fullmatch(os.path.basename(tmp_abs))):
        raise UnsafePathError(f"{tmp_dir!r} is not a temporary sibling of {final!r} "
                              f"(<name>.tmp-<pid>-<id> beside it); refusing to publish it")
    old = None
    if os.path.lexists(final):
        old = f"{final}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp_abs, final)
    if old:
        _remove(old)


def _remove(path: str) -> None:
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def sweep_stale_siblings(final: str, log=print) -> list:
    """Removes ``<final>.tmp-<pid>-*`` and ``<final>.old-<pid>-*`` left beside ``final`` by
    killed jobs (their pid no longer runs); returns the paths removed.

    Names without a pid (written before the pid was added) and those of running processes are
    kept. Call it while holding ``final``'s lock, so no live job of this machine owns them.
    """
    final = os.path.abspath(final)
    parent = os.path.dirname(final)
    if not os.path.isdir(parent):
        return []
    patterns = [_sibling_pattern(final, kind) for kind in ("tmp", "old")]
    removed = []
    for entry in sorted(os.listdir(parent)):
        match = next((m for m in (p.fullmatch(entry) for p in patterns) if m), None)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or pid_alive(pid):
            continue
        path = os.path.join(parent, entry)
        log(f"removing stale temporary folder {path} (its process {pid} no longer runs)")
        _remove(path)
        removed.append(path)
    return removed


def publish_numbered(tmp_dir: str, parent: str, version: int) -> int:
    """Renames ``tmp_dir`` to ``parent/<version>``; if that is taken (another process published
    it meanwhile), tries the next numbers. Returns the version published."""
    while True:
        target = os.path.join(parent, str(version))
        if not os.path.exists(target):
            try:
                os.rename(tmp_dir, target)
                return version
            except OSError:
                if not os.path.exists(target):
                    raise
        version += 1
