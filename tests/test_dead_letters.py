"""Dead letters keep the original line: file, 1-based line number and the exact bytes as stored.

References are computed in plain Python from the input files (``for raw in open(path, "rb")``).
"""
import base64
import collections
import gzip
import io
import json
import os

import pytest

import micrec_tf  # noqa: F401  (before tensorflow)
from micrec_tf.config import from_dict
from micrec_tf.data import schema
from micrec_tf.data.adapters import CanonicalAdapter
from pipelines import preprocess, rows

T = 1_600_000_000
ITEMS = [f"i{k}" for k in range(8)]

# (raw bytes of one line, reason or None for a good line / header / blank line)
INTERACTIONS_A = [
    (b"user_id\titem_id\ttimestamp\n", None),
    *[(f"u{k % 3}\t{ITEMS[k % 8]}\t{T + 60 * k}\n".encode(), None) for k in range(12)],
    (b"u1\ti1\n", "wrong_field_count"),
    (b"u1\ti1\tsoon\n", "bad_timestamp"),
    (b"u1\ti1\t16\xe900\n", "bad_timestamp"),  # invalid UTF-8 in the timestamp
    (b"u1\ti\xff1\t1600000000\n", "bad_encoding"),  # invalid UTF-8 in an id: never guessed
    (b"u\xff\ti1\t1600000000\n", "bad_encoding"),
    (b"\xff\xfe\tbad\n", "wrong_field_count"),  # invalid UTF-8, two fields
    (b"u1;i1;1600000000\n", "wrong_field_count"),  # odd separator
    (b"u1\t\ti1\t1600000000\n", "wrong_field_count"),  # doubled tab
    (b"u1 i1\t1600000000\n", "wrong_field_count"),
    (b"u1\ti1\t1600\r000\n", "bad_timestamp"),  # a lone CR does not end a line
    (b"\n", None),
    (b"\t\t\n", None),  # blank: skipped
    (b"\ti1\t1600000000\n", "empty_id"),
    (b"u2\ti2\t 1600000100 \r\n", None),  # CRLF, padded timestamp: valid
    (b"u2\tnot_an_item\t1600000200\r\n", "unknown_item"),
    (b"u2\ti3\tnope", "bad_timestamp"),  # last line without a newline
]
INTERACTIONS_B = [  # gzipped
    (b"user_id\titem_id\ttimestamp\n", None),
    (b"u4\ti4\t1600000300\n", None),
    (b"u4\ti\xc3\xa9\t1600000400\n", "unknown_item"),  # valid UTF-8, unknown id
    (b"u4\ti5\t-1\n", "bad_timestamp"),
    (b"u4\ti5\t1600000500\n", None),
]
ITEMS_ROWS = [
    (b"item_id\ttitle\ttags\tprovider\n", None),
    *[(f"{i}\tTitle {i}\tt{k % 3}\tp{k % 2}\n".encode(), None) for k, i in enumerate(ITEMS)],
    (b"i9\tno fields\n", "wrong_field_count"),
    (b"i\xfe9\tTitle\tt1\tp1\n", "bad_encoding"),
    (b"i7b\tTitle \xff\tt1\tp1\n", None),  # a bad byte in a title only: kept, as U+FFFD
    (b" \tEmpty id\tt1\tp1\n", "empty_id"),
]
USERS_ROWS = [
    (b"user_id\tgender\r\n", None),
    *[(f"u{k}\t{'MF'[k % 2]}\r\n".encode(), None) for k in range(5)],
    (b"u7\tF\textra\r\n", "wrong_field_count"),
]
FILES = {  # name -> (source, rows)
    "interactions-a.tsv": ("interactions", INTERACTIONS_A),
    "interactions-b.tsv.gz": ("interactions", INTERACTIONS_B),
    "items.tsv": ("items", ITEMS_ROWS),
    "users.tsv": ("users", USERS_ROWS),
}


def write_raw(root):
    for name, (_, rows) in FILES.items():
        data = b"".join(raw for raw, _ in rows)
        opener = gzip.open if name.endswith(".gz") else open
        with opener(os.path.join(root, name), "wb") as fh:
            fh.write(data)


