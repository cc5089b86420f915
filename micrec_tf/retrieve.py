"""Top-K for sample users: ``python -m micrec_tf.retrieve --config configs/x.yaml [options]``.

Loads the latest export of the config (``exports/<name>/<version>``, or ``--version``), takes one
or more users of the artifacts' test split (``--user`` ids, default the first user; their latest
test click with the 20 clicks before it as history) and prints the top-K items with scores.
``--exclude-clicked`` drops every item the user clicked before. ``--num-users N --output f.jsonl``
is the batch mode: one JSON line per user ``{"user_id", "target", "items", "scores"}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

from micrec_tf.config import load_config, parse_overrides
from micrec_tf.retrieval import Retriever, resolve_version_dir


def _titles(artifacts_dir: str) -> dict:
    path = os.path.join(artifacts_dir, "items", "items.jsonl")
    titles = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    titles[str(row.get("item_id"))] = row.get("title", "")
    return titles


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--export-dir", default=None,
                        help="export root or version directory (default exports/<name>)")
    parser.add_argument("--version", default=None, help="export version (default: the latest)")
    parser.add_argument("--user", action="append", default=None, metavar="USER_ID",
                        help="user id of the test split (repeatable; default: the first user)")
    parser.add_argument("--num-users", type=int, default=1,
                        help="without --user: this many users of the test split")
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"])
    parser.add_argument("--k", type=int, default=None, help="top-K (default export.top_k, 500)")
    parser.add_argument("--exclude-clicked", action="store_true",
                        help="drop the items the user clicked before")
    parser.add_argument("--index", default=None, choices=["scann", "brute_force"],
                        help="override the exported index (brute_force: exact over the dump)")
    parser.add_argument("--output", default=None, help="write JSON lines here instead of printing")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, parse_overrides(args.set))
    vdir = resolve_version_dir(args.export_dir or cfg.export_dir, args.version)
    start = time.time()
    retriever = Retriever.load(vdir, index=args.index)
    k = args.k or cfg.export.top_k
    users = retriever.test_users(cfg.artifacts_dir, args.user, args.num_users, args.split)
    excl = [u["clicked"] for u in users] if args.exclude_clicked else None
    ids, scores = retriever.retrieve([u["request"] for u in users], k=k, exclude=excl)
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
    for u, row_ids, row_scores in zip(users, ids, scores):
        req = u["request"]
        profile = ", ".join(f"{f}={req[f]!r}" for f in retriever.user_fields)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
