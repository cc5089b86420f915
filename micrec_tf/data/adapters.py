"""Dataset adapters: raw files -> canonical rows (see ``schema.Adapter`` and docs/ARCHITECTURE.md).

Each adapter names its files (glob patterns under ``data_dir``, gzip is read transparently by
the extension, text encoding) and parses one raw line at a time. ``parse_*`` are pure functions
of the line (the adapter is pickled and shipped to Beam workers): they return a list of rows,
``[]`` for a header or blank line, and raise :class:`RowError` for a bad line.

Datasets without a user table (MIND, Amazon) have ``user_files = SourceFiles(())``: users are
the ids seen in the interactions, with an empty profile.

``get_adapter(data_cfg)`` picks the adapter for ``data.dataset`` and checks ``data.data_dir``.
"""
from __future__ import annotations

import calendar
import gzip
import html
import json
import os
import re
from datetime import datetime

from micrec_tf.data.schema import (BAD_JSON, BAD_TIMESTAMP, EMPTY_ID, WRONG_FIELD_COUNT,
                                   Adapter, InputError, Interaction, Item, RowError, SourceFiles,
                                   User, parse_timestamp, require_id, split_fields)

_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")


BOM = "\ufeff"


def _strip_eol(line: str) -> str:
    """The line without its line ending, nor a UTF-8 byte-order mark before its first field
    (Excel and Notepad write one at the start of a file: it is not part of the header)."""
    return line.rstrip("\r\n").removeprefix(BOM)


def _fields(line: str, sep: str, expected):
    """``(line without EOL, fields)``; fields is None for a blank line (skipped, not an error)."""
    line = _strip_eol(line)
    if not line.strip():
        return line, None
    return line, split_fields(line, sep, expected)


def _year_from_title(title: str) -> str:
    m = _YEAR_IN_TITLE.search(title)
    return m.group(1) if m else ""


# MovieLens 1M age bucket codes; MovieLens 100K exact ages are mapped onto them.
_ML_AGE_BUCKETS = ((18, "1"), (25, "18"), (35, "25"), (45, "35"), (50, "45"), (56, "50"))


def _age_bucket(age: str) -> str:
    try:
        value = int(age)
    except ValueError:
        return age.strip()
    for upper, code in _ML_AGE_BUCKETS:
        if value < upper:
            return code
    return "56"


def _zip_prefix(zip_code: str) -> str:
    return zip_code.strip()[:2]


# --------------------------------------------------------------------------------------------
# Canonical TSV (also the synthetic dataset)
# --------------------------------------------------------------------------------------------
class CanonicalAdapter(Adapter):
    """The canonical TSV format: ``interactions.tsv``, ``items.tsv``, ``users.tsv`` with headers.

    Profile and extra item field names come from the headers: use :meth:`from_dir`. Every file
    may also be gzipped (``.tsv.gz``) or split in several files (``interactions-*.tsv``); each
    part's header line is skipped. ``users.tsv`` is optional.
    """

    interaction_files = SourceFiles(("interactions*.tsv", "interactions*.tsv.gz"))
    item_files = SourceFiles(("items*.tsv", "items*.tsv.gz"))
    user_files = SourceFiles(("users*.tsv", "users*.tsv.gz"))

    def __init__(self, user_fields=(), item_extra_fields=(), name: str = "canonical"):
        self.name = name
        self.user_fields = tuple(user_fields)
        self.item_extra_fields = tuple(item_extra_fields)

    @classmethod
    def from_dir(cls, data_dir: str, name: str = "canonical") -> "CanonicalAdapter":
        """Reads the field names from the header lines of the files in ``data_dir``."""
        item_paths = cls.item_files.paths(data_dir)
        if not item_paths:
            raise FileNotFoundError(
                f"{name}: no items file ({list(cls.item_files.patterns)}) under {data_dir!r}")
        item_header = _first_line(item_paths[0])
        fixed = ["item_id", "title", "tags", "provider"]
        if item_header[:4] != fixed:
            raise InputError(f"{item_paths[0]}:1: header must start with {fixed}, got "
                             f"{item_header}")
        user_fields: list = []
        user_paths = cls.user_files.paths(data_dir)
        if user_paths:
            user_header = _first_line(user_paths[0])
            if user_header[:1] != ["user_id"]:
                raise InputError(
                    f"{user_paths[0]}:1: header must start with 'user_id', got {user_header}")
            user_fields = user_header[1:]
        return cls(user_fields=user_fields, item_extra_fields=item_header[4:], name=name)

    def parse_interaction(self, line: str) -> list:
        line, fields = _fields(line, "\t", 3)
        if fields is None:
            return []
        if fields[0] == "user_id" and fields[1] == "item_id":
            return []
        return [Interaction(require_id(fields[0], line, "user_id"),
                            require_id(fields[1], line, "item_id"),
                            parse_timestamp(fields[2], line))]

    def parse_item(self, line: str) -> list:
        line, fields = _fields(line, "\t", 4 + len(self.item_extra_fields))
        if fields is None:
            return []
        if fields[0] == "item_id" and fields[1] == "title":
            return []
        tags = tuple(t.strip() for t in fields[2].split("|") if t.strip())
        extra = {k: v.strip() for k, v in zip(self.item_extra_fields, fields[4:])}
        return [Item(require_id(fields[0], line, "item_id"), fields[1].strip(), tags,
                     fields[3].strip(), extra)]

    def parse_user(self, line: str) -> list:
        line, fields = _fields(line, "\t", 1 + len(self.user_fields))
        if fields is None:
            return []
        if fields[0] == "user_id":
            return []
        profile = {k: v.strip() for k, v in zip(self.user_fields, fields[1:])}
        return [User(require_id(fields[0], line, "user_id"), profile)]


