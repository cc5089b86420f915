"""One daily update of a served model (issue 29): ``python -m micrec_tf.update --config X
--window DIR [--previous VERSION_DIR] [--split-fractions a,b,c | config]`` (or ``make update
CONFIG=X WINDOW=DIR [SPLIT_FRACTIONS=a,b,c]``).

An update = four stages, each writing into a fresh folder of its own generation:

1. preprocess the window's raw data (``DIR``: a raw-data folder in the config's adapter format,
   holding the window's clicks and the item / user files of the catalogue so far), growing the
   previous artifacts (``preprocess.previous_artifacts``: append-only vocabularies,
   ``pipelines/lineage.py``); when the previous artifacts hold session tails
   (``preprocess.session_tails``) the co-occurrence table grows by the window's pairs and the
   update writes tails for the next one, else it counts the window alone (one line says so);
   likewise with history tails (``preprocess.history_tails``, ``pipelines/history_tails.py``)
   the window's examples get each user's earlier clicks as history (else the window's alone);
2. title neighbours: merged for the new items (``semantic.source`` ``title`` / ``vectors``:
   ``pipelines.title_neighbours.merge_title_neighbours``), recomputed for ``taxonomy`` (cheap);
   skipped when the previous artifacts have none;
3. warm-started training from the previous version (``train.warm_start_from`` = that export
   version: every variable restored, tables grown; ``train.warm_start_epochs`` passes, one by
   default: ``micrec_tf/warm_start.py``);
4. export of a new numbered version (``export/export_model.py``: assembled under a dot name,
   published with one rename, then its TF Serving view).

**The window's split.** By default an update splits its window ``UPDATE_SPLIT_FRACTIONS`` =
[0.9, 0.1, 0.0] (``preprocess.split: global_time``; ties at the boundary go to validation):
it trains on the window's first 90 % of clicks, keeps the newest 10 % as the validation tail
(the warm start's epoch choice with ``train.early_stopping_patience``, and the validation
metrics of ``metrics.json``), and writes **no test split**: the newest clicks are not held out
(a daily chain would otherwise never train on them, since tomorrow's window does not hold
them), and evaluating an update is the next window's business (``experiments/rolling.py``).
With no test example the run's final test evaluation is skipped (``train(...,
evaluate_test=False)``: ``metrics.json`` has no ``test`` block) and ``update.json`` records
``split_fractions``. The config's ``preprocess.split_fractions`` is NOT read unless asked for
(a default of 0.8/0.1/0.1 would otherwise be indistinguishable from a choice):
``--split-fractions a,b,c`` (``run_update(..., split_fractions=[a, b, c])``) sets the window's
fractions, ``--split-fractions config`` (``split_fractions="config"``) takes the config's. **The
update of before** (80/10/10 of the window, test split evaluated at the end; the 1 M-item
benchmark of docs/BENCHMARKS.md "One daily update at 1,000,000 items" ran it) is
``--split-fractions config`` with the default config, or ``--split-fractions 0.8,0.1,0.1``. A
test split that is written (a fraction > 0) is evaluated as before. ``leave_last_out`` ignores
the fractions (its test split is each user's last click, evaluated as before).

**One growing click log.** ``--since T0 --until T1`` (``run_update(..., time_range=[t0, t1])``,
Unix seconds; the command line also takes a UTC date or date-time such as ``2026-12-06`` or
``2026-12-06T06:00:00``) reads only the clicks with ``t0 <= time < t1`` from the window folder
(``preprocess.time_range``), so ``--window`` can be the same growing log every day; clicks
outside are dropped and counted (``stats.json`` ``clicks_outside_time_range``), never dead
letters. Both or neither. Without them every click of the folder is the window's, as before.

**Where the previous state comes from.** The previous state is the newest published export
version of ``exports/<name>`` (``--previous`` names another version folder): its
``metadata.json`` names the run folder (``run_dir``) and the artifacts folder
(``artifacts_dir_abs``) it was made from. That version is what retrieval and TF Serving use,
so the state an update starts from is always the one serving; a first update starts from
``make train && make export`` of a from-scratch run (generation 0). The export's rename is the
only publish point: nothing else needs to switch.

**Folders.** Generation ``g`` = the previous artifacts' ``lineage.json`` generation + 1 (0 for
a folder without one). Everything an update writes, except its export version, lives in
``<artifacts_root>/<name>-updates/gen-<g:04d>/``: ``artifacts/<name>/`` (the grown artifacts),
``run/`` (the warm-started run) and ``update.json`` (the cost record, written after the
export). ``<artifacts_root>/<name>-updates/state.json`` (written last, atomically with
``os.replace``) records the latest finished update; it is a record for people and scripts, not
read by the next update (the export is the source of truth).

**Failure safety.** The whole update holds the lock of ``<name>-updates`` (a second update of
the same name fails at once, naming the pid: :mod:`micrec_tf.locks`). A failed or killed update
before the export's rename publishes nothing: the previous version keeps serving and its run
and artifacts folders are never written (each stage writes only into the new generation's
folder; the export sweeps its own dot-named temporaries). The next update finds the killed
one's generation folder (same number, referenced by no published version) and removes it
before starting. Killed after the export's rename and before ``update.json`` / ``state.json``:
the new version is complete and serves, and the next update grows from it (``state.json``
lags one update behind until then).

Cost: one line per stage (wall seconds) and a total, the rows added (new lines per vocabulary,
from ``lineage.json`` ``appended``), the window's clicks and the examples written (from
``stats.json``), the new items' title neighbours, the training steps; the same in
``update.json`` and ``state.json``.

Default behaviour: nothing else calls this module; every other command is unchanged.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

from micrec_tf import cli, locks, publish
from micrec_tf.config import Config

__all__ = ["UpdateError", "update_root", "generation_dir", "previous_state", "run_update",
           "format_cost", "prune_generations", "parse_time", "time_range_arg", "UPDATE_SPLIT_FRACTIONS", "update_split_fractions"]

STATE_FILE = "state.json"
RECORD_FILE = "update.json"
GEN_PREFIX = "gen-"
TAILS_FILE = "session_tails.jsonl"  # pipelines/cooccurrence.py, preprocess.session_tails
HISTORY_TAILS_STATE = os.path.join("history_tails", "state.json")  # pipelines/history_tails.py
# The window's [train, valid, test] shares by default (module doc "The window's split").
UPDATE_SPLIT_FRACTIONS = (0.9, 0.1, 0.0)
CONFIG_FRACTIONS = "config"  # split_fractions / --split-fractions: the config's own


class UpdateError(cli.UsageError):
    """An update cannot start (no previous version, a bad window folder, ...); one line."""


def update_root(cfg: Config) -> str:
    """``<artifacts_root>/<name>-updates``: the generations' folders and ``state.json``."""
    return os.path.abspath(os.path.join(cfg.artifacts_root, f"{cfg.name}-updates"))


