"""Training entry point: ``python -m micrec_tf.train --config configs/ml-1m.yaml [--set k=v ...]``.

Reads the preprocessing artifacts, builds the configured model (base towers + CL plug-ins), trains
it with the custom ``train_step`` and writes to ``runs/<name>/`` (or ``--run-dir``)::

    backup/          BackupAndRestore state, written at every epoch end and every
                     train.steps_per_checkpoint batches: a killed run resumes from here
    best_weights.npz the best epoch's weights so far (early stopping survives a kill)
    checkpoint/      final weights (tf.train.Checkpoint of the model): with early stopping
                     (train.early_stopping_patience > 0) the best epoch by val HIT@N[0]
                     (item_cold_start: by cold-validation HIT@50, ColdValidation)
    tensorboard/     per-loss curves and validation HIT@N
    config.yaml      the exact config used
    history.json     per-epoch losses and validation metrics
    metrics.json     final validation (and test) HIT@N / coverage
    run_state.json   "training" from the start, "finished" once checkpoint/ and metrics.json are
                     written, with the hashes of config.yaml and checkpoint/ (micrec_tf/run_state.py;
                     export refuses a run that is not finished under its own config.yaml)

Device handling: a ``tf.distribute`` strategy chosen from the visible GPUs (mirrored for several,
one-device for one, default on CPU) and mixed precision where it pays (compute capability >= 7.0
under ``mixed_precision: auto``; Pascal cards such as the P40 train in float32).

Several machines (issue 31): with ``TF_CONFIG`` set, every worker runs this same command;
training is data-parallel (``MultiWorkerMirroredStrategy``, ``train.batch_size`` the global
batch), only worker 0 (the chief) writes the run folder, which must be on storage every worker
sees; ``train.collective_timeout_s`` bounds a collective's wait. See docs/DISTRIBUTED.md.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import numpy as np
import tensorflow as tf
import tf_keras
import yaml

from micrec_tf import cli, locks, publish, run_state
from micrec_tf.cl import cl_anchors_line, describe_cl_anchors
from micrec_tf.config import Config
from micrec_tf.data.arrays import load_split_arrays, train_item_counts
from micrec_tf.data.artifacts import check_cl_tables, load_artifacts, read_vocab
from micrec_tf.data.cold_start import ITEM_COLD_START
from micrec_tf.data.contract import ITEM
from micrec_tf.data.input import first_batch, make_dataset
from micrec_tf.evaluation.data import earlier_clicks_exclusion
from micrec_tf.evaluation.cold_start import check_catalogue_vocabulary, cold_rows
from micrec_tf.evaluation.evaluate import evaluate_cold_start, evaluate_model
from micrec_tf.evaluation.metrics import long_tail_items
from micrec_tf.model import build_model
from micrec_tf.optimizers import make_optimizer
from micrec_tf.precision import BF16_CPU_FLAGS, cpu_flags, policy_scope
from micrec_tf.towers import history_path
from micrec_tf.warm_start import update_config, warm_start


class GPURequestedError(RuntimeError):
    """``train.require_gpu`` is set but TensorFlow sees no GPU."""


class WorkerLostError(RuntimeError):
    """Multi-worker training (issue 31): a collective failed, a worker is lost or stalled."""


def multiworker_requested() -> bool:
    """Whether ``TF_CONFIG`` describes a cluster (:func:`select_strategy` then builds
    ``MultiWorkerMirroredStrategy``)."""
    return bool(os.environ.get("TF_CONFIG", "").strip())


def is_multiworker(strategy) -> bool:
    """Whether ``strategy`` is a ``MultiWorkerMirroredStrategy``."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def chief_task_id(strategy) -> int:
    """This worker's index in the cluster (0 = the chief, which writes the run folder); 0
    outside multi-worker training."""
    if not is_multiworker(strategy):
        return 0
    return int(strategy.cluster_resolver.task_id or 0)


def select_strategy(require_gpu: bool = False, log=print, collective_timeout_s=None):
    """Returns ``(strategy, gpus)`` for the visible devices.

    With the environment variable ``TF_CONFIG`` set (TensorFlow's standard cluster description,
    ``{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}``) the
    strategy is ``tf.distribute.MultiWorkerMirroredStrategy`` (issue 31): data-parallel over the
    workers, gradients all-reduced with collective ops (ring on CPU). It must be created before
    any other TensorFlow op runs in the process. ``collective_timeout_s`` bounds each collective
    (None: TensorFlow's default, no timeout), so a lost worker fails the others loudly instead
    of hanging them. Without ``TF_CONFIG`` (or with an empty one): exactly the behaviour before
    issue 31 (mirrored over several GPUs, one-device for one, the default strategy on CPU).
    """
    gpus = tf.config.list_physical_devices("GPU")
    if require_gpu and not gpus:
        raise GPURequestedError(
            "train.require_gpu is true but TensorFlow sees no GPU. Check `nvidia-smi`, install the "
            "CUDA build with `make install GPU=1`, or set train.require_gpu: false to train on CPU.")
    if multiworker_requested():
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=collective_timeout_s)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        resolver = strategy.cluster_resolver
        log(f"[train] devices: {len(gpus)} GPU(s) {[g.name for g in gpus]}; strategy "
            f"MultiWorkerMirroredStrategy: {strategy.num_replicas_in_sync} replica(s), task "
            f"{resolver.task_type}:{resolver.task_id}")
        return strategy, gpus
    if len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy()
    elif len(gpus) == 1:
        strategy = tf.distribute.OneDeviceStrategy("/gpu:0")
    else:
        strategy = tf.distribute.get_strategy()
    log(f"[train] devices: {len(gpus)} GPU(s) {[g.name for g in gpus]}; "
        f"strategy {type(strategy).__name__}")
    return strategy, gpus


