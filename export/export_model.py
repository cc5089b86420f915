"""Exports a trained run: ``python -m export.export_model --config configs/x.yaml [--run-dir DIR]``.

Layout (one complete version per directory; see docs/SERVING.md)::

    exports/<name>/
      <version>/                 integer Unix timestamp of the export
        user_tower/              SavedModel, signature serving_default (export/serving.py),
                                 assets/ = vocab files, assets.extra/tf_serving_warmup_requests
        item_embeddings/         embeddings.npy, ids.txt, vocab.txt, info.json (item_index.py)
        scann/                   serialised ScaNN searcher + params.json (absent for brute force)
        metadata.json            config, vocab sizes, training metrics, code version, index params
      serving/                   the TF Serving model base path:
        <version>/               = <version>/user_tower/, hard-linked (copied where links fail)

Atomicity: a version is assembled in ``exports/<name>/.tmp-<version>-<pid>-<random>/`` and
published with one ``os.rename``; a reader (the retrieval code, TF Serving) only considers
all-digit directory names, so it never sees a partial version. Any error removes the temporary
directory; a killed export leaves only a dot-named directory, swept by the next export. The serving
view ``serving/<version>`` is published the same way, right after the version itself. A kill
between the two renames leaves a *half-published* version (retrieval would use it while TF Serving
still serves the previous user tower): every export, and every retrieval start-up
(``micrec_tf.retrieval.resolve_version_dir``), first creates the missing serving views
(``serving.repair_serving_views``).

Refusals, before any expensive work: a run folder whose checkpoint is not the finished training of
its own config.yaml (``micrec_tf/run_state.py``), and an export folder or ``serving/`` that cannot
be written (``export/write_checks.py``). A write that fails later (a full disk, an I/O error, also
inside ScaNN's native writer) is one user-error line, and the temporary directory is removed:
nothing is published.

Index: ``export.index`` (``scann`` by default); where ScaNN does not pay (under 256 items, or no
more items than ``export.top_k``) the export builds the exact brute-force index and logs why
(``item_index.choose_index``).
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import time

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import numpy as np

from micrec_tf import cli, locks, provenance, publish, run_state
from micrec_tf.config import Config
from micrec_tf.data.artifacts import ArtifactError
from micrec_tf.data.contract import HIST_LEN, USER_ID, user_feature, user_tower_features

from export import item_index, serving, write_checks
from export.requests import oov_string, raw_requests
from export.serving import SERVING_DIR, TMP_PREFIX

NUM_WARMUP_USERS = 8


# ----------------------------------------------------------------------------- temporary folders
def sweep_stale_tmp(parent: str, log=print) -> None:
    """Removes ``.tmp-*`` directories left by killed exports (their pid no longer runs)."""
    if not os.path.isdir(parent):
        return
    for d in os.listdir(parent):
        if not d.startswith(TMP_PREFIX):
            continue
        parts = d[len(TMP_PREFIX):].split("-")
        pid = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
        if pid is not None and pid != os.getpid() and not locks.pid_alive(pid):
            log(f"[export] removing stale temporary directory {os.path.join(parent, d)}")
            shutil.rmtree(os.path.join(parent, d), ignore_errors=True)


def _tmp_dir(parent: str, version: int) -> str:
    os.makedirs(parent, exist_ok=True)
    path = serving.tmp_path(parent, version)
    os.mkdir(path)
    return path


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------- requests
def requests_from_arrays(arrays: dict, rows, art) -> list:
    """Raw request rows for example ``rows`` of split arrays (see export.requests.raw_requests)."""
    return raw_requests(arrays, rows, art.vocabs, art.user_fields)


def user_features(arrays: dict, rows, art) -> dict:
    """The integer features ``model.user_embeddings`` takes, for example ``rows``."""
    keys = user_tower_features(art.user_fields)
    return {k: np.asarray(arrays[k])[np.asarray(rows)].astype(np.int64) for k in keys}


def _split_arrays(art, split: str, feats: list):
    """The split arrays of ``feats`` in ``split``; None where the split or a feature is absent
    (a damaged split is an error, not an absent one)."""
    from micrec_tf.data.arrays import load_split_arrays

    try:
        return load_split_arrays(art.path, split, feats)
    except ArtifactError:
        raise
    except (FileNotFoundError, KeyError):
        return None


def sample_test_examples(art, max_rows: int = NUM_WARMUP_USERS):
    """``(arrays, rows)``: up to ``max_rows`` test examples (valid/train if test is empty)."""
    feats = [USER_ID] + user_tower_features(art.user_fields)
    for split in ("test", "valid", "train"):
        arrays = _split_arrays(art, split, feats)
        if arrays is not None and len(arrays[HIST_LEN]):
            # The first rows with a non-empty history (rows with none if there are too few).
            order = np.argsort(np.asarray(arrays[HIST_LEN]) == 0, kind="stable")
            return arrays, np.sort(order[:max_rows])
    return None, None


def recall_queries(model, art, max_rows: int = 500, seed: int = 0):
    """User vectors of up to ``max_rows`` random test examples (None if there is no test split)."""
    arrays = _split_arrays(art, "test", user_tower_features(art.user_fields))
    n = 0 if arrays is None else len(arrays[HIST_LEN])
    if not n:
        return None
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n, max_rows), replace=False))
    return np.asarray(model.user_embeddings(user_features(arrays, rows, art)), np.float32)


def warmup_requests(art, sample_rows: list) -> list:
    """Columnar warmup requests: a batch of real users, one user alone, an unknown user."""
    fields = art.user_fields
    reqs = []
    if sample_rows:
        reqs.append(serving.columnar(sample_rows, fields))
        reqs.append(serving.columnar(sample_rows[:1], fields))
    unknown = {f: oov_string(art.vocabs[user_feature(f)], avoid_empty=True) for f in fields}
    unknown[serving.HISTORY_INPUT] = [oov_string(art.vocabs["item_id"], avoid_empty=True)]
    reqs.append(serving.columnar([unknown, {f: unknown[f] for f in fields}], fields))
    return reqs


# ----------------------------------------------------------------------------- export
def history_length(art, cfg: Config) -> int:
    """H, the history length of the artifacts' feature spec (the config's where it has none)."""
    return int(art.feature_spec.get("history_length", cfg.preprocess.history_length))


def vocab_files(art) -> dict:
    """``{vocab name: path}`` of the vocabularies the serving graph reads
    (:func:`export.serving.tower_vocab_names`), each checked against the loaded one and for
    duplicate lines (a lookup table needs unique keys)."""
    files = {}
    for name in serving.tower_vocab_names(art.user_fields):
        path = os.path.join(art.path, "vocab", f"{name}.txt")
        if not os.path.exists(path):
            raise FileNotFoundError(f"vocabulary {path!r} not found (artifacts incomplete?)")
        lines = item_index.read_vocab_file(path)
        if name in art.vocabs and list(art.vocabs[name]) != lines:
            raise ValueError(f"{path} does not match the loaded vocabulary {name!r}")
        if len(set(lines)) != len(lines):
            raise ValueError(f"{path} has duplicate values; a lookup table needs unique keys")
        files[name] = path
    return files


def _self_check(user_tower_dir: str, model, arrays, rows, art, tol: float = 1e-5) -> float:
    """Loads the written SavedModel and compares it with the model on real examples."""
    import tensorflow as tf

    if arrays is None:
        return float("nan")
    fn = tf.saved_model.load(user_tower_dir).signatures[serving.SIGNATURE_NAME]
    cols = serving.columnar(requests_from_arrays(arrays, rows, art), art.user_fields)
    got = fn(**{k: tf.constant(serving.encode_strings(v), tf.string) for k, v in cols.items()})
    got = got[serving.OUTPUT_NAME].numpy()
    want = np.asarray(model.user_embeddings(user_features(arrays, rows, art)), np.float32)
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    if not diff <= tol:
        raise RuntimeError(f"exported user tower differs from the trained model by {diff} "
                           f"(> {tol}) on real test examples; not publishing this export")
    return diff


def export_model(model, cfg: Config, art, export_root: str | None = None,
                 index: str | None = None, run_dir: str | None = None,
                 version: int | None = None, log=print) -> str:
    """Writes and publishes one export version of ``model``; returns the version directory.

    ``cfg`` is the run's config (stored in metadata.json); ``export_root`` defaults to
    ``cfg.export_dir`` and ``index`` to ``cfg.export.index``.

    The export folder must be one a job may own (:func:`micrec_tf.publish.check_owned_dir`); the
    export holds its lock (``<exports_dir>/.<name>.lock``) throughout: a second export into the
    same folder fails at once, naming this one's pid (:mod:`micrec_tf.locks`).
    """
    start = time.time()
    export_root = export_root or cfg.export_dir
    index = index or cfg.export.index
    publish.check_owned_dir(export_root, "the export folder")
    # Both targets before anything is written: a version published without its serving view is
    # what a read-only serving/ used to leave behind.
    write_checks.check_writable([export_root, os.path.join(export_root, SERVING_DIR)])
    with locks.folder_lock(export_root, "export",
                           "wait for it or pick another export.exports_dir"):
        return _export_locked(model, cfg, art, export_root, index, run_dir, version, log, start)


def _export_locked(model, cfg: Config, art, export_root: str, index: str, run_dir, version,
                   log, start: float) -> str:
    """The body of :func:`export_model` while it holds the export folder's lock."""
    import tensorflow as tf

    sweep_stale_tmp(export_root, log)
    sweep_stale_tmp(os.path.join(export_root, SERVING_DIR), log)
    serving.repair_serving_views(export_root, log)
    latest = serving.latest_version(export_root)
    version = int(version or max(int(time.time()), (latest + 1) if latest is not None else 0))
    tmp = _tmp_dir(export_root, version)
    try:
        if cfg.export.fold_text and serving.fold_text_fields(model):
            log("[export] text field folded: the served tower reads a [items x "
                f"{cfg.model.embedding_dim}] table, not the text vectors (export.fold_text)")
        files = vocab_files(art)
        arrays, rows = sample_test_examples(art)
        sample = requests_from_arrays(arrays, rows, art) if arrays is not None else []

        log(f"[export] user tower -> {tmp}/user_tower")
        tower = serving.save_user_tower(
            model, art.user_fields, files, history_length(art, cfg),
            os.path.join(tmp, "user_tower"), warmup_requests=warmup_requests(art, sample))
        tower["self_check_max_abs_diff"] = _self_check(os.path.join(tmp, "user_tower"), model,
                                                       arrays, rows, art)

        log("[export] item embeddings")
        dump = item_index.dump_item_embeddings(model, files["item_id"],
                                               os.path.join(tmp, "item_embeddings"))
        vectors = np.load(os.path.join(tmp, "item_embeddings", "embeddings.npy"))
        index_info = item_index.build_index(vectors, index, os.path.join(tmp, "scann"),
                                            k=cfg.export.top_k,
                                            brute_force_max_items=cfg.export.brute_force_max_items,
                                            queries=recall_queries(model, art))
        log(f"[export] index: {item_index.describe_index(index_info)}")
        metadata = {
            "name": cfg.name,
            "version": version,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "run_dir": os.path.abspath(run_dir) if run_dir else None,
            "artifacts_dir": art.path,
            "artifacts_dir_abs": os.path.abspath(art.path),
            "code_version": provenance.code_version(),
            "tensorflow_version": tf.__version__,
            "config": cfg.to_dict(),
            "vocab_sizes": {k: int(v) for k, v in art.vocab_sizes.items()},
            "user_fields": list(art.user_fields),
            "training_metrics": (_read_json(os.path.join(run_dir, "metrics.json"))
                                 if run_dir else None),
            "user_tower": tower,
            "item_embeddings": dump,
            "index": index_info,
            "top_k": cfg.export.top_k,
        }
        _write_metadata(os.path.join(tmp, "metadata.json"), metadata)
        published = publish.publish_numbered(tmp, export_root, version)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_checks.write_failure(err, tmp)  # a full disk, an unwritable folder
        if failure is not None:
            raise failure from err
        raise
    if published != version:  # another export took the number meanwhile: fix the record
        version = published
        meta_path = os.path.join(export_root, str(version), "metadata.json")
        metadata["version"] = version
        _write_metadata(meta_path + ".new", metadata)
        os.replace(meta_path + ".new", meta_path)
    version_dir = os.path.join(export_root, str(version))
    try:
        serving.publish_serving_view(export_root, version)
    except OSError as err:
        failure = write_checks.write_failure(
            err, os.path.join(export_root, SERVING_DIR),
            what=f"{version_dir} is published without its TF Serving view, which the next export "
                 "or retrieval start-up creates")
        if failure is None:
            raise
        raise failure from err
    log(f"[export] published {version_dir} in {time.time() - start:.1f}s "
        f"(TF Serving base path: {os.path.join(export_root, SERVING_DIR)})")
    serving.prune_versions(export_root, cfg.export.keep_versions, log)
    return version_dir


