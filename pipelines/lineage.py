"""Append-only vocabularies (issue 29): the previous artifacts a run grows from, its version id
and ``lineage.json``.

``preprocess.previous_artifacts`` (default ``""``: no previous artifacts, the job as before, byte
for byte, and no ``lineage.json``) names an artifacts folder. The run then keeps every line of
every ``vocab/<field>.txt`` of that folder at its line (= index) and appends the values it meets
for the first time after them (:func:`pipelines.vocab.append_order`).

**Version id** (:func:`vocab_version`): ``"sha256:"`` + the first 16 hex digits of the SHA-256
of the folder's vocabulary files: for each ``vocab/*.txt`` file in sorted name order (the
``<field>.txt`` files and ``item_id_counts.txt``), its name, a NUL byte, its byte length in
decimal, a NUL byte, then its bytes. A content hash rather than a counter: every artifacts
folder has one (those written before this module too, without writing anything new into them),
a copied folder keeps it, and two runs that give the same vocabularies give the same id.

**lineage.json** (written into an artifacts folder grown from previous artifacts only)::

    {"version": "sha256:...",            # this folder's vocab_version
     "grew_from": "sha256:...",          # the previous folder's vocab_version
     "previous_artifacts": "/abs/path",  # where the previous folder was when read
     "generation": 1,                    # previous generation + 1 (a folder without
                                         # lineage.json is generation 0)
     "item_vocabulary": "clicked",       # preprocess.item_vocabulary of this run
     "dataset": "...", "adapter": "...",
     "previous_sizes": {"item_id": 31, ...},  # vocabulary sizes, OOV slot included
     "sizes": {"item_id": 41, ...},           # (as feature_spec.json's vocab_sizes)
     "appended": {"item_id": 10, ...}}        # new lines = sizes - previous_sizes

Refusals (:class:`PreviousArtifactsError`, one line naming the value): a folder without
``stats.json`` or ``vocab/``, a file that cannot be read or parsed, another dataset or adapter
than this run's, another ``item_vocabulary`` (read from ``lineage.json``; for a folder without
one: ``clicked`` when stats.json's ``items`` < ``items_in_table``, ``catalogue`` when
``item_id_counts.txt`` holds a 0, else either: every item of the table was clicked and both
modes wrote the same files), another set of vocabulary fields (schema), and a vocabulary file
with a repeated line. After the job, :func:`check_item_rows` refuses a previous item that left
the item file (it would keep its line without an ``items.jsonl`` row).

Local folders and any Beam filesystem (``gs://...``) are read through ``FileSystems``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath

import pipelines.common  # noqa: F401  (first: it makes Beam's import quiet)
from micrec_tf.config import ConfigError
from micrec_tf.data.contract import vocab_names

from apache_beam.io.filesystems import FileSystems  # noqa: E402  (after pipelines.common)

__all__ = ["LINEAGE_FILE", "Previous", "PreviousArtifactsError", "check_item_rows",
           "lineage_record", "read_previous", "vocab_version", "write_lineage"]

LINEAGE_FILE = "lineage.json"
_COUNTS_FILE = "item_id_counts.txt"  # pipelines.vocab.ITEM_COUNTS_FILE (vocab imports us)
_KEY = "preprocess.previous_artifacts"


class PreviousArtifactsError(ConfigError):
    """The previous artifacts cannot be grown from (one line naming the folder and the value)."""


@dataclasses.dataclass(frozen=True)
class Previous:
    """The previous artifacts a run grows from.

    ``vocabs``: ``{field: (value, ...)}`` in line order (value k has index k + 1);
    ``version``: its :func:`vocab_version`; ``generation``: 0 without ``lineage.json``."""

    path: str
    version: str
    vocabs: dict
    generation: int
    item_vocabulary: str | None  # None: a first-generation folder both modes would have written

    def sizes(self) -> dict:
        return {f: len(v) + 1 for f, v in sorted(self.vocabs.items())}


def _join(*parts) -> str:
    return posixpath.join(*parts) if "://" in parts[0] else os.path.join(*parts)


def _read(path: str) -> bytes:
    with FileSystems.open(path) as fh:
        return fh.read()


def _vocab_files(art_dir: str) -> list:
    """Sorted ``[(name, path)]`` of ``<art_dir>/vocab/*.txt``."""
    pattern = _join(art_dir, "vocab", "*.txt")
    found = FileSystems.match([pattern])[0].metadata_list
    files = [(posixpath.basename(m.path.replace("\\", "/")), m.path) for m in found]
    return sorted(files)


def vocab_version(art_dir: str) -> str:
    """The version id of an artifacts folder (module doc): ``"sha256:" + 16 hex digits``."""
    h = hashlib.sha256()
    for name, path in _vocab_files(art_dir):
        data = _read(path)
        h.update(name.encode("utf-8") + b"\0" + str(len(data)).encode("ascii") + b"\0")
        h.update(data)
    return "sha256:" + h.hexdigest()[:16]


def _refuse(path: str, what: str) -> PreviousArtifactsError:
    return PreviousArtifactsError(f"{_KEY} {path!r}: {what}")


def _read_json(path: str, where: str):
    try:
        return json.loads(_read(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _refuse(where, f"cannot read {posixpath.basename(path)}: "
                             f"{type(err).__name__}: {err}".replace("\n", " ")) from None


def _read_vocab(path: str, where: str, name: str) -> tuple:
    try:
        text = _read(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise _refuse(where, f"cannot read vocab/{name}: {type(err).__name__}: "
                             f"{err}".replace("\n", " ")) from None
    values = text.split("\n")
    if values and values[-1] == "":
        values.pop()
    seen = {}
    for n, v in enumerate(values, 1):
        if v in seen:
            raise _refuse(where, f"vocab/{name} line {n} repeats line {seen[v]}: {v!r} (a "
                                 f"vocabulary value must be on one line only)")
        seen[v] = n
    return tuple(values)


def read_previous(path: str, cfg, adapter) -> Previous:
    """Reads and checks the previous artifacts for a run of ``cfg`` with ``adapter``."""
    if "://" not in path:
        path = os.path.abspath(path)
        if not os.path.isdir(path):
            raise _refuse(path, "no such folder (give an artifacts folder of an earlier "
                                "preprocess run)")
    stats_path = _join(path, "stats.json")
    if not FileSystems.exists(stats_path):
        raise _refuse(path, "not an artifacts folder (no stats.json)")
    stats = _read_json(stats_path, path)
    if not isinstance(stats, dict):
        raise _refuse(path, f"stats.json is not an object. Received: {type(stats).__name__}")
    for key, want in (("dataset", cfg.data.dataset), ("adapter", getattr(adapter, "name", ""))):
        if stats.get(key) != want:
            raise _refuse(path, f"built with {key} {stats.get(key)!r}, this run's is {want!r}")
    fields = vocab_names(tuple(adapter.user_fields), tuple(adapter.item_extra_fields))
    files = dict(_vocab_files(path))
    have = {n[:-4] for n in files if n != _COUNTS_FILE}
    if have != set(fields):
        raise _refuse(path, f"its vocabularies {sorted(have)} are not this run's schema "
                            f"{sorted(fields)} (missing {sorted(set(fields) - have)}, extra "
                            f"{sorted(have - set(fields))})")
    vocabs = {f: _read_vocab(files[f + ".txt"], path, f + ".txt") for f in fields}
    generation, item_vocabulary = 0, None
    lineage_path = _join(path, LINEAGE_FILE)
    if FileSystems.exists(lineage_path):
        lineage = _read_json(lineage_path, path)
        if not isinstance(lineage, dict):
            raise _refuse(path, f"{LINEAGE_FILE} is not an object")
        generation = int(lineage.get("generation", 0))
        item_vocabulary = lineage.get("item_vocabulary")
    elif (stats.get("items") or 0) < (stats.get("items_in_table") or 0):
        # A first-generation folder: catalogue mode puts every item of the table in the
        # vocabulary, clicked mode only those with a training click (a count > 0 each).
        item_vocabulary = "clicked"
    elif _COUNTS_FILE in files and b"\n0\n" in b"\n" + _read(files[_COUNTS_FILE]):
        item_vocabulary = "catalogue"
    want = cfg.preprocess.item_vocabulary
    if item_vocabulary is not None and item_vocabulary != want:
        raise _refuse(path, f"built with preprocess.item_vocabulary {item_vocabulary!r}, this "
                            f"run's is {want!r}")
    return Previous(path=path, version=vocab_version(path), vocabs=vocabs,
                    generation=generation, item_vocabulary=item_vocabulary)


def lineage_record(out_dir: str, previous: Previous, cfg, adapter) -> dict:
    """The ``lineage.json`` object of ``out_dir`` grown from ``previous`` (module doc)."""
    sizes = {}
    for f in sorted(previous.vocabs):
        data = _read(_join(out_dir, "vocab", f + ".txt"))
        sizes[f] = data.count(b"\n") + 1
    before = previous.sizes()
    return {"version": vocab_version(out_dir), "grew_from": previous.version,
            "previous_artifacts": previous.path, "generation": previous.generation + 1,
            "item_vocabulary": cfg.preprocess.item_vocabulary, "dataset": cfg.data.dataset,
            "adapter": getattr(adapter, "name", ""), "previous_sizes": before, "sizes": sizes,
            "appended": {f: sizes[f] - before[f] for f in sizes}}


def write_lineage(out_dir: str, previous: Previous, cfg, adapter) -> dict:
    """Writes ``<out_dir>/lineage.json``; returns its object."""
    from pipelines.common import write_bytes

    record = lineage_record(out_dir, previous, cfg, adapter)
    write_bytes(_join(out_dir, LINEAGE_FILE),
                json.dumps(record, indent=1, sort_keys=True).encode("utf-8"))
    return record


def check_item_rows(out_dir: str, previous: Previous) -> None:
    """Every line of ``vocab/item_id.txt`` has its ``items/items.jsonl`` row: an item of the
    previous vocabulary that left the item file keeps its line but has no row, which the
    trainer's strict reader refuses; refused here, naming the first such items."""
    vocab = _read(_join(out_dir, "vocab", "item_id.txt"))
    table = _read(_join(out_dir, "items", "items.jsonl"))
    if vocab.count(b"\n") == table.count(b"\n"):  # one row per line (ids are distinct)
        return
    ids = set(vocab.decode("utf-8").split("\n")) - {""}
    rows = set()
    for line in table.decode("utf-8").splitlines():
        rows.add(json.loads(line)["item_id"])
    missing = sorted(ids - rows)
    if missing:
        raise _refuse(previous.path, f"{len(missing)} item(s) of its vocabulary are no longer "
                                     f"in the item file (first: {missing[:5]}); append-only "
                                     f"vocabularies keep removed items: put their rows back")