def generation_dir(cfg: Config, generation: int) -> str:
    """``<update_root>/gen-<generation:04d>``."""
    return os.path.join(update_root(cfg), f"{GEN_PREFIX}{int(generation):04d}")


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh) or {}
    except (OSError, ValueError) as err:
        raise UpdateError(f"{what} {path!r} cannot be read ({err})") from None


def previous_state(cfg: Config, previous: str | None = None) -> dict:
    """The state an update grows from: ``{version, version_dir, run_dir, artifacts_dir,
    generation}`` of export version ``previous`` (a version folder), by default the newest
    published version of ``cfg.export_dir``. ``UpdateError`` (one line) when there is none or
    its run / artifacts folder is gone."""
    from export import serving

    if previous:
        version_dir = os.path.abspath(previous)
        if not os.path.isfile(os.path.join(version_dir, "metadata.json")):
            raise UpdateError(f"--previous {previous!r} is not an export version folder (no "
                              "metadata.json)")
    else:
        latest = serving.latest_version(cfg.export_dir)
        if latest is None:
            raise UpdateError(f"no published version under {cfg.export_dir!r} to update: train "
                              "and export a first model (make train && make export), or give "
                              "--previous VERSION_DIR")
        version_dir = os.path.abspath(os.path.join(cfg.export_dir, str(latest)))
    meta = _read_json(os.path.join(version_dir, "metadata.json"), "export metadata")
    run_dir = meta.get("run_dir") or ""
    art = meta.get("artifacts_dir_abs") or meta.get("artifacts_dir") or ""
    for key, path in (("run_dir", run_dir), ("artifacts_dir_abs", art)):
        if not path or not os.path.isdir(path):
            raise UpdateError(f"export version {version_dir!r}: its {key} {path!r} "
                              "(metadata.json) is gone; an update needs the previous run and "
                              "artifacts")
    lineage_path = os.path.join(art, "lineage.json")
    generation = (int(_read_json(lineage_path, "lineage").get("generation", 0))
                  if os.path.exists(lineage_path) else 0)
    return {"version": int(meta.get("version", os.path.basename(version_dir))),
            "version_dir": version_dir, "run_dir": os.path.abspath(run_dir),
            "artifacts_dir": os.path.abspath(art), "generation": generation}


