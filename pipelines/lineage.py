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

**Running click totals** (``item_id_counts_total.txt`` at the folder's root, grown folders only;
:func:`write_running_totals`): line k = the training clicks of line k of ``vocab/item_id.txt``
over every run of the lineage: the previous folder's total (its ``item_id_counts_total.txt``; for
a generation-0 folder its ``vocab/item_id_counts.txt``, whose per-run counts are its total) plus
this run's ``vocab/item_id_counts.txt``; a line appended by this run has this run's count. The
warm start (:mod:`micrec_tf.warm_start`) masks ID rows by it at ``model.min_id_clicks`` > 1. A
previous folder of generation >= 1 without the file (grown before it existed) or without item
counts gives no total (the file is not written; the warm start then keeps today's rule). Outside
``vocab/``, so the version id, the schema check and the append-only check do not see it (growing
in place from the same clicks doubles the totals but changes no vocabulary byte).

**stats.json ``item_vocabulary``** (written by every run since issue 29; :func:`read_previous`):
the mode of a folder is ``lineage.json``'s, else stats.json's, else inferred as above (a folder
written before the key).

Local folders and any Beam filesystem (``gs://...``) are read through ``FileSystems``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath

import pipelines.common  # noqa: F401  (first: it makes Beam's import quiet)
from micrec_tf.config import ITEM_VOCABULARIES, ConfigError
from micrec_tf.data.contract import vocab_names

from apache_beam.io.filesystems import FileSystems  # noqa: E402  (after pipelines.common)

__all__ = ["LINEAGE_FILE", "TOTALS_FILE", "Previous", "PreviousArtifactsError", "check_item_rows",
           "lineage_record", "read_previous", "running_totals", "vocab_version", "write_lineage",
           "write_running_totals"]

LINEAGE_FILE = "lineage.json"
_COUNTS_FILE = "item_id_counts.txt"  # pipelines.vocab.ITEM_COUNTS_FILE (vocab imports us)
# Running training-click totals per vocab/item_id.txt line, at the root of a grown folder
# (module doc); micrec_tf.warm_start.TOTALS_FILE reads it.
TOTALS_FILE = "item_id_counts_total.txt"
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
    # Running training clicks per item_id line (module doc), None when unknown.
    item_totals: tuple | None = None

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
    elif "item_vocabulary" in stats:  # recorded since issue 29
        item_vocabulary = stats["item_vocabulary"]
        if item_vocabulary not in ITEM_VOCABULARIES:
            raise _refuse(path, f"stats.json item_vocabulary must be one of "
                                f"{list(ITEM_VOCABULARIES)}. Received: {item_vocabulary!r}")
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
                    generation=generation, item_vocabulary=item_vocabulary,
                    item_totals=_previous_totals(path, files, generation,
                                                 len(vocabs["item_id"])))


def _read_counts(path: str, where: str, name: str, n: int) -> tuple:
    """The ints >= 0 of a counts file, one a line; refused unless exactly ``n`` lines."""
    try:
        lines = _read(path).decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise _refuse(where, f"cannot read {name}: {type(err).__name__}: "
                             f"{err}".replace("\n", " ")) from None
    if lines and lines[-1] == "":
        lines.pop()
    for k, v in enumerate(lines, 1):
        if not v.isdigit():
            raise _refuse(where, f"{name} line {k} is not a click count (an int >= 0). "
                                 f"Received: {v!r}")
    if len(lines) != n:
        raise _refuse(where, f"{name} has {len(lines)} lines, vocab/item_id.txt {n}")
    return tuple(int(v) for v in lines)


def _previous_totals(path: str, files: dict, generation: int, n: int) -> tuple | None:
    """The previous folder's running totals (module doc): its ``item_id_counts_total.txt``;
    for generation 0 its ``vocab/item_id_counts.txt``; None when neither applies."""
    totals_path = _join(path, TOTALS_FILE)
    if FileSystems.exists(totals_path):
        return _read_counts(totals_path, path, TOTALS_FILE, n)
    if generation == 0 and _COUNTS_FILE in files:
        return _read_counts(files[_COUNTS_FILE], path, "vocab/" + _COUNTS_FILE, n)
    return None


def running_totals(previous_totals, counts) -> list:
    """``previous_totals[k] + counts[k]`` for the previous lines, then ``counts[k]`` for the
    appended ones (ints; ``counts``: this run's clicks per line, at least as many lines)."""
    previous_totals, counts = list(previous_totals), list(counts)
    if len(counts) < len(previous_totals):
        raise ValueError(f"counts must cover every previous line ({len(previous_totals)}). "
                         f"Received: {len(counts)} lines")
    return ([int(a) + int(b) for a, b in zip(previous_totals, counts)]
            + [int(c) for c in counts[len(previous_totals):]])


def write_running_totals(out_dir: str, previous: Previous) -> list | None:
    """Writes ``<out_dir>/item_id_counts_total.txt`` (module doc) from this run's
    ``vocab/item_id_counts.txt`` and ``previous.item_totals``; returns the totals, or None
    (nothing written) when the previous totals are unknown."""
    from pipelines.common import write_bytes

    if previous.item_totals is None:
        return None
    n = _read(_join(out_dir, "vocab", "item_id.txt")).count(b"\n")
    counts = _read_counts(_join(out_dir, "vocab", _COUNTS_FILE), out_dir,
                          "vocab/" + _COUNTS_FILE, n)
    totals = running_totals(previous.item_totals, counts)
    write_bytes(_join(out_dir, TOTALS_FILE), "".join(f"{t}\n" for t in totals).encode("ascii"))
    return totals


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
