"""In-memory view of the preprocessing artifacts that the trainer needs (see docs/ARCHITECTURE.md).

All arrays are indexed by item index; row 0 is the OOV/padding item and is all zeros.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

import numpy as np

from micrec_tf.data import contract


@dataclasses.dataclass
class ItemTable:
    """Every catalogue item's fields, so sampled negatives can be embedded.

    tags:     int64 [V, T] tag indices, 0-padded.
    provider: int64 [V]    provider index.
    extra:    {field: int64 [V]} extra categorical fields (names as in the vocab, e.g. "item_year").
    category: int64 [V]    first tag index (0 if none), used by session CL's same-category emphasis.
    text_vectors_dir: where pipelines.title_neighbours writes the items' text vectors
              (``title_embeddings/``, read by :func:`load_text_vectors` only for
              ``model.item_text``); None when the table did not come from an artifacts folder.
    id_clicks: int64 [V] each item's number of training clicks (``vocab/item_id_counts.txt``;
              row 0 = 0; 0 for a catalogue item nobody clicked), read by ``model.min_id_clicks``;
              None (older artifacts without the file): every vocabulary item counts as clicked.
    """

    tags: np.ndarray
    provider: np.ndarray
    extra: dict
    category: np.ndarray
    text_vectors_dir: str | None = None
    id_clicks: np.ndarray | None = None

    @property
    def num_items(self) -> int:
        """V: catalogue size including the padding row 0."""
        return int(self.tags.shape[0])


@dataclasses.dataclass
class NeighbourTable:
    """Per item, padded neighbour lists: ``neighbours`` int64 [V, M], ``weights`` float32 [V, M].

    A weight of 0 marks padding. For co-occurrence, weights are counts and ``same_category`` is an
    int8 [V, M] flag; for title neighbours, weights are cosine scores.
    """

    neighbours: np.ndarray
    weights: np.ndarray
    same_category: np.ndarray | None = None


@dataclasses.dataclass
class CooccurrenceTable:
    """Every item's full session co-occurrence list, as CSR arrays (``cooccurrence.npz``).

    Row ``i`` (item index; row 0, padding, is empty) holds entries ``indptr[i]:indptr[i + 1]``,
    sorted by count descending, then neighbour index ascending.

    indptr:        int64 [V + 1]
    neighbours:    int64 [E] neighbour item indices in 1..V-1, never ``i`` itself
    counts:        int64 [E] co-occurrence counts (> 0); the table is symmetric
    same_category: int8  [E] 1 where the pair is "same category" (``preprocess.session_category``)
    """

    indptr: np.ndarray
    neighbours: np.ndarray
    counts: np.ndarray
    same_category: np.ndarray

    @property
    def num_items(self) -> int:
        """V, the padding row included."""
        return int(self.indptr.size - 1)

    @property
    def num_entries(self) -> int:
        return int(self.neighbours.size)

    @property
    def degree(self) -> np.ndarray:
        """int64 [V]: how many distinct items co-occurred with each item."""
        return np.diff(self.indptr)

    def row(self, i: int):
        """-> (neighbours [n], counts [n], same_category [n]) of item ``i``."""
        s, e = int(self.indptr[i]), int(self.indptr[i + 1])
        return self.neighbours[s:e], self.counts[s:e], self.same_category[s:e]

    def rows(self) -> np.ndarray:
        """int64 [E]: the row (anchor item) of every entry."""
        return np.repeat(np.arange(self.num_items, dtype=np.int64), self.degree)

    def to_padded(self, max_len: int | None = None) -> NeighbourTable:
        """The first ``max_len`` entries of each row (all by default) as [V, M] padded arrays."""
        deg = self.degree
        m = int(max(deg.max(initial=0), 1)) if max_len is None else int(max_len)
        m = max(min(m, int(deg.max(initial=0))), 1)
        neighbours = np.zeros([self.num_items, m], np.int64)
        weights = np.zeros([self.num_items, m], np.float32)
        same = np.zeros([self.num_items, m], np.int8)
        rows = self.rows()
        pos = np.arange(self.num_entries, dtype=np.int64) - self.indptr[rows]
        keep = pos < m
        neighbours[rows[keep], pos[keep]] = self.neighbours[keep]
        weights[rows[keep], pos[keep]] = self.counts[keep]
        same[rows[keep], pos[keep]] = self.same_category[keep]
        return NeighbourTable(neighbours=neighbours, weights=weights, same_category=same)

    @classmethod
    def from_rows(cls, num_items: int, rows) -> "CooccurrenceTable":
        """From ``[(item, neighbours, counts, same_category)]`` (any order; each list any order).

        Entries are sorted into the table's order (count desc, neighbour asc).
        """
        rows = sorted(rows, key=lambda r: r[0])
        sizes = np.zeros(num_items, np.int64)
        nb_parts, c_parts, s_parts = [], [], []
        for item, nb, counts, same in rows:
            nb = np.asarray(nb, np.int64)
            counts = np.asarray(counts, np.int64)
            order = np.lexsort((nb, -counts))
            nb_parts.append(nb[order])
            c_parts.append(counts[order])
            s_parts.append(np.asarray(same, np.int8)[order])
            sizes[item] = nb.size
        indptr = np.zeros(num_items + 1, np.int64)
        indptr[1:] = np.cumsum(sizes)

        def cat(parts, dtype):
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        return cls(indptr, cat(nb_parts, np.int64), cat(c_parts, np.int64), cat(s_parts, np.int8))

    @classmethod
    def from_padded(cls, table: NeighbourTable) -> "CooccurrenceTable":
        """From padded [V, M] lists (weight 0 = padding), e.g. a hand-made test table."""
        nb, w = np.asarray(table.neighbours), np.asarray(table.weights)
        same = (np.zeros(nb.shape, np.int8) if table.same_category is None
                else np.asarray(table.same_category))
        rows = []
        for i in range(nb.shape[0]):
            keep = (nb[i] > 0) & (w[i] > 0)
            if keep.any():
                rows.append((i, nb[i][keep], np.round(w[i][keep]).astype(np.int64), same[i][keep]))
        return cls.from_rows(nb.shape[0], rows)

    def validate(self, path: str = "co-occurrence table") -> "CooccurrenceTable":
        """Raises :class:`ArtifactContentError` (a ``ValueError``) naming ``path`` when the arrays
        break the contract above."""
        v, e = self.num_items, self.num_entries
        bad = ArtifactContentError
        if v < 1 or self.indptr[0] != 0 or self.indptr[-1] != e or np.any(np.diff(self.indptr) < 0):
            raise bad(f"{path}: indptr is not a CSR row pointer over {e} entries")
        if self.counts.size != e or self.same_category.size != e:
            raise bad(f"{path}: neighbours ({e}), counts ({self.counts.size}) and "
                      f"same_category ({self.same_category.size}) differ in length")
        if e and (self.neighbours.min() < 1 or self.neighbours.max() >= v):
            raise bad(f"{path}: a neighbour index is outside [1, {v})")
        if e and self.counts.min() < 1:
            raise bad(f"{path}: a count is < 1")
        if e and np.any(self.rows() == self.neighbours):
            raise bad(f"{path}: an item is listed as its own neighbour")
        return self


def cooccurrence_npz_bytes(table: CooccurrenceTable) -> bytes:
    """The ``cooccurrence.npz`` file content of ``table`` (the writer's half of the contract)."""
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, indptr=table.indptr.astype(np.int64),
                        neighbours=table.neighbours.astype(np.int32),
                        counts=table.counts.astype(np.int64),
                        same_category=table.same_category.astype(np.int8))
    return buf.getvalue()


