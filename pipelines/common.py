"""What every stage of the preprocessing job shares: the quiet Beam import, the side-output
tags, the per-bundle counters and the file writes.

Import this module before ``apache_beam`` (``import apache_beam`` logs ``apitools not found ...``
on the root logger otherwise): it imports Beam inside :func:`quiet_root_logger`, so a later
``import apache_beam`` is silent.

Side outputs of the stages:

- ``STATS``: ``(key, int)`` counts, summed over the job into stats.json (``CombinePerKey(sum)``).
- ``DEAD``: ``(source, path, line_number, reason, detail, raw bytes)`` rejected raw lines
  (:func:`pipelines.rows.dead_letter_record` turns one into a line of dead_letters.jsonl).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
from micrec_tf import cli

STATS = "stats"
DEAD = "dead"


@contextlib.contextmanager
def quiet_root_logger():
    """Drops what is logged on the root logger inside the block, unless ``--verbose``.

    ``import apache_beam`` warns ``apitools not found ...`` through ``logging.warning`` (the root
    logger, which :func:`micrec_tf.cli.quiet_logs` cannot target by name) on a machine without
    the Google Cloud client libraries. The NullHandler also keeps ``logging.warning`` from
    installing a root handler.
    """
    if cli.verbose_requested():
        yield
        return
    root = logging.getLogger()
    guard, errors_only = logging.NullHandler(), (lambda record: record.levelno >= logging.ERROR)
    root.addHandler(guard)
    root.addFilter(errors_only)
    try:
        yield
    finally:
        root.removeFilter(errors_only)
        root.removeHandler(guard)


with quiet_root_logger():
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.transforms.window import GlobalWindows


def windowed(value):
    """``value`` in the global window: what ``finish_bundle`` must emit."""
    return GlobalWindows.windowed_value(value)


def is_remote(path: str) -> bool:
    return "://" in path


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` (local or any Beam filesystem), creating local folders."""
    if not is_remote(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with FileSystems.create(path) as fh:
        fh.write(data)


def write_lines(path: str, lines) -> None:
    """Writes each string of ``lines`` followed by ``\\n``, UTF-8."""
    write_bytes(path, "".join(line + "\n" for line in lines).encode("utf-8"))


class BundleCounter:
    """Mixin of a DoFn: counts per bundle, emitted once at finish_bundle on the STATS output."""

    def _reset_stats(self):
        self._stats = collections.Counter()

    def _flush_stats(self):
        for key, value in sorted(self._stats.items()):
            yield beam.pvalue.TaggedOutput(STATS, windowed((key, value)))
        self._stats = collections.Counter()

