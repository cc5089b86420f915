"""The rolling protocol of a growing catalogue (issue 29, item 6):
``python -m experiments.rolling --config configs/ml-1m.yaml [--windows 10] [--seeds 1]
[--models "ICAN,MicRec (final)"] [--lr-grid 0.0003,0.001,0.003] [--cached-only]``.

**The cut** (:func:`cut_windows`). Every click of the dataset (its raw interaction lines, read
through the dataset adapter) in time order: segment 0 = the first ``INITIAL_FRACTION`` (50 %) of
the clicks, then ``--windows`` W windows 1..W of equal click counts. The cut is made on click
ranks and then on time: boundary k is the timestamp of the click at target rank
``r_k = n0 + round(k (n - n0) / W)`` (``n0 = round(n / 2)``, halves up) in the stable time
order, and a click belongs to the last segment whose boundary is at or before its timestamp.
Clicks tied with a boundary's timestamp therefore all go to the later segment, the rule of
``preprocess.split: global_time``, so the preprocessing's own split reproduces the cut exactly
(counts can differ from the targets by the ties at a boundary; a cut whose ties leave a segment
empty is refused). Unparseable raw lines are no clicks: they are left out of every folder.

**Steps.** Step s = 0..W-1 trains on segments 0..s and is evaluated on window s + 1:

* step 0: the initial model, trained from scratch on segment 0 (early stopping, with session
  tails for the co-occurrence updates and history tails for the updates' histories,
  ``HISTORY_TAILS``) and exported;
* step s >= 1, **incremental**: one daily update (:func:`micrec_tf.update.run_update`: window
  s preprocessed growing the previous artifacts, title neighbours merged, warm start from the
  previous version, one pass, export of a new version) from step s - 1's version, with the
  step's own split fractions (below; passed explicitly, so the update's default window split
  [0.9, 0.1, 0.0] does not apply);
* step s >= 1, **full retrain**: the same model from scratch on segments 0..s, to convergence
  (``train.epochs`` cap, ``train.early_stopping_patience``; the best epoch restored);
* both are evaluated on the **same examples**: the test split of the full retrain's artifacts
  (every click of window s + 1, each with its user's whole earlier history); the incremental
  model reads them through :func:`remap_arrays` (raw ids -> its own indices; item vocabularies
  are whole-catalogue, ``preprocess.item_vocabulary: catalogue``, which the driver sets);
  HIT@N and coverage@N (``eval.hit_n``, ``eval.coverage_n``, ``eval.exclude_clicked`` as in the
  config) over all of the window's clicks and over the **new-item slice**: clicks on items
  first clicked in window s + 1 (no click in segments 0..s, :func:`new_items`).

Splits (``preprocess.split_fractions``, :func:`step_fractions`): in both runs of step s the last
``VALID_FRACTION`` (10 %) of segment s's clicks is the validation split (early stopping of the
full retrain; the update's one pass does not stop early), the clicks before it are training
clicks, window s + 1 is the test split. The incremental model's preprocess sees segments s and
s + 1 only (the update's window folder), but the initial model's preprocess writes history tails
(``preprocess.history_tails: true``, :data:`HISTORY_TAILS`, set in the initial and update
units' configs, hence in their cache signatures) and every update grows them
(``micrec_tf.update`` turns the key on when the previous artifacts have tails), so the
incremental model's training examples carry each user's earlier clicks as history (its last
``history_length`` clicks over segments 0..s; segment s + 1, in both update s's and update
s + 1's folders, is dropped from the carried tails by the merge rule of
``pipelines/history_tails.py``, and since a tail keeps the last ``history_length`` clicks
before its run's test split plus that whole split, the carried part still holds the
``history_length`` clicks before segment s + 1: exact, 0 short histories in the ml-100k replay
of docs/GROWING_CATALOGUE.md), as the full retrain's do. Before this protocol change the
incremental examples carried histories from window s only; no rolling result was committed
under it (``docs/results/runs/`` held no ``*rolling*`` unit), so no committed result depends on
it. The full retrains see every click and write no history tails (``HISTORY_TAILS`` is not set
in their configs: their units' signatures are unchanged). The evaluation examples carry full
histories for both models.

**Learning rate of the update** (``--lr-grid``, per model): step 1 (the first update, from the
initial model on window 1) is run once per grid value, each scored by its all-clicks HIT@N[0] on
window 2; the best (first in grid order on a tie) continues to steps 2..W-1. Window 2 therefore
chooses the learning rate: step 1 is reported as **tuning** and the summary ratios are over the
held-out steps 2..W-1 only. The full retrains use the config's ``train.learning_rate``.

Wall time: incremental = the update's total (preprocess, title neighbours, train, export);
full = preprocess + title neighbours + training. Quality ratio = incremental / full.

Everything is cached one JSON per unit (initial model, each update, each full retrain, each
evaluation is part of its unit) under ``docs/results/runs/<name>-rolling/`` with the step's
config signature and the cut, so a second call trains nothing and a stopped call resumes; runs,
artifacts, window folders and exports live under ``--scratch`` (default
``<runs_dir>/<name>-rolling``, not committed). Writes ``docs/results/<name>-rolling.md`` and
``.json``; ``--cached-only`` writes what is cached, marked partial.

**Items that arrive over time** (``item_published.tsv`` in the data folder, written by the
synthetic generator at ``data.synthetic.arrival: news``; :func:`read_published`). When the file
is there (automatic; ``--all-items`` or ``published_filter=False`` turns it off) every window
folder's item file holds only the items published before the folder's **catalogue cut**: the
first click of the segment after the folder's last one (``upto-k`` and ``pair-(k-1)``, whose
last segment k is step k-1's evaluation window: boundary k; for k = W one second after the last
click). So an item not yet published is no catalogue row at that step, every item clicked in the
folder is (no click precedes its item's publication), and each later step's catalogue is a
superset: the update's append-only vocabularies append the newly published items
(:func:`prepare_folders`). Units run this way carry ``"items": "published"`` in their cache
signature. Without the file (ml-1m, every other dataset) the item files are links, as before.
A ``synthetic`` config is generated first (``ensure_generated``) and its runs read the window
folders as ``canonical`` data (else the preprocess would generate into them).

Nothing else imports this module; no default behaviour changes.
"""
from __future__ import annotations

