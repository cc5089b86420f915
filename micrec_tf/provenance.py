"""Which code produced a result: the package version and the git commit of the checkout.

The one git probe of the project (the export's metadata.json ``code_version`` and the benchmark
report's machine block use it).
"""
from __future__ import annotations

import os
import subprocess

__all__ = ["repo_root", "git_state", "code_version"]


def repo_root() -> str:
    """The checkout holding the ``micrec_tf`` package (its parent folder)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_state(root: str | None = None) -> tuple:
    """``(commit sha | None, dirty bool | None)`` of the git checkout at ``root`` (default:
    :func:`repo_root`); ``None`` where git is missing, times out, or ``root`` is no checkout.
    Dirty = tracked files modified (untracked files do not count)."""
    root = root or repo_root()
    commit = dirty = None
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if sha.returncode == 0 and sha.stdout.strip():
            commit = sha.stdout.strip()
            st = subprocess.run(["git", "-C", root, "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True,
                                timeout=10)
            dirty = bool(st.stdout.strip()) if st.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return commit, dirty


def code_version() -> dict:
    """``{"micrec_tf": __version__, "git_commit": sha | None, "git_dirty": bool | None}``."""
    import micrec_tf

    commit, dirty = git_state()
    return {"micrec_tf": micrec_tf.__version__, "git_commit": commit, "git_dirty": dirty}