def load_cooccurrence(artifacts_dir: str, num_items: int | None = None) -> CooccurrenceTable:
    """``cooccurrence/cooccurrence.npz`` as a validated :class:`CooccurrenceTable`.

    ``num_items`` (V, the item vocabulary + padding) is checked against the table when given.
    Raises :class:`ArtifactError` when the file is missing or unreadable,
    :class:`ArtifactContentError` (a ``ValueError``) when it breaks the contract.
    """
    path = os.path.join(os.fspath(artifacts_dir), COOCCURRENCE)
    if not os.path.exists(path):
        raise ArtifactError(f"{path} is missing: {RERUN}")
    try:
        with np.load(path) as z:
            table = CooccurrenceTable(z["indptr"].astype(np.int64),
                                      z["neighbours"].astype(np.int64),
                                      z["counts"].astype(np.int64),
                                      z["same_category"].astype(np.int8))
    except (OSError, KeyError, ValueError, EOFError) as err:
        raise ArtifactError(f"{path} is unreadable ({err}): {RERUN}") from None
    table.validate(path)
    if num_items is not None and table.num_items != num_items:
        raise ArtifactContentError(f"{path} has {table.num_items} rows but the item vocabulary "
                                   f"has {num_items} (with padding): the artifacts are stale; "
                                   f"{RERUN}")
    return table