import bisect
import datetime
import gzip
import json
import os
import shutil
import sys
import time

import numpy as np

from micrec_tf import cli
from micrec_tf.config import CL_TASKS, Config

from experiments.report import names_arg, write_report
from experiments.run_cache import run_signature, slug

__all__ = ["Cut", "cut_windows", "new_items", "step_fractions", "remap_arrays", "Steps",
           "run_rolling", "choose_lr", "ratio", "MODELS", "read_published", "catalogue_cuts"]

ICAN, FINAL = "ICAN", "MicRec (final)"
MODELS = {ICAN: {"model.name": "ican", "model.cl": []},
          FINAL: {"model.name": "ican", "model.cl": list(CL_TASKS)}}
LR_GRID = (0.0003, 0.001, 0.003)
INITIAL_FRACTION = 0.5
VALID_FRACTION = 0.1
# Set by the driver for every run: the protocol's split and whole-catalogue item vocabularies.
PROTOCOL = {"preprocess.split": "global_time", "preprocess.item_vocabulary": "catalogue"}
# Set for the initial model and the updates (not the full retrains): the initial artifacts carry
# history tails, so the updates' training examples get the users' earlier clicks as history.
HISTORY_TAILS = {"preprocess.history_tails": True}
# Publication times of the items (micrec_tf.data.synthetic.PUBLISHED_FILE): item_id, published.
PUBLISHED_FILE = "item_published.tsv"


# ------------------------------------------------------------------------------------------
# The cut
# ------------------------------------------------------------------------------------------
class Cut:
    """Segments of a click log: 0 (initial) and windows 1..W.

    ``boundaries``: W timestamps; a click at time ``t`` is in segment
    ``bisect_right(boundaries, t)`` (ties with a boundary go to the later segment).
    ``counts``: clicks per segment 0..W. ``targets``: the target ranks r_0..r_{W-1}.
    """

    def __init__(self, boundaries, counts, targets):
        self.boundaries = tuple(int(b) for b in boundaries)
        self.counts = tuple(int(c) for c in counts)
        self.targets = tuple(int(r) for r in targets)

    @property
    def windows(self) -> int:
        return len(self.boundaries)

    def segment(self, ts) -> int:
        """Segment (0..W) of a click at timestamp ``ts``."""
        return bisect.bisect_right(self.boundaries, int(ts))

    def summary(self) -> dict:
        return {"boundaries": list(self.boundaries), "counts": list(self.counts),
                "targets": list(self.targets)}


def _round_half_up(num: int, den: int) -> int:
    """round(num / den), halves up, in integers."""
    return (2 * num + den) // (2 * den)


def cut_windows(timestamps, windows: int, initial_fraction: float = INITIAL_FRACTION) -> Cut:
    """The protocol's cut of clicks with these timestamps (module doc).

    Args:
        timestamps: one int per click, any order.
        windows: W >= 1.
        initial_fraction: share of the clicks in segment 0, in (0, 1).

    Raises ValueError (one line) for no clicks, a bad W or fraction, or ties that leave a
    segment empty.
    """
    if isinstance(windows, bool) or not isinstance(windows, int) or windows < 1:
        raise ValueError(f"windows must be an integer >= 1. Received: {windows!r}")
    if not 0.0 < float(initial_fraction) < 1.0:
        raise ValueError(f"initial_fraction must be in (0, 1). Received: {initial_fraction!r}")
    ts = sorted(int(t) for t in timestamps)
    n = len(ts)
    n0 = min(n, int(np.floor(float(initial_fraction) * n + 0.5)))
    if n - n0 < windows or n0 < 1:
        raise ValueError(f"{n} clicks cannot make an initial segment and {windows} windows. "
                         f"Received: {n} clicks")
    targets = [n0 + _round_half_up(k * (n - n0), windows) for k in range(windows)]
    boundaries = [ts[r] for r in targets]
    counts = [0] * (windows + 1)
    for t in ts:
        counts[bisect.bisect_right(boundaries, t)] += 1
    empty = [k for k, c in enumerate(counts) if c == 0]
    if empty:
        raise ValueError(f"clicks tied at a window boundary leave segment {empty[0]} empty "
                         f"(ties go to the later segment); use fewer windows. Received: "
                         f"{windows} windows over {n} clicks")
    return Cut(boundaries, counts, targets)


