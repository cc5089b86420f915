"""Atomic publishing of a folder: build it under a temporary sibling name, then rename it into place.

Readers never see a half-written folder: they only look at the final name, and ``os.rename``
within one file system is atomic. Two ways to publish:

* :func:`replace_dir` -- the folder has one fixed name (``artifacts/<name>/``,
  ``title_neighbours/``): the previous folder is renamed aside, the new one renamed in, the old
  one removed.
* :func:`publish_numbered` -- versions side by side (``exports/<name>/<version>/``): the new
  folder takes the first free number from ``version`` on; nothing is replaced.

Build the temporary folder at :func:`tmp_sibling` (same parent, so the rename stays on one file
system; readers look only at the final name, never at ``<final>.tmp-<id>``).
"""
from __future__ import annotations

import os
import shutil
import uuid

__all__ = ["tmp_sibling", "replace_dir", "publish_numbered"]


def tmp_sibling(final: str) -> str:
    """A fresh ``<final>.tmp-<8 hex>`` path next to ``final`` (not created)."""
    return f"{final}.tmp-{uuid.uuid4().hex[:8]}"


def replace_dir(tmp_dir: str, final: str) -> None:
    """Publishes ``tmp_dir`` as ``final``, replacing what was there (renamed aside to
    ``<final>.old-<id>`` first, removed after the new folder is in place)."""
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp_dir, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


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