@dataclasses.dataclass
class Artifacts:
    """Everything the trainer loads once from ``artifacts/<name>/``."""

    path: str
    feature_spec: dict
    vocabs: dict  # field -> list[str]; list position p = index p + 1
    item_table: ItemTable
    cooccurrence: CooccurrenceTable | None
    title_neighbours: NeighbourTable | None
    stats: dict

    @property
    def vocab_sizes(self) -> dict:
        """field -> vocabulary size including the OOV slot 0."""
        return {k: len(v) + 1 for k, v in self.vocabs.items()}

    @property
    def user_fields(self) -> list:
        return list(self.feature_spec.get("user_fields", []))

    @property
    def item_extra_fields(self) -> list:
        return list(self.feature_spec.get("item_extra_fields", []))


# ------------------------------------------------------------------------------------ loading

EXAMPLES = "examples"
FEATURE_SPEC = os.path.join(EXAMPLES, "feature_spec.json")
ITEMS = os.path.join("items", "items.jsonl")
COOCCURRENCE = os.path.join("cooccurrence", "cooccurrence.npz")
TITLE_NEIGHBOURS = os.path.join("title_neighbours", "title_neighbours.jsonl")
TITLE_EMBEDDINGS = "title_embeddings"  # pipelines.title_neighbours.EMBEDDINGS_DIR
STATS = "stats.json"
ITEM_ID_COUNTS = "item_id_counts.txt"  # in vocab/: training clicks per item index (issue 28)
SPLITS = ("train", "valid", "test")
RERUN = "rerun `python -m pipelines.preprocess --config <config>`"


class ArtifactError(FileNotFoundError):
    """The preprocessing output is missing, incomplete or corrupt; the message names the file.

    A ``FileNotFoundError``, so the command-line entry points report it in one line.
    """


class ArtifactContentError(ArtifactError, ValueError):
    """A file of the preprocessing output breaks its contract; the message names ``file:line``
    (or the file) and the bad value.

    Also a ``ValueError`` (the readers raised that before), and an :class:`ArtifactError`, so
    the command-line entry points report it in one line.
    """


# ----------------------------------------------------------------------------- example shards

def shard_name(split: str, shard: int, num_shards: int) -> str:
    """The file name pipelines/preprocess.py gives shard ``shard`` of ``num_shards``."""
    return f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord.gz"


def _found_shards(examples: str, split: str) -> dict:
    """``{num_shards: {shard: path}}`` of the ``<split>-K-of-N.tfrecord.gz`` files present."""
    name = re.compile(rf"{re.escape(split)}-(\d+)-of-(\d+)\.tfrecord\.gz")
    found = {}
    for path in glob.glob(os.path.join(glob.escape(examples), f"{split}-*.tfrecord.gz")):
        m = name.fullmatch(os.path.basename(path))
        if m:
            found.setdefault(int(m[2]), {})[int(m[1])] = path
    return found