def choose_mixed_precision(setting: str, gpus, log=print) -> bool:
    """``on``/``off`` force; ``auto`` enables float16 only if every GPU has compute cap >= 7.0."""
    if setting == "on":
        use, why = True, "forced on by train.mixed_precision"
    elif setting == "off":
        use, why = False, "forced off by train.mixed_precision"
    elif not gpus:
        use, why = False, "no GPU visible"
    else:
        caps = [tf.config.experimental.get_device_details(g).get("compute_capability", (0, 0))
                for g in gpus]
        use = all(tuple(c) >= (7, 0) for c in caps)
        why = (f"GPU compute capability {caps}: "
               + ("tensor cores pay off" if use else "< 7.0 (e.g. Pascal/P40): float16 is slow"))
    log(f"[train] mixed precision {'ON (mixed_float16)' if use else 'OFF (float32)'}: {why}")
    return use


def training_policy(setting: str, gpus, log=print, flags: set | None = None) -> str:
    """The Keras dtype policy training runs under (one of :data:`micrec_tf.precision.POLICIES`)
    for ``train.mixed_precision`` = ``setting``: ``bfloat16`` -> ``mixed_bfloat16`` (logged with
    whether the GPU or this CPU computes bfloat16 natively: ``flags``, default
    :func:`micrec_tf.precision.cpu_flags`, holds avx512_bf16 or amx_bf16); otherwise
    :func:`choose_mixed_precision` decides between ``mixed_float16`` and ``float32``."""
    if setting != "bfloat16":
        return "mixed_float16" if choose_mixed_precision(setting, gpus, log) else "float32"
    if gpus:
        why = f"on {len(gpus)} GPU(s)"
    else:
        have = sorted(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else set(flags)))
        why = (f"this CPU has {' and '.join(have)}" if have else
               f"WARNING: this CPU has none of {' / '.join(BF16_CPU_FLAGS)}: its bfloat16 matrix "
               "products are emulated and likely slower than float32")
    log(f"[train] mixed precision ON (mixed_bfloat16): forced by train.mixed_precision=bfloat16; "
        f"{why}")
    return "mixed_bfloat16"


class ValidationHitRate(tf_keras.callbacks.Callback):
    """At each epoch end: validation HIT@N and coverage into ``logs`` as ``val_hit_at_<N>``."""

    def __init__(self, arrays: dict, num_items: int, hit_n, coverage_n, exclude, batch_size,
                 exact_engine: str = "numpy"):
        super().__init__()
        self.arrays, self.num_items = arrays, num_items
        self.hit_n, self.coverage_n = list(hit_n), list(coverage_n)
        self.exclude, self.batch_size = exclude, batch_size
        self.exact_engine = exact_engine  # eval.exact_engine (default numpy, as before the key)

    def on_epoch_end(self, epoch, logs=None):
        res = evaluate_model(self.model, self.arrays, self.num_items, self.hit_n, self.coverage_n,
                             exclude=self.exclude, batch_size=self.batch_size,
                             exact_engine=self.exact_engine)
        if logs is not None:
            for n in self.hit_n:
                logs[f"val_hit_at_{n}"] = res[f"hit@{n}"]
            for n in self.coverage_n:
                logs[f"val_coverage_at_{n}"] = res[f"coverage@{n}"]
        shown = " ".join(f"HIT@{n}={res[f'hit@{n}']:.4f}" for n in self.hit_n)
        print(f"[train] epoch {epoch + 1} validation: {shown}", flush=True)


# Item-cold-start runs stop early on, and are chosen by, cold-validation HIT@50.
COLD_MONITOR_N = 50


