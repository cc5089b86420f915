"""Strict readers: a bad artifact or raw input line is one error naming ``file:line``.

Artifact readers (vocabularies, ``items.jsonl``, ``title_neighbours.jsonl``) refuse repeated or
unknown entries, and the command-line entry points print them as one ``error:`` line (exit 2),
not a traceback. Each test damages a private copy of the ``tiny_pipeline`` artifacts.
"""
import json
import os
import shutil

import pytest
import yaml

from micrec_tf import cli
from micrec_tf.data.artifacts import ArtifactError, load_artifacts, read_items


@pytest.fixture
def copy(tiny_pipeline, tmp_path):
    """(cfg, artifacts dir, config path) of a private copy of the tiny pipeline's artifacts."""
    cfg, _ = tiny_pipeline
    cfg = cfg.replace({"artifacts_root": str(tmp_path / "artifacts"),
                       "train.runs_dir": str(tmp_path / "runs"), "train.epochs": 1})
    shutil.copytree(tiny_pipeline[0].artifacts_dir, cfg.artifacts_dir)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return cfg, cfg.artifacts_dir, str(path)


def _lines(path):
    with open(path, encoding="utf-8") as fh:
        return fh.read().splitlines()


def _write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))


def _train_error(config_path, capsys, *sets):
    """The one stderr line of ``micrec_tf.train`` (asserting exit 2 and a single line)."""
    from micrec_tf.train import main

    argv = ["--config", config_path] + [a for s in sets for a in ("--set", s)]
    assert cli.run(main, argv) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    return lines[0]


def test_repeated_vocabulary_line_is_refused_with_file_and_line(copy, capsys):
    """A repeated value in vocab/<field>.txt maps two indices to one key: it trained silently
    and was rejected only at export. The count still matches feature_spec.json here."""
    _, art, config_path = copy
    path = os.path.join(art, "vocab", "tag.txt")
    lines = _lines(path)
    assert len(lines) >= 3 and len(set(lines)) == len(lines)
    lines[2] = lines[0]
    _write_lines(path, lines)
    with pytest.raises(ArtifactError, match=rf"tag\.txt:3: value {lines[0]!r} repeats line 1"):
        load_artifacts(art)
    line = _train_error(config_path, capsys)
    assert "tag.txt:3" in line and "pipelines.preprocess" in line


def test_repeated_items_line_is_one_error_line(copy, capsys):
    _, art, config_path = copy
    path = os.path.join(art, "items", "items.jsonl")
    lines = _lines(path)
    _write_lines(path, lines[:2] + [lines[1]] + lines[2:])
    item = json.loads(lines[1])["item"]
    with pytest.raises(ValueError, match=rf"items\.jsonl:3: item {item} appears twice"):
        read_items(path)
    line = _train_error(config_path, capsys)
    assert f"items.jsonl:3: item {item} appears twice" in line


def test_repeated_item_id_in_items_jsonl_is_refused(copy):
    """Two indices with one ``item_id``: retrieval's id -> title map would keep only one."""
    _, art, _ = copy
    path = os.path.join(art, "items", "items.jsonl")
    lines = _lines(path)
    first, second = json.loads(lines[0]), json.loads(lines[1])
    second["item_id"] = first["item_id"]
    lines[1] = json.dumps(second)
    _write_lines(path, lines)
    with pytest.raises(ArtifactError,
                       match=rf"items\.jsonl:2: item_id {first['item_id']!r} repeats line 1"):
        read_items(path)


def test_unknown_item_in_the_neighbour_table_is_one_error_line(copy, capsys):
    _, art, config_path = copy
    path = os.path.join(art, "title_neighbours", "title_neighbours.jsonl")
    lines = _lines(path)
    row = json.loads(lines[1])
    row["item"] = 10 ** 6  # far outside the tiny item vocabulary
    lines[1] = json.dumps(row)
    _write_lines(path, lines)
    line = _train_error(config_path, capsys)
    assert "title_neighbours.jsonl:2" in line and "1000000" in line