def _write_metadata(path: str, metadata: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(metadata, fh, indent=1, default=str)


def restore_for_export(run_dir: str):
    """``(model, run_cfg, art)``: the run's model in float32, every weight read from its checkpoint.

    The checkpoint also holds the optimizer's state, which inference does not need (hence
    ``expect_partial``: no warning per optimizer slot); every variable of the model, built
    first, must have a value there, so the export carries trained weights, never fresh initial
    values.
    """
    import tensorflow as tf

    from micrec_tf.precision import policy_scope
    from micrec_tf.train import restore_model

    if not os.path.exists(os.path.join(run_dir, "config.yaml")):
        raise FileNotFoundError(f"no trained run at {run_dir!r} (config.yaml missing): "
                                f"run `make train CONFIG=...` first")
    # Export in float32 whatever the run trained with: serving vectors must be reproducible. The
    # caller's global policy is restored on return; the model's layers stay float32.
    with policy_scope("float32"):
        model, run_cfg, art = restore_model(run_dir)
        # Build every lazily created variable, then read the checkpoint again and insist that it
        # covers all of them.
        serving.build_variables(model, art.user_fields, history_length(art, run_cfg))
    ckpt = os.path.join(run_dir, "checkpoint", "model")
    status = tf.train.Checkpoint(model=model).read(ckpt).expect_partial()
    try:
        status.assert_existing_objects_matched()
    except AssertionError as err:
        first = str(err).strip().splitlines()[0][:300]
        raise RuntimeError(f"checkpoint {ckpt!r} lacks weights of the model that "
                           f"{os.path.join(run_dir, 'config.yaml')} describes ({first}); "
                           "not exporting fresh initial values") from err
    return model, run_cfg, art


def export_run(cfg: Config, run_dir: str | None = None, export_root: str | None = None,
               log=print) -> str:
    """Restores the trained model of ``run_dir`` (default ``runs/<name>``) and exports it.

    The model, vocabularies and metadata come from the run's own config.yaml; the export
    settings (``export.*``) and the export location come from ``cfg``.
    """
    from micrec_tf.precision import policy_scope

    run_dir = run_dir or cfg.run_dir
    export_root = export_root or cfg.export_dir
    # Cheap refusals before the restore: a run whose checkpoint is not its config's finished one
    # (micrec_tf/run_state.py), and targets that cannot be written.
    trained = os.path.exists(os.path.join(run_dir, "config.yaml"))  # else restore says "no run"
    note = run_state.check_finished(run_dir) if trained else None
    if note:
        log(note)
    publish.check_owned_dir(export_root, "the export folder")
    write_checks.check_writable([export_root, os.path.join(export_root, SERVING_DIR)])
    with policy_scope("float32"):  # the whole export in float32; the caller's policy comes back
        model, run_cfg, art = restore_for_export(run_dir)
        run_cfg = run_cfg.replace({f"export.{k}": v for k, v in cfg.to_dict()["export"].items()})
        return export_model(model, run_cfg, art, export_root=export_root, run_dir=run_dir,
                            log=log)


def main(argv=None) -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("--run-dir", default=None,
                        help="trained run to export (default runs/<name>)")
    args = parser.parse_args(argv)
    cfg = cli.load(args)
    version_dir = export_run(cfg, run_dir=args.run_dir)
    print(version_dir)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
