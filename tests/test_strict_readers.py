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
