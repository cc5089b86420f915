"""Shared fixtures: a tiny synthetic dataset run through the real preprocessing jobs."""
import glob
import json
import os

import pytest

from micrec_tf.config import from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_examples(art: str, split: str) -> list:
    """Every example of ``split`` in the artifacts at ``art``, parsed with the committed
    ``feature_spec.json`` alone (not the library's reader): [{feature: str or [int]}]."""
    import tensorflow as tf

    with open(os.path.join(art, "examples", "feature_spec.json"), encoding="utf-8") as fh:
        spec = json.load(fh)
    parse = {k: tf.io.FixedLenFeature(v["shape"], tf.string if v["dtype"] == "string" else tf.int64)
             for k, v in spec["features"].items()}
    files = sorted(glob.glob(os.path.join(art, "examples", f"{split}-*.tfrecord.gz")))
    out = []
    for rec in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        ex = tf.io.parse_single_example(rec, parse)
        out.append({k: (v.numpy()[0].decode() if v.dtype == tf.string else v.numpy().tolist())
                    for k, v in ex.items()})
    return out


def tiny_config(tmp: str, **sections) -> "object":
    """A small, fast config whose data, artifacts, runs and exports all live under ``tmp``."""
    raw = {
        "name": "tiny",
        "artifacts_root": os.path.join(tmp, "artifacts"),
        "data": {"dataset": "synthetic", "data_dir": os.path.join(tmp, "data"),
                 "synthetic": {"num_users": 150, "num_items": 300, "num_events": 4000,
                               "num_topics": 6, "seed": 3}},
        "preprocess": {"num_shards": 2},
        "semantic": {"source": "taxonomy", "top_k": 5},
        "model": {"embedding_dim": 16, "output_dim": 16, "item_mlp_units": [32, 16, 16],
                  "user_mlp_units": [32, 16, 16], "cl": ["feature", "semantic", "session"]},
        "loss": {"num_negatives": 64, "num_cl_negatives": 20, "temperature": 0.2},
        "train": {"batch_size": 256, "epochs": 2, "runs_dir": os.path.join(tmp, "runs"),
                  "steps_per_checkpoint": 2, "early_stopping_patience": 0},
        "eval": {"hit_n": [10, 50], "coverage_n": [10, 50]},
        "export": {"exports_dir": os.path.join(tmp, "exports")},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return from_dict(raw)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """(cfg, tmp dir) after the preprocessing and title-neighbour (taxonomy) jobs have run."""
    from pipelines import preprocess, title_neighbours

    tmp = str(tmp_path_factory.mktemp("tiny"))
    cfg = tiny_config(tmp)
    preprocess.run(cfg, verbose=False)
    title_neighbours.run(cfg, verbose=False)
    return cfg, tmp