def split_files(artifacts_dir: str, split: str, num_examples: dict | None = None) -> list:
    """The TFRecord shards of one split, in shard order, after checking that the set is whole.

    Every ``<split>-K-of-N.tfrecord.gz`` for K in 0..N-1 must be present, with one N. Raises
    :class:`ArtifactError` naming the missing (or stray) files. A split with no shard at all
    raises :class:`ArtifactError` too when ``num_examples`` (feature_spec.json's record) gives
    it examples, a plain ``FileNotFoundError`` otherwise (a split that was never written).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}. Received: {split!r}")
    examples = os.path.join(os.fspath(artifacts_dir), EXAMPLES)
    found = _found_shards(examples, split)
    if not found:
        msg = f"no {split} shards ({split}-*-of-*.tfrecord.gz) in {examples!r}"
        if (num_examples or {}).get(split):
            raise ArtifactError(f"{msg}, but feature_spec.json records {num_examples[split]} "
                                f"{split} examples: the artifacts are incomplete; {RERUN}")
        raise FileNotFoundError(f"{msg}: {RERUN}")
    if len(found) > 1:
        raise ArtifactError(f"{examples!r} mixes {split} shard sets of {sorted(found)} files: "
                            f"stale shards of an earlier run are left; {RERUN}")
    (n, shards), = found.items()
    missing = [os.path.join(examples, shard_name(split, k, n)) for k in range(n) if k not in shards]
    if missing:
        raise ArtifactError(f"{split} shard(s) {missing} are missing (the set has {n} files): "
                            f"the artifacts are incomplete; {RERUN}")
    stray = sorted(p for k, p in shards.items() if k >= n)
    if stray:
        raise ArtifactError(f"{split} shard(s) {stray} are outside the set of {n} files: {RERUN}")
    return [shards[k] for k in range(n)]


def check_example_count(num_examples: dict, split: str, counts: dict) -> None:
    """Raises :class:`ArtifactError` if the examples read differ from the recorded number.

    ``counts`` maps each shard path to the examples read from it; ``num_examples`` is
    feature_spec.json's record (a split it lacks is not checked). The message lists the
    per-shard counts, so that an empty or short shard stands out.
    """
    recorded = (num_examples or {}).get(split)
    total = sum(counts.values())
    if recorded is not None and int(recorded) != total:
        per_shard = ", ".join(f"{os.path.basename(p)}: {n}" for p, n in counts.items())
        where = os.path.dirname(next(iter(counts), "")) or "."
        raise ArtifactError(f"the {split} split has {total} examples in {where!r} ({per_shard}) "
                            f"but feature_spec.json records {recorded}: a shard is incomplete; "
                            f"{RERUN}")


def unreadable_shard_error(path: str, err: Exception) -> ArtifactError:
    """An :class:`ArtifactError` naming ``path`` for a TensorFlow read error (e.g. DataLossError).

    Keeps TensorFlow's reason ("truncated record at ...") without its op and function names.
    """
    reason = getattr(err, "message", None) or str(err)
    reason = re.sub(r"\{\{[^}]*\}\}\s*", "", reason).split(" [Op:")[0].strip()
    return ArtifactError(f"{path} is truncated or corrupt ({reason}): {RERUN}")


def load_feature_spec(artifacts_dir: str) -> dict:
    """``examples/feature_spec.json``; :class:`ArtifactError` if it is missing."""
    path = os.path.join(os.fspath(artifacts_dir), FEATURE_SPEC)
    if not os.path.exists(path):
        raise ArtifactError(f"{path} is missing: {os.fspath(artifacts_dir)!r} is not a complete "
                            f"preprocessing output; {RERUN}")
    try:
        return contract.check_feature_spec(_read_json(path), path)
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}): {RERUN}") from None


def _read_json(path: str):
    """A JSON file (``json.JSONDecodeError``, a ``ValueError``, when it is not valid)."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _read_stats(path: str) -> dict:
    """``stats.json``; :class:`ArtifactContentError` naming it when it is not valid JSON."""
    try:
        return _read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactContentError(f"{path} is not valid JSON ({err}): {RERUN}") from None


def _read_jsonl_numbered(path: str):
    """``(line number, parsed row)`` of every non-blank line; :class:`ArtifactContentError`
    naming ``file:line`` on bad JSON."""
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as err:
                    raise ArtifactContentError(f"{path}:{n} is not valid JSON: {err}") from None


