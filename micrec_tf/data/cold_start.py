"""The item-cold-start rule of issue 28 (``preprocess.split: item_cold_start``), in one place.

Pure Python (no Beam, no TensorFlow): the preprocessing (:mod:`pipelines.split`) uses it to
split the clicks and the evaluation (:mod:`micrec_tf.evaluation.cold_start`) to pick the
candidate set of a cold click, so both read the same definition.
"""
from __future__ import annotations

import hashlib

__all__ = ["ITEM_COLD_START", "COLD_MODULUS", "COLD_VALID_BUCKET", "COLD_TEST_BUCKET", "COLD_VALID", "COLD_TEST",
           "cold_bucket"]

# The value of ``preprocess.split`` that selects this protocol.
ITEM_COLD_START = "item_cold_start"
# sha256(raw item id) mod COLD_MODULUS: this value = cold-validation item, this one = cold-test.
COLD_MODULUS, COLD_VALID_BUCKET, COLD_TEST_BUCKET = 10, 0, 1
# The names of the two cold buckets (the split names of the evaluation clicks they go to).
COLD_VALID, COLD_TEST = "valid", "test"


def cold_bucket(raw_item_id: str):
    """The cold split of an item under ``item_cold_start``: ``"valid"``, ``"test"`` or None (warm).

    ``int(hashlib.sha256(raw_item_id.encode()).hexdigest(), 16) % 10``: 0 = cold-validation,
    1 = cold-test, else warm (the issue-28 rule; ``raw_item_id`` is the dataset's own string,
    ``movies.dat``'s first field for ml-1m).
    """
    b = int(hashlib.sha256(raw_item_id.encode()).hexdigest(), 16) % COLD_MODULUS
    return COLD_VALID if b == COLD_VALID_BUCKET else (COLD_TEST if b == COLD_TEST_BUCKET else None)