def new_items(clicks, cut: Cut, segment: int) -> set:
    """Raw ids of the items clicked in ``segment`` and never in an earlier one.

    ``clicks``: ``(timestamp, raw item id)`` pairs."""
    first = {}
    for ts, item in clicks:
        s = cut.segment(ts)
        if s < first.get(item, s + 1):
            first[item] = s
    return {item for item, s in first.items() if s == segment}


def step_fractions(counts, step: int, update: bool = False) -> list:
    """``preprocess.split_fractions`` of step ``step``'s runs (module doc): training clicks =
    segments 0..step (``update``: segment ``step`` alone) less the last ``VALID_FRACTION`` of
    segment ``step`` (validation); test = segment ``step + 1``."""
    if not 0 <= step < len(counts) - 1:
        raise ValueError(f"step must be in [0, {len(counts) - 2}]. Received: {step!r}")
    if update and step == 0:
        raise ValueError("step 0 is the initial model, not an update. Received: step 0")
    trained = counts[step] if update else sum(counts[:step + 1])
    v = max(1, int(np.floor(VALID_FRACTION * counts[step] + 0.5)))
    if trained - v < 1:
        raise ValueError(f"segment {step} is too small for a training and a validation split. "
                         f"Received: {counts[step]} clicks")
    n = trained + counts[step + 1]
    return [(trained - v) / n, v / n, counts[step + 1] / n]


# ------------------------------------------------------------------------------------------
# Window folders (raw data in the dataset's own format)
# ------------------------------------------------------------------------------------------
def _open_text(path: str, encoding: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")


def read_raw_clicks(adapter, data_dir: str) -> tuple:
    """``(header lines, [(raw line, Interaction)])`` of the adapter's interaction files in file
    order. Header = the lines before the first click of the first file that parse to no click;
    later such lines (blank lines, other files' headers) and unparseable lines are dropped.
    A line holding several clicks is refused (the cut moves whole lines)."""
    from micrec_tf.data.schema import RowError

    paths = adapter.interaction_files.paths(data_dir)
    if not paths:
        raise cli.UsageError(f"no interaction file ({list(adapter.interaction_files.patterns)}) "
                             f"under {data_dir!r}")
    header, rows = [], []
    for i, path in enumerate(paths):
        with _open_text(path, adapter.interaction_files.encoding) as fh:
            for line in fh:
                try:
                    parsed = adapter.parse_interaction(line)
                except RowError:
                    continue
                if len(parsed) > 1:
                    raise cli.UsageError(f"{path}: a line holds {len(parsed)} clicks; the rolling "
                                         f"protocol cuts whole lines. Received: {adapter.name}")
                if parsed:
                    rows.append((line if line.endswith("\n") else line + "\n", parsed[0]))
                elif i == 0 and not rows:
                    header.append(line)
    return header, rows


def read_published(data_dir: str) -> dict | None:
    """``{raw item id: publication Unix second}`` of ``<data_dir>/item_published.tsv`` (a header
    line ``item_id<TAB>published``, then one item a line); None when the file is absent. A bad
    line is a one-line ``UsageError`` naming ``file:line``."""
    path = os.path.join(data_dir, PUBLISHED_FILE)
    if not os.path.exists(path):
        return None
    out = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            fields = line.rstrip("\n").split("\t")
            if n == 1 and fields == ["item_id", "published"]:
                continue
            if len(fields) != 2 or not fields[0] or not fields[1].lstrip("-").isdigit() \
                    or fields[0] in out:
                raise cli.UsageError(f"{path}:{n}: expected a new item id and its publication "
                                     f"time (Unix seconds). Received: {line.rstrip()!r}")
            out[fields[0]] = int(fields[1])
    return out


def catalogue_cuts(cut: Cut, last_timestamp: int) -> dict:
    """``{k: t}``, k = 1..W: a folder whose last segment is k (``upto-k``, ``pair-(k-1)``) holds
    the items published before t: boundary k (the first click of segment k + 1) for k < W,
    ``last_timestamp + 1`` for k = W."""
    return {k: (cut.boundaries[k] if k < cut.windows else int(last_timestamp) + 1)
            for k in range(1, cut.windows + 1)}


def _published_item_lines(path: str, adapter, published: dict, before: int) -> list:
    """The lines of one item file whose item was published before ``before``; lines that hold
    no item (header, blank, unparseable: the preprocess's dead letters) are kept as they are.
    An item without a publication time is refused (one line)."""
    from micrec_tf.data.schema import RowError

    keep = []
    with _open_text(path, adapter.item_files.encoding) as fh:
        for n, line in enumerate(fh, 1):
            try:
                parsed = adapter.parse_item(line)
            except RowError:
                parsed = []
            missing = [it.item_id for it in parsed if it.item_id not in published]
            if missing:
                raise cli.UsageError(f"{path}:{n}: item {missing[0]!r} has no publication time "
                                     f"in {PUBLISHED_FILE}")
            if all(published[it.item_id] < before for it in parsed):
                keep.append(line if line.endswith("\n") else line + "\n")
    return keep


def write_data_folder(dst: str, header, lines, adapter, data_dir: str, published=None,
                      before=None) -> None:
    """A raw-data folder: ``lines`` (with ``header`` first) as one interaction file named after
    the first source file (``.gz`` dropped), and links to the item and user files. With
    ``published`` (:func:`read_published`) the item files are copies (``.gz`` dropped) holding
    the items published before ``before`` only (:func:`_published_item_lines`)."""
    src = adapter.interaction_files.paths(data_dir)[0]
    name = os.path.basename(src)[:-3] if src.endswith(".gz") else os.path.basename(src)
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, name), "w", encoding=adapter.interaction_files.encoding,
              newline="") as fh:
        fh.writelines(header)
        fh.writelines(lines)
    for files in (adapter.item_files, adapter.user_files):
        for path in files.paths(data_dir):
            base = os.path.basename(path)
            if published is not None and files is adapter.item_files:
                base = base[:-3] if base.endswith(".gz") else base
                with open(os.path.join(tmp, base), "w", encoding=files.encoding,
                          newline="") as fh:
                    fh.writelines(_published_item_lines(path, adapter, published, before))
                continue
            os.symlink(os.path.abspath(path), os.path.join(tmp, base))
    if adapter.interaction_files.paths(tmp) != [os.path.join(tmp, name)]:
        raise cli.UsageError(f"the window file {name!r} does not match the adapter's patterns "
                             f"{list(adapter.interaction_files.patterns)}")
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def prepare_folders(header, rows, cut: Cut, adapter, data_dir: str, scratch: str,
                    published=None) -> dict:
    """Writes (once per cut) ``upto-<k>`` (segments 0..k, k = 1..W: step k - 1's full retrain
    and evaluation data) and ``pair-<k>`` (segments k and k + 1, k = 1..W-1: update k's window
    folder) under ``<scratch>/data``; returns ``{"upto": {k: dir}, "pair": {k: dir}}``.
    ``published`` (:func:`read_published`; None: item files linked, as before): each folder's
    item files hold the items published before its :func:`catalogue_cuts` time."""
    root = os.path.join(scratch, "data")
    stamp = os.path.join(root, "cut.json")
    folders = {"upto": {k: os.path.join(root, f"upto-{k:02d}") for k in
                        range(1, cut.windows + 1)},
               "pair": {k: os.path.join(root, f"pair-{k:02d}") for k in range(1, cut.windows)}}
    cuts = (catalogue_cuts(cut, max(c.timestamp for _, c in rows))
            if published is not None else None)
    summary = cut.summary()
    if cuts is not None:  # (the stamp of a run without the filter is the cut alone, as before)
        summary["items_published_before"] = [cuts[k] for k in sorted(cuts)]
    if os.path.exists(stamp):
        with open(stamp) as fh:
            if json.load(fh) == summary:
                return folders
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    seg = [cut.segment(c.timestamp) for _, c in rows]

    def before(k):
        return None if cuts is None else cuts[k]

    for k, d in folders["upto"].items():
        write_data_folder(d, header, [ln for (ln, _), s in zip(rows, seg) if s <= k], adapter,
                          data_dir, published, before(k))
    for k, d in folders["pair"].items():
        write_data_folder(d, header, [ln for (ln, _), s in zip(rows, seg) if s in (k, k + 1)],
                          adapter, data_dir, published, before(k + 1))
    with open(stamp, "w") as fh:
        json.dump(summary, fh)
    return folders