class ColdValidation(tf_keras.callbacks.Callback):
    """Item-cold-start runs (issue 28): at each epoch end, the **cold** slice of the validation
    clicks (clicks on cold-validation items, each ranked among every catalogue item of that
    bucket, :mod:`micrec_tf.evaluation.cold_start`) into ``logs`` as ``val_cold_hit_at_<N>``
    and ``val_cold_ndcg_at_20``; early stopping and the reproduction's choices read it, since
    the protocol chooses on the cold-validation items.

    ``arrays``: the validation clicks on cold-validation items (all of them, not the warm
    validation subsample); ``raw_item_ids``: the lines of ``vocab/item_id.txt``.
    """

    def __init__(self, arrays: dict, num_items: int, raw_item_ids, item_vocabulary: str,
                 batch_size: int):
        super().__init__()
        if len(arrays[ITEM]) == 0:
            raise ValueError("item_cold_start: the validation split has no click on a "
                             "cold-validation item, so nothing can choose on it. Received: 0 "
                             "cold-validation clicks")
        self.arrays, self.num_items, self.raw_item_ids = arrays, num_items, raw_item_ids
        self.item_vocabulary, self.batch_size = item_vocabulary, batch_size

    def on_epoch_end(self, epoch, logs=None):
        res = evaluate_cold_start(self.model, self.arrays, self.num_items, self.raw_item_ids,
                                  "valid", self.item_vocabulary, self.batch_size,
                                  slices=("cold",))
        ns = [int(k.split("@")[1]) for k in res if k.startswith("cold/hit@")]
        if logs is not None:
            for n in ns:
                logs[f"val_cold_hit_at_{n}"] = res[f"cold/hit@{n}"]
            logs["val_cold_ndcg_at_20"] = res["cold/ndcg@20"]
        shown = " ".join(f"HIT@{n}={res[f'cold/hit@{n}']:.4f}" for n in ns)
        print(f"[train] epoch {epoch + 1} cold-validation ({res['cold/num_clicks']} clicks, "
              f"{res['cold/num_candidates']} items): {shown}", flush=True)


# Seconds between the ``[train]`` step-progress lines within an epoch.
PROGRESS_EVERY_S = 60.0


class StepProgress(tf_keras.callbacks.Callback):
    """A ``[train] epoch E: step S/T ...`` line every ``every_s`` seconds within an epoch (steps,
    examples/s, loss, minutes left of the epoch): an epoch at 1 M items runs most of an hour.
    ``every_s=0`` prints after every step."""

    def __init__(self, batch_size: int, every_s: float = PROGRESS_EVERY_S, log=print):
        super().__init__()
        if int(batch_size) != batch_size or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer. Received: {batch_size!r}")
        if not every_s >= 0:
            raise ValueError(f"every_s must be >= 0. Received: {every_s!r}")
        self.batch_size, self.every_s, self.log = int(batch_size), float(every_s), log
        self._epoch, self._start, self._next = 0, 0.0, 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._start = epoch, time.perf_counter()
        self._next = self._start + self.every_s

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if now < self._next:
            return
        self._next = now + self.every_s
        done, total = batch + 1, (self.params or {}).get("steps")
        rate = done / max(now - self._start, 1e-9)
        loss = (logs or {}).get("loss")
        left = (f", about {(total - done) / rate / 60:.0f} min left of the epoch"
                if total else "")
        self.log(f"[train] epoch {self._epoch + 1}: step {done:,}/{total or '?'}"
                 f" ({rate * self.batch_size:,.0f} examples/s"
                 + ("" if loss is None else f", loss {float(loss):.4f}") + f"{left})")


class _JsonHistory(tf_keras.callbacks.Callback):
    """Writes ``history.json``: one row per finished epoch, kept across a resumed run.

    ``completed_epochs`` is how many epochs the resumed backup holds (rows after them belong to
    work the kill lost and are dropped); ``resumed_from_batch`` (1-based, 0 = a whole epoch)
    marks the row of an epoch resumed mid-way, whose logged losses average only the batches
    trained after the restart.
    """

    def __init__(self, path, completed_epochs: int = 0, resumed_from_batch: int = 0):
        super().__init__()
        self.path, self.rows = path, []
        if os.path.exists(path) and completed_epochs:  # resumed run: keep the epochs done
            with open(path) as fh:
                self.rows = [r for r in json.load(fh) if r["epoch"] <= completed_epochs]
        self.partial_epoch = completed_epochs + 1 if resumed_from_batch else None
        self.resumed_from_batch = resumed_from_batch

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
        if epoch + 1 == self.partial_epoch:
            row["losses_from_batch"] = self.resumed_from_batch
        self.rows = [r for r in self.rows if r["epoch"] != epoch + 1] + [row]
        write_json_atomic(self.path, self.rows)


