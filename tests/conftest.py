"""Shared fixtures: a tiny synthetic dataset run through the real preprocessing jobs; the
``slow`` marker that ``make test-fast`` leaves out.

``make test`` runs every test. ``make test-fast`` (``pytest -m "not slow"``) is the edit-test
loop: no Beam job and no training run. A test is ``slow`` when it uses one of
:data:`SLOW_FIXTURES` (directly or through another fixture), is in a :data:`SLOW_MODULES` module,
is named in :data:`SLOW_TESTS`, or carries ``@pytest.mark.slow`` itself. Under
``-m "not slow"`` a Beam pipeline run or a training run (``Model.fit`` called from
:mod:`micrec_tf.train`) in this process fails the test that starts it, naming this marker; jobs
started in a subprocess are not seen, so such tests are listed by name.
"""
import asyncio
import glob
import json
import os
import sys
import threading

import pytest

from micrec_tf.config import from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Fixtures that run a Beam job, a training or an export (module or session scoped): every test
# that depends on one is slow.
SLOW_FIXTURES = frozenset({
    "tiny_pipeline",            # here: preprocess + title_neighbours (Beam)
    "env",                      # test_export, test_retrieve_cli: train + export
    "small",                    # test_export_publish: preprocess + train
    "gt", "llo",                # test_preprocess: the Beam job
    "full", "tie",              # test_cooccurrence: the Beam job
    "run",                      # test_dead_letters: the Beam job
    "quick_run",                # test_bench: the quick benchmark in a subprocess
    "trained",                  # test_export_readonly: train
    "finished",                 # test_run_state: train
})

# Test modules whose tests run Beam pipelines (TestPipeline) almost throughout.
SLOW_MODULES = frozenset({"test_pipelines_transforms.py"})

# Tests that run a Beam job or a training themselves, in this process or in a subprocess, as
# "module.py::test_name" (every parametrized case).
SLOW_TESTS = frozenset({
    "test_cli.py::test_pipelines_print_only_their_own_lines",
    "test_cooccurrence.py::test_capped_table_follows_the_reference_generator",
    "test_cooccurrence.py::test_parse_rows_carries_the_click_order",
    "test_cooccurrence.py::test_prepare_user_sorts_by_time_then_input_order_and_drops_the_key",
    "test_cooccurrence.py::test_user_cooccurrence_partials_merge_to_the_brute_force",
    "test_cooccurrence.py::test_cooccurrence_rows_rank_cut_and_flag",
    "test_folder_safety.py::test_preprocess_sweeps_what_a_killed_preprocess_left",
    "test_notebook.py::test_notebook_runs_headless_in_quick_mode",
    "test_preprocess.py::test_cli_on_generated_synthetic_data",
    "test_preprocess.py::test_identical_clicks_count_once_and_are_reported",
    "test_strict_readers.py::test_byte_order_mark_at_the_start_of_canonical_files_is_accepted",
    "test_strict_readers.py::test_duplicate_item_and_user_ids_go_to_the_dead_letters",
    "test_strict_readers.py::test_millisecond_timestamps_are_refused_naming_the_first_one",
    "test_title_neighbours.py::test_title_job",
})


def pytest_configure(config):
    """Registers the ``slow`` marker (``pytest --markers`` lists it)."""
    config.addinivalue_line(
        "markers", "slow: runs a Beam job, a training or an export; left out by make test-fast")