# ------------------------------------------------------------------------------------------
# Evaluation on the full retrain's examples
# ------------------------------------------------------------------------------------------
def remap_arrays(arrays: dict, src_vocabs: dict, dst_vocabs: dict, user_fields) -> tuple:
    """Example arrays of one artifacts folder in another's indices (value k of a vocabulary has
    index k + 1, 0 = OOV / padding).

    ``src_vocabs`` / ``dst_vocabs``: name -> values (``item_id``, ``user_<f>``). ``item`` and
    ``hist_items`` [N, H] go through ``item_id`` (an item the destination lacks is refused:
    ValueError); ``user_<f>`` [N] through its field (an unknown value becomes 0, OOV, and is
    counted). Other arrays are kept. Returns ``(arrays, {feature: values mapped to OOV})``."""
    from micrec_tf.data.contract import HIST_ITEMS, ITEM, user_feature

    out, oov = dict(arrays), {}

    def table(name, strict):
        dst = {v: i + 1 for i, v in enumerate(dst_vocabs[name])}
        src = src_vocabs[name]
        lut = np.zeros(len(src) + 1, np.int64)
        for i, v in enumerate(src):
            if v not in dst and strict:
                raise ValueError(f"{name} {v!r} is not in the model's vocabulary: the rolling "
                                 f"evaluation needs whole-catalogue item vocabularies. Received: "
                                 f"{len(dst_vocabs[name])} values")
            lut[i + 1] = dst.get(v, 0)
        return lut

    items = table("item_id", True)
    for key in (ITEM, HIST_ITEMS):
        if key in arrays:
            out[key] = items[np.asarray(arrays[key], np.int64)]
    for f in user_fields:
        key = user_feature(f)
        if key in arrays:
            a = np.asarray(arrays[key], np.int64)
            out[key] = table(key, False)[a]
            oov[key] = int(np.count_nonzero((out[key] == 0) & (a != 0)))
    return out, oov


def _subset(arrays: dict, mask) -> dict:
    return {k: np.asarray(v)[mask] for k, v in arrays.items()}


