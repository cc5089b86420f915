"""The Beam preprocessing job: raw files -> artifacts/<name>/ (contracts in docs/ARCHITECTURE.md).

    python -m pipelines.preprocess --config configs/ml-1m.yaml [--set key=value ...] [Beam flags]

Any flag this module does not know goes to Beam's ``PipelineOptions`` (after
``preprocess.beam_args`` from the config), so ``--runner=DataflowRunner --project=...`` or
``--direct_num_workers=2`` work unchanged. DirectRunner is the default.

A flag that neither this module nor any Beam ``PipelineOptions`` class knows (``--sett``, a
stray word) is an error naming it (exit 2), never a warning Beam prints before running anyway.

This module is the job driver: :func:`build_pipeline` chains the composite transforms, one
concept per module, and :func:`run` runs them and finishes stats.json and feature_spec.json.

1. :mod:`pipelines.rows`: read every raw file as numbered lines (bytes exactly as stored,
   1-based line numbers, uncompressed files split in line-aligned ranges), parse them with the
   dataset adapter; bad lines go to ``dead_letters/`` with their reason (Beam counters
   ``dead_letters:<reason>``), clicks on items missing from the item table too
   (``unknown_item``). A dead letter keeps the file, the line number and the original bytes,
   so the line can be fixed and replayed. Nothing is dropped silently: every raw line is
   counted in stats.json as parsed, skipped (header or blank) or dead-lettered.
2. :mod:`pipelines.split`: ``global_time`` (exact timestamp quantiles, two passes: day
   buckets, then the exact seconds inside the two boundary buckets; ties at a boundary all go
   to the later split) or ``leave_last_out`` (per user, last click = test, second-last =
   valid) or ``item_cold_start`` (cold items by a hash of their raw id: every click on them is
   an evaluation click and is kept out of steps 3 and 5; warm clicks as ``global_time``); each
   user's clicks in order, labelled.
3. :mod:`pipelines.vocab`: vocabularies from training clicks only, by training-click frequency
   desc, then value (``item_vocabulary: catalogue``: every item of the item file, the unclicked
   ones last by raw id; ``vocab/item_id_counts.txt``: training clicks per item line);
   :mod:`pipelines.items`: the item table on those indices.
4. :mod:`pipelines.examples`: one ``tf.train.Example`` per click with the H most recent
   earlier clicks; sharded GZIP TFRecords. With ``preprocess.history_tails`` (issue 29,
   :mod:`pipelines.history_tails`) each user's last H clicks (before the test split, then
   every test-split click) are written too, and with
   ``previous_artifacts`` holding them the histories start in the previous tails.
5. :mod:`pipelines.cooccurrence`: sessions and the co-occurrence table (training clicks
   only), one CSR file ``cooccurrence/cooccurrence.npz``. With ``preprocess.session_tails``
   (issue 29) the users' session tails are written too, and with ``previous_artifacts`` as well
   the table is the previous one plus this run's clicks (:class:`UpdateCooccurrence`).

With ``preprocess.train_user_fraction`` f < 1 (:mod:`pipelines.thinning`) steps 3 and 5 and the
training examples of step 4 see the training clicks of a fixed hash-chosen share f of the users
only; the split and the validation / test examples (histories included) are those of f = 1.
6. stats.json.

Click order (the tie rule): a user's clicks are sorted by timestamp; clicks in the same second
keep the input order: the input files in the order the adapter lists them, then the line
number, then the row's position within the line (a MIND line yields many clicks). The key
(:func:`pipelines.rows.click_order`, one int) travels from parsing to
:class:`pipelines.split.PrepareUser` and is dropped there. It decides histories, session pairs
under a cap and the leave-last-out targets (53 % of MovieLens clicks share their second with
the previous click). With ``deduplicate_clicks`` the first copy of identical (item, second)
clicks is kept.

Output is deterministic: every file is sorted before it is written (TFRecord shards by user
hash, records by user then click order), so two runs give byte-identical artifacts except the
timing block of stats.json. The job writes into ``<artifacts_dir>.tmp-<pid>-<id>`` and renames it
into place only when everything succeeded. It holds the lock of the artifacts folder meanwhile
(``artifacts/.<name>.lock``: a second preprocess of the same folder fails at once, naming the
pid), and first removes the temporaries of killed runs (their pid no longer runs). It replaces
only a folder that holds artifacts (``stats.json``) or nothing, never the current folder, the
repository, the home folder or one above them (:mod:`micrec_tf.publish`).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import sys
import time

from micrec_tf import cli, locks, publish
from pipelines import lineage
from pipelines.common import DEAD, STATS, is_remote, write_bytes
from pipelines.cooccurrence import (CooccurrenceCounts, UpdateCooccurrence, WriteCooccurrence,
                                    WriteSessionState, check_session_category)
from pipelines.examples import WriteExamples, feature_spec
from pipelines.history_tails import JoinHistoryTails, ReadHistoryTails, has_history_tails
from pipelines.items import ItemTable
from pipelines.rows import (SOURCES, ClicksInTimeRange, FirstPerId, KnownClicks, ReadSource,
                           WriteDeadLetters)
from pipelines.split import ITEM_COLD_START, SPLITS, SplitBoundaries, UserTimelines, cold_bucket
from pipelines.thinning import ThinTrainingUsers
from pipelines.options import pipeline_options
from pipelines.vocab import Vocabularies

import apache_beam as beam  # noqa: E402  (after pipelines.common: its import is quiet)
from apache_beam.io.filesystems import FileSystems  # noqa: E402

from micrec_tf.config import Config  # noqa: E402
from micrec_tf.data import schema  # noqa: E402
from micrec_tf.data.contract import (RESERVED_FEATURES, item_feature, user_feature,  # noqa: E402
                                     vocab_names)

LOG = logging.getLogger("pipelines.preprocess")

__all__ = ["build_pipeline", "main", "run", "summary_text"]

# Files that mark a folder as preprocessing artifacts: the only kind of folder preprocess replaces.
ARTIFACTS_MARKERS = ("stats.json",)


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------

def _write_summary(items, out_dir):
    summary = {k: v for k, v in sorted(items)}
    write_bytes(os.path.join(out_dir, "_summary.json"),
                json.dumps(summary, sort_keys=True).encode("utf-8"))


def build_pipeline(p, cfg: Config, adapter, data_dir: str, out_dir: str,
                   previous=None) -> None:
    """Adds every step of the job to pipeline ``p``; artifacts go to ``out_dir``.

    ``previous``: the :class:`pipelines.lineage.Previous` to grow the vocabularies from (read
    from ``preprocess.previous_artifacts`` when None and the key is set)."""
    pc = cfg.preprocess
    user_fields = tuple(adapter.user_fields)
    extra_fields = tuple(adapter.item_extra_fields)
    for name in [user_feature(f) for f in user_fields] + [item_feature(f) for f in extra_fields]:
        if name in RESERVED_FEATURES:
            raise ValueError(f"adapter field {name!r} collides with a reserved feature name")
    check_session_category(pc.session_category, extra_fields)

    # 1. Raw rows: parsed, one item / user row per id, clicks on known items.
    inter = p | "Interactions" >> ReadSource(adapter, "interactions",
                                             adapter.interaction_files, data_dir)
    items = p | "Items" >> ReadSource(adapter, "items", adapter.item_files, data_dir,
                                      keep_origin=True)
    users = p | "Users" >> ReadSource(adapter, "users", adapter.user_files, data_dir,
                                      required=False, keep_origin=True)
    # The first row of an id is kept; later rows of the id go to the dead letters.
    items_first = items["rows"] | "PickItems" >> FirstPerId("items", schema.DUPLICATE_ITEM_ID)
    users_first = users["rows"] | "PickUsers" >> FirstPerId(
        "users", schema.DUPLICATE_USER_ID, value=lambda r: r[1])
    items_picked = items_first["rows"]
    items_kv = items_picked | "ItemKV" >> beam.Map(lambda r: (r[0], r[1]))
    users_kv = users_first["rows"] | "UserKV" >> beam.Map(lambda r: (r[0], r[1]))
    dup_stats = (
        (items_picked | "ItemDups" >> beam.Map(lambda r: ("duplicates.items", r[2])),
         users_kv | "UserOne" >> beam.Map(lambda r: ("users.catalogue", 1)))
        | "FlattenDupStats" >> beam.Flatten())
    inter_rows, range_stats = inter["rows"], []
    if pc.time_range is not None:  # issue 29: one window of a growing click log
        ranged = inter_rows | "TimeRange" >> ClicksInTimeRange(*pc.time_range)
        inter_rows, range_stats = ranged["rows"], [ranged[STATS]]
    valid = ((inter_rows, items_kv | "ItemIds" >> beam.Keys())
             | "KnownClicks" >> KnownClicks())
    clicks = valid["clicks"]

    # 2. Split boundaries (exact, two passes; item_cold_start: over warm clicks only); each
    # user's clicks in order, labelled.
    cold_stats = []
    split_clicks = clicks
    if pc.split == ITEM_COLD_START:
        split_clicks = clicks | "WarmClicks" >> beam.Filter(
            lambda kv: cold_bucket(kv[1][2]) is None)
        cold_stats = [items_kv | "ColdItems" >> beam.FlatMap(
            lambda kv: [(f"cold.{b}_items", 1)] if (b := cold_bucket(kv[0])) else [])]
    bounds = split_clicks | "Split" >> SplitBoundaries(pc.split, pc.split_fractions)
    user_rows = ((clicks, users_kv, bounds["boundaries"]) | "UserTimelines" >> UserTimelines(
        pc.split, len(user_fields), pc.deduplicate_clicks))

    # 2b. preprocess.train_user_fraction < 1: the rows the training artifacts (3, 5) are built
    # from keep the training clicks of the kept users only; examples (4) read the full rows.
    train_rows, thin_stats = user_rows["users"], []
    if pc.train_user_fraction < 1.0:
        thinned = user_rows["users"] | "ThinTrainingUsers" >> ThinTrainingUsers(
            pc.train_user_fraction)
        train_rows, thin_stats = thinned["users"], [thinned[STATS]]

    # 3. Vocabularies (training clicks only) and the item table on their indices.
    # preprocess.previous_artifacts (issue 29): every previous vocabulary line keeps its index.
    if previous is None and pc.previous_artifacts:
        previous = lineage.read_previous(pc.previous_artifacts, cfg, adapter)
    vocab = ((train_rows, items_kv)
             | "Vocab" >> Vocabularies(out_dir, user_fields, extra_fields, pc.max_tags,
                                       pc.session_window_s, pc.item_vocabulary,
                                       previous.vocabs if previous is not None else None))
    index = vocab["index"]
    item_table = (items_picked, index) | "ItemTable" >> ItemTable(out_dir, pc.max_tags,
                                                                   extra_fields)
    item_feats = item_table["features"]

    # 5. Co-occurrence table: partial rows on item indices, summed per item, one CSR file.
    if pc.session_tails and previous is not None:  # issue 29: the previous table + this run's
        cooc_stats = ((train_rows, item_feats, index)
                      | "UpdateCooccurrence" >> UpdateCooccurrence(
                          out_dir, previous.path, pc, extra_fields))
        cooc = {STATS: p | "NoCoocCounts" >> beam.Create([])}
    else:
        cooc = ((train_rows, index) | "Cooccurrence" >> CooccurrenceCounts(
            pc.session_window_s, pc.max_pairs_per_click))
        cooc_stats = ((cooc["rows"], item_feats, index)
                      | "WriteCooccurrence" >> WriteCooccurrence(
                          out_dir, pc.cooccurrence_top_m, pc.session_category, extra_fields,
                          pc.max_tags))
        if pc.session_tails:  # issue 29: the state an incremental update starts from
            _ = train_rows | "SessionState" >> WriteSessionState(out_dir, pc)

    # 4. Examples. preprocess.history_tails (issue 29): each user's last history_length clicks
    # are written for the next run, and the previous artifacts' tails start the histories.
    example_rows, tail_stats, carry = user_rows["users"], [], False
    if pc.history_tails:
        carry = previous is not None and has_history_tails(previous.path)
        prev_tails = (p | "PreviousTails" >> ReadHistoryTails(previous.path, pc.history_length)
                      if carry else p | "NoPreviousTails" >> beam.Create([]))
        joined = ((user_rows["users"], prev_tails) | "HistoryTails" >> JoinHistoryTails(
            out_dir, pc.history_length, pc.num_shards, previous.path if carry else None))
        tail_stats = [joined[STATS]]
        if carry:  # (row, carried tail) pairs
            example_rows = joined["rows"]
    example_stats = ((example_rows, item_feats, index)
                     | "Examples" >> WriteExamples(out_dir, user_fields, extra_fields,
                                                   pc.history_length, pc.max_tags,
                                                   pc.num_shards, pc.train_user_fraction,
                                                   with_tails=carry))

    # 1. Dead letters.
    dead_stats = ((inter[DEAD], items[DEAD], users[DEAD], valid[DEAD], items_first[DEAD],
                   users_first[DEAD])
                  | "DeadLetters" >> WriteDeadLetters(out_dir, {
                      src: files.encoding for src, files in zip(SOURCES, (
                          adapter.interaction_files, adapter.item_files, adapter.user_files))}))

    # 6. Summary (stats.json and feature_spec.json are finished by the driver).
    ((inter[STATS], items[STATS], users[STATS], valid[STATS], vocab[STATS], item_table[STATS],
      cooc[STATS], cooc_stats, example_stats, dead_stats, dup_stats, bounds[STATS],
      user_rows[STATS], items_first[STATS], users_first[STATS], *cold_stats, *thin_stats,
      *tail_stats, *range_stats)
     | "FlattenStats" >> beam.Flatten() | "SumStats" >> beam.CombinePerKey(sum)
     | "AllStats" >> beam.combiners.ToList()
     | "WriteSummary" >> beam.Map(_write_summary, out_dir))


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def _dead_letter_counters(result):
    """The Beam counters ``dead_letters:<reason>`` (None where the runner cannot report them)."""
    try:
        from apache_beam.metrics.metric import MetricsFilter

        out = collections.Counter()
        for c in result.metrics().query(MetricsFilter().with_namespace("dead_letters"))["counters"]:
            value = c.committed if c.committed is not None else c.attempted
            out[c.key.metric.name] += int(value or 0)
        return {r: out.get(r, 0) for r in schema.REASONS}
    except Exception as err:  # noqa: BLE001 - metrics support varies by runner
        LOG.warning("could not query Beam counters: %s", err)
        return None


def _cold_split_stats(cfg: Config, s: dict) -> dict:
    """``{"cold_split": {...}}`` under ``item_cold_start`` (else nothing): catalogue items and
    clicks of each cold bucket, and the warm valid / test clicks."""
    if cfg.preprocess.split != ITEM_COLD_START:
        return {}
    return {"cold_split": {
        "cold_valid_items": s.get("cold.valid_items", 0),
        "cold_test_items": s.get("cold.test_items", 0),
        "cold_valid_clicks": s.get("cold.valid_clicks", 0),
        "cold_test_clicks": s.get("cold.test_clicks", 0),
        "warm_valid_clicks": s.get("events.valid", 0),
        "warm_test_clicks": s.get("events.test", 0)}}


def _thinning_stats(cfg: Config, s: dict) -> dict:
    """``{"train_user_fraction": {...}}`` when ``preprocess.train_user_fraction`` < 1 (else
    nothing, so the 100 % stats.json is the one of before): the fraction, the users with
    training clicks kept and dropped, and the training clicks dropped."""
    if cfg.preprocess.train_user_fraction >= 1.0:
        return {}
    return {"train_user_fraction": {
        "fraction": cfg.preprocess.train_user_fraction,
        "users_kept": s.get("thin.users_kept", 0),
        "users_dropped": s.get("thin.users_dropped", 0),
        "train_clicks_dropped": s.get("thin.train_clicks_dropped", 0)}}


def _history_tails_stats(cfg: Config, s: dict) -> dict:
    """``{"history_tails": {...}}`` with ``preprocess.history_tails`` (else nothing, the stats
    of before): tails written, and rows whose histories start in a previous tail."""
    if not cfg.preprocess.history_tails:
        return {}
    return {"history_tails": {"users": s.get("history_tails.users", 0),
                              "users_carried": s.get("history_tails.users_carried", 0)}}


def _time_range_stats(cfg: Config, s: dict) -> dict:
    """``time_range`` and ``clicks_outside_time_range`` when ``preprocess.time_range`` is set
    (else nothing: stats.json as before)."""
    if cfg.preprocess.time_range is None:
        return {}
    return {"time_range": list(cfg.preprocess.time_range),
            "clicks_outside_time_range": s.get("clicks_outside_time_range", 0)}


def _finish(cfg: Config, adapter, out_dir: str, wall_s: float, counters=None) -> dict:
    """Reads _summary.json (then deletes it), writes stats.json and feature_spec.json."""
    summary_path = os.path.join(out_dir, "_summary.json")
    with FileSystems.open(summary_path) as fh:
        s = json.loads(fh.read().decode("utf-8"))
    FileSystems.delete([summary_path])
    user_fields, extra_fields = list(adapter.user_fields), list(adapter.item_extra_fields)
    fields = vocab_names(user_fields, extra_fields)
    vocab_sizes = {f: s.get(f"vocab.{f}", 1) for f in fields}
    num_examples = {split: s.get(f"examples.{split}", 0) for split in SPLITS}
    spec = feature_spec(cfg, user_fields, extra_fields, vocab_sizes, num_examples)
    write_bytes(os.path.join(out_dir, "examples", "feature_spec.json"),
                 json.dumps(spec, indent=1).encode("utf-8"))
    by_source = {src: {r: s.get(f"dead.{src}.{r}", 0) for r in schema.REASONS} for src in SOURCES}
    by_reason = {r: sum(by_source[src][r] for src in SOURCES) for r in schema.REASONS}
    events = s.get("events", 0)
    stats = {
        "name": cfg.name, "dataset": cfg.data.dataset, "adapter": getattr(adapter, "name", ""),
        "split": cfg.preprocess.split, "split_fractions": list(cfg.preprocess.split_fractions),
        "item_vocabulary": cfg.preprocess.item_vocabulary,  # issue 29: read by pipelines.lineage
        "split_boundaries": {"valid_start": s.get("boundary.valid_start"),
                             "test_start": s.get("boundary.test_start")},
        "users": s.get("users", 0), "users_train": s.get("users.train", 0),
        "users_in_table": s.get("users.catalogue", 0),
        "users_without_profile": s.get("users_unknown", 0),
        "items": vocab_sizes["item_id"] - 1, "items_in_table": s.get("items.catalogue", 0),
        "events": events,
        "events_by_split": {split: s.get(f"events.{split}", 0) for split in SPLITS},
        "events_without_user_profile": s.get("events_unknown_user", 0),
        "sessions": s.get("sessions", 0), "sessions_train": s.get("sessions.train", 0),
        "pairs": s.get("pairs", 0), "pairs_distinct": s.get("pairs.distinct", 0),
        "cooccurrence_items": s.get("cooc.items", 0),
        "session_window_s": cfg.preprocess.session_window_s,
        "rows": {src: {"read": s.get(f"rows.{src}", 0), "parsed": s.get(f"parsed.{src}", 0),
                       "skipped_header_or_blank": s.get(f"skipped.{src}", 0),
                       "dead_letters": sum(by_source[src].values())} for src in SOURCES},
        "duplicate_item_rows": s.get("duplicates.items", 0),
        "duplicate_clicks_removed": s.get("duplicate_clicks", 0),
        "dead_letters": {"total": sum(by_reason.values()), "by_reason": by_reason,
                         "by_source": by_source, "beam_counters": counters},
        "vocab_sizes": vocab_sizes, "num_examples": num_examples,
        **_cold_split_stats(cfg, s),
        **_thinning_stats(cfg, s),
        **_history_tails_stats(cfg, s),
        **_time_range_stats(cfg, s),
        "timing": {"wall_s": round(wall_s, 3),
                   "events_per_s": round(events / wall_s, 1) if wall_s > 0 else None},
    }
    if not events:
        clicks_read = stats["rows"].get("interactions", {}).get("parsed", 0)
        outside = stats.get("clicks_outside_time_range", 0)
        if not clicks_read:
            LOG.warning("no interactions: the click files hold no rows (an empty window)")
        elif outside == clicks_read:
            LOG.warning("no interactions: none of the %d clicks read is in preprocess.time_range "
                        "%s (an empty window)", clicks_read, stats["time_range"])
        else:
            LOG.warning("no valid interactions: every click went to the dead letters (%s)",
                        os.path.join(out_dir, "dead_letters", "dead_letters.jsonl"))
    if s.get("dead_letters.written", 0) != stats["dead_letters"]["total"]:
        raise RuntimeError(f"dead-letter file holds {s.get('dead_letters.written')} rows, "
                           f"counters say {stats['dead_letters']['total']}")
    write_bytes(os.path.join(out_dir, "stats.json"),
                 json.dumps(stats, indent=1, sort_keys=True).encode("utf-8"))
    return stats


def _resolve_data(cfg: Config, adapter, data_dir):
    """The adapter and raw-data folder (generating the synthetic dataset first if needed)."""
    if data_dir is None:
        if cfg.data.dataset == "synthetic":
            from micrec_tf.data.synthetic import ensure_generated
            data_dir = ensure_generated(cfg)
        else:
            data_dir = cfg.data.data_dir
    if adapter is None:
        from micrec_tf.data.adapters import get_adapter
        adapter = get_adapter(cfg.data)
    return adapter, str(data_dir)


def run(cfg: Config, beam_argv=(), adapter=None, data_dir=None, out_dir=None,
        verbose: bool = True) -> dict:
    """Runs the job; returns the stats dict (also written to ``<out_dir>/stats.json``).

    ``adapter``/``data_dir`` default to the config's (tests pass their own); ``out_dir``
    defaults to ``cfg.artifacts_dir``. A local output is written to a temporary sibling and
    renamed into place at the end, under the folder's lock (:mod:`micrec_tf.locks`: a second
    preprocess of the same folder fails at once, naming this one's pid), after the temporaries
    of killed runs are swept; it replaces only an absent, empty or artifacts folder
    (:func:`micrec_tf.publish.check_replaceable`). A remote one (``gs://bucket/folder``) is
    cleared, then written in place.
    """
    options = pipeline_options(cfg, beam_argv)
    out_dir = out_dir or cfg.artifacts_dir
    if is_remote(out_dir):
        return _run_remote(cfg, options, adapter, data_dir, out_dir.rstrip("/"), verbose)
    out_dir = os.path.abspath(out_dir)
    publish.check_replaceable(out_dir, ARTIFACTS_MARKERS, "the artifacts folder")
    with locks.folder_lock(out_dir, "preprocess",
                           "wait for it or pick another name / --out_dir"):
        publish.sweep_stale_siblings(out_dir, log=LOG.warning)
        adapter, data_dir = _resolve_data(cfg, adapter, data_dir)
        tmp_dir = publish.tmp_sibling(out_dir)
        try:
            stats = _run_into(cfg, options, adapter, data_dir, tmp_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        publish.replace_dir(tmp_dir, out_dir, ARTIFACTS_MARKERS)
    if verbose:
        print(summary_text(stats, out_dir))
    return stats


def _run_remote(cfg: Config, options, adapter, data_dir: str, out_dir: str,
                verbose: bool) -> dict:
    """A remote output (``gs://bucket/path``): cleared, then written in place (no lock: a remote
    folder is not kept from another machine's job). A whole bucket is refused."""
    scheme, _, rest = out_dir.partition("://")
    if "/" not in rest.strip("/"):
        raise publish.UnsafePathError(
            f"the artifacts folder {out_dir!r} is a whole bucket; preprocess clears its output "
            f"folder first: name a folder inside it ({scheme}://<bucket>/<folder>)")
    adapter, data_dir = _resolve_data(cfg, adapter, data_dir)
    if FileSystems.exists(out_dir):
        FileSystems.delete([out_dir])
    stats = _run_into(cfg, options, adapter, data_dir, out_dir)
    if verbose:
        print(summary_text(stats, out_dir))
    return stats


def _run_into(cfg: Config, options, adapter, data_dir: str, out_dir: str) -> dict:
    """Runs the pipeline writing into ``out_dir`` and finishes stats.json there."""
    start = time.time()
    previous = None
    if cfg.preprocess.previous_artifacts:  # issue 29: read and checked before any work
        previous = lineage.read_previous(cfg.preprocess.previous_artifacts, cfg, adapter)
    p = beam.Pipeline(options=options)
    build_pipeline(p, cfg, adapter, data_dir, out_dir, previous=previous)
    result = p.run()
    result.wait_until_finish()
    stats = _finish(cfg, adapter, out_dir, time.time() - start, _dead_letter_counters(result))
    if previous is not None:
        lineage.check_item_rows(out_dir, previous)
        lineage.write_running_totals(out_dir, previous)  # item_id_counts_total.txt (issue 29)
        lineage.write_lineage(out_dir, previous, cfg, adapter)
    return stats


def summary_text(stats: dict, out_dir: str) -> str:
    d = stats["dead_letters"]
    reasons = ", ".join(f"{r} {n}" for r, n in d["by_reason"].items() if n)
    lines = [
        f"preprocess: {stats['name']} ({stats['dataset']}) -> {out_dir}",
        "  rows read: " + ", ".join(f"{k} {v['read']}" for k, v in stats["rows"].items()),
        f"  events {stats['events']} (train {stats['events_by_split']['train']}, "
        f"valid {stats['events_by_split']['valid']}, test {stats['events_by_split']['test']}); "
        f"split {stats['split']} boundaries {stats['split_boundaries']}",
        f"  users {stats['users']}, items in vocab {stats['items']} "
        f"(table {stats['items_in_table']}), sessions {stats['sessions']} "
        f"(train {stats['sessions_train']}), co-occurrence pairs {stats['pairs']} "
        f"(distinct {stats['pairs_distinct']})",
        f"  examples {stats['num_examples']}",
        f"  vocab sizes {stats['vocab_sizes']}",
        f"  dead letters {d['total']}" + (
            f": {reasons} (raw lines in {os.path.join(out_dir, 'dead_letters')})"
            if d["total"] else ""),
        f"  wall {stats['timing']['wall_s']:.1f} s, {stats['timing']['events_per_s']} events/s",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Flags this parser does not know go to Beam (checked by :func:`pipelines.options.beam_options`)."""
    parser = cli.parser(__doc__, allow_abbrev=False)
    parser.add_argument("--out_dir", default=None, help="output dir (default: artifacts/<name>)")
    parser.add_argument("--previous_artifacts", default=None,
                        help="grow the vocabularies of this earlier artifacts folder (append-only; "
                             "= --set preprocess.previous_artifacts=FOLDER)")
    args, beam_argv = parser.parse_known_args(argv)
    cfg = cli.load(args)
    if args.previous_artifacts is not None:
        cfg.preprocess.previous_artifacts = args.previous_artifacts
    pipeline_options(cfg, beam_argv, command=parser)  # an unknown flag fails before any work
    run(cfg, beam_argv, out_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