def read_vocab(path: str) -> list:
    """The values of a ``vocab/<field>.txt`` file, in order (value k has index k + 1).

    Strict: a value repeated on a later line (two indices for one key) is an
    :class:`ArtifactContentError` naming ``file:line`` and the line it repeats.
    """
    values, first = [], {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            value = line.rstrip("\n")
            if value in first:
                raise ArtifactContentError(
                    f"{path}:{n}: value {value!r} repeats line {first[value]}: a vocabulary "
                    f"gives each value one index; the artifacts are corrupt; {RERUN}")
            first[value] = n
            values.append(value)
    return values


def _check_index(path: str, row: dict, key: str, size: int) -> int:
    idx = row.get(key)
    if not _is_int(idx) or not 0 < idx < size:
        raise ArtifactContentError(f"{path}: {key} {idx!r} is outside the item vocabulary "
                                   f"[1, {size}): the artifacts are inconsistent; {RERUN}")
    return idx


def read_items(path: str) -> list:
    """``items/items.jsonl`` (a path to the file or to the artifacts folder): its rows sorted by
    ``item``, each checked strictly (:class:`ArtifactContentError`, a ``ValueError``, naming
    ``file:line`` and the bad value).

    A row: ``{"item": int >= 1 (unique), "item_id": str (unique), "title": str, "tags": [int >= 1],
    "provider": int >= 0, "extra": {"item_<field>": int >= 0}}``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, ITEMS)
    if not os.path.exists(path):
        raise ArtifactError(f"{path} is missing: {RERUN}")
    rows, seen, id_lines = [], set(), {}
    for n, row in _read_jsonl_numbered(path):
        where = f"{path}:{n}"
        idx = row.get("item") if isinstance(row, dict) else None
        if not _is_int(idx) or idx < 1:
            raise ArtifactContentError(f"{where}: item must be a positive int. Received: {idx!r}")
        if idx in seen:
            raise ArtifactContentError(f"{where}: item {idx} appears twice: {RERUN}")
        seen.add(idx)
        bad = [k for k, ok in (("item_id", isinstance(row.get("item_id"), str)),
                               ("title", isinstance(row.get("title"), str)),
                               ("tags", isinstance(row.get("tags"), list)
                                and all(_is_int(t) and t >= 1 for t in row["tags"])),
                               ("provider", _is_int(row.get("provider")) and row["provider"] >= 0),
                               ("extra", isinstance(row.get("extra"), dict)
                                and all(_is_int(v) and v >= 0 for v in row["extra"].values())))
               if not ok]
        if bad:
            raise ArtifactContentError(f"{where}: item {idx} has bad {bad}. Received: "
                                       f"{ {k: row.get(k) for k in bad} }")
        if row["item_id"] in id_lines:
            raise ArtifactContentError(f"{where}: item_id {row['item_id']!r} repeats line "
                                       f"{id_lines[row['item_id']]}: {RERUN}")
        id_lines[row["item_id"]] = n
        rows.append(row)
    rows.sort(key=lambda r: r["item"])
    return rows


def read_id_clicks(path: str, num_items: int) -> np.ndarray:
    """``vocab/item_id_counts.txt`` (line k: the training clicks of item index k + 1) as int64
    [num_items] with row 0 = 0; :class:`ArtifactContentError` naming ``file:line`` for a line
    that is not an int >= 0, or a line count other than ``num_items - 1``."""
    counts = np.zeros([num_items], np.int64)
    n = 0
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            value = line.strip()
            if not value.isdigit():
                raise ArtifactContentError(f"{path}:{n}: a click count must be an int >= 0. "
                                           f"Received: {value!r}; {RERUN}")
            if n < num_items:
                counts[n] = int(value)
    if n != num_items - 1:
        raise ArtifactContentError(f"{path} has {n} counts, the item vocabulary "
                                   f"{num_items - 1}: the artifacts are inconsistent; {RERUN}")
    return counts


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _load_item_table(path: str, num_items: int, max_tags: int, extra_names: list) -> ItemTable:
    """The :class:`ItemTable` of ``items.jsonl``; every vocabulary item must have a row."""
    tags = np.zeros([num_items, max_tags], np.int64)
    provider = np.zeros([num_items], np.int64)
    extra = {name: np.zeros([num_items], np.int64) for name in extra_names}
    rows = read_items(path)
    for row in rows:
        idx = _check_index(path, row, "item", num_items)
        item_tags = row["tags"][:max_tags]
        tags[idx, :len(item_tags)] = item_tags
        provider[idx] = row["provider"]
        unknown = sorted(set(row["extra"]) - set(extra_names))
        if unknown:
            raise ArtifactContentError(
                f"{path}: item {idx} has extra fields {unknown} that feature_spec.json does not "
                f"declare ({extra_names}): the artifacts are inconsistent; {RERUN}")
        for name in extra_names:
            extra[name][idx] = row["extra"].get(name, 0)
    if len(rows) != num_items - 1:
        raise ArtifactContentError(f"{path} has {len(rows)} items, the item vocabulary "
                                   f"{num_items - 1}: the artifacts are stale or incomplete; "
                                   f"{RERUN}")
    return ItemTable(tags=tags, provider=provider, extra=extra, category=tags[:, 0].copy(),
                     text_vectors_dir=os.path.join(os.path.dirname(os.path.dirname(path)),
                                                   TITLE_EMBEDDINGS))


def _load_neighbours(path: str, weight_key: str, num_items: int) -> NeighbourTable:
    """``title_neighbours.jsonl`` as a padded :class:`NeighbourTable`; every row needs ``item``,
    ``neighbours`` and ``weight_key`` lists of one length (:class:`ArtifactContentError`, a
    ``ValueError``, naming ``file:line``)."""
    rows = []
    for n, row in _read_jsonl_numbered(path):
        where = f"{path}:{n}"
        idx = _check_index(where, row, "item", num_items)
        nb, w = row.get("neighbours"), row.get(weight_key)
        if not isinstance(nb, list) or not isinstance(w, list):
            raise ArtifactContentError(f"{where}: item {idx} needs 'neighbours' and "
                                       f"{weight_key!r} lists. Received keys: {sorted(row)}")
        if len(nb) != len(w):
            raise ArtifactContentError(f"{where}: item {idx} has {len(nb)} neighbours but "
                                       f"{len(w)} {weight_key}")
        if any(not _is_int(b) or not 0 < b < num_items for b in nb):
            raise ArtifactContentError(f"{where}: item {idx} has a neighbour outside "
                                       f"[1, {num_items}). Received: {nb}")
        rows.append((idx, nb, w))
    width = max([len(nb) for _, nb, _ in rows] + [1])
    neighbours = np.zeros([num_items, width], np.int64)
    weights = np.zeros([num_items, width], np.float32)
    for idx, nb, w in rows:
        neighbours[idx, :len(nb)] = nb
        weights[idx, :len(w)] = w
    return NeighbourTable(neighbours=neighbours, weights=weights)


def load_artifacts(path: str) -> Artifacts:
    """Reads ``artifacts/<name>/`` (see docs/ARCHITECTURE.md) into an :class:`Artifacts`.

    Raises ``FileNotFoundError`` naming every missing required file (:class:`ArtifactError` for
    an incomplete set of example shards, see :func:`split_files`), :class:`ArtifactContentError`
    (a ``ValueError``) for a bad line (named ``file:line``) or files that contradict each other.
    ``title_neighbours`` is None when that job has not run yet (see :func:`check_cl_tables`).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"artifacts directory {path!r} not found: run `python -m pipelines.preprocess "
            "--config <config>` first")
    spec = load_feature_spec(path)
    for split, count in spec.get("num_examples", {}).items():
        if split in SPLITS and count:  # only the file names here; readers check the counts
            split_files(path, split, spec["num_examples"])
    fields = contract.vocab_names(spec["user_fields"], spec["item_extra_fields"])
    required = [STATS, ITEMS, COOCCURRENCE] + [os.path.join("vocab", f"{f}.txt") for f in fields]
    missing = [rel for rel in required if not os.path.exists(os.path.join(path, rel))]
    if missing:
        raise FileNotFoundError(f"artifacts in {path!r} lack {missing}; rerun pipelines.preprocess")
    vocabs = {f: read_vocab(os.path.join(path, "vocab", f"{f}.txt")) for f in fields}
    for f, size in spec.get("vocab_sizes", {}).items():
        if f in vocabs and len(vocabs[f]) + 1 != size:
            raise ArtifactContentError(
                f"{os.path.join(path, 'vocab', f + '.txt')} has {len(vocabs[f])} values but "
                f"feature_spec.json says size {size} (with OOV): the artifacts are inconsistent; "
                f"{RERUN}")
    num_items = len(vocabs["item_id"]) + 1
    extra_names = [contract.item_feature(f) for f in spec["item_extra_fields"]]
    item_table = _load_item_table(os.path.join(path, ITEMS), num_items,
                                  int(spec["max_tags"]), extra_names)
    counts_path = os.path.join(path, "vocab", ITEM_ID_COUNTS)
    if os.path.exists(counts_path):  # absent in older artifacts: every item counts as clicked
        item_table.id_clicks = read_id_clicks(counts_path, num_items)
    cooccurrence = load_cooccurrence(path, num_items)
    title_path = os.path.join(path, TITLE_NEIGHBOURS)
    title_neighbours = (_load_neighbours(title_path, "scores", num_items)
                        if os.path.exists(title_path) else None)
    return Artifacts(path=path, feature_spec=spec, vocabs=vocabs, item_table=item_table,
                     cooccurrence=cooccurrence, title_neighbours=title_neighbours,
                     stats=_read_stats(os.path.join(path, STATS)))