def evaluate_on(run_dir: str, eval_artifacts: str, new: set, log=print) -> dict:
    """``{"all": metrics, "new": metrics, "oov": {...}}`` of the model of ``run_dir`` on the test
    split of ``eval_artifacts`` (``new``: raw item ids of the new-item slice)."""
    import tf_keras

    from micrec_tf.data.artifacts import read_vocab
    from micrec_tf.data.contract import ITEM
    from micrec_tf.data.arrays import load_split_arrays
    from micrec_tf.evaluation.data import earlier_clicks_exclusion
    from micrec_tf.evaluation.evaluate import evaluate_model
    from micrec_tf.train import restore_model

    model, mcfg, art = restore_model(run_dir)
    num_items = int(art.vocab_sizes["item_id"])
    splits = {s: load_split_arrays(eval_artifacts, s) for s in ("train", "valid", "test")}

    def vocabs(folder):
        names = ["item_id"] + [f"user_{f}" for f in art.user_fields]
        return {n: read_vocab(os.path.join(folder, "vocab", f"{n}.txt")) for n in names}

    src = vocabs(eval_artifacts)
    target_raw = [src["item_id"][i - 1] if i > 0 else None for i in splits["test"][ITEM]]
    oov = {}
    if os.path.realpath(eval_artifacts) != os.path.realpath(mcfg.artifacts_dir):
        dst = vocabs(mcfg.artifacts_dir)
        for s in splits:
            splits[s], miss = remap_arrays(splits[s], src, dst, art.user_fields)
            if s == "test":
                oov = miss
    history = list(splits.values())
    mask = np.array([r in new for r in target_raw], bool)
    out = {"oov": oov}
    for name, arrays in (("all", splits["test"]), ("new", _subset(splits["test"], mask))):
        excl = earlier_clicks_exclusion(arrays, history) if mcfg.eval.exclude_clicked else None
        out[name] = (evaluate_model(model, arrays, num_items, mcfg.eval.hit_n,
                                    mcfg.eval.coverage_n, exclude=excl,
                                    batch_size=mcfg.eval.batch_size)
                     if len(arrays[ITEM]) else {"num_examples": 0})
    del model
    tf_keras.backend.clear_session()
    return out


# ------------------------------------------------------------------------------------------
# The runs (replaced by fakes in the fast tests)
# ------------------------------------------------------------------------------------------
class Steps:
    """The protocol's real runs. Each returns a JSON-able dict (cached by the driver)."""

    def __init__(self, log=print):
        self.log = log

    def _build(self, cfg: Config, tails: bool) -> dict:
        from micrec_tf.train import train
        from pipelines import preprocess, title_neighbours

        seconds = {}
        t = time.time()
        preprocess.run(cfg.replace({"preprocess.session_tails": tails}), verbose=False)
        seconds["preprocess"] = time.time() - t
        t = time.time()
        if "semantic" in cfg.model.cl:
            title_neighbours.run(cfg, verbose=False)
        seconds["title_neighbours"] = time.time() - t
        t = time.time()
        res = train(cfg, run_dir=cfg.run_dir, evaluate_test=False, log=self.log)
        seconds["train"] = time.time() - t
        res.pop("model", None)
        seconds["total"] = sum(seconds.values())
        return {"run_dir": os.path.abspath(cfg.run_dir),
                "artifacts_dir": os.path.abspath(cfg.artifacts_dir), "seconds": seconds,
                "best_epoch": res.get("best_epoch"), "epochs_run": res.get("epochs_run"),
                "epochs_cap": cfg.train.epochs, "stopped_early": res.get("stopped_early")}

    def initial(self, cfg: Config) -> dict:
        """Step 0: from scratch on ``cfg``'s data (with session tails; history tails as ``cfg``
        says: the driver sets them, :data:`HISTORY_TAILS`) and exported."""
        from export.export_model import export_run

        out = self._build(cfg, tails=True)
        out["version_dir"] = os.path.abspath(export_run(cfg, log=self.log))
        return out

    def full(self, cfg: Config) -> dict:
        """A full retrain from scratch on ``cfg``'s data."""
        return self._build(cfg, tails=False)

    def update(self, cfg: Config, window_dir: str, previous_version: str) -> dict:
        """One daily update of ``window_dir`` from ``previous_version``, split by ``cfg``'s
        ``preprocess.split_fractions`` (the step's, :func:`step_fractions`: passed explicitly,
        the update's own default [0.9, 0.1, 0.0] would drop the test split)."""
        from micrec_tf.update import run_update

        rec = run_update(cfg, window_dir, previous_version, log=self.log,
                         split_fractions=list(cfg.preprocess.split_fractions))
        return {"run_dir": rec["run_dir"], "artifacts_dir": rec["artifacts_dir"],
                "version_dir": rec["version_dir"], "seconds": rec["timing_s"],
                "rows_added": rec["rows_added"], "epochs_run": rec["epochs_run"],
                "optimizer_iterations": rec["optimizer_iterations"]}

    def evaluate(self, run_dir: str, eval_artifacts: str, new: set) -> dict:
        return evaluate_on(run_dir, eval_artifacts, new, self.log)


# ------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------
def ratio(a, b):
    """``a / b`` (None when either is missing or ``b`` is 0)."""
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


def choose_lr(scores: dict):
    """The grid value with the best score (``{lr: score}`` in grid order; the first on a tie);
    None while a score is missing."""
    if not scores or any(v is None for v in scores.values()):
        return None
    best = max(scores.values())
    return next(lr for lr, v in scores.items() if v == best)