def write_json_atomic(path: str, obj) -> None:
    """Writes ``obj`` as JSON to ``path`` via a temporary file and a rename (no torn files)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


class BestEpoch(tf_keras.callbacks.Callback):
    """Early stopping on a validation metric that survives a kill, and restores the best epoch.

    Like ``EarlyStopping(mode="max", restore_best_weights=True)``, except that (a) the best
    epoch's weights are also restored when the run ends at the epoch cap, not only when it
    stops early, and (b) its state (best value, epochs without improvement, best weights in
    ``weights_path``) is rebuilt from ``history_rows`` of a resumed run, so a killed run stops
    and restores exactly as the uninterrupted one would. ``patience`` 0 disables both: the
    run keeps its last epoch.
    """

    def __init__(self, monitor: str, patience: int, weights_path: str, history_rows=(),
                 log=print):
        super().__init__()
        self.monitor, self.patience, self.weights_path, self.log = (monitor, patience,
                                                                     weights_path, log)
        self.best, self.best_epoch, self.wait, self.best_weights = -np.inf, None, 0, None
        self.stopped_early = False
        for row in sorted(history_rows, key=lambda r: r["epoch"]):
            self._update(row["epoch"], row.get(monitor))
        if self.best_epoch is not None and os.path.exists(weights_path):
            with np.load(weights_path) as saved:
                self.best_weights = [saved[f"w{i}"] for i in range(len(saved.files))]

    def _update(self, epoch: int, value) -> bool:
        if value is None:
            return False
        if value > self.best:
            self.best, self.best_epoch, self.wait = float(value), epoch, 0
            return True
        self.wait += 1
        return False

    def on_epoch_end(self, epoch, logs=None):
        if self.patience <= 0:
            return
        if self._update(epoch + 1, (logs or {}).get(self.monitor)):
            self.best_weights = self.model.get_weights()
            tmp = f"{self.weights_path}.tmp-{os.getpid()}.npz"
            np.savez(tmp, **{f"w{i}": w for i, w in enumerate(self.best_weights)})
            os.replace(tmp, self.weights_path)
        elif self.wait >= self.patience:
            self.model.stop_training = True
            self.stopped_early = True
            self.log(f"[train] early stopping after epoch {epoch + 1}: {self.monitor} has not "
                     f"improved for {self.wait} epoch(s)")

    def on_train_end(self, logs=None):
        if self.patience > 0 and self.best_weights is not None:
            self.model.set_weights(self.best_weights)
            self.log(f"[train] restored the best epoch {self.best_epoch} "
                     f"({self.monitor}={self.best:.4f})")


class EpochBackup(tf_keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` that backs up every ``save_freq`` batches *and* at every epoch end.

    With ``save_freq`` in batches alone, an epoch shorter than it is never backed up and a
    killed run restarts from epoch 1. Put it last among the callbacks, so that the epoch-end
    backup follows validation, history and early-stopping state.

    ``sampler_states_path`` (multi-worker training, non-chief workers only; None = the
    behaviour of before issue 31): this worker's samplers' generator states are saved there
    with every backup and restored from it on resume. The backup checkpoint holds the chief's
    states only, and a CL task's draws depend on its replica's batch, so each worker's own
    streams must come back for a resumed run to continue as the uninterrupted one.
    """

    def __init__(self, backup_dir: str, save_freq: int, log=print,
                 sampler_states_path: str | None = None):
        super().__init__(backup_dir, save_freq=save_freq)
        self.log = log
        self.sampler_states_path = sampler_states_path

    def on_epoch_end(self, epoch, logs=None):
        self._batches_count = 0
        self._backup(epoch=epoch)  # the saved batch is the epoch's last: resume at epoch + 1
        self.log(f"[train] epoch {epoch + 1} backed up to {self.backup_dir}")

    def _saved_at(self) -> list:
        state = self._training_state
        return [int(state._ckpt_saved_epoch.numpy()), int(state._ckpt_saved_batch.numpy())]

    def _backup(self, epoch, batch=0):
        if self.sampler_states_path:
            # Written before the checkpoint, whose save is a collective: once the chief's
            # backup exists, this worker's states for it do too. The previous entry is kept
            # for a kill between the two (the chief's newest backup is then the previous one).
            path, backups = self.sampler_states_path, []
            if os.path.exists(path):
                with open(path) as fh:
                    backups = json.load(fh)["backups"][-1:]
            backups.append({"saved_at": self._saved_at(), "states": [
                [int(x) for x in g.state.numpy()] for g in self.model.samplers]})
            write_json_atomic(path, {"backups": backups})
        super()._backup(epoch, batch)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        path = self.sampler_states_path
        if not path or not os.path.exists(path):
            return
        with open(path) as fh:
            saved = [b for b in json.load(fh)["backups"] if b["saved_at"] == self._saved_at()]
        if not saved:
            self.log(f"[train] {path} holds no state for the backup: this worker's samplers "
                     f"continue from the chief's")
            return
        for g, values in zip(self.model.samplers, saved[-1]["states"]):
            g.state.assign(tf.constant(values, g.state.dtype))

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        if self.sampler_states_path and os.path.exists(self.sampler_states_path):
            os.remove(self.sampler_states_path)


def user_sampler(fraction: float, seed: int, buckets: int = 10000):
    """A batch map keeping the examples of a fixed, seeded ``fraction`` of users (by id hash)."""
    salt = tf.constant(f"#{seed}")
    limit = int(round(fraction * buckets))

    def keep(batch):
        bucket = tf.strings.to_hash_bucket_fast(batch["user_id"] + salt, buckets)
        mask = bucket < limit
        return {k: tf.boolean_mask(v, mask) for k, v in batch.items()}

    return keep


def _subsample(arrays: dict, max_examples: int, seed: int) -> dict:
    """At most ``max_examples`` examples, a fixed random subset in file order."""
    n = len(arrays["item"])
    if n <= max_examples:
        return arrays
    idx = np.sort(np.random.default_rng(seed).choice(n, max_examples, replace=False))
    return {k: v[idx] for k, v in arrays.items()}


def consumed_batches(backup_dir: str, steps_per_epoch: int) -> int:
    """Batches a killed run already trained on, read from its BackupAndRestore checkpoint.

    Mirrors tf_keras's ``maybe_load_initial_counters_from_ckpt``: the backup stores the epoch and
    the batch within it at which it was written. 0 when there is no backup.
    """
    latest = tf.train.latest_checkpoint(os.path.join(backup_dir, "chief"))
    if not latest:
        return 0
    reader = tf.train.load_checkpoint(latest)
    epoch = int(reader.get_tensor("ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE"))
    batch = int(reader.get_tensor("ckpt_saved_batch/.ATTRIBUTES/VARIABLE_VALUE"))
    if epoch < 0 or batch < 0:
        return 0
    return epoch * steps_per_epoch + batch + 1


