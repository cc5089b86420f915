"""Top-K for sample users: ``python -m micrec_tf.retrieve --config configs/x.yaml [options]``.

Loads the latest export of the config (``exports/<name>/<version>``, or ``--version``), takes one
or more users of the artifacts' test split (``--user`` ids, default the first user; their latest
test click with the 20 clicks before it as history) and prints the top-K items with scores.
``--exclude-clicked`` drops every item the user clicked before. ``--num-users N --output f.jsonl``
is the batch mode: one JSON line per user ``{"user_id", "target", "items", "scores"}``.

Each user's profile is printed in the artifacts' declared field order (``user_fields`` of the
feature spec, as recorded in the export's metadata.json: the column order of ``users.tsv``), then
any other signature inputs in sorted order. A ``--user`` id without a click in ``--split`` is a
one-line error (exit 2) naming the id and the split.
"""
from __future__ import annotations

import json
import os
import sys
import time

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

from micrec_tf import cli
from micrec_tf.data.artifacts import ITEMS, read_items
from micrec_tf.retrieval import Retriever, resolve_version_dir
from export import rest


def _titles(artifacts_dir: str) -> dict:
    """item id -> title from ``items.jsonl`` (:func:`micrec_tf.data.artifacts.read_items`);
    empty when the artifacts are not beside the export."""
    if not os.path.exists(os.path.join(artifacts_dir, ITEMS)):
        return {}
    return {row["item_id"]: row["title"] for row in read_items(artifacts_dir)}


def profile_fields(retriever: Retriever) -> list:
    """The order profiles are printed in: the export's declared ``user_fields`` (the artifacts'
    feature spec order), then any other profile input of the signature, sorted."""
    declared = [f for f in retriever.metadata.get("user_fields", []) if f in retriever.user_fields]
    return declared + sorted(set(retriever.user_fields) - set(declared))


def split_users(retriever: Retriever, artifacts_dir: str, user_ids, num_users: int,
                split: str) -> list:
    """:meth:`Retriever.test_users`; a requested id without a click in ``split`` (the
    ``KeyError`` test_users raises) or an empty split is a :class:`cli.UsageError`."""
    try:
        users = retriever.test_users(artifacts_dir, user_ids, num_users, split)
    except KeyError as err:
        if user_ids is None:
            raise
        raise cli.UsageError(f"{err.args[0]}; --user takes ids of users with a click in the "
                             f"{split} split (or choose another --split)") from None
    if not users:
        raise cli.UsageError(f"the {split} split of {artifacts_dir!r} has no users")
    return users


def _parser():
    parser = cli.parser(__doc__)
    parser.add_argument("--export-dir", default=None,
                        help="export root or version directory (default exports/<name>)")
    parser.add_argument("--version", default=None, help="export version (default: the latest)")
    parser.add_argument("--user", action="append", default=None, metavar="USER_ID",
                        help="user id of the split (repeatable; default: the first user)")
    parser.add_argument("--num-users", type=int, default=1,
                        help="without --user: this many users of the split")
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"])
    parser.add_argument("--k", type=int, default=None, help="top-K (default export.top_k, 500)")
    parser.add_argument("--exclude-clicked", action="store_true",
                        help="drop the items the user clicked before")
    parser.add_argument("--index", default=None, choices=["scann", "brute_force"],
                        help="override the exported index (brute_force: exact over the dump)")
    parser.add_argument("--output", default=None, help="write JSON lines here instead of printing")
    return parser


def _check_counts(args) -> None:
    for flag, value in (("--k", args.k), ("--num-users", args.num_users)):
        if value is not None and value < 1:
            raise cli.UsageError(f"{flag} must be a positive integer. Received: {value}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    _check_counts(args)
    cfg = cli.load(args)
    k = args.k or cfg.export.top_k
    try:  # the service's cap and message (export.serve_max_k)
        max_k = max(cfg.export.serve_max_k, cfg.export.top_k)
        k = rest.check_k(k, max_k)
    except rest.RequestError as err:
        raise cli.UsageError(f"--k: {err}") from None
    vdir = resolve_version_dir(args.export_dir or cfg.export_dir, args.version)
    start = time.time()
    retriever = Retriever.load(vdir, index=args.index)
    users = split_users(retriever, cfg.artifacts_dir, args.user, args.num_users, args.split)
    excl = [u["clicked"] for u in users] if args.exclude_clicked else None
    ids, scores = retriever.retrieve([u["request"] for u in users], k=k, exclude=excl,
                                      max_k=max_k)
    seconds = time.time() - start
    print(f"[retrieve] {vdir} ({retriever.index_kind}, {len(retriever.ids)} items): "
          f"{len(users)} user(s), top-{k} in {seconds:.2f}s", file=sys.stderr)

    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            for u, row_ids, row_scores in zip(users, ids, scores):
                keep = [i for i, x in enumerate(row_ids) if x]
                fh.write(json.dumps({"user_id": u["user_id"], "target": u["target"],
                                     "items": [row_ids[i] for i in keep],
                                     "scores": [float(row_scores[i]) for i in keep]}) + "\n")
        print(f"[retrieve] wrote {len(users)} line(s) to {args.output}", file=sys.stderr)
        return 0

    titles = _titles(cfg.artifacts_dir)
    fields = profile_fields(retriever)
    for u, row_ids, row_scores in zip(users, ids, scores):
        _print_user(u, row_ids, row_scores, fields, titles, args, k)
    return 0


def _print_user(u: dict, row_ids, row_scores, fields: list, titles: dict, args, k: int) -> None:
    req = u["request"]
    profile = ", ".join(f"{f}={req[f]!r}" for f in fields)
    print(f"user {u['user_id']} ({profile})")
    print(f"  history (oldest first, {len(req['history'])}): " + ", ".join(req["history"]))
    if args.exclude_clicked:
        print(f"  excluding {len(u['clicked'])} earlier clicked item(s)")
    target = u["target"]
    if not target:
        where = "an item unseen in training (OOV): not retrievable"
    elif args.exclude_clicked and target in set(u["clicked"]):
        where = "clicked before, so excluded"
    else:
        rank = next((i + 1 for i, x in enumerate(row_ids) if x == target), None)
        where = f"rank {rank if rank else f'> {k}'}"
    print(f"  next click in {args.split}: {target or '?'} {titles.get(target, '')!r} "
          f"-> {where}")
    print(f"  {'rank':>4}  {'item_id':<12} {'score':>9}  title")
    for i, (item, score) in enumerate(zip(row_ids, row_scores)):
        if not item:
            break
        print(f"  {i + 1:>4}  {item:<12} {score:>9.4f}  {titles.get(item, '')}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
