"""The example contract, declared once: feature names, ``examples/feature_spec.json`` and how a
serialized ``tf.train.Example`` is parsed.

The writer (:mod:`pipelines.examples`), the readers (:mod:`micrec_tf.data.input` for tf.data,
:mod:`micrec_tf.data.arrays` for numpy), the towers and the serving layer
(:mod:`export.serving`) all take their feature names and parsing spec from here, the way
TensorFlow Transform's feature spec drives writer, reader and serving input from one declaration.
Formats: docs/ARCHITECTURE.md ("Example features").

One example per click::

    user_id        string [1]  raw user id
    user_<field>   int64  [1]  profile field index, per user field
    hist_items     int64  [H]  the H most recent earlier clicks, oldest first, 0-padded at the end
    hist_len       int64  [1]  real entries in hist_items
    item           int64  [1]  target item index (0 = OOV)
    item_tags      int64  [T]  target item tag indices, 0-padded (T = max_tags)
    item_provider  int64  [1]  target item provider index
    item_<field>   int64  [1]  target item extra field index, per item extra field
    timestamp      int64  [1]  click time, Unix seconds

No TensorFlow at import: :func:`parse_features` imports it when called.
"""
from __future__ import annotations

from typing import Iterable, Sequence

__all__ = [
    "USER_ID", "HIST_ITEMS", "HIST_LEN", "ITEM", "ITEM_TAGS", "ITEM_PROVIDER", "TIMESTAMP",
    "RESERVED_FEATURES", "EVAL_FEATURES", "user_feature", "item_feature", "user_tower_features",
    "vocab_names", "feature_spec", "check_feature_spec", "parse_features", "scalar_features",
]

USER_ID = "user_id"
HIST_ITEMS = "hist_items"
HIST_LEN = "hist_len"
ITEM = "item"
ITEM_TAGS = "item_tags"
ITEM_PROVIDER = "item_provider"
TIMESTAMP = "timestamp"

# Names a user profile field or item extra field may not produce (``user_<f>`` / ``item_<f>``).
RESERVED_FEATURES = (USER_ID, HIST_ITEMS, HIST_LEN, ITEM, ITEM_TAGS, ITEM_PROVIDER, TIMESTAMP)
# The features the baselines, exclusion sets and evaluation queries need (a user tower needs more).
EVAL_FEATURES = (USER_ID, HIST_ITEMS, HIST_LEN, ITEM, TIMESTAMP)
DTYPES = ("int64", "string")

_USER, _ITEM = "user_", "item_"


def user_feature(field: str) -> str:
    """The example feature (and vocabulary) name of user profile field ``field``: ``user_<f>``."""
    return _USER + field


def item_feature(field: str) -> str:
    """The example feature (and vocabulary) name of item extra field ``field``: ``item_<f>``."""
    return _ITEM + field


def user_tower_features(user_fields: Iterable[str]) -> list:
    """What the user tower reads, in order: ``user_<f>`` per profile field, then the history."""
    return [user_feature(f) for f in user_fields] + [HIST_ITEMS, HIST_LEN]


def vocab_names(user_fields: Iterable[str], item_extra_fields: Iterable[str]) -> list:
    """Every vocabulary (``vocab/<name>.txt``) the preprocessing job writes, in a fixed order."""
    return (["item_id", "tag", "provider", USER_ID] + [user_feature(f) for f in user_fields]
            + [item_feature(f) for f in item_extra_fields])


def feature_spec(history_length: int, max_tags: int, user_fields: Sequence[str],
                 item_extra_fields: Sequence[str], vocab_sizes: dict, num_examples: dict) -> dict:
    """The content of ``examples/feature_spec.json``: every feature's dtype and shape (in the
    order of the module doc), and the sizes the readers need (history length, max tags,
    vocabulary sizes with the OOV slot, examples per split)."""
    scalar = {"dtype": "int64", "shape": [1]}
    feats = {USER_ID: {"dtype": "string", "shape": [1]}}
    feats.update({user_feature(f): dict(scalar) for f in user_fields})
    feats[HIST_ITEMS] = {"dtype": "int64", "shape": [int(history_length)]}
    feats[HIST_LEN] = dict(scalar)
    feats[ITEM] = dict(scalar)
    feats[ITEM_TAGS] = {"dtype": "int64", "shape": [int(max_tags)]}
    feats[ITEM_PROVIDER] = dict(scalar)
    feats.update({item_feature(f): dict(scalar) for f in item_extra_fields})
    feats[TIMESTAMP] = dict(scalar)
    return {"features": feats, "history_length": int(history_length), "max_tags": int(max_tags),
            "user_fields": list(user_fields), "item_extra_fields": list(item_extra_fields),
            "vocab_sizes": dict(vocab_sizes), "num_examples": dict(num_examples)}


def check_feature_spec(spec, path: str = "feature_spec.json") -> dict:
    """Returns ``spec`` after checking it is what :func:`feature_spec` writes; ``ValueError``
    naming ``path`` and the bad entry otherwise."""
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a JSON object. Received: {type(spec).__name__}")
    missing = [k for k in ("features", "history_length", "max_tags", "user_fields",
                           "item_extra_fields", "vocab_sizes", "num_examples") if k not in spec]
    if missing:
        raise ValueError(f"{path}: keys {missing} are missing: the artifacts are stale")
    feats = spec["features"]
    expected = list(feature_spec(spec["history_length"], spec["max_tags"], spec["user_fields"],
                                 spec["item_extra_fields"], {}, {})["features"])
    if not isinstance(feats, dict) or sorted(feats) != sorted(expected):
        got = sorted(feats) if isinstance(feats, dict) else feats
        raise ValueError(f"{path}: features must be {expected}. Received: {got}")
    for name, f in feats.items():
        shape = f.get("shape") if isinstance(f, dict) else None
        if (not isinstance(f, dict) or f.get("dtype") not in DTYPES or not isinstance(shape, list)
                or len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 1):
            raise ValueError(f"{path}: feature {name!r} needs a dtype in {DTYPES} and a shape "
                             f"[n >= 1]. Received: {f!r}")
    if "item_id" not in spec["vocab_sizes"]:
        raise ValueError(f"{path}: vocab_sizes has no 'item_id'. Received: "
                         f"{sorted(spec['vocab_sizes'])}")
    return spec


def scalar_features(spec: dict) -> set:
    """Names of the shape-[1] features (readers give them as rank-1 ``[B]`` arrays)."""
    return {name for name, f in spec["features"].items() if list(f["shape"]) == [1]}


def parse_features(spec: dict, names: Sequence[str] | None = None) -> dict:
    """``{name: tf.io.FixedLenFeature}`` for ``tf.io.parse_example``: every feature of
    ``spec`` (``names=None``) or the ones named (``KeyError`` naming an unknown one)."""
    import tensorflow as tf  # deferred: the contract itself needs no TensorFlow

    feats = spec["features"]
    names = list(feats) if names is None else list(names)
    unknown = [n for n in names if n not in feats]
    if unknown:
        raise KeyError(f"features {unknown} are not in the feature spec ({sorted(feats)})")
    dtypes = {"int64": tf.int64, "string": tf.string}
    out = {}
    for name in names:
        f = feats[name]
        if f["dtype"] not in dtypes:
            raise ValueError(f"feature {name!r} has unsupported dtype. Received: {f['dtype']!r}")
        out[name] = tf.io.FixedLenFeature(list(f["shape"]), dtypes[f["dtype"]])
    return out
