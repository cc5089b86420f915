"""``run_state.json``: what a run folder's training did, so that export trusts only a checkpoint
written to the end under the folder's own ``config.yaml``.

Training replaces ``config.yaml`` when it starts and writes ``checkpoint/`` only when it ends, so a
training that dies in between (missing artifacts, a kill after its first backup) leaves the
previous run's weights beside the new run's config. The record closes that gap::

    {"state": "training", "config_sha256": ..., "started_at": ..., "pid": ...}
        written (atomically) by :func:`mark_training` before ``config.yaml`` is replaced;
    {"state": "finished", "config_sha256": ..., "checkpoint_sha256": ..., "started_at": ...,
     "finished_at": ...}
        written by :func:`mark_finished` after the final checkpoint and ``metrics.json``.

``config_sha256`` is the SHA-256 of the ``config.yaml`` bytes the training wrote;
``checkpoint_sha256`` that of ``checkpoint/model.index`` (the bundle's index, which holds a
checksum of every tensor, so it identifies the weights without reading them).
:func:`check_finished` (export) refuses a run whose record is not ``finished`` or whose files no
longer match it. A folder from before this record (no ``run_state.json``) is accepted when it has a
``metrics.json``: training deleted that file when it started and wrote it last, so its presence
means the latest training under this ``config.yaml`` finished; without one it is refused.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os

from micrec_tf.cli import UsageError

RUN_STATE = "run_state.json"
CHECKPOINT_INDEX = os.path.join("checkpoint", "model.index")


class RunStateError(UsageError):
    """A run folder whose checkpoint is not the finished training of its config.yaml."""


def sha256_text(text: str) -> str:
    """SHA-256 (hex) of ``text`` in UTF-8, as it is written to ``config.yaml``."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: str) -> str | None:
    """SHA-256 (hex) of the file at ``path``; None if there is none."""
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write(run_dir: str, record: dict) -> None:
    path = os.path.join(run_dir, RUN_STATE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read(run_dir: str) -> dict | None:
    """The record of ``run_dir``; None when there is none. ``RunStateError`` if unreadable."""
    path = os.path.join(run_dir, RUN_STATE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError) as err:
        raise RunStateError(f"{path} is unreadable ({err}); run `make train` again") from err
    if not isinstance(record, dict):
        raise RunStateError(f"{path} is not a run-state record; run `make train` again")
    return record


def mark_training(run_dir: str, config_text: str) -> None:
    """Records that a training of ``config_text`` starts in ``run_dir`` (call it before
    ``config.yaml`` is replaced): until :func:`mark_finished`, the folder's checkpoint is stale."""
    _write(run_dir, {"state": "training", "config_sha256": sha256_text(config_text),
                     "started_at": _now(), "pid": os.getpid()})


def mark_finished(run_dir: str, config_text: str) -> None:
    """Records that the training of ``config_text`` wrote its final checkpoint and metrics."""
    started = (read(run_dir) or {}).get("started_at")
    _write(run_dir, {"state": "finished", "config_sha256": sha256_text(config_text),
                     "checkpoint_sha256": sha256_file(os.path.join(run_dir, CHECKPOINT_INDEX)),
                     "started_at": started, "finished_at": _now()})


def check_finished(run_dir: str) -> str | None:
    """Raises :class:`RunStateError` (one line naming ``run_dir`` and the reason) unless the
    folder's checkpoint is the finished training of its ``config.yaml``; returns a note to log
    for a folder from before ``run_state.json`` (None otherwise)."""
    record = read(run_dir)
    again = "run `make train` (python -m micrec_tf.train) again"
    if record is None:
        if os.path.exists(os.path.join(run_dir, "metrics.json")):
            return (f"[export] {run_dir} predates run_state.json; its metrics.json says its "
                    "last training finished")
        raise RunStateError(
            f"{run_dir} has no run_state.json and no metrics.json: its last training did not "
            f"finish, so its checkpoint may be an older run's; {again}")
    if record.get("state") != "finished":
        raise RunStateError(
            f"{run_dir} did not finish: its training started at {record.get('started_at')} "
            f"(pid {record.get('pid')}) and never wrote a final checkpoint, so checkpoint/ "
            f"(if any) is an older run's; {again}")
    config = sha256_file(os.path.join(run_dir, "config.yaml"))
    if config != record.get("config_sha256"):
        raise RunStateError(
            f"{run_dir}/checkpoint was not written under {run_dir}/config.yaml (the config "
            f"changed after the training finished at {record.get('finished_at')}); {again}")
    if sha256_file(os.path.join(run_dir, CHECKPOINT_INDEX)) != record.get("checkpoint_sha256"):
        raise RunStateError(
            f"{run_dir}/checkpoint is not the one its training wrote (finished at "
            f"{record.get('finished_at')}): it was replaced or removed since; {again}")
    return None