def _referenced_folders(export_root: str) -> set:
    """Resolved run and artifacts folders that a published version's metadata.json names."""
    from export import serving

    found = set()
    for v in serving.published_versions(export_root):
        try:
            with open(os.path.join(export_root, str(v), "metadata.json"), encoding="utf-8") as fh:
                meta = json.load(fh) or {}
        except (OSError, ValueError):
            continue
        for key in ("run_dir", "artifacts_dir_abs"):
            if meta.get(key):
                found.add(os.path.realpath(meta[key]))
    return found


def _clear_leftover(gen_dir: str, export_root: str, log) -> None:
    """Removes the generation folder a failed or killed update left (it holds the update
    root's lock, so no live update owns it); refuses when a published version uses it."""
    if not os.path.lexists(gen_dir):
        return
    real = os.path.realpath(gen_dir)
    used = [p for p in _referenced_folders(export_root)
            if p == real or p.startswith(real + os.sep)]
    if used:
        raise UpdateError(f"{gen_dir!r} holds {used[0]!r}, which a published version under "
                          f"{export_root!r} uses, yet it is not the previous state: move it away "
                          "or give --previous")
    log(f"[update] removing {gen_dir} (left by a failed or killed update)")
    shutil.rmtree(gen_dir)


def prune_generations(root: str, export_root: str, log=print) -> list:
    """Removes the generation folders ``root/gen-*`` that no published version of
    ``export_root`` uses (its metadata.json's run or artifacts folder lies inside), after an
    export pruned old versions (``export.keep_versions``); returns their names, ascending.
    Folders outside ``root`` (the from-scratch run and artifacts of generation 0) are never
    touched."""
    from export import serving

    used = _referenced_folders(export_root)
    removed = []
    names = sorted(d for d in os.listdir(root) if d.startswith(GEN_PREFIX)
                   and d[len(GEN_PREFIX):].isdigit()) if os.path.isdir(root) else []
    for name in names:
        path = os.path.join(root, name)
        real = os.path.realpath(path)
        if os.path.isdir(path) and not any(p == real or p.startswith(real + os.sep)
                                           for p in used):
            serving.remove_tree(path, int(name[len(GEN_PREFIX):]))
            removed.append(name)
    if removed:
        log(f"[update] removed {len(removed)} generation folder(s) no kept version uses: "
            + ", ".join(removed))
    return removed


def _write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def has_session_tails(art_dir: str) -> bool:
    """Whether artifacts ``art_dir`` hold the session tails a grown co-occurrence table needs."""
    return os.path.isfile(os.path.join(art_dir, "cooccurrence", TAILS_FILE))


def has_history_tails(art_dir: str) -> bool:
    """Whether artifacts ``art_dir`` hold history tails (``preprocess.history_tails``)."""
    return os.path.isfile(os.path.join(art_dir, HISTORY_TAILS_STATE))


def update_split_fractions(cfg: Config, split_fractions=None) -> list:
    """The window's ``preprocess.split_fractions`` (module doc "The window's split"): None ->
    ``UPDATE_SPLIT_FRACTIONS`` [0.9, 0.1, 0.0]; ``"config"`` -> ``cfg.preprocess.split_fractions``
    (the update of before); a sequence of 3 numbers -> those (checked as the config key is:
    ``ConfigError``, one line)."""
    if split_fractions is None:
        return list(UPDATE_SPLIT_FRACTIONS)
    if isinstance(split_fractions, str):
        if split_fractions != CONFIG_FRACTIONS:
            raise UpdateError(f"split_fractions must be 3 numbers or {CONFIG_FRACTIONS!r}. "
                              f"Received: {split_fractions!r}")
        return list(cfg.preprocess.split_fractions)
    fractions = list(split_fractions)
    cfg.replace({"preprocess.split_fractions": fractions})  # validates (one-line ConfigError)
    return fractions


