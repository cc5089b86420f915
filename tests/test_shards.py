"""Incomplete or damaged example shards stop every reader with an error naming the file.

Each test damages a copy of the ``tiny_pipeline`` artifacts (the shared fixture stays intact).
Record counts are taken independently of TensorFlow, from the TFRecord framing (an 8-byte
little-endian length, a 4-byte CRC, the data, a 4-byte CRC) of the gunzipped files.
"""
import glob
import gzip
import json
import os
import shutil
import struct

import pytest
import yaml

from micrec_tf.data.artifacts import ArtifactError, load_artifacts, split_files


def frames(path):
    """The raw TFRecord frames (header, data and CRCs, as bytes) of a GZIP TFRecord file."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        end = pos + 8 + 4 + length + 4
        assert end <= len(data), f"{path}: frame at {pos} runs past the end"
        out.append(data[pos:end])
        pos = end
    return out


def shards(art, split):
    return sorted(glob.glob(os.path.join(art, "examples", f"{split}-*-of-*.tfrecord.gz")))


def recorded(art, split):
    with open(os.path.join(art, "examples", "feature_spec.json")) as fh:
        return json.load(fh)["num_examples"][split]


def biggest_shard(art, split):
    """The shard of ``split`` with the most records (so that damaging it loses examples)."""
    return max(shards(art, split), key=lambda p: len(frames(p)))


@pytest.fixture
def copy(tiny_pipeline, tmp_path):
    """(cfg, artifacts dir) of a private copy of the tiny pipeline's artifacts."""
    cfg, _ = tiny_pipeline
    cfg = cfg.replace({"artifacts_root": str(tmp_path / "artifacts"),
                       "train.runs_dir": str(tmp_path / "runs")})
    shutil.copytree(tiny_pipeline[0].artifacts_dir, cfg.artifacts_dir)
    return cfg, cfg.artifacts_dir


def delete_shard(art, split="train"):
    path = shards(art, split)[-1]
    os.remove(path)
    return path


def truncate_shard(art, split="train"):
    path = biggest_shard(art, split)
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[:len(data) // 2])
    return path


def halve_shard(art, split="train"):
    """Rewrites a shard, validly, with only its first half of records; returns (path, lost)."""
    path = biggest_shard(art, split)
    kept = frames(path)
    lost = len(kept) - len(kept) // 2
    with gzip.open(path, "wb") as fh:
        fh.write(b"".join(kept[:len(kept) // 2]))
    return path, lost


def load_train(art):
    from micrec_tf.evaluation.data import load_split_arrays

    return load_split_arrays(art, "train", ["item"])


def count_dataset(art, split):
    from micrec_tf.data.input import make_dataset

    return sum(int(b["item"].shape[0]) for b in make_dataset(art, split, batch_size=64))


# ----------------------------------------------------------------------------- the readers
def test_intact_copy_loads_every_recorded_example(copy):
    _, art = copy
    for split in ("train", "valid", "test"):
        files = shards(art, split)
        n = sum(len(frames(p)) for p in files)
        assert n == recorded(art, split) > 0
        assert split_files(art, split) == files
    assert load_train(art)["item"].shape == (recorded(art, "train"),)
    assert count_dataset(art, "train") == recorded(art, "train")


def test_missing_shard_is_named_by_every_reader(copy):
    _, art = copy
    path = delete_shard(art)
    name = os.path.basename(path)
    assert name.startswith("train-") and "-of-" in name
    for read in (load_train, lambda a: count_dataset(a, "train"), load_artifacts):
        with pytest.raises(ArtifactError, match=name) as err:
            read(art)
        assert "preprocess" in str(err.value)
        assert isinstance(err.value, FileNotFoundError)  # one-line error in the CLIs


def test_whole_split_missing_while_recorded(copy):
    _, art = copy
    for path in shards(art, "valid"):
        os.remove(path)
    with pytest.raises(ArtifactError, match=r"no valid shards.*records \d+ valid examples"):
        load_artifacts(art)


def test_mixed_shard_sets_are_rejected(copy):
    _, art = copy
    stale = os.path.join(art, "examples", "train-00000-of-00003.tfrecord.gz")
    shutil.copy(shards(art, "train")[0], stale)
    with pytest.raises(ArtifactError, match=r"mixes train shard sets of \[2, 3\]"):
        load_train(art)


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_unreadable_shard_is_named(copy, damage):
    _, art = copy
    if damage == "truncate":
        path = truncate_shard(art)
    else:
        path = biggest_shard(art, "train")
        with open(path, "rb") as fh:
            data = bytearray(fh.read())
        mid = len(data) // 2
        data[mid:mid + 16] = b"\xff" * 16
        with open(path, "wb") as fh:
            fh.write(bytes(data))
    with pytest.raises(ArtifactError, match="truncated or corrupt") as err:
        load_train(art)
    assert path in str(err.value) and "[Op:" not in str(err.value)


def test_short_shard_fails_the_count_check(copy):
    _, art = copy
    path, lost = halve_shard(art)
    total = recorded(art, "train")
    with pytest.raises(ArtifactError, match=rf"train split has {total - lost} examples .*"
                                            rf"feature_spec.json records {total}") as err:
        load_train(art)
    assert f"{os.path.basename(path)}: {len(frames(path))}" in str(err.value)


def test_empty_shard_fails_the_count_check(copy):
    """A file cut to its first bytes reads as 0 records without a TensorFlow error."""
    _, art = copy
    path = shards(art, "valid")[0]
    with open(path, "rb") as fh:
        head = fh.read(10)
    with open(path, "wb") as fh:
        fh.write(head)
    from micrec_tf.evaluation.data import load_split_arrays

    with pytest.raises(ArtifactError, match=rf"{os.path.basename(path)}: 0\b"):
        load_split_arrays(art, "valid")


# ----------------------------------------------------------------------------- training
class _Started(Exception):
    pass


def _no_epoch():
    """A Keras callback that fails the test if training reaches an epoch."""
    import tf_keras

    class NoEpoch(tf_keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            raise _Started("training started on damaged artifacts")

    return NoEpoch()


@pytest.mark.parametrize("damage", ["delete", "truncate", "halve"])
def test_training_stops_before_the_first_epoch(copy, damage):
    from micrec_tf.train import train

    cfg, art = copy
    if damage == "delete":
        expected = os.path.basename(delete_shard(art))
    elif damage == "truncate":
        expected = os.path.basename(truncate_shard(art))
    else:
        halve_shard(art)
        expected = rf"train split has \d+ examples .* records {recorded(art, 'train')}"
    with pytest.raises(ArtifactError, match=expected):
        train(cfg, log=lambda *a: None, extra_callbacks=[_no_epoch()])


def test_training_names_a_shard_corrupt_at_its_start(copy):
    from micrec_tf.train import train

    cfg, art = copy
    path = shards(art, "valid")[0]
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[:30] + b"\xff" * 16 + data[46:])
    with pytest.raises(ArtifactError, match=os.path.basename(path)):
        train(cfg, log=lambda *a: None, extra_callbacks=[_no_epoch()])


def test_train_cli_prints_one_line_naming_the_missing_shard(copy, tmp_path, capsys):
    from micrec_tf import cli
    from micrec_tf.train import main

    cfg, art = copy
    path = delete_shard(art)
    config = tmp_path / "broken.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert cli.run(main, ["--config", str(config)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and path in err[0]
