"""Canonical rows and the adapter protocol shared by every data source.

An adapter names its raw files and parses one raw line at a time into canonical rows. A bad line
raises :class:`RowError` with a fixed reason string; the Beam job sends it to the dead letters.
An input that is unusable as a whole (a header that does not fit, timestamps in the wrong unit)
raises :class:`InputError`: the job stops with one line naming the file (and line).
"""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Iterable, Iterator

from micrec_tf.cli import UsageError

# Dead-letter reasons (fixed strings; Beam counters are named after them).
WRONG_FIELD_COUNT = "wrong_field_count"
BAD_TIMESTAMP = "bad_timestamp"
EMPTY_ID = "empty_id"
UNKNOWN_ITEM = "unknown_item"
BAD_JSON = "bad_json"
# A user or item id holding bytes that are not valid in the source's text encoding (two such
# ids could decode to the same string, so they are never guessed at). Titles and other text
# fields keep the undecodable bytes as U+FFFD.
BAD_ENCODING = "bad_encoding"
# A later row of an item (user) id that an earlier row of the table already defined (file order,
# then line): the first row is kept, the dead letter's detail names its line.
DUPLICATE_ITEM_ID = "duplicate_item_id"
DUPLICATE_USER_ID = "duplicate_user_id"
REASONS = (WRONG_FIELD_COUNT, BAD_TIMESTAMP, EMPTY_ID, UNKNOWN_ITEM, BAD_JSON, BAD_ENCODING,
           DUPLICATE_ITEM_ID, DUPLICATE_USER_ID)
# Timestamps are Unix seconds; a larger value (the year 5138 in seconds) is a timestamp in
# milliseconds (1.7e12 today) or microseconds, not a date: see :func:`check_seconds`.
MAX_UNIX_SECONDS = 10 ** 11


class InputError(UsageError):
    """A raw input is unusable as a whole (not one bad line); the message names ``file:line``.

    A :class:`micrec_tf.cli.UsageError`: the entry points print it as one line and exit 2.
    """


def check_seconds(timestamp: int, where: str) -> int:
    """``timestamp`` if it can be Unix seconds, else :class:`InputError` naming ``where``
    (``file:line``): a value above :data:`MAX_UNIX_SECONDS` is in milliseconds (or finer), and
    read as seconds it would put every click in a session of its own."""
    if timestamp > MAX_UNIX_SECONDS:
        unit = "milliseconds" if timestamp < MAX_UNIX_SECONDS * 1000 else "microseconds or finer"
        raise InputError(f"{where}: timestamp {timestamp} looks like {unit} (expected Unix "
                         f"seconds; values above {MAX_UNIX_SECONDS:.0e} are past the year 5000): "
                         f"convert the column to seconds")
    return timestamp


class RowError(ValueError):
    """A raw line that cannot become a canonical row. ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, line: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown dead-letter reason {reason!r}; expected one of {REASONS}")
        super().__init__(f"{reason}: {detail or line!r}")
        self.reason = reason
        self.line = line
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Interaction:
    user_id: str
    item_id: str
    timestamp: int  # Unix seconds


@dataclasses.dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    tags: tuple = ()
    provider: str = ""
    extra: dict = dataclasses.field(default_factory=dict, hash=False)


@dataclasses.dataclass(frozen=True)
class User:
    user_id: str
    profile: dict = dataclasses.field(default_factory=dict, hash=False)


@dataclasses.dataclass(frozen=True)
class SourceFiles:
    """Raw files of one table: glob patterns under ``data_dir`` plus how to decode them."""

    patterns: tuple
    encoding: str = "utf-8"  # Beam reads bytes and decodes with this

    def paths(self, data_dir: str) -> list[str]:
        out = []
        for pattern in self.patterns:
            out.extend(sorted(glob.glob(os.path.join(data_dir, pattern))))
        return out


class Adapter:
    """Base class: maps a raw dataset to canonical rows, one line at a time.

    Subclasses set ``name``, the three ``*_files`` and implement the three ``parse_*`` methods.
    ``parse_*`` return a list of rows (a MIND behaviour line holds many clicks), ``[]`` for a
    header or blank line, and raise :class:`RowError` for a bad line. They must be pure functions of
    the line (Beam ships them to workers).
    """

    name = "base"
    interaction_files: SourceFiles
    item_files: SourceFiles
    user_files: SourceFiles
    user_fields: tuple = ()  # profile field names, in order
    item_extra_fields: tuple = ()  # extra categorical item fields, in order

    def parse_interaction(self, line: str) -> list[Interaction]:
        raise NotImplementedError

    def parse_item(self, line: str) -> list[Item]:
        raise NotImplementedError

    def parse_user(self, line: str) -> list[User]:
        raise NotImplementedError

    # In-memory helpers for small data and tests (the Beam job does not use these).
    def read_lines(self, files: SourceFiles, data_dir: str) -> Iterator[str]:
        import gzip

        paths = files.paths(data_dir)
        if not paths:
            raise FileNotFoundError(
                f"{self.name}: no files match {list(files.patterns)} under {data_dir!r}")
        for path in paths:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rb") as fh:
                for raw in fh:
                    yield raw.decode(files.encoding).rstrip("\r\n")


def split_fields(line: str, sep: str, expected: int | Iterable[int]) -> list[str]:
    """Splits ``line`` and checks the field count, raising ``wrong_field_count`` otherwise."""
    fields = line.split(sep)
    allowed = (expected,) if isinstance(expected, int) else tuple(expected)
    if len(fields) not in allowed:
        raise RowError(WRONG_FIELD_COUNT, line,
                       f"expected {allowed} fields separated by {sep!r}, got {len(fields)}")
    return fields


def require_id(value: str, line: str, what: str) -> str:
    value = value.strip()
    if not value:
        raise RowError(EMPTY_ID, line, f"empty {what}")
    return value


def parse_timestamp(value: str, line: str) -> int:
    try:
        ts = int(value.strip())
    except ValueError:
        raise RowError(BAD_TIMESTAMP, line, f"timestamp {value!r} is not an integer") from None
    if ts < 0:
        raise RowError(BAD_TIMESTAMP, line, f"timestamp {value!r} is negative")
    return ts
