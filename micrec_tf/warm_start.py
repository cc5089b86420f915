"""Warm start (issue 29): restore a previous run into a model built for a grown catalogue.

``train.warm_start_from: <run folder>`` (or an export version: its ``metadata.json`` names the
run folder it was exported from) makes :func:`micrec_tf.train.train` build the model for the new
artifacts as usual, then restore every variable of the previous run's ``checkpoint/`` into it:

- a variable of the same shape is copied, bit for bit (towers, attention, CL projectors, loss
  trackers, the random generators' states, the optimizer's iteration count);
- a variable whose first dimension is a vocabulary size that grew (the item ID, tag, provider,
  item / user field tables, a user ID table where a model has one; the streaming frequency
  estimate; the Adam slots ``m``
  and ``v`` of every grown table, which are variables of the same shape) is **grown**: rows
  ``[0, old)`` copied bit for bit, rows ``[old, new)`` as the new model built them (an
  embedding table's initializer; zeros for Adam slots; the estimator's prior);
- a variable that is data of the new artifacts, not trained state, is recomputed from them
  (:data:`FROM_NEW_ARTIFACTS`; either may exist on one side only): the text table of
  ``model.item_text`` keeps the new build's value, all rows (the new title vectors); the ID
  keep mask of ``model.min_id_clicks`` is the new build's (from the new
  ``vocab/item_id_counts.txt``: every new item) except that an old item whose ID row was in use
  before stays in use (a window without a click on it gives it count 0; :func:`_kept_ids`).
  For ``min_id_clicks`` 1 (default) that is the mask of the running click total. For > 1,
  when the new artifacts hold the running totals (``item_id_counts_total.txt``, written by a
  preprocess grown from previous artifacts, :mod:`pipelines.lineage`), every item whose total
  reaches ``min_id_clicks`` is in use too (:func:`total_keep_mask`), so an old item whose clicks
  are split over windows is unmasked once they add up; without the file (generation-0 or older
  artifacts) and at ``min_id_clicks`` <= 1 the mask is the rule above, bit for bit. The
  learning rate keeps the update's ``train.learning_rate``
  (:data:`FROM_NEW_CONFIG`: tuned for the one-pass budget). Mixed precision's loss scale
  (``model/optimizer/loss_scale/*``) is copied where both runs have one and may appear or go
  (a float32 run has none). Tables built from the artifacts as
  constants (sampled-softmax frequency weights, CL neighbour tables, the item feature table)
  are not in a checkpoint at all: they come from the new artifacts anyway.

Anything else is refused before training with one line (:class:`WarmStartError`) naming the
variable and both shapes: a variable missing on either side (another ``model.cl``, another
architecture), a shrunk or otherwise changed dimension, a grown first dimension that is no
vocabulary size of the new artifacts; so are another ``model.name`` or ``model.embedding_dim``
(named by key). When the previous run's artifacts are still readable, their vocabularies must be
prefixes of the new ones (the append-only contract: every known id keeps its index); a rebuilt,
re-sorted vocabulary is refused naming the field and the first line that moved.

How: the new model's fresh state is written once to a scratch checkpoint (its keys, shapes and
fresh values), the merged values are written under the same keys with the same object graph
(``tf.raw_ops.SaveV2``, one variable at a time, then ``MergeV2Checkpoints``: the peak memory
is the model plus about one variable's old and new values), and TensorFlow's own checkpoint
reader restores them
(``assert_consumed``), so every variable is matched by its checkpoint path, not by a name.

An update trains ``train.warm_start_epochs`` epochs (default 1: one pass over the window) in
place of ``train.epochs`` (:func:`update_config`); early stopping is the usual
``train.early_stopping_patience`` with ``warm_start_epochs`` > 1. ``train.warm_start_from: ""``
(default) changes nothing: the run trains from scratch, as before the key.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
import yaml

from micrec_tf import cli, run_state
from micrec_tf.config import Config, from_dict
from micrec_tf.data.artifacts import ITEM_ID_COUNTS, read_vocab

# Variables that are data of the new artifacts: the new build's values, all rows.
FROM_NEW_ARTIFACTS = ("item_id_keep_mask", "item_text_table")
# Variables that follow the update's config, not the previous run's.
FROM_NEW_CONFIG = ("_learning_rate",)  # under model/optimizer/
# Config keys that must be equal: another value builds another model.
SAME_KEYS = ("model.name", "model.embedding_dim")
OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"
CHECKPOINT = os.path.join("checkpoint", "model")
COPY, GROW, NEW = "copy", "grow", "new"
KEEP_MASK = FROM_NEW_ARTIFACTS[0]
# Running training-click totals per vocab/item_id.txt line, at the artifacts root of a grown
# folder (pipelines.lineage.TOTALS_FILE; micrec_tf does not import pipelines).
TOTALS_FILE = "item_id_counts_total.txt"


class WarmStartError(cli.UsageError):
    """``train.warm_start_from`` cannot be restored into this model; one line says why."""


def update_config(cfg: Config) -> Config:
    """The config an update trains with: ``train.epochs`` = ``train.warm_start_epochs`` when
    ``train.warm_start_from`` is set; ``cfg`` itself otherwise (today's behaviour). A source
    that is no finished run is refused here, before the run folder is touched."""
    if not cfg.train.warm_start_from:
        return cfg
    resolve_run_dir(cfg.train.warm_start_from)
    return cfg.replace({"train.epochs": cfg.train.warm_start_epochs})


def resolve_run_dir(source: str) -> str:
    """The finished run folder that ``source`` (a run folder or an export version) names."""
    key = f"train.warm_start_from {source!r}"
    if not os.path.isdir(source):
        raise WarmStartError(f"{key} is not a folder: give a finished run folder or an export "
                             "version")
    run_dir, meta = source, None
    meta_path = os.path.join(source, "metadata.json")
    if not os.path.exists(os.path.join(source, "config.yaml")) and os.path.exists(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as fh:
                meta = json.load(fh) or {}
        except (OSError, ValueError) as err:
            raise WarmStartError(f"{key}: its metadata.json cannot be read "
                                 f"({type(err).__name__}: {err})") from None
        run_dir = meta.get("run_dir") or ""
        if not run_dir or not os.path.isdir(run_dir):
            raise WarmStartError(f"{key} is an export version whose run folder "
                                 f"{run_dir!r} (metadata.json run_dir) is gone: give the run folder")
    if not os.path.exists(os.path.join(run_dir, "config.yaml")):
        raise WarmStartError(f"{key} is neither a run folder (config.yaml) nor an export version "
                             "(metadata.json naming its run)")
    try:
        run_state.check_finished(run_dir)
    except run_state.RunStateError as err:
        raise WarmStartError(f"{key}: {err}") from None
    if meta is not None and not _same_training(meta, run_dir):
        raise WarmStartError(f"{key} is an export version of {run_dir}, which was trained again "
                             "since (its config.yaml or metrics.json differ from the export's "
                             "metadata.json): give the run folder itself")
    return run_dir


def _same_training(meta: dict, run_dir: str) -> bool:
    """Whether ``run_dir`` still holds the training an export's ``metadata.json`` recorded:
    the same config (``export.*`` aside: the export's own settings) and, where the export kept
    them, the same final metrics."""
    def trained(raw):
        return {k: v for k, v in from_dict(raw).to_dict().items() if k != "export"}

    with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as fh:
        config = yaml.safe_load(fh) or {}
    if "config" in meta and trained(config) != trained(meta["config"]):
        return False
    metrics_path = os.path.join(run_dir, "metrics.json")
    if meta.get("training_metrics") is not None and os.path.exists(metrics_path):
        with open(metrics_path, encoding="utf-8") as fh:
            return json.load(fh) == meta["training_metrics"]
    return True


def check_same_model(previous: dict, cfg: Config) -> None:
    """Refuses a previous config (a dict as in ``config.yaml``) of another :data:`SAME_KEYS`."""
    now = cfg.to_dict()
    for key in SAME_KEYS:
        section, name = key.split(".")
        old, new = (previous.get(section) or {}).get(name), now[section][name]
        if old != new:
            raise WarmStartError(f"cannot warm-start: {key} is {new!r} but the previous run's is "
                                 f"{old!r}")


def check_append_only(previous_artifacts: str, artifacts: str) -> str | None:
    """Refuses new vocabularies that do not extend the previous ones line for line.

    Every ``vocab/<field>.txt`` of ``previous_artifacts`` (``item_id_counts.txt`` aside: counts
    change) must be a prefix of the same file in ``artifacts``. Returns a note to log when the
    previous artifacts are gone or are the same folder (nothing to compare), None otherwise."""
    if os.path.realpath(previous_artifacts) == os.path.realpath(artifacts):
        return (f"the previous run read the same artifacts folder {artifacts}: the append-only "
                "vocabularies are assumed, not checked")
    paths = sorted(glob.glob(os.path.join(previous_artifacts, "vocab", "*.txt")))
    paths = [p for p in paths if os.path.basename(p) != ITEM_ID_COUNTS]
    if not paths:
        return (f"the previous run's artifacts {previous_artifacts} are gone: the append-only "
                "vocabularies are assumed, not checked")
    for path in paths:
        name = os.path.basename(path)
        new_path = os.path.join(artifacts, "vocab", name)
        old = read_vocab(path)
        new = read_vocab(new_path) if os.path.exists(new_path) else []
        moved = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b),
                     None if len(new) >= len(old) else len(new))
        if moved is not None:
            now = repr(new[moved]) if moved < len(new) else "nothing"
            raise WarmStartError(
                f"cannot warm-start: vocab/{name} is not append-only: line {moved + 1} was "
                f"{old[moved]!r} in {previous_artifacts}, now {now} (rebuild the artifacts with "
                "the previous artifacts given, so that every known id keeps its index)")
    return None


def plan_restore(previous: dict, fresh: dict, vocab_sizes) -> dict:
    """``{checkpoint key: "copy" | "grow" | "new"}`` for every key of the new model.

    ``previous`` / ``fresh``: ``{key: shape}`` of the previous checkpoint and of the new model
    (as ``tf.train.load_checkpoint(...).get_variable_to_shape_map()`` gives them);
    ``vocab_sizes``: the new artifacts' vocabulary sizes (with OOV), the only first dimensions a
    variable may grow to. Raises :class:`WarmStartError` naming the first variable that cannot
    be matched (one missing on either side first; the model's before the optimizer's) and its
    shapes."""
    sizes = {int(v) for v in vocab_sizes}
    # The model's own variables before the optimizer's (whose slots follow their variables'
    # order, so one missing variable shifts every later slot): the first refusal names the cause.
    order = sorted((k for k in fresh if k != OBJECT_GRAPH),
                   key=lambda k: (k.startswith("model/optimizer/"), k))
    plan = {k: NEW for k in order if _from_new_artifacts(k)}  # may appear or go: data
    # Mixed precision's loss scale may appear or go too (a float32 run has none): kept where
    # both runs have it, the new build's where only the update has one.
    plan.update({k: NEW for k in order if _loss_scale(k) and k not in previous})
    missing = [k for k in order if k not in previous and k not in plan]
    left = sorted((k for k in previous if k != OBJECT_GRAPH and k not in fresh
                   and not _from_new_artifacts(k) and not _loss_scale(k)),
                  key=lambda k: (k.startswith("model/optimizer/"), k))
    if left and (not missing or missing[0].startswith("model/optimizer/")):
        raise WarmStartError(f"cannot warm-start: variable {left[0]} (shape "
                             f"{list(previous[left[0]])}) of the previous checkpoint has no place "
                             "in the new model (another model.cl or architecture?)")
    if missing:
        raise WarmStartError(f"cannot warm-start: variable {missing[0]} (shape "
                             f"{list(fresh[missing[0]])}) is not in the previous checkpoint "
                             "(another model.cl or architecture?)")
    for key in (k for k in order if k not in plan):
        new, old = (tuple(int(d) for d in shape) for shape in (fresh[key], previous[key]))
        grows = (len(old) == len(new) >= 1 and old[1:] == new[1:] and new[0] > old[0]
                 and new[0] in sizes)
        if old != new and not grows:
            raise WarmStartError(
                f"cannot warm-start: variable {key} has shape {list(old)} in the previous "
                f"checkpoint and {list(new)} in the new model (only a vocabulary-sized first "
                "dimension may grow)")
        plan[key] = NEW if _from_new_config(key) else GROW if grows else COPY
    return plan


def _loss_scale(key: str) -> bool:
    return key.startswith("model/optimizer/") and "/loss_scale/" in key


def _from_new_config(key: str) -> bool:
    return key.startswith("model/optimizer/") and any(f"/{n}/" in key for n in FROM_NEW_CONFIG)


def _from_new_artifacts(key: str) -> bool:
    return any(f"/{name}/" in key for name in FROM_NEW_ARTIFACTS)


def total_keep_mask(artifacts_dir: str, min_id_clicks: int) -> np.ndarray | None:
    """float32 [V] (1 = the ID row is used; row 0 = 1, padding): the items whose running click
    total (``<artifacts_dir>/item_id_counts_total.txt``, line k = item index k + 1) reaches
    ``min_id_clicks``. None (the keep mask of before) when ``min_id_clicks`` <= 1 or the file
    is absent. A line that is not an int >= 0 is a :class:`WarmStartError`."""
    path = os.path.join(artifacts_dir, TOTALS_FILE)
    if int(min_id_clicks) <= 1 or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    bad = next((k for k, v in enumerate(lines, 1) if not v.isdigit()), None)
    if bad is not None:
        raise WarmStartError(f"cannot warm-start: {path}:{bad} is not a click count (an int "
                             f">= 0). Received: {lines[bad - 1]!r}")
    keep = np.array([0] + [int(v) for v in lines], np.int64) >= int(min_id_clicks)
    keep[0] = True
    return keep.astype(np.float32)


def restore_grown(model, previous_checkpoint: str, vocab_sizes, work_dir: str,
                  total_keep=None) -> dict:
    """Restores ``previous_checkpoint`` (a ``tf.train.Checkpoint(model=...)`` prefix) into the
    built ``model`` (optimizer slots included), growing vocabulary-sized variables.

    ``work_dir`` holds the scratch checkpoints (deleted by the caller). ``total_keep``: float32
    [V] of :func:`total_keep_mask` (None, default: the keep mask of before), OR-ed into the ID
    keep mask (:func:`_kept_ids`). Returns
    ``{"copied": n, "grown": {key: [old rows, new rows]}, "from_new": [keys]}``."""
    ckpt = tf.train.Checkpoint(model=model)
    fresh_prefix = ckpt.write(os.path.join(work_dir, "fresh", "model"))
    fresh = tf.train.load_checkpoint(fresh_prefix)
    prev = tf.train.load_checkpoint(previous_checkpoint)
    fresh_dtypes, prev_dtypes = fresh.get_variable_to_dtype_map(), prev.get_variable_to_dtype_map()
    fresh_shapes = fresh.get_variable_to_shape_map()
    plan = plan_restore(prev.get_variable_to_shape_map(), fresh_shapes, vocab_sizes)
    # One shard per variable (the object graph first), merged at the end: at most one
    # variable's old, fresh and merged values are in memory at a time.
    parts = os.path.join(work_dir, "parts")
    os.makedirs(parts, exist_ok=True)
    shards = []

    def save(name, value, dtype):
        shards.append(os.path.join(parts, f"part-{len(shards):06d}"))
        tf.raw_ops.SaveV2(prefix=shards[-1], tensor_names=[name], shape_and_slices=[""],
                          tensors=[tf.constant(value, dtype=dtype)])

    save(OBJECT_GRAPH, fresh.get_tensor(OBJECT_GRAPH), tf.string)
    summary = {"copied": 0, "grown": {}, "from_new": []}
    for key, action in plan.items():
        if action != NEW and prev_dtypes[key] != fresh_dtypes[key]:
            raise WarmStartError(f"cannot warm-start: variable {key} is {prev_dtypes[key].name} in "
                                 f"the previous checkpoint and {fresh_dtypes[key].name} in the new "
                                 "model")
        if action == NEW:
            value = fresh.get_tensor(key)
            if f"/{KEEP_MASK}/" in key:
                value = _kept_ids(value, key, prev, plan, fresh_shapes, total_keep)
            summary["from_new"].append(key)
        elif action == COPY:
            value = prev.get_tensor(key)
            summary["copied"] += 1
        else:
            old = prev.get_tensor(key)
            value = np.concatenate([old, fresh.get_tensor(key)[old.shape[0]:]], axis=0)
            summary["grown"][key] = [int(old.shape[0]), int(value.shape[0])]
        save(key, value, fresh_dtypes[key])
        del value
    merged = os.path.join(work_dir, "merged", "model")
    os.makedirs(os.path.dirname(merged), exist_ok=True)
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=shards, destination_prefix=merged)
    ckpt.read(merged).assert_consumed()
    return summary


def _kept_ids(mask: np.ndarray, key: str, prev, plan: dict, fresh_shapes: dict,
              total_keep=None) -> np.ndarray:
    """The ID keep mask of the update (float32 [V], 1 = the item's ID row is used): the new
    artifacts' mask (from their item counts), with every old item whose ID row was in use
    before kept in use, since a window without a click on an old item gives it count 0 and its
    trained row must not go dark. "Before" is the previous mask where there was one, else every
    old item (the previous model masked none); the old item count is then the previous first
    dimension of the tables grown to the mask's length V (the item ID table; V when the
    catalogue did not grow). ``total_keep`` (float32 [V], :func:`total_keep_mask`; None: not
    used) is OR-ed in: an item whose running total reaches ``model.min_id_clicks`` is used."""
    mask = np.array(mask, copy=True)
    if total_keep is not None:
        total_keep = np.asarray(total_keep, mask.dtype)
        if total_keep.shape != mask.shape:
            raise WarmStartError(f"cannot warm-start: the running click totals ({TOTALS_FILE}) "
                                 f"cover {total_keep.shape[0] - 1} items, {key} "
                                 f"{mask.shape[0] - 1}: the artifacts are inconsistent")
        mask = np.maximum(mask, total_keep)
    if prev.has_tensor(key):
        old = prev.get_tensor(key)
        n = min(old.shape[0], mask.shape[0])
        mask[:n] = np.maximum(mask[:n], old[:n])
        return mask
    shapes = prev.get_variable_to_shape_map()
    olds = {int(shapes[k][0]) for k, a in plan.items()
            if a == GROW and int(fresh_shapes[k][0]) == mask.shape[0]}
    if len(olds) > 1:
        raise WarmStartError(f"cannot warm-start: the tables of length {mask.shape[0]} grew from "
                             f"several lengths {sorted(olds)}; {key} cannot tell the old items")
    n = olds.pop() if olds else mask.shape[0]
    mask[:n] = 1.0
    return mask


def warm_start(model, cfg: Config, run_dir: str, vocab_sizes, log=print) -> dict | None:
    """Restores ``cfg.train.warm_start_from`` into the built ``model`` (see the module doc);
    None when the key is "" (nothing happens: a run from scratch). Call it once every variable
    and optimizer slot exists, before training; returns the summary of :func:`restore_grown`
    with ``from`` (the run folder) and ``rows_added`` (per grown model table, optimizer slots
    aside)."""
    if not cfg.train.warm_start_from:
        return None
    previous_run = resolve_run_dir(cfg.train.warm_start_from)
    if os.path.realpath(previous_run) == os.path.realpath(run_dir):
        raise WarmStartError(f"train.warm_start_from {cfg.train.warm_start_from!r} is the run "
                             "folder being trained: give the update its own --run-dir")
    with open(os.path.join(previous_run, "config.yaml"), encoding="utf-8") as fh:
        previous = yaml.safe_load(fh) or {}
    check_same_model(previous, cfg)
    note = check_append_only(from_dict(previous).artifacts_dir, cfg.artifacts_dir)
    if note:
        log(f"[train] warm start: {note}")
    work_dir = tempfile.mkdtemp(prefix=".warm_start-", dir=run_dir)
    try:
        summary = restore_grown(model, os.path.join(previous_run, CHECKPOINT), vocab_sizes,
                                work_dir, total_keep_mask(cfg.artifacts_dir,
                                                          cfg.model.min_id_clicks))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    summary["from"] = os.path.abspath(previous_run)
    summary["rows_added"] = {k.split("/.ATTRIBUTES")[0]: n - o
                             for k, (o, n) in summary["grown"].items()
                             if not k.startswith("model/optimizer/")}
    added = ", ".join(f"{k.split('/')[-2] if k.endswith('/embeddings') else k}: +{n}"
                      for k, n in summary["rows_added"].items()) or "no rows added"
    log(f"[train] warm start from {previous_run}: {summary['copied']} variables copied, "
        f"{len(summary['grown'])} grown ({added}), {len(summary['from_new'])} from the new "
        f"artifacts / config; iteration {int(model.optimizer.iterations.numpy())}")
    return summary