def _first_line(path: str) -> list:
    """The header fields of a canonical TSV (a leading byte-order mark dropped)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        first = fh.readline()
    try:
        return _strip_eol(first.decode("utf-8")).split("\t")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}:1: the header is not UTF-8 ({err.reason} at byte "
                         f"{err.start})") from None


# --------------------------------------------------------------------------------------------
# MovieLens
# --------------------------------------------------------------------------------------------
class MovieLens1MAdapter(Adapter):
    """MovieLens 1M: ``ratings*.dat[.gz]``, ``movies.dat``, ``users.dat``; ``::``, latin-1.

    Every rating is a click. Genres are the tags; no provider; ``year`` (from the title) is an
    extra item field. Profile: gender, age (bucket code), occupation (code), zip prefix.
    """

    name = "movielens_1m"
    interaction_files = SourceFiles(("ratings*.dat", "ratings*.dat.gz"), encoding="latin-1")
    item_files = SourceFiles(("movies.dat", "movies.dat.gz"), encoding="latin-1")
    user_files = SourceFiles(("users.dat", "users.dat.gz"), encoding="latin-1")
    user_fields = ("gender", "age", "occupation", "zip_prefix")
    item_extra_fields = ("year",)

    def parse_interaction(self, line: str) -> list:
        line, fields = _fields(line, "::", 4)
        if fields is None:
            return []
        return [Interaction(require_id(fields[0], line, "UserID"),
                            require_id(fields[1], line, "MovieID"),
                            parse_timestamp(fields[3], line))]

    def parse_item(self, line: str) -> list:
        line, fields = _fields(line, "::", 3)
        if fields is None:
            return []
        title = fields[1].strip()
        tags = tuple(g.strip() for g in fields[2].split("|") if g.strip())
        return [Item(require_id(fields[0], line, "MovieID"), title, tags, "",
                     {"year": _year_from_title(title)})]

    def parse_user(self, line: str) -> list:
        line, fields = _fields(line, "::", 5)
        if fields is None:
            return []
        return [User(require_id(fields[0], line, "UserID"),
                     {"gender": fields[1].strip(), "age": fields[2].strip(),
                      "occupation": fields[3].strip(), "zip_prefix": _zip_prefix(fields[4])})]


ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")


class MovieLens100KAdapter(Adapter):
    """MovieLens 100K: ``u.data`` (tab), ``u.item`` (``|``, latin-1, 19 genre flags), ``u.user``.

    Same canonical fields as :class:`MovieLens1MAdapter`: exact ages are mapped onto the ML-1M
    age buckets, ``year`` comes from the title (or the release date).
    """

    name = "movielens_100k"
    interaction_files = SourceFiles(("u.data", "u.data.gz"), encoding="latin-1")
    item_files = SourceFiles(("u.item", "u.item.gz"), encoding="latin-1")
    user_files = SourceFiles(("u.user", "u.user.gz"), encoding="latin-1")
    user_fields = ("gender", "age", "occupation", "zip_prefix")
    item_extra_fields = ("year",)

    def parse_interaction(self, line: str) -> list:
        line, fields = _fields(line, "\t", 4)
        if fields is None:
            return []
        return [Interaction(require_id(fields[0], line, "user_id"),
                            require_id(fields[1], line, "item_id"),
                            parse_timestamp(fields[3], line))]

    def parse_item(self, line: str) -> list:
        line, fields = _fields(line, "|", 5 + len(ML100K_GENRES))
        if fields is None:
            return []
        title = fields[1].strip()
        tags = tuple(g for g, flag in zip(ML100K_GENRES, fields[5:]) if flag.strip() == "1")
        year = _year_from_title(title)
        if not year and re.search(r"\d{4}$", fields[2].strip()):
            year = fields[2].strip()[-4:]
        return [Item(require_id(fields[0], line, "item_id"), title, tags, "", {"year": year})]

    def parse_user(self, line: str) -> list:
        line, fields = _fields(line, "|", 5)
        if fields is None:
            return []
        return [User(require_id(fields[0], line, "user_id"),
                     {"gender": fields[2].strip(), "age": _age_bucket(fields[1]),
                      "occupation": fields[3].strip(), "zip_prefix": _zip_prefix(fields[4])})]


# --------------------------------------------------------------------------------------------
# MIND
# --------------------------------------------------------------------------------------------
MIND_TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"
# MIND impressions start on 2019-11-09 (all splits); the click histories precede them.
MIND_HISTORY_ANCHOR = 1573257600  # 2019-11-09 00:00:00 UTC


class MindAdapter(Adapter):
    """MIND: ``news.tsv`` (8 columns) and ``behaviors.tsv`` (5 columns), tab-separated, no header.

    Items: category and subcategory are the tags (category first), no provider.

    Clicks come from two places of a behaviour line: the impressions marked ``-1`` (at the
    impression time, times read as UTC) and the ``history`` column, which has no timestamps. MIND
    histories are the user's clicks *before* the impression logs start (the same history is
    repeated on every impression line of a user), so history click ``j`` of ``n`` gets the time
    ``min(MIND_HISTORY_ANCHOR, impression time) - (n - j) * history_step_s``: order is kept, all
    history clicks precede all impression clicks (and land in the training period of a global
    time split), consecutive history clicks are ``history_step_s`` (600 s) apart so only a few
    neighbours fall in one session window, and the repeated history of a user yields exactly
    the same rows on every line (the pipeline can drop them as exact duplicates). Impression
    entries without a label (MIND test set) are not clicks.
    """

    name = "mind"
    interaction_files = SourceFiles(("behaviors.tsv", "behaviors.tsv.gz"))
    item_files = SourceFiles(("news.tsv", "news.tsv.gz"))
    user_files = SourceFiles(())
    user_fields = ()
    item_extra_fields = ()

    def __init__(self, history_step_s: int = 600, history_anchor: int = MIND_HISTORY_ANCHOR):
        self.history_step_s = int(history_step_s)
        self.history_anchor = int(history_anchor)

    @staticmethod
    def parse_time(value: str, line: str) -> int:
        try:
            dt = datetime.strptime(value.strip(), MIND_TIME_FORMAT)
        except ValueError:
            raise RowError(BAD_TIMESTAMP, line,
                           f"time {value!r} does not match {MIND_TIME_FORMAT!r}") from None
        return calendar.timegm(dt.timetuple())

    def parse_interaction(self, line: str) -> list:
        line, fields = _fields(line, "\t", 5)
        if fields is None:
            return []
        user = require_id(fields[1], line, "user_id")
        ts = self.parse_time(fields[2], line)
        history = fields[3].split()
        base = min(self.history_anchor, ts)
        n = len(history)
        rows = [Interaction(user, news, base - (n - j) * self.history_step_s)
                for j, news in enumerate(history)]
        for entry in fields[4].split():
            news, sep, label = entry.rpartition("-")
            if not sep:
                continue  # unlabelled impression (test set): not a click
            if label not in ("0", "1"):
                raise RowError(WRONG_FIELD_COUNT, line,
                               f"impression {entry!r} is not 'newsID-label' with label 0/1")
            if label == "1":
                rows.append(Interaction(user, require_id(news, line, "impression news id"), ts))
        return rows

    def parse_item(self, line: str) -> list:
        line, fields = _fields(line, "\t", 8)
        if fields is None:
            return []
        tags = tuple(t for t in (fields[1].strip(), fields[2].strip()) if t)
        return [Item(require_id(fields[0], line, "news_id"), fields[3].strip(), tags, "", {})]

    def parse_user(self, line: str) -> list:
        return []


# --------------------------------------------------------------------------------------------
# Amazon Review Data (2018)
# --------------------------------------------------------------------------------------------
_TAG = re.compile(r"<[^<>]*>")
_SPACES = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def _clean_text(value) -> str:
    """HTML entities and tags removed, whitespace collapsed; '' for scraping artefacts."""
    if not isinstance(value, str):
        return ""
    text = _SPACES.sub(" ", _TAG.sub(" ", html.unescape(value))).strip()
    if any(bad in text for bad in ("<", ">", '="')):
        return ""  # e.g. '<span class="a-size-medium a-color-secondary"', ' Magazines" />'
    return text


def _first_sentence(text: str, max_words: int = 30) -> str:
    sentence = _SENTENCE_END.split(text, maxsplit=1)[0]
    words = sentence.split()
    return " ".join(words[:max_words])


def _json_object(line: str) -> dict:
    try:
        obj = json.loads(line)
    except ValueError as err:
        raise RowError(BAD_JSON, line, f"invalid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise RowError(BAD_JSON, line, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _json_id(obj: dict, key: str, line: str) -> str:
    value = obj.get(key)
    if value is None or isinstance(value, (dict, list, bool)):
        raise RowError(EMPTY_ID, line, f"missing {key}")
    return require_id(str(value), line, key)


class AmazonAdapter(Adapter):
    """Amazon Review Data (2018): 5-core reviews ``*_5.json.gz`` + metadata ``meta_*.json.gz``.

    Each review is a click at ``unixReviewTime`` (day granularity). Items: ``title`` with HTML
    removed; the scraped placeholder titles fall back to the first sentence of ``description``,
    then to the brand. Tags = ``category`` without its root level (the category name of the
    file); provider = ``brand`` (or ``details["Publisher:"]``); extra field ``format`` from
    ``details["Format:"]``. The metadata repeats some products: de-duplicate on ``item_id``.
    No user table.
    """

    name = "amazon"
    interaction_files = SourceFiles(("*_5.json", "*_5.json.gz"))
    item_files = SourceFiles(("meta_*.json", "meta_*.json.gz"))
    user_files = SourceFiles(())
    user_fields = ()
    item_extra_fields = ("format",)

    def parse_interaction(self, line: str) -> list:
        line = _strip_eol(line)
        if not line.strip():
            return []
        obj = _json_object(line)
        user = _json_id(obj, "reviewerID", line)
        item = _json_id(obj, "asin", line)
        ts = obj.get("unixReviewTime")
        if isinstance(ts, float) and ts.is_integer():
            ts = int(ts)
        if isinstance(ts, bool) or not isinstance(ts, (int, str)):
            raise RowError(BAD_TIMESTAMP, line, f"unixReviewTime {ts!r} is not an integer")
        return [Interaction(user, item, parse_timestamp(str(ts), line))]

    def parse_item(self, line: str) -> list:
        line = _strip_eol(line)
        if not line.strip():
            return []
        obj = _json_object(line)
        item = _json_id(obj, "asin", line)
        details = obj.get("details") if isinstance(obj.get("details"), dict) else {}
        brand = _clean_text(obj.get("brand")) or _clean_text(details.get("Publisher:"))
        title = _clean_text(obj.get("title"))
        if not title:
            desc = obj.get("description")
            if isinstance(desc, list):
                desc = next((d for d in desc if _clean_text(d)), "")
            title = _first_sentence(_clean_text(desc)) or brand
        tags = []
        category = obj.get("category")
        if isinstance(category, list):
            for label in category[1:]:
                label = _clean_text(label)
                if label and label not in tags:
                    tags.append(label)
        fmt = _clean_text(details.get("Format:"))
        return [Item(item, title, tuple(tags), brand, {"format": fmt})]

    def parse_user(self, line: str) -> list:
        return []


# --------------------------------------------------------------------------------------------
ADAPTERS = {
    "movielens_1m": MovieLens1MAdapter,
    "movielens_100k": MovieLens100KAdapter,
    "mind": MindAdapter,
    "amazon": AmazonAdapter,
}
CANONICAL = ("synthetic", "canonical")


def get_adapter(data_cfg) -> Adapter:
    """The adapter for ``data_cfg.dataset`` reading ``data_cfg.data_dir`` (checked to exist).

    For ``synthetic`` the data must have been generated already
    (``micrec_tf.data.synthetic.ensure_generated``); nothing is generated here.
    """
    dataset = data_cfg.dataset
    data_dir = data_cfg.data_dir
    if dataset not in ADAPTERS and dataset not in CANONICAL:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(ADAPTERS) + list(CANONICAL)}")
    where = f"{data_dir!r} (absolute: {os.path.abspath(data_dir)})"
    if dataset == "synthetic":
        if not CanonicalAdapter.interaction_files.paths(data_dir):
            raise FileNotFoundError(
                f"synthetic data has not been generated in data_dir {where}: run "
                "`python -m micrec_tf.data.synthetic --config <config>` or call "
                "micrec_tf.data.synthetic.ensure_generated(cfg) first")
    elif not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir {where} for dataset {dataset!r} does not exist")
    if dataset in CANONICAL:
        adapter = CanonicalAdapter.from_dir(data_dir, name=dataset)
    else:
        adapter = ADAPTERS[dataset]()
    for what, files in (("interaction", adapter.interaction_files),
                        ("item", adapter.item_files)):
        if not files.paths(data_dir):
            raise FileNotFoundError(f"{dataset}: no {what} files matching "
                                    f"{list(files.patterns)} in data_dir {where}")
    return adapter