def pytest_collection_modifyitems(config, items):
    """Marks ``slow`` the tests that use a :data:`SLOW_FIXTURES` fixture, are in a
    :data:`SLOW_MODULES` module or are named in :data:`SLOW_TESTS`."""
    for item in items:
        module = os.path.basename(str(item.fspath))
        name = f"{module}::{getattr(item, 'originalname', None) or item.name}"
        if (SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or module in SLOW_MODULES
                or name in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _fast_selection_guard(request):
    """Under ``-m "not slow"``: a Beam pipeline run, or a training run (``Model.fit`` called from
    :mod:`micrec_tf.train`), raises instead of running, so a test that needs one and is not
    marked ``slow`` fails and says so rather than slowing the edit-test loop."""
    if "not slow" not in (request.config.getoption("markexpr") or ""):
        yield
        return
    import apache_beam as beam
    import tf_keras

    def refuse(what):
        return RuntimeError(f"{what} under -m 'not slow' (make test-fast): mark the test slow "
                            "(@pytest.mark.slow, or SLOW_FIXTURES / SLOW_TESTS in "
                            "tests/conftest.py)")

    def no_beam(self, *args, **kwargs):
        raise refuse("a Beam job")

    real_fit = tf_keras.Model.fit

    def fit_unless_training_run(self, *args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__") == "micrec_tf.train":
            raise refuse("a training run (micrec_tf.train)")
        return real_fit(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(beam.Pipeline, "run", no_beam)
        mp.setattr(tf_keras.Model, "fit", fit_unless_training_run)
        yield


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


def tiny_export_raw(root) -> dict:
    """The raw config (a dict, for a YAML file) of the tiny exported run the export and index
    tests train: 1,200 items, feature + session CL, one epoch, everything under ``root``."""
    root = str(root)
    return {
        "name": "tiny",
        "artifacts_root": os.path.join(root, "artifacts"),
        "data": {"dataset": "synthetic", "data_dir": os.path.join(root, "data"),
                 "synthetic": {"num_users": 150, "num_items": 1200, "num_events": 4000,
                               "num_topics": 8, "seed": 3}},
        "preprocess": {"num_shards": 1},
        "model": {"cl": ["feature", "session"], "embedding_dim": 16,
                  "item_mlp_units": [32, 64], "user_mlp_units": [32, 64]},
        "loss": {"num_negatives": 64},
        "train": {"batch_size": 512, "epochs": 1, "runs_dir": os.path.join(root, "runs"),
                  "early_stopping_patience": 0},
        "export": {"exports_dir": os.path.join(root, "exports")},
    }


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """(cfg, tmp dir) after the preprocessing and title-neighbour (taxonomy) jobs have run."""
    from pipelines import preprocess, title_neighbours

    tmp = str(tmp_path_factory.mktemp("tiny"))
    cfg = tiny_config(tmp)
    preprocess.run(cfg, verbose=False)
    title_neighbours.run(cfg, verbose=False)
    return cfg, tmp


def tiny_item_fields(num_items: int, max_tags: int = 2, seed: int = 0):
    """The hand-sized catalogue of the layer tests: ``(vocab_sizes, tags, provider, year, rs)``.

    ``tags`` int64 [V, max_tags] (first tag of every item 1..V-1 drawn from 1..4, the rest 0),
    ``provider`` / ``year`` int [V] drawn from 1..2 / 1..3 (row 0 padding); vocabulary sizes 5
    tags, 3 providers, 4 years, 3 genders. ``rs`` is the ``RandomState(seed)`` they were drawn
    from, returned so that a test's later draws continue the same stream.
    """
    import numpy as np

    rs = np.random.RandomState(seed)
    tags = np.zeros((num_items, max_tags), np.int64)
    tags[1:, 0] = rs.randint(1, 5, num_items - 1)
    provider = np.where(np.arange(num_items) > 0, rs.randint(1, 3, num_items), 0)
    year = np.where(np.arange(num_items) > 0, rs.randint(1, 4, num_items), 0)
    vocab = {"item_id": num_items, "tag": 5, "provider": 3, "item_year": 4, "user_gender": 3}
    return vocab, tags, provider, year, rs


# Micro-batcher test helpers (tests/test_server_deadlines.py, tests/test_batcher_queue_delay.py).
LONG_WAIT_MS = 600_000.0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


class Recorder:
    """``fn``: records each batch, item -> item * 10; the first call waits on ``gate``."""

    def __init__(self):
        self.calls = []
        self.started = threading.Event()
        self.gate = threading.Event()

    def __call__(self, items):
        self.calls.append(list(items))
        self.started.set()
        assert self.gate.wait(30), "gate never opened"
        return [x * 10 for x in items]


async def until(predicate):
    while not predicate():
        await asyncio.sleep(0.002)