def test_semantic_cl_without_title_neighbours_says_which_job_to_run(copy, capsys):
    """``pipelines.preprocess`` alone, then training with semantic CL: one line with the command
    that writes the missing table (no silent drop of the CL term)."""
    _, art, config_path = copy
    shutil.rmtree(os.path.join(art, "title_neighbours"))
    line = _train_error(config_path, capsys)
    assert "python -m pipelines.title_neighbours --config" in line
    assert "title_neighbours.jsonl" in line and "semantic" in line


# ------------------------------------------------------------------------------- raw input
T = 1_700_000_000
BOM = "\ufeff".encode("utf-8")


def _raw_dataset(root, interactions=None, items=None, users=None):
    """A tiny canonical dataset; each table is a list of lines (header first), UTF-8."""
    items = items or (["item_id\ttitle\ttags\tprovider"]
                      + [f"i{k}\tTitle {k}\tt{k % 2}\tp{k % 3}" for k in range(6)])
    interactions = interactions or (["user_id\titem_id\ttimestamp"]
                                    + [f"u{k % 4}\ti{k % 6}\t{T + 60 * k}" for k in range(40)])
    users = users or ["user_id\tgender"] + [f"u{k}\t{'MF'[k % 2]}" for k in range(4)]
    os.makedirs(root, exist_ok=True)
    for name, lines in (("items.tsv", items), ("interactions.tsv", interactions),
                        ("users.tsv", users)):
        data = lines if isinstance(lines, bytes) else "".join(l + "\n" for l in lines).encode()
        with open(os.path.join(root, name), "wb") as fh:
            fh.write(data)
    return root


def _raw_config(tmp_path, root):
    path = tmp_path / "raw.yaml"
    path.write_text(yaml.safe_dump({
        "name": "raw", "artifacts_root": str(tmp_path / "artifacts"),
        "data": {"dataset": "canonical", "data_dir": root},
        "preprocess": {"split": "leave_last_out", "num_shards": 1}}))
    return str(path)