def _training_config(raw: dict) -> dict:
    """A config dict as a resumed run compares it: read through today's config, so keys added
    since it was written take their defaults (which keep the behaviour of before), and without
    the ``export`` section (it never changes a training run). A dict today's config refuses (a
    key that no longer exists) is compared as it is."""
    from micrec_tf.config import ConfigError, from_dict

    try:
        out = from_dict(raw).to_dict()
    except (ConfigError, TypeError, ValueError):
        out = dict(raw or {})
    out.pop("export", None)
    return out


def discard_stale_backup(cfg: Config, run_dir: str, log=print) -> bool:
    """Deletes ``run_dir/backup`` when it belongs to a run with a different config (a resumed run
    must continue the same experiment); returns whether it did. The config of the interrupted
    run is the ``config.yaml`` it wrote on start, compared as :func:`_training_config` reads it:
    a config key added by a newer version of this code (at its default) or a changed
    ``export.*`` setting does not discard the backup."""
    backup_dir, config_path = os.path.join(run_dir, "backup"), os.path.join(run_dir, "config.yaml")
    if not os.path.isdir(backup_dir) or not os.path.exists(config_path):
        return False
    with open(config_path) as fh:
        previous = _training_config(yaml.safe_load(fh))
    now = _training_config(cfg.to_dict())
    if previous == now:
        return False
    changed = sorted(_changed_keys(previous, now))
    log(f"[train] {run_dir} holds an interrupted run of another config (changed: "
        f"{', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}); starting from scratch")
    shutil.rmtree(backup_dir)
    return True


def _changed_keys(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in set(a) | set(b):
            yield from _changed_keys(a.get(key), b.get(key), f"{prefix}{key}.")
    elif a != b:
        yield prefix.rstrip(".")


def describe_code_paths(cfg: Config, num_items: int, feature_spec: dict) -> str:
    """One line: how the user tower embeds the history in training (``history_path`` of a
    training call of the configured batch size), and its attention."""
    h = int(feature_spec.get("history_length", cfg.preprocess.history_length))
    b, mode = int(cfg.train.batch_size), cfg.model.history_embeddings
    chosen = history_path(mode, num_items, b, h, training=True)
    table = chosen == "table"
    why = (f"{num_items - 1:,} items {'<' if table else '>='} batch {b} x {h} history slots"
           if mode == "auto" else "forced")
    if mode == "auto" and chosen == "unique":
        why += "; inference per slot"
    path = {"unique": "distinct items", "table": "catalogue table", "slots": "per slot"}[chosen]
    return (f"history embeddings: {path} "
            f"(model.history_embeddings={mode}: {why}); attention: {cfg.model.attention}")


def train(cfg: Config, run_dir: str | None = None, evaluate_test: bool = True,
          log=print, extra_callbacks=()) -> dict:
    """Trains ``cfg``'s model; returns ``{"run_dir", "history", "valid", "test", "model"}``.

    ``extra_callbacks`` run after the others and before the backup (tests use one to kill a
    run). ``best_epoch`` in the result is the epoch whose weights the run keeps.

    The run folder must be one a job may own (:func:`micrec_tf.publish.check_owned_dir`: not
    the current folder, the repository, the home folder or one above them); the run holds its
    lock (``<runs_dir>/.<name>.lock``) throughout: a second training of the same folder fails at
    once, naming this one's pid (:mod:`micrec_tf.locks`).
    """
    run_dir = run_dir or cfg.run_dir
    cfg = update_config(cfg)  # issue 29: an update trains train.warm_start_epochs epochs
    publish.check_owned_dir(run_dir, "the run folder (--run-dir)")
    if multiworker_requested():
        return _train_multiworker(cfg, run_dir, evaluate_test, log, extra_callbacks)
    with locks.folder_lock(run_dir, "training", "wait for it or pick another --run-dir"):
        return _train_locked(cfg, run_dir, evaluate_test, log, extra_callbacks)


def _train_multiworker(cfg: Config, run_dir: str, evaluate_test: bool, log,
                       extra_callbacks) -> dict:
    """:func:`train` under ``TF_CONFIG`` (issue 31): every worker runs the whole training.

    The strategy comes first (collectives must be configured before any other TensorFlow op).
    The chief (task 0) trains in ``run_dir`` as a single process would; every other worker
    writes its copies of the run's files (config, history, best weights, TensorBoard,
    checkpoint, metrics, run state, lock) to a temporary folder it removes at the end, and
    shares the chief's ``run_dir/backup`` (read on resume; BackupAndRestore writes the
    worker's own state to ``backup/workertemp_<i>`` and removes it), so ``run_dir`` must be on a
    filesystem every worker sees. A failed collective (a worker killed or stalled past
    ``train.collective_timeout_s``) raises :class:`WorkerLostError`.
    """
    strategy, gpus = select_strategy(cfg.train.require_gpu, log,
                                     cfg.train.collective_timeout_s or None)
    task = chief_task_id(strategy)
    lost = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
            tf.errors.CancelledError, tf.errors.AbortedError)
    backup_dir = os.path.join(run_dir, "backup")
    tmp = None
    try:
        if task == 0:
            with locks.folder_lock(run_dir, "training", "wait for it or pick another --run-dir"):
                return _train_locked(cfg, run_dir, evaluate_test, log, extra_callbacks,
                                     (strategy, gpus), backup_dir)
        tmp = tempfile.mkdtemp(prefix=f"micrec-worker{task}-")
        work_dir = os.path.join(tmp, os.path.basename(os.path.normpath(run_dir)) or "run")
        log(f"[train] worker {task}: the chief (worker 0) writes {run_dir}; this worker writes "
            f"its copies to {work_dir} (removed at the end) and shares {backup_dir}")
        with locks.folder_lock(work_dir, "training", "wait for it or pick another --run-dir"):
            result = _train_locked(cfg, work_dir, evaluate_test, log, extra_callbacks,
                                   (strategy, gpus), backup_dir)
        result["run_dir"] = run_dir
        return result
    except lost as err:
        first = " ".join(str(err.message).split())[:400]
        raise WorkerLostError(
            f"multi-worker training (worker {task}) stopped: a collective failed, a worker is "
            f"lost or stalled ({type(err).__name__}: {first}). Restart every worker with the "
            f"same command: the run resumes from {backup_dir}") from err
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _train_locked(cfg: Config, run_dir: str, evaluate_test: bool, log, extra_callbacks,
                  strategy_gpus=None, backup_dir: str | None = None) -> dict:
    """The body of :func:`train` while it holds the run folder's lock.

    ``strategy_gpus``: ``(strategy, gpus)`` already made (multi-worker training); None (the
    single-process default) selects them here, as before issue 31. ``backup_dir``: the
    BackupAndRestore folder, None = ``run_dir/backup``.
    """
    os.makedirs(run_dir, exist_ok=True)
    discard_stale_backup(cfg, run_dir, log)
    # A previous run's results no longer describe this directory once its config is replaced;
    # its checkpoint/ neither: run_state.json says "training" until this run writes its own
    # (export refuses the folder meanwhile, micrec_tf/run_state.py).
    config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    run_state.mark_training(run_dir, config_text)
    if os.path.exists(os.path.join(run_dir, "metrics.json")):
        os.remove(os.path.join(run_dir, "metrics.json"))
    with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
        fh.write(config_text)
    tf_keras.utils.set_random_seed(cfg.train.seed)

    strategy, gpus = strategy_gpus or select_strategy(cfg.train.require_gpu, log)
    policy = training_policy(cfg.train.mixed_precision, gpus, log)
    # The model is built and trained under this policy; the caller's global policy is restored on
    # return (the returned model keeps the policy its layers were built with).
    with policy_scope(policy):
        return _train_under_policy(cfg, run_dir, strategy, evaluate_test, log, extra_callbacks,
                                   backup_dir or os.path.join(run_dir, "backup"))


