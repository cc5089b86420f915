"""The sparsity sweep rebuilt from thinned clicks (``preprocess.train_user_fraction``, issue 28).

``train.train_fraction`` thins training users at batch time only: the vocabularies, the item
counts and the co-occurrence table still come from every user's clicks, which favours session
CL. With ``preprocess.train_user_fraction`` f < 1 the preprocessing job itself keeps the training
clicks of a fixed set of users and builds every training artifact from those alone.

**The kept-user rule** (:func:`kept_user`): a user is kept when

    int(hashlib.sha256(raw_user_id.encode("utf-8")).hexdigest(), 16) % 10**6 < round(f * 10**6)

with the raw user id the dataset's own string. The rule does not depend on the seed or on the
data, so the users kept at 0.2 are a subset of those kept at 0.5 (the points of a sweep are
comparable), and f = 1 keeps everyone.

**What a dropped user loses**: its training clicks reach no training artifact: not the item /
tag / provider / extra-field vocabularies and their counts (``vocab/item_id_counts.txt``), not
``user_id`` and the profile vocabularies (a dropped user's id is out of vocabulary, index 0), not
the co-occurrence table, not the training examples (hence not the popularity that
:mod:`experiments.reference_rows` counts on them), and not ``stats.json``'s ``events_by_split.train``
/ ``sessions`` (stats.json's ``train_user_fraction`` block counts what was dropped).

**What stays as in the 100 % job**: the split (its boundaries are computed over every click),
and every validation and test example: the same clicks, and each one's history from *all* of the
user's earlier clicks, the dropped training clicks included (the user's recent clicks are still
known at serving time; only training sees fewer users). Only the indices change with the
vocabulary: with ``preprocess.item_vocabulary: clicked`` an item whose training clicks all came
from dropped users leaves the vocabulary, so an evaluation click on it (target or history entry)
gets index 0, a miss as for any out-of-vocabulary item; with ``catalogue`` every item keeps an
index (such an item counts 0 training clicks, and ``model.min_id_clicks`` masks its ID row).

The artifacts of a thinned job belong in their own folder (:func:`thinned_name`: the config's
``name`` with a suffix, set by :mod:`experiments.reproduce`), never over the 100 % artifacts.
Title neighbours depend only on the items of ``items/items.jsonl``: run
``pipelines.title_neighbours`` on the thinned folder too (with ``clicked`` its item set shrinks).

Transforms (PCollections they take and give):

- :class:`ThinTrainingUsers`: user rows of :class:`pipelines.split.UserTimelines` -> ``{"users":
  the rows the training artifacts are built from, STATS}``. A kept user's row is unchanged; a
  dropped user's row keeps only its evaluation clicks (``clicks[n_train:]``, ``n_train`` 0; an
  ``item_cold_start`` row's ``n_warm_before`` shifted to those clicks). These rows feed the
  vocabulary and co-occurrence steps only; the examples are written from the full rows
  (:class:`pipelines.examples.WriteExamples` skips a dropped user's training examples itself).
"""
from __future__ import annotations

import hashlib

from pipelines.common import STATS

import apache_beam as beam  # noqa: E402  (after pipelines.common: its import is quiet)

# The rule reads the fraction to this many parts (6 decimals).
KEEP_MODULUS = 10 ** 6


def keep_limit(fraction: float) -> int:
    """Users whose hash mod :data:`KEEP_MODULUS` is below this are kept."""
    if isinstance(fraction, bool) or not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"train_user_fraction must be in (0, 1]. Received: {fraction!r}")
    return int(round(float(fraction) * KEEP_MODULUS))


def kept_user(user_id: str, fraction: float) -> bool:
    """Whether ``user_id``'s training clicks are kept at ``train_user_fraction`` ``fraction``
    (module docstring; always True at 1.0)."""
    h = int(hashlib.sha256(user_id.encode("utf-8")).hexdigest(), 16) % KEEP_MODULUS
    return h < keep_limit(fraction)


def thinned_name(name: str, fraction: float) -> str:
    """The artifacts name of a thinned job: ``<name>`` at 1.0, else ``<name>-users<pct>``
    (``ml-1m`` at 0.5 -> ``ml-1m-users50``; ``0.125`` -> ``ml-1m-users12.5``)."""
    keep_limit(fraction)
    if float(fraction) == 1.0:
        return name
    pct = f"{float(fraction) * 100:.4f}".rstrip("0").rstrip(".")
    return f"{name}-users{pct}"


def thin_row(user, fraction: float):
    """One user row of :class:`pipelines.split.UserTimelines` as the training artifacts see it
    (module docstring): unchanged for a kept user or one without training clicks."""
    user_id, profile, clicks, n_train, n_valid, has_profile = user[:6]
    if not n_train or kept_user(user_id, fraction):
        return user
    row = (user_id, profile, tuple(clicks[n_train:]), 0, n_valid, has_profile)
    if len(user) > 6:
        row += (tuple((ts, item, split, max(0, n_before - n_train))
                      for ts, item, split, n_before in user[6]),)
    return row


class _Thin(beam.DoFn):
    def __init__(self, fraction):
        self.fraction = fraction

    def process(self, user):
        row = thin_row(user, self.fraction)
        if row is not user:
            yield beam.pvalue.TaggedOutput(STATS, ("thin.users_dropped", 1))
            yield beam.pvalue.TaggedOutput(STATS, ("thin.train_clicks_dropped", user[3]))
        elif user[3]:
            yield beam.pvalue.TaggedOutput(STATS, ("thin.users_kept", 1))
        yield row


class ThinTrainingUsers(beam.PTransform):
    """User rows -> ``{"users": thinned rows, STATS}`` (``thin.users_kept``,
    ``thin.users_dropped``: users with training clicks kept / dropped; ``thin.train_clicks_dropped``).
    """

    def __init__(self, fraction: float):
        super().__init__()
        keep_limit(fraction)
        self.fraction = float(fraction)

    def expand(self, users):
        out = users | "Thin" >> beam.ParDo(_Thin(self.fraction)).with_outputs(STATS, main="users")
        return {"users": out.users, STATS: out[STATS]}