def check_cl_tables(art: Artifacts, cl_tasks) -> None:
    """Raises :class:`ArtifactError` when a CL term of ``cl_tasks`` (``model.cl``) lacks the
    table it trains on: semantic CL needs ``title_neighbours.jsonl``, which
    ``pipelines.title_neighbours`` writes after ``pipelines.preprocess``."""
    if "semantic" in cl_tasks and art.title_neighbours is None:
        raise ArtifactError(
            f"{os.path.join(art.path, TITLE_NEIGHBOURS)} is missing but model.cl has 'semantic': "
            f"run `python -m pipelines.title_neighbours --config <config>` after "
            f"pipelines.preprocess, or drop 'semantic' from model.cl")


def text_vectors_for(item_table, num_items: int, text_vectors=None) -> np.ndarray:
    """The float32 [V, D_t] text table a model with ``model.item_text`` is built with:
    ``text_vectors`` when given, else :func:`load_text_vectors` of ``item_table``'s
    ``text_vectors_dir``; ValueError unless it has one row per item index."""
    if text_vectors is None:
        text_vectors = load_text_vectors(item_table.text_vectors_dir, num_items)
    text_vectors = np.asarray(text_vectors, np.float32)
    if text_vectors.ndim != 2 or text_vectors.shape[0] != num_items:
        raise ValueError(f"text_vectors must be [{num_items}, D_t] (one row per item index). "
                         f"Received: shape {text_vectors.shape}")
    return text_vectors