def _chief_value(strategy, value_fn) -> int:
    """``value_fn()`` computed by the chief alone and given to every worker of a
    ``MultiWorkerMirroredStrategy`` (a SUM all-reduce of the chief's value and the others' 0s;
    also a barrier: no worker reads the run folder before the chief has prepared it);
    ``value_fn()`` itself under any other strategy."""
    if not is_multiworker(strategy):
        return value_fn()
    mine = float(value_fn()) if chief_task_id(strategy) == 0 else 0.0
    per_replica = strategy.run(lambda: tf.constant(mine, tf.float64))
    return int(round(float(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))))


def _train_under_policy(cfg: Config, run_dir: str, strategy, evaluate_test: bool, log,
                        extra_callbacks, backup_dir: str) -> dict:
    """The body of :func:`train` once the run directory, strategy and dtype policy are set."""
    art = load_artifacts(cfg.artifacts_dir)
    check_cl_tables(art, cfg.model.cl)
    raw_ids = None  # the lines of vocab/item_id.txt, read once for the cold-start pieces
    if cfg.preprocess.split == ITEM_COLD_START:  # its metrics need every catalogue item (issue 28)
        check_catalogue_vocabulary(cfg.preprocess.item_vocabulary)
        raw_ids = read_vocab(os.path.join(cfg.artifacts_dir, "vocab", "item_id.txt"))
    num_items = art.item_table.num_items
    n_train = art.feature_spec.get("num_examples", {}).get("train")
    preset = f" preset={cfg.model.preset}" if cfg.model.preset else ""
    log(f"[train] {cfg.name}: model={cfg.model.name}{preset} cl={cfg.model.cl} items={num_items - 1} "
        f"train examples={n_train} batch={cfg.train.batch_size}")
    with strategy.scope():
        model = build_model(cfg, art.item_table, art.vocab_sizes, art.user_fields,
                            art.cooccurrence, art.title_neighbours)
        model.compile(optimizer=make_optimizer(cfg.train))  # train.optimizer (default Adam)
    log("[train] " + describe_code_paths(cfg, num_items, art.feature_spec))
    # Which items are CL anchors (issue 28); None without CL tasks. Kept in metrics.json.
    cl_anchors = describe_cl_anchors(
        cfg.loss.cl_anchors, num_items, art.item_table.id_clicks, getattr(model, "cl_tasks", {}),
        raw_ids)
    if cl_anchors:
        log("[train] " + cl_anchors_line(cl_anchors))

    # One endless, seeded stream of batches (reshuffled per epoch, deterministically), cut into
    # epochs by steps_per_epoch. A resumed run skips the batches its backup already trained on,
    # so it sees exactly the data an uninterrupted run would.
    steps_per_epoch = max(1, int(np.ceil((n_train or 0) * cfg.train.train_fraction
                                         / cfg.train.batch_size)))
    # Multi-worker: every worker skips the batches the chief's backup holds (the same number).
    done = _chief_value(strategy, lambda: consumed_batches(backup_dir, steps_per_epoch))
    if done and chief_task_id(strategy) != 0:
        # A resumed non-chief worker rebuilds the finished epochs' state (history rows, best
        # weights) from the chief's run folder, as the chief does, so that both take the same
        # early-stopping decisions.
        shared = os.path.dirname(backup_dir)
        for name in ("history.json", "best_weights.npz"):
            if os.path.exists(os.path.join(shared, name)):
                shutil.copy2(os.path.join(shared, name), os.path.join(run_dir, name))
    completed_epochs, resumed_batch = divmod(done, steps_per_epoch)
    if done:
        where = (f"at batch {resumed_batch + 1}/{steps_per_epoch} of epoch {completed_epochs + 1}"
                 f" (its logged losses average the resumed batches only)" if resumed_batch
                 else f"at epoch {completed_epochs + 1}")
        log(f"[train] resuming from {backup_dir} {where}: skipping {done} batches already "
            f"trained on")
    # Reads every split once: a missing, short or corrupt shard stops here, naming the file,
    # before the first batch.
    splits = {s: load_split_arrays(cfg.artifacts_dir, s) for s in ("train", "valid", "test")}
    train_ds = make_dataset(cfg.artifacts_dir, "train", cfg.train.batch_size, shuffle=True,
                            seed=cfg.train.seed, repeat=True)
    if cfg.train.train_fraction < 1.0:
        train_ds = train_ds.map(user_sampler(cfg.train.train_fraction, cfg.train.seed))
    train_ds = train_ds.skip(done)
    if is_multiworker(strategy):
        # Issue 31: every worker reads the same stream of global batches (train.batch_size) and
        # keeps its share of each (worker k the k-th of its num_workers slices): the same global
        # batches as one process, whatever the number of shards (FILE sharding would give each
        # worker other files, hence other batches, and fails with more workers than shards).
        # skip(done) above counts global batches.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA)
        train_ds = train_ds.with_options(options)
    with strategy.scope():
        # Create every variable (towers, CL projectors, optimizer slots) before fit, so that
        # BackupAndRestore restores all of them, not only those that exist at restore time.
        # (A batch of the validation split; of another split, or one all-zero example, when an
        # update's window left it empty: issue 29.)
        model.compute_losses(first_batch(cfg.artifacts_dir, 8))
        model.optimizer.build(model.trainable_variables)
        # Issue 29: train.warm_start_from restores a previous run, its tables grown (None: "").
        warm = warm_start(model, cfg, run_dir, art.vocab_sizes.values(), log)
    # Under a GPU strategy, Keras distributes the dataset, which prefetches batches to the device.

    valid = _subsample(splits["valid"], cfg.train.validation_max_examples, cfg.train.seed)
    history = list(splits.values())
    v_excl = earlier_clicks_exclusion(valid, history) if cfg.eval.exclude_clicked else None
    t_excl = (earlier_clicks_exclusion(splits["test"], history) if cfg.eval.exclude_clicked
              else None)

    history_cb = _JsonHistory(os.path.join(run_dir, "history.json"), completed_epochs,
                              resumed_batch + 1 if resumed_batch else 0)
    cold_cbs, monitor = [], f"val_hit_at_{cfg.eval.hit_n[0]}"
    if cfg.preprocess.split == ITEM_COLD_START:
        # The protocol chooses on the cold-validation items: early stopping reads their slice.
        rows = cold_rows(splits["valid"][ITEM], raw_ids, "valid")
        cold_cbs = [ColdValidation({k: np.asarray(a)[rows] for k, a in splits["valid"].items()},
                                   num_items, raw_ids, cfg.preprocess.item_vocabulary,
                                   cfg.eval.batch_size)]
        monitor = f"val_cold_hit_at_{COLD_MONITOR_N}"
    best_cb = BestEpoch(monitor, cfg.train.early_stopping_patience,
                        os.path.join(run_dir, "best_weights.npz"), history_cb.rows, log)
    callbacks = [
        ValidationHitRate(valid, num_items, cfg.eval.hit_n, cfg.eval.coverage_n, v_excl,
                          cfg.eval.batch_size, cfg.eval.exact_engine),
        *cold_cbs,
        tf_keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard"), update_freq=50),
        StepProgress(cfg.train.batch_size, PROGRESS_EVERY_S, log),
        history_cb,
        best_cb,
        *extra_callbacks,
        # Last: its epoch-end backup must follow the state the callbacks above just updated.
        EpochBackup(backup_dir, cfg.train.steps_per_checkpoint, log,
                    os.path.join(backup_dir, f"sampler_states_worker{chief_task_id(strategy)}.json")
                    if chief_task_id(strategy) else None),
    ]

    start = time.time()
    if warm is not None and not n_train:  # issue 29: an empty window trains no step
        log("[train] warm start on a window without training examples: no training step")
        hist = tf_keras.callbacks.History()
        hist.epoch, hist.history = [], {}
    else:
        hist = model.fit(train_ds, epochs=cfg.train.epochs, steps_per_epoch=steps_per_epoch,
                         callbacks=callbacks, verbose=2)
    seconds = time.time() - start
    log(f"[train] done in {seconds:.1f}s ({(n_train or 0) * len(hist.epoch) / max(seconds, 1e-9):.0f} "
        f"examples/s over {len(hist.epoch)} epoch(s))")

    ckpt_dir = os.path.join(run_dir, "checkpoint")
    tf.train.Checkpoint(model=model).write(os.path.join(ckpt_dir, "model"))
    epochs_run = completed_epochs + len(hist.epoch)
    if best_cb.patience > 0 and best_cb.best_epoch == cfg.train.epochs:
        log(f"[train] the best epoch is the last allowed (train.epochs={cfg.train.epochs}): "
            f"the run stopped at its epoch cap and may not have converged")
    result = {"run_dir": run_dir, "seconds": seconds, "epochs_run": epochs_run,
              "best_epoch": best_cb.best_epoch if best_cb.patience > 0 else epochs_run,
              "stopped_early": best_cb.stopped_early,
              "history": {k: [float(x) for x in v] for k, v in hist.history.items()},
              "valid": evaluate_model(model, valid, num_items, cfg.eval.hit_n, cfg.eval.coverage_n,
                                      exclude=v_excl, batch_size=cfg.eval.batch_size,
                                      exact_engine=cfg.eval.exact_engine)}
    if cl_anchors:
        result["cl_anchors"] = cl_anchors
    if warm:
        result["warm_start"] = warm
    if evaluate_test:
        # Long tail (paper 5.6): test clicks on the 80 % least-clicked training items.
        tail = long_tail_items(train_item_counts(cfg.artifacts_dir, splits["train"]))
        test = splits["test"]
        if cfg.eval.test_max_examples:
            test = _subsample(test, cfg.eval.test_max_examples, cfg.train.seed + 1)
            if cfg.eval.exclude_clicked:
                t_excl = earlier_clicks_exclusion(test, history)
        result["test"] = evaluate_model(model, test, num_items, cfg.eval.hit_n,
                                        cfg.eval.coverage_n, exclude=t_excl,
                                        batch_size=cfg.eval.batch_size,
                                        slices={"long_tail": tail[test["item"]]},
                                        exact_engine=cfg.eval.exact_engine)
    if cfg.preprocess.split == ITEM_COLD_START:
        # Issue 28: cold / warm / all (micrec_tf/evaluation/cold_start.py) over every click of
        # the split (the validation subsample above is for the per-epoch warm metric only).
        evals = {"valid": splits["valid"], **({"test": test} if evaluate_test else {})}
        result["cold_start"] = {
            s: evaluate_cold_start(model, arrays, num_items, raw_ids, s,
                                   cfg.preprocess.item_vocabulary, cfg.eval.batch_size)
            for s, arrays in evals.items()}
    with open(os.path.join(run_dir, "metrics.json"), "w") as fh:
        json.dump({k: v for k, v in result.items() if k != "history"}, fh, indent=1)
    run_state.mark_finished(run_dir, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    for split in ("valid", "test"):
        if split in result:
            shown = " ".join(f"{k}={v:.4f}" for k, v in result[split].items()
                             if isinstance(v, float))
            log(f"[train] {split}: {shown or 'no examples, no metrics'}")
    result["model"] = model
    return result


def restore_model(run_dir: str):
    """Rebuilds the model of a finished run from its config and checkpoint: ``(model, cfg, art)``."""
    from micrec_tf.config import from_dict

    with open(os.path.join(run_dir, "config.yaml")) as fh:
        cfg = from_dict(yaml.safe_load(fh))
    art = load_artifacts(cfg.artifacts_dir)
    model = build_model(cfg, art.item_table, art.vocab_sizes, art.user_fields,
                        art.cooccurrence, art.title_neighbours)
    ckpt = os.path.join(run_dir, "checkpoint", "model")
    if not tf.io.gfile.exists(ckpt + ".index"):
        raise FileNotFoundError(f"no trained checkpoint at {ckpt!r}: run `make train` first")
    tf.train.Checkpoint(model=model).read(ckpt).expect_partial()
    return model, cfg, art


def main(argv=None) -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("--run-dir", default=None, help="default: runs/<name>")
    args = parser.parse_args(argv)
    try:
        train(cli.load(args), run_dir=args.run_dir)
    except WorkerLostError as err:  # issue 31: one line, not a collective's traceback
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