def _dead_letters(art):
    with open(os.path.join(art, "dead_letters", "dead_letters.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_byte_order_mark_at_the_start_of_canonical_files_is_accepted(tmp_path):
    """A UTF-8 BOM before the header (as Excel and Notepad write it) is not part of the first
    field name: the header is recognised, and no line is dead-lettered."""
    from micrec_tf.config import load_config
    from micrec_tf.data.adapters import CanonicalAdapter
    from pipelines import preprocess

    plain = _raw_dataset(str(tmp_path / "plain"))
    root = str(tmp_path / "bom")
    shutil.copytree(plain, root)
    for name in ("items.tsv", "interactions.tsv", "users.tsv"):
        path = os.path.join(root, name)
        with open(path, "rb") as fh:
            data = fh.read()
        with open(path, "wb") as fh:
            fh.write(BOM + data)
    adapter = CanonicalAdapter.from_dir(root)
    assert adapter.user_fields == ("gender",) and adapter.item_extra_fields == ()
    assert adapter.parse_item("\ufeffitem_id\ttitle\ttags\tprovider") == []
    assert adapter.parse_interaction("\ufeffuser_id\titem_id\ttimestamp") == []
    assert adapter.parse_user("\ufeffuser_id\tgender") == []
    stats = preprocess.run(load_config(_raw_config(tmp_path, root)), verbose=False)
    assert stats["dead_letters"]["total"] == 0, _dead_letters(os.path.join(
        str(tmp_path / "artifacts"), "raw"))
    assert stats["events"] == 40 and stats["items_in_table"] == 6
    assert stats["users_in_table"] == 4 and stats["users_without_profile"] == 0
    for source in ("interactions", "items", "users"):
        assert stats["rows"][source]["skipped_header_or_blank"] == 1, source


def test_duplicate_item_and_user_ids_go_to_the_dead_letters(tmp_path):
    """The first row of an id (file order) is kept; a later row with the same id is a dead letter
    (``duplicate_item_id`` / ``duplicate_user_id``) naming the line it repeats, counted in
    stats.json and the summary. Before, the row with the smallest repr won, silently."""
    from micrec_tf.config import load_config
    from pipelines import preprocess

    items = (["item_id\ttitle\ttags\tprovider"]
             + [f"i{k}\tTitle {k}\tt{k % 2}\tp{k % 3}" for k in range(6)]
             + ["i3\tA different title\tt1\tp1"])  # line 8 repeats line 5 (i3)
    users = ["user_id\tgender"] + [f"u{k}\t{'MF'[k % 2]}" for k in range(4)] + ["u1\tF"]
    root = _raw_dataset(str(tmp_path / "raw"), items=items, users=users)
    cfg = load_config(_raw_config(tmp_path, root))
    stats = preprocess.run(cfg, verbose=False)
    dead = _dead_letters(cfg.artifacts_dir)
    got = sorted((d["source"], os.path.basename(d["file"]), d["line_number"], d["reason"])
                 for d in dead)
    assert got == [("items", "items.tsv", 8, "duplicate_item_id"),
                   ("users", "users.tsv", 6, "duplicate_user_id")]
    assert "line 5" in [d for d in dead if d["source"] == "items"][0]["detail"]
    assert stats["dead_letters"]["by_reason"]["duplicate_item_id"] == 1
    assert stats["dead_letters"]["by_reason"]["duplicate_user_id"] == 1
    assert stats["dead_letters"]["beam_counters"] == stats["dead_letters"]["by_reason"]
    assert stats["items_in_table"] == 6 and stats["users_in_table"] == 4
    titles = {r["item_id"]: r["title"] for r in read_items(cfg.artifacts_dir)}
    assert titles["i3"] == "Title 3"  # the first row, not "A different title"
    assert "duplicate_item_id 1" in preprocess.summary_text(stats, cfg.artifacts_dir)


def test_millisecond_timestamps_are_refused_naming_the_first_one(tmp_path, capsys):
    """Milliseconds read as seconds put every click in its own session (zero co-occurrence
    pairs, session CL loss 0) without a word: the job stops at the first such value."""
    from pipelines import preprocess

    clicks = (["user_id\titem_id\ttimestamp"]
              + [f"u{k % 4}\ti{k % 6}\t{(T + 60 * k) * 1000 + 123}" for k in range(40)])
    root = _raw_dataset(str(tmp_path / "raw"), interactions=clicks)
    config_path = _raw_config(tmp_path, root)
    assert cli.run(preprocess.main, ["--config", config_path]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert f"interactions.tsv:2: timestamp {T * 1000 + 123} looks like milliseconds" in lines[0]
    assert "Traceback" not in out + err and "while running" not in lines[0]
    assert not os.path.exists(os.path.join(str(tmp_path / "artifacts"), "raw"))


def test_input_error_from_a_beam_worker_is_one_line(capsys):
    """A runner with worker processes raises a RuntimeError holding the worker's traceback text;
    an in-process runner re-raises the error with the step appended. Both end in one line."""
    from micrec_tf.data.schema import InputError

    text = ("Traceback (most recent call last):\n  File \"x.py\", line 3, in process\n"
            "micrec_tf.data.schema.InputError: /d/interactions.tsv:7: timestamp 1700000000123 "
            "looks like milliseconds [while running 'Interactions/ParseInteractions']\n\n")
    for err in (RuntimeError(text),
                InputError("/d/interactions.tsv:7: timestamp 1700000000123 looks like "
                           "milliseconds [while running 'Interactions/ParseInteractions']")):
        def main(argv, err=err):
            raise err

        assert cli.run(main, []) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert lines == ["error: /d/interactions.tsv:7: timestamp 1700000000123 looks like "
                         "milliseconds (--debug shows the traceback)"]

    def bug(argv):
        raise RuntimeError("Traceback ...\nKeyError: 'x'\n")

    with pytest.raises(RuntimeError):  # any other failure keeps its traceback
        cli.run(bug, [])


def test_bad_canonical_header_is_one_error_line(tmp_path, capsys):
    """A header without the fixed columns: one line naming ``file:1``, before any Beam work."""
    from pipelines import preprocess

    items = ["id\tname\ttags\tprovider"] + [f"i{k}\tTitle {k}\tt0\tp0" for k in range(6)]
    root = _raw_dataset(str(tmp_path / "raw"), items=items)
    assert cli.run(preprocess.main, ["--config", _raw_config(tmp_path, root)]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "items.tsv:1: header must start with" in lines[0], err
    assert "Traceback" not in out + err
