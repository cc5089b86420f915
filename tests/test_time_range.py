"""One growing click log read window by window (``preprocess.time_range``, ``update --since
--until``; issue 29).

References: ``calendar.timegm`` for the dates; for the preprocess job, the same job run on a
folder whose click file was filtered by timestamp in plain Python (every artifact that counts
clicks must agree: the split counts, the vocabularies, the examples).
"""
from __future__ import annotations

import calendar
import os
import shutil

import numpy as np
import pytest

from micrec_tf.update import UpdateError, parse_time, time_range_arg
from tests.conftest import tiny_config


@pytest.mark.parametrize("text, expected", [
    ("1796515200", 1796515200),
    ("2026-12-06", calendar.timegm((2026, 12, 6, 0, 0, 0))),
    ("2026-12-06T06:30:00", calendar.timegm((2026, 12, 6, 6, 30, 0))),
    ("2026-12-06T06:30:00+01:00", calendar.timegm((2026, 12, 6, 5, 30, 0))),
])
def test_parse_time(text, expected):
    assert parse_time(text, "--since") == expected


def test_time_range_arguments():
    assert time_range_arg(None, None) is None
    assert time_range_arg("2026-12-06", "2026-12-07") == [
        calendar.timegm((2026, 12, 6, 0, 0, 0)), calendar.timegm((2026, 12, 7, 0, 0, 0))]
    with pytest.raises(UpdateError, match="--since and --until go together. Received: "
                                          "since='2026-12-06', until=None"):
        time_range_arg("2026-12-06", None)
    with pytest.raises(UpdateError, match="--since must be before --until"):
        time_range_arg("2026-12-07", "2026-12-06")
    with pytest.raises(UpdateError, match="--until must be Unix seconds or a date.*"
                                          "Received: 'yesterday'"):
        time_range_arg("2026-12-06", "yesterday")


def _lines(path):
    with open(path, encoding="utf-8") as fh:
        return fh.readlines()


@pytest.mark.slow
def test_a_time_range_equals_the_filtered_click_file(tmp_path):
    from micrec_tf.data.arrays import load_split_arrays
    from micrec_tf.data.synthetic import ensure_generated
    from pipelines import preprocess

    raw = ensure_generated(tiny_config(str(tmp_path)))
    clicks = _lines(os.path.join(raw, "interactions.tsv"))
    head, rows = clicks[0], clicks[1:]
    times = sorted(int(ln.split("\t")[2]) for ln in rows)
    since, until = times[len(times) // 4], times[3 * len(times) // 4]
    inside = [ln for ln in rows if since <= int(ln.split("\t")[2]) < until]
    assert 0 < len(inside) < len(rows)
    filtered = tmp_path / "filtered"
    os.makedirs(filtered)
    (filtered / "interactions.tsv").write_text(head + "".join(inside), encoding="utf-8")
    for name in ("items.tsv", "users.tsv"):
        shutil.copy(os.path.join(raw, name), filtered / name)

    base = {"data": {"dataset": "canonical"}}
    ranged = tiny_config(str(tmp_path / "a"), **base,
                         preprocess={"time_range": [since, until]})
    ranged = ranged.replace({"data.data_dir": raw})
    plain = tiny_config(str(tmp_path / "b"), **base).replace({"data.data_dir": str(filtered)})
    got = preprocess.run(ranged, verbose=False)
    want = preprocess.run(plain, verbose=False)
    assert got["time_range"] == [since, until]
    assert got["clicks_outside_time_range"] == len(rows) - len(inside)
    assert "time_range" not in want  # stats.json as before without the key
    assert got["events"] == want["events"] == len(inside)
    assert got["events_by_split"] == want["events_by_split"]
    assert got["dead_letters"]["total"] == want["dead_letters"]["total"] == 0
    for vocab in sorted(os.listdir(os.path.join(plain.artifacts_dir, "vocab"))):
        assert (_lines(os.path.join(ranged.artifacts_dir, "vocab", vocab))
                == _lines(os.path.join(plain.artifacts_dir, "vocab", vocab))), vocab
    for split in ("train", "valid", "test"):
        a = load_split_arrays(ranged.artifacts_dir, split)
        b = load_split_arrays(plain.artifacts_dir, split)
        assert sorted(a) == sorted(b)
        order_a = np.lexsort((a["item"], a["user_id"]))
        order_b = np.lexsort((b["item"], b["user_id"]))
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key])[order_a],
                                          np.asarray(b[key])[order_b], err_msg=f"{split}/{key}")