def load_text_vectors(text_vectors_dir: str | None, num_items: int) -> np.ndarray:
    """The items' frozen text vectors as a float32 [V, D_t] table aligned with the item index
    (row 0 and the rows of items without a vector are zeros), for ``model.item_text``.

    Reads ``title_embeddings/{embeddings.npy, items.npy}`` (rows of ``items.npy``'s item
    indices, written by ``pipelines.title_neighbours`` for ``semantic.source`` title or vectors).
    Raises :class:`ArtifactError` when the folder is missing (source taxonomy writes none) and
    :class:`ArtifactContentError` when the two files disagree or an index is out of range.
    """
    emb_path = os.path.join(text_vectors_dir or TITLE_EMBEDDINGS, "embeddings.npy")
    items_path = os.path.join(text_vectors_dir or TITLE_EMBEDDINGS, "items.npy")
    if not text_vectors_dir or not (os.path.exists(emb_path) and os.path.exists(items_path)):
        raise ArtifactError(
            f"{emb_path} is missing but model.item_text is true: run `python -m "
            f"pipelines.title_neighbours --config <config>` with semantic.source 'title' or "
            f"'vectors' after pipelines.preprocess, or set model.item_text false")
    try:
        emb = np.load(emb_path)
        items = np.load(items_path)
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{emb_path} is unreadable ({err}): rerun pipelines.title_neighbours"
                            ) from None
    if emb.ndim != 2 or items.shape != (emb.shape[0],):
        raise ArtifactContentError(f"{emb_path} is {emb.shape} but {items_path} is {items.shape}: "
                                   f"rerun pipelines.title_neighbours")
    if items.size and (items.min() < 1 or items.max() >= num_items):
        raise ArtifactContentError(f"{items_path} has an item index outside [1, {num_items}): "
                                   f"rerun pipelines.title_neighbours")
    if not np.all(np.isfinite(emb)):
        raise ArtifactContentError(f"{emb_path} contains NaN or infinity: "
                                   f"rerun pipelines.title_neighbours")
    table = np.zeros([num_items, emb.shape[1]], np.float32)
    table[items.astype(np.int64)] = emb.astype(np.float32)
    return table