def file_lines(path):
    """{line number: raw bytes} read back from the file in plain Python."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        return {k + 1: raw for k, raw in enumerate(fh)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The job on the raw files above, with uncompressed files split into 60-byte ranges."""
    root = str(tmp_path_factory.mktemp("raw"))
    write_raw(root)
    out = str(tmp_path_factory.mktemp("out"))
    cfg = from_dict({"name": "dl", "artifacts_root": out,
                     "data": {"dataset": "canonical", "data_dir": root},
                     "preprocess": {"split": "leave_last_out", "num_shards": 1}})
    mp = pytest.MonkeyPatch()
    mp.setattr(rows, "READ_RANGE_BYTES", 60)  # read when ReadSource is built
    try:
        stats = preprocess.run(cfg, ["--direct_num_workers=1"],
                               adapter=CanonicalAdapter.from_dir(root), verbose=False)
    finally:
        mp.undo()
    with open(os.path.join(cfg.artifacts_dir, "dead_letters", "dead_letters.jsonl"),
              encoding="utf-8") as fh:
        dead = [json.loads(line) for line in fh]
    return root, stats, dead


def test_dead_letters_carry_the_exact_raw_line(run):
    root, stats, dead = run
    want = {}
    for name, (source, rows) in FILES.items():
        for k, (_, reason) in enumerate(rows):
            if reason:
                want[(source, os.path.join(root, name), k + 1)] = reason
    got = {(d["source"], d["file"], d["line_number"]): d["reason"] for d in dead}
    assert got == want and len(dead) == len(want)
    for d in dead:
        raw = base64.b64decode(d["raw"], validate=True)
        assert raw == file_lines(d["file"])[d["line_number"]], d
        assert d["text"] == raw.decode("utf-8", errors="replace").rstrip("\r\n")
        assert d["detail"], d
    assert stats["dead_letters"]["total"] == len(want)
    assert stats["dead_letters"]["by_reason"] == {
        r: collections.Counter(want.values()).get(r, 0) for r in schema.REASONS}


def test_good_lines_are_all_kept(run):
    _, stats, _ = run
    good = sum(1 for name in ("interactions-a.tsv", "interactions-b.tsv.gz")
               for raw, reason in FILES[name][1]
               if reason is None and raw.strip() and not raw.startswith(b"user_id"))
    assert stats["events"] == good
    rows = stats["rows"]["interactions"]
    assert rows["read"] == len(INTERACTIONS_A) + len(INTERACTIONS_B)
    assert stats["users_in_table"] == 5 and stats["items_in_table"] == len(ITEMS) + 1  # + i7b


def test_dead_letters_replay(run, tmp_path):
    """The raw lines of the dead letters, written back in order, are the bad lines' bytes."""
    root, _, dead = run
    path = os.path.join(root, "interactions-a.tsv")
    replay = b"".join(base64.b64decode(d["raw"]) for d in dead if d["file"] == path)
    assert replay == b"".join(raw for raw, reason in INTERACTIONS_A if reason)


@pytest.mark.parametrize("range_bytes", [1, 5, 13, 64, 10_000])
def test_numbered_ranges_cover_the_file(tmp_path, range_bytes):
    """line_ranges + read_range give every line once, numbered, bytes as stored."""
    data = (b"a\tb\r\n\n\nlong line " + b"x" * 40 + b"\n\xff\xfe\rz\n" + b"y" * 30
            + b"\nlast without newline")
    path = str(tmp_path / "f.tsv")
    with open(path, "wb") as fh:
        fh.write(data)
    ranges = rows.line_ranges(path, range_bytes)
    got = [(n, raw) for r in ranges for _, n, raw in rows.read_range(r)]
    assert got == sorted(file_lines(path).items())
    assert b"".join(raw for _, raw in got) == data
    if range_bytes < 20:
        assert len(ranges) > 1


def test_numbered_lines_small_blocks():
    data = b"one\ntwo lines\r\n\nthree"
    assert list(rows.numbered_lines(io.BytesIO(data), 5, block_bytes=3)) == [
        (5, b"one\n"), (6, b"two lines\r\n"), (7, b"\n"), (8, b"three")]
    assert list(rows.numbered_lines(io.BytesIO(data), 1, limit=8, block_bytes=3)) == [
        (1, b"one\n"), (2, b"two ")]