def _fractions_arg(text: str):
    """``--split-fractions``: ``a,b,c`` -> [a, b, c]; ``config`` as is."""
    if text.strip() == CONFIG_FRACTIONS:
        return CONFIG_FRACTIONS
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UpdateError(f"--split-fractions must be 3 comma-separated numbers (train, valid, "
                          f"test) or {CONFIG_FRACTIONS!r}. Received: {text!r}") from None


def parse_time(text: str, what: str) -> int:
    """``--since`` / ``--until``: Unix seconds (digits), or an ISO 8601 date or date-time, UTC
    unless it names its zone -> Unix seconds. ``UpdateError`` (one line) otherwise."""
    import datetime

    text = str(text).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise UpdateError(f"{what} must be Unix seconds or a date / date-time such as 2026-12-06 "
                          f"or 2026-12-06T06:00:00 (UTC unless a zone is given). Received: "
                          f"{text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return int(when.timestamp())


def time_range_arg(since, until) -> list | None:
    """``[since, until]`` in Unix seconds from the two options (each None, Unix seconds or a
    date as :func:`parse_time` reads it); None when both are None; ``UpdateError`` when only one
    is given or ``since >= until``."""
    if since is None and until is None:
        return None
    if since is None or until is None:
        raise UpdateError(f"--since and --until go together. Received: since={since!r}, "
                          f"until={until!r}")
    lo, hi = parse_time(since, "--since"), parse_time(until, "--until")
    if lo >= hi:
        raise UpdateError(f"--since must be before --until. Received: since={since!r} ({lo}), "
                          f"until={until!r} ({hi})")
    return [lo, hi]


def stage_configs(cfg: Config, window: str, prev: dict, gen_dir: str,
                  split_fractions=None, time_range=None) -> Config:
    """The config of the update's stages: ``cfg`` with the window as raw data, the generation's
    artifacts root, the previous artifacts to grow and the previous version to warm-start from.
    ``preprocess.session_tails`` is turned on when the previous artifacts have tails (the table
    then grows by the window's pairs, and the new artifacts carry tails for the next update);
    otherwise it stays as ``cfg`` says (false: the table counts the window alone).
    ``preprocess.history_tails`` likewise: on when the previous artifacts have history tails
    (the window's examples then get the users' earlier clicks as history, and the new artifacts
    carry tails for the next update); else as ``cfg`` says (true: this update's tails start
    from the window alone, its histories are the window's; false: no tails, as before).
    ``split_fractions``: the window's ``preprocess.split_fractions`` (None: the config's; the
    caller resolves them with :func:`update_split_fractions`). ``time_range``: ``[since,
    until]`` (Unix seconds) of the clicks to read (``preprocess.time_range``; None: the
    config's)."""
    extra = ({} if split_fractions is None
             else {"preprocess.split_fractions": list(split_fractions)})
    if time_range is not None:
        extra["preprocess.time_range"] = list(time_range)
    return cfg.replace({**extra, "data.data_dir": os.path.abspath(window),
                        "artifacts_root": os.path.join(gen_dir, "artifacts"),
                        "preprocess.previous_artifacts": prev["artifacts_dir"],
                        "preprocess.session_tails": (has_session_tails(prev["artifacts_dir"])
                                                     or cfg.preprocess.session_tails),
                        "preprocess.history_tails": (has_history_tails(prev["artifacts_dir"])
                                                     or cfg.preprocess.history_tails),
                        "train.warm_start_from": prev["version_dir"]})


def run_update(cfg: Config, window: str, previous: str | None = None, log=print,
               split_fractions=None, time_range=None) -> dict:
    """Runs one update (module doc); returns its record (also ``update.json`` / ``state.json``):
    ``generation``, ``version``, ``version_dir``, ``previous`` (the state grown from),
    ``artifacts_dir``, ``run_dir``, ``timing_s`` {preprocess, title_neighbours, train, export,
    total}, ``rows_added`` {vocabulary: new lines}, ``window_clicks`` {train, valid, test},
    ``examples`` {split: n}, ``split_fractions`` (the window's), ``evaluated_test`` (whether
    the run's final test evaluation ran: a test example exists), ``title_neighbours`` (merge
    stats or None), ``epochs_run``, ``optimizer_iterations``.

    ``split_fractions``: None (default) = ``UPDATE_SPLIT_FRACTIONS`` [0.9, 0.1, 0.0], no test
    split; ``"config"`` = the config's ``preprocess.split_fractions`` (the update of before:
    80/10/10 by default, the test split evaluated); or 3 numbers (module doc).
    ``time_range``: ``[since, until]`` Unix seconds: only the window's clicks in that range
    (module doc "One growing click log"); None (default): all of them."""
    fractions = update_split_fractions(cfg, split_fractions)
    if time_range is not None:  # validated as the config key is (one-line ConfigError)
        cfg.replace({"preprocess.time_range": list(time_range)})
    if not os.path.isdir(window):
        raise UpdateError(f"--window {window!r} is not a folder: give the window's raw data "
                          f"folder ({cfg.data.dataset} format)")
    root = update_root(cfg)
    publish.check_owned_dir(root, "the update folder")
    os.makedirs(root, exist_ok=True)
    with locks.folder_lock(root, "update", "wait for it to finish"):
        return _update_locked(cfg, window, previous, root, log, fractions, time_range)


def _update_locked(cfg: Config, window: str, previous, root: str, log, fractions,
                   time_range=None) -> dict:
    from export.export_model import export_run, sweep_stale_tmp
    from micrec_tf.train import train
    from pipelines import preprocess, title_neighbours

    start = time.time()
    timing = {}
    sweep_stale_tmp(root, log)  # a generation folder whose removal was killed (prune_generations)
    prev = previous_state(cfg, previous)
    generation = prev["generation"] + 1
    gen_dir = generation_dir(cfg, generation)
    _clear_leftover(gen_dir, cfg.export_dir, log)
    os.makedirs(gen_dir)
    ucfg = stage_configs(cfg, window, prev, gen_dir, fractions, time_range)
    run_dir = os.path.join(gen_dir, "run")
    log(f"[update] generation {generation} from version {prev['version']} "
        f"({prev['version_dir']}), window {os.path.abspath(window)}")
    cooccurrence = "grown" if ucfg.preprocess.session_tails else "window"
    if cooccurrence == "window":
        log("[update] co-occurrence: this window's clicks alone (the previous artifacts have no "
            "session tails: preprocess with preprocess.session_tails: true to grow the table)")
    histories = ("previous tails + window" if has_history_tails(prev["artifacts_dir"])
                 and ucfg.preprocess.history_tails else "window")
    if histories == "window":
        log("[update] histories: this window's clicks alone (the previous artifacts have no "
            "history tails: preprocess with preprocess.history_tails: true to carry them)")

    t = time.time()
    stats = preprocess.run(ucfg, data_dir=os.path.abspath(window), verbose=False)
    timing["preprocess"] = time.time() - t
    with open(os.path.join(ucfg.artifacts_dir, "lineage.json"), encoding="utf-8") as fh:
        lineage = json.load(fh)

    t = time.time()
    neighbours = None
    if os.path.isdir(os.path.join(prev["artifacts_dir"], "title_neighbours")):
        if ucfg.semantic.source in ("title", "vectors"):
            neighbours = title_neighbours.merge_title_neighbours(
                prev["artifacts_dir"], None, ucfg.artifacts_dir, ucfg)
        else:  # taxonomy: recomputed from the grown item file (no model, no encoding)
            neighbours = title_neighbours.run(ucfg, verbose=False)
    timing["title_neighbours"] = time.time() - t

    t = time.time()
    # No test example (the default [0.9, 0.1, 0.0]): no final test evaluation, no "test" block.
    evaluate_test = int(stats.get("num_examples", {}).get("test", 0)) > 0
    res = train(ucfg, run_dir=run_dir, evaluate_test=evaluate_test, log=log)
    timing["train"] = time.time() - t
    model = res.get("model")
    steps = int(model.optimizer.iterations.numpy()) if model is not None else None
    del model, res["model"]

    t = time.time()
    version_dir = export_run(ucfg, run_dir=run_dir, export_root=cfg.export_dir, log=log)
    timing["export"] = time.time() - t
    timing["total"] = time.time() - start

    record = {
        "generation": generation,
        "version": int(os.path.basename(version_dir)),
        "version_dir": os.path.abspath(version_dir),
        "previous": prev,
        "window": os.path.abspath(window),
        "artifacts_dir": os.path.abspath(ucfg.artifacts_dir),
        "run_dir": os.path.abspath(run_dir),
        "timing_s": {k: round(v, 3) for k, v in timing.items()},
        "rows_added": dict(sorted(lineage.get("appended", {}).items())),
        "window_clicks": dict(stats.get("events_by_split", {})),
        "examples": dict(stats.get("num_examples", {})),
        "split_fractions": list(fractions),
        "time_range": ucfg.preprocess.time_range,
        "clicks_outside_time_range": stats.get("clicks_outside_time_range", 0),
        "evaluated_test": evaluate_test,
        "cooccurrence": cooccurrence,
        "histories": histories,
        "title_neighbours": (None if neighbours is None else
                             {k: neighbours.get(k) for k in ("mode", "items", "new_items",
                                                             "changed_old_lists")}),
        "epochs_run": res.get("epochs_run"),
        "optimizer_iterations": steps,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json_atomic(os.path.join(gen_dir, RECORD_FILE), record)
    _write_json_atomic(os.path.join(root, STATE_FILE), record)
    if cfg.export.keep_versions:  # the export kept the newest versions; their folders stay
        record["generations_removed"] = prune_generations(root, cfg.export_dir, log)
    for line in format_cost(record):
        log(line)
    return record


def format_cost(record: dict) -> list:
    """The cost lines printed at the end of an update (from its record)."""
    t = record["timing_s"]
    added = record["rows_added"]
    clicks = record["window_clicks"]
    nb = record.get("title_neighbours")
    lines = [
        f"[update] published version {record['version']} ({record['version_dir']}), "
        f"generation {record['generation']}, grown from version "
        f"{record['previous']['version']}",
        "[update] time: " + ", ".join(f"{k} {t[k]:.1f} s" for k in
                                      ("preprocess", "title_neighbours", "train", "export",
                                       "total") if k in t),
        "[update] rows added: " + (", ".join(f"{k} +{v}" for k, v in added.items()) or "none"),
        f"[update] window clicks {sum(clicks.values())} (" +
        ", ".join(f"{k} {v}" for k, v in clicks.items()) + "); examples " +
        ", ".join(f"{k} {v}" for k, v in record["examples"].items())
        + f"; co-occurrence table: {record.get('cooccurrence', 'window')}"
        + f"; histories: {record.get('histories', 'window')}"
        + ("" if "split_fractions" not in record else
           "; split " + "/".join(f"{x:g}" for x in record["split_fractions"])
           + ("" if record.get("evaluated_test") else " (no test evaluation)"))
        + ("" if not record.get("time_range") else
           f"; time range [{record['time_range'][0]}, {record['time_range'][1]}) "
           f"({record.get('clicks_outside_time_range', 0)} clicks outside)"),
    ]
    if nb is not None:
        lines.append(f"[update] title neighbours: {nb.get('mode') or 'recomputed'}, "
                     f"{nb.get('items')} items" + (
                         f", {nb['new_items']} new, {nb['changed_old_lists']} old lists changed"
                         if nb.get("new_items") is not None else ""))
    lines.append(f"[update] training: {record['epochs_run']} epoch(s), optimizer iterations "
                 f"{record['optimizer_iterations']}")
    return lines


def main(argv=None) -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("--window", required=True,
                        help="raw data folder of the window (the config's adapter format: the "
                             "window's clicks, the item and user files)")
    parser.add_argument("--previous", default=None,
                        help="export version folder to grow from (default: the newest published "
                             "version of exports/<name>)")
    parser.add_argument("--split-fractions", default=None,
                        help="the window's train,valid,test shares (default "
                             + ",".join(f"{x:g}" for x in UPDATE_SPLIT_FRACTIONS)
                             + ": no test split, the newest clicks trained on), or 'config' for "
                             "the config's preprocess.split_fractions (the update of before)")
    parser.add_argument("--since", default=None,
                        help="with --until: read only the window's clicks from this time on "
                             "(Unix seconds, or a UTC date / date-time such as 2026-12-06)")
    parser.add_argument("--until", default=None,
                        help="with --since: read only the window's clicks before this time")
    args = parser.parse_args(argv)
    cfg = cli.load(args)
    fractions = None if args.split_fractions is None else _fractions_arg(args.split_fractions)
    record = run_update(cfg, args.window, args.previous, split_fractions=fractions,
                        time_range=time_range_arg(args.since, args.until))
    print(record["version_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