class _Cache:
    """One JSON per unit under ``root``; reused when its signature matches."""

    def __init__(self, root: str, cached_only: bool, log):
        self.root, self.cached_only, self.log = root, cached_only, log
        self.missing, self.trained = [], []

    def get(self, key: str, signature: dict, make):
        path = os.path.join(self.root, f"{key}.json")
        if os.path.exists(path):
            with open(path) as fh:
                cached = json.load(fh)
            if cached.get("signature") == signature:
                return cached["result"]
            self.log(f"[rolling] cached {key} was made with another config or cut: again")
        if self.cached_only:
            self.missing.append(key)
            return None
        self.log(f"[rolling] {key}")
        result = make()
        self.trained.append(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as fh:
            json.dump({"key": key, "signature": signature, "result": result,
                       "date": datetime.date.today().isoformat()}, fh, indent=1, default=list)
        os.replace(path + ".tmp", path)
        return result


def _lr_tag(lr) -> str:
    """``lr0_001`` for 0.001: the cache-key part of an update learning rate."""
    return slug(f"lr{lr:g}")


def run_rolling(cfg: Config, windows: int = 10, seeds: int = 1, models=None, lr_grid=LR_GRID,
                out_dir: str = "docs/results", scratch: str | None = None, cached_only=False,
                steps: Steps | None = None, command: str = "", log=print,
                published_filter: bool | None = None) -> str:
    """Runs (cached) the protocol for each model and seed and writes the report; returns the
    markdown path. ``steps``: the runs (default :class:`Steps`). ``published_filter``: None
    (default) filters the item files by ``item_published.tsv`` when the data folder has one
    (module doc), False never (the run of before), True requires the file."""
    from micrec_tf.data.adapters import get_adapter

    start = time.time()
    models = list(models or MODELS)
    steps = steps or Steps(log)
    name = f"{cfg.name}-rolling"
    scratch = os.path.abspath(scratch or os.path.join(cfg.train.runs_dir, name))
    base = cfg.replace({**PROTOCOL, "artifacts_root": os.path.join(scratch, "artifacts"),
                        "train.runs_dir": os.path.join(scratch, "runs"),
                        "export.exports_dir": os.path.join(scratch, "exports")})
    if cfg.data.dataset == "synthetic":  # generated once here; the steps read window folders
        from micrec_tf.data.synthetic import ensure_generated

        ensure_generated(cfg)
        base = base.replace({"data.dataset": "canonical"})
    adapter = get_adapter(cfg.data)
    published = None if published_filter is False else read_published(cfg.data.data_dir)
    if published_filter and published is None:
        raise cli.UsageError(f"no {PUBLISHED_FILE} under {cfg.data.data_dir!r} to filter the "
                             f"item files by (generate with data.synthetic.arrival: news)")
    header, rows = read_raw_clicks(adapter, cfg.data.data_dir)
    cut = cut_windows([c.timestamp for _, c in rows], windows)
    clicks = [(c.timestamp, c.item_id) for _, c in rows]
    new = {s: new_items(clicks, cut, s + 1) for s in range(windows)}
    folders = (None if cached_only else
               prepare_folders(header, rows, cut, adapter, cfg.data.data_dir, scratch,
                               published))
    cache = _Cache(os.path.join(out_dir, "runs", name), cached_only, log)
    extra_sig = {} if published is None else {"items": "published"}
    results = {}
    for model in models:
        for seed in range(seeds):  # seed 0 first: the other seeds update at its choice
            chosen = results.get(model, {}).get(0, {}).get("lr")
            results.setdefault(model, {})[seed] = _run_model(
                base, model, seed, cut, new, folders, cache, steps,
                lr_grid if seed == 0 else ((chosen,) if chosen is not None else ()),
                extra_sig)
    md, js = report(cfg, cut, new, results, lr_grid, cache, command, time.time() - start,
                    seeds)
    return write_report(out_dir, name, md, js, log, "rolling")


def _step_cfg(base: Config, model: str, seed: int, tag: str, data_dir: str, fractions,
              lr=None, tails: bool = False) -> Config:
    """One unit's config. ``tails``: :data:`HISTORY_TAILS` on (the initial model, the updates);
    False leaves ``preprocess.history_tails`` as the config says (the full retrains)."""
    ov = {**MODELS[model], "name": f"{base.name}-{slug(model)}-s{seed}-{tag}",
          "data.data_dir": data_dir or base.data.data_dir,
          "preprocess.split_fractions": list(fractions), "train.seed": seed,
          **(HISTORY_TAILS if tails else {})}
    if lr is not None:
        ov["train.learning_rate"] = lr
    return base.replace(ov)


def _run_model(base, model, seed, cut, new, folders, cache, steps, lr_grid,
               extra_sig=None) -> dict:
    """One model and seed: {"initial", "full": {s}, "trials": {lr}, "lr", "inc": {s}}.
    ``lr_grid``: the update learning rates step 1 tries (seeds > 0: seed 0's choice alone, or
    none while it is not chosen). ``extra_sig``: added to every unit's cache signature."""
    W = cut.windows
    key = f"{slug(model)}/seed{seed}"
    folder = (lambda kind, k: folders[kind][k]) if folders else (lambda kind, k: None)

    def sig(cfg, **extra):
        """The unit's config without its folders (the cut pins the data), the cut, ``extra``."""
        config = run_signature(cfg)
        config.pop("artifacts_root", None)
        config.get("data", {}).pop("data_dir", None)
        return {"config": config, "cut": cut.summary(), **(extra_sig or {}), **extra}

    def evaluated(unit: dict, eval_artifacts: str, s: int) -> dict:
        unit = dict(unit)
        unit["eval"] = steps.evaluate(unit["run_dir"], eval_artifacts, new[s])
        return unit

    out = {"full": {}, "trials": {}, "inc": {}, "lr": None}
    cfg0 = _step_cfg(base, model, seed, "initial", folder("upto", 1),
                     step_fractions(cut.counts, 0), tails=True)
    init = out["initial"] = cache.get(
        f"{key}/initial", sig(cfg0),
        lambda: (lambda u: evaluated(u, u["artifacts_dir"], 0))(steps.initial(cfg0)))
    for s in range(1, W):
        cfg = _step_cfg(base, model, seed, f"full{s:02d}", folder("upto", s + 1),
                        step_fractions(cut.counts, s))
        out["full"][s] = cache.get(
            f"{key}/full/step{s:02d}", sig(cfg),
            lambda cfg=cfg, s=s: (lambda u: evaluated(u, u["artifacts_dir"], s))(
                steps.full(cfg)))

    def update(s, lr, previous):
        cfg = _step_cfg(base, model, seed, f"inc-{_lr_tag(lr)}", None,
                        step_fractions(cut.counts, s, update=True), lr, tails=True)
        full = out["full"].get(s)
        if previous is None or full is None:
            cache.missing.append(f"{key}/inc/{_lr_tag(lr)}/step{s:02d} (after its inputs)")
            return None

        def make():
            for path, what in ((previous["version_dir"], "previous version"),
                               (full["artifacts_dir"], "evaluation artifacts")):
                if not os.path.isdir(path):
                    raise cli.UsageError(f"step {s} of {key} needs the {what} {path!r}, which "
                                         f"is gone: delete the cached steps after it under "
                                         f"{cache.root} and run again")
            u = steps.update(cfg, folder("pair", s), previous["version_dir"])
            return evaluated(u, full["artifacts_dir"], s)

        return cache.get(f"{key}/inc/{_lr_tag(lr)}/step{s:02d}", sig(cfg), make)

    if W < 2:
        return out
    trials = {lr: update(1, lr, init) for lr in lr_grid}
    n0 = f"hit@{base.eval.hit_n[0]}"
    out["trials"] = {lr: (None if t is None else t["eval"]["all"].get(n0))
                     for lr, t in trials.items()}
    if not lr_grid:
        cache.missing.append(f"{key}/inc/* (after seed 0's learning rate choice)")
    lr = out["lr"] = choose_lr(out["trials"])
    if lr is None:
        return out
    out["inc"][1] = trials[lr]
    prev = trials[lr]
    for s in range(2, W):
        prev = out["inc"][s] = update(s, lr, prev)
    return out


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------
def _get(unit, part, key):
    if unit is None:
        return None
    return unit.get("eval", {}).get(part, {}).get(key)


def _f(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"


def step_rows(res: dict, n_hit: str, n_last: str, n_cov: str) -> list:
    """Per step: the incremental and full numbers and their ratios (dicts)."""
    rows = []
    init = res.get("initial")
    if init is not None:
        rows.append({"step": 0, "kind": "initial", "inc": init, "full": init})
    for s in sorted(set(res.get("full", {})) | set(res.get("inc", {}))):
        inc, full = res["inc"].get(s), res["full"].get(s)
        rows.append({"step": s, "kind": "tuning" if s == 1 else "held-out",
                     "inc": inc, "full": full})
    out = []
    for r in rows:
        inc, full = r["inc"], r["full"]
        row = {"step": r["step"], "kind": r["kind"]}
        for part in ("all", "new"):
            for m in (n_hit, n_last, n_cov):
                a, b = _get(inc, part, m), _get(full, part, m)
                row[f"{part}/{m}"] = {"inc": a, "full": b, "ratio": ratio(a, b)}
            row[f"{part}/examples"] = _get(full, part, "num_examples")
        ti = None if inc is None else inc["seconds"]["total"]
        tf_ = None if full is None else full["seconds"]["total"]
        row["seconds"] = {"inc": ti, "full": tf_, "ratio": ratio(ti, tf_)}
        row["full_best_epoch"] = None if full is None else full.get("best_epoch")
        row["full_epochs_cap"] = None if full is None else full.get("epochs_cap")
        row["cap_hit"] = (full is not None and full.get("best_epoch") is not None
                          and full.get("best_epoch") == full.get("epochs_cap"))
        out.append(row)
    return out


def _mean(values):
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def report(cfg: Config, cut: Cut, new: dict, results: dict, lr_grid, cache: _Cache,
           command: str, wall: float, seeds: int) -> tuple:
    n_hit, n_last = f"hit@{cfg.eval.hit_n[0]}", f"hit@{cfg.eval.hit_n[-1]}"
    n_cov = f"coverage@{cfg.eval.coverage_n[0]}"
    partial = bool(cache.missing)
    lines = [f"# Rolling protocol: {cfg.name} (issue 29)", ""]
    if partial:
        lines += [f"**Partial**: {len(cache.missing)} unit(s) not done yet (listed at the end).",
                  ""]
    lines += [
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}; wall time of this call {wall / 60:.1f} "
        f"min; units trained by it: {len(cache.trained)}",
        f"- cut (experiments/rolling.py): segment 0 = the first {INITIAL_FRACTION:.0%} of the "
        f"clicks in time order, then {cut.windows} windows of equal click counts (ties at a "
        f"boundary go to the later segment); clicks per segment {list(cut.counts)}; items first "
        f"clicked in windows 1..{cut.windows}: {[len(new[s]) for s in range(cut.windows)]}",
        "- step s: incremental = one warm-started pass on window s (the daily update) from step "
        "s-1's version; full = the same model from scratch on segments 0..s to convergence "
        f"(<= {cfg.train.epochs} epochs, patience {cfg.train.early_stopping_patience}); both "
        "evaluated on every click of window s+1 (the same examples, full histories) and on its "
        "new-item slice; ratio = incremental / full",
        "- the update's learning rate is chosen per model on step 1 (window 2's all-clicks "
        f"{n_hit.upper()}, seed 0) among {list(lr_grid)}: step 1 is **tuning**; the summary is "
        "over the held-out steps 2.. only",
        "",
    ]
    js = {"cut": cut.summary(), "new_items": {s + 1: len(v) for s, v in new.items()},
          "lr_grid": list(lr_grid), "models": {}, "missing": cache.missing}
    for model, per_seed in results.items():
        lines += [f"## {model}", ""]
        lr0 = per_seed.get(0, {}).get("lr")
        trials = per_seed.get(0, {}).get("trials", {})
        lines += [f"Update learning rate: **{lr0 if lr0 is not None else 'not chosen yet'}** "
                  f"(step-1 {n_hit.upper()} on window 2: "
                  + ", ".join(f"{lr:g}: {_f(v)}" for lr, v in trials.items()) + ")", ""]
        js["models"][model] = {"lr": lr0, "trials": {str(k): v for k, v in trials.items()},
                               "seeds": {}}
        for seed, res in per_seed.items():
            rows = step_rows(res, n_hit, n_last, n_cov)
            js["models"][model]["seeds"][seed] = rows
            if seeds > 1:
                lines += [f"### seed {seed}", ""]
            lines += [
                f"| step | eval window | {n_hit} all inc / full (ratio) | {n_hit} new inc / "
                f"full (ratio) | {n_last} all inc / full | {n_cov} inc / full | new clicks | "
                "time s inc / full (ratio) | full best epoch |",
                "|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                a, nw = r[f"all/{n_hit}"], r[f"new/{n_hit}"]
                last, cov, t = r[f"all/{n_last}"], r[f"all/{n_cov}"], r["seconds"]
                flag = " (cap)" if r["cap_hit"] else ""
                lines.append(
                    f"| {r['step']} ({r['kind']}) | {r['step'] + 1} | {_f(a['inc'])} / "
                    f"{_f(a['full'])} ({_f(a['ratio'], 3)}) | {_f(nw['inc'])} / {_f(nw['full'])}"
                    f" ({_f(nw['ratio'], 3)}) | {_f(last['inc'])} / {_f(last['full'])} | "
                    f"{_f(cov['inc'])} / {_f(cov['full'])} | {r['new/examples']} | "
                    f"{_f(t['inc'], 1)} / {_f(t['full'], 1)} ({_f(t['ratio'], 3)}) | "
                    f"{r['full_best_epoch'] if r['full_best_epoch'] is not None else '-'}"
                    f"{flag} |")
            held = [r for r in rows if r["kind"] == "held-out"]
            summary = {k: _mean([r[k]["ratio"] for r in held])
                       for k in (f"all/{n_hit}", f"new/{n_hit}", "seconds")}
            js["models"][model].setdefault("summary", {})[seed] = summary
            lines += ["", f"Held-out steps ({len(held)}): mean ratio {n_hit} all "
                      f"{_f(summary[f'all/{n_hit}'], 3)}, new {_f(summary[f'new/{n_hit}'], 3)}, "
                      f"wall time {_f(summary['seconds'], 3)}; full retrains at their epoch cap: "
                      f"{[r['step'] for r in rows if r['cap_hit']] or 'none'}", ""]
    if cache.missing:
        lines += ["## Not run yet", ""] + [f"- `{k}`" for k in cache.missing]
    return "\n".join(lines) + "\n", js


def main(argv=None) -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--models", default=None,
                        help=f"comma-separated subset of: {', '.join(MODELS)}")
    parser.add_argument("--lr-grid", default=",".join(f"{x:g}" for x in LR_GRID))
    parser.add_argument("--scratch", default=None,
                        help="runs, artifacts, window folders, exports (default "
                             "<runs_dir>/<name>-rolling)")
    parser.add_argument("--cached-only", action="store_true",
                        help="train nothing: write a partial report of the cached units")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--all-items", action="store_true",
                        help=f"link the whole item file into every window folder even when the "
                             f"data has {PUBLISHED_FILE} (default: filter by publication)")
    args = parser.parse_args(argv)
    cfg = cli.load(args)
    models = names_arg(parser, args.models, MODELS, "model")
    try:
        grid = tuple(float(x) for x in args.lr_grid.split(","))
    except ValueError:
        parser.error(f"--lr-grid must be comma-separated numbers, got {args.lr_grid!r}")
    run_rolling(cfg, args.windows, args.seeds, models, grid, args.out, args.scratch,
                args.cached_only, command="python -m experiments.rolling " +
                " ".join(argv if argv is not None else sys.argv[1:]),
                published_filter=False if args.all_items else None)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
