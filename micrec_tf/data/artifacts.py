"""In-memory view of the preprocessing artifacts that the trainer needs (see docs/ARCHITECTURE.md).

All arrays are indexed by item index; row 0 is the OOV/padding item and is all zeros.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class ItemTable:
    """Every catalogue item's fields, so sampled negatives can be embedded.

    tags:     int64 [V, T] tag indices, 0-padded.
    provider: int64 [V]    provider index.
    extra:    {field: int64 [V]} extra categorical fields (names as in the vocab, e.g. "item_year").
    category: int64 [V]    first tag index (0 if none), used by session CL's same-category emphasis.
    """

    tags: np.ndarray
    provider: np.ndarray
    extra: dict
    category: np.ndarray

    @property
    def num_items(self) -> int:
        """V: catalogue size including the padding row 0."""
        return int(self.tags.shape[0])


@dataclasses.dataclass
class NeighbourTable:
    """Per item, padded neighbour lists: ``neighbors`` int64 [V, M], ``weights`` float32 [V, M].

    A weight of 0 marks padding. For co-occurrence, weights are counts and ``same_category`` is an
    int8 [V, M] flag; for title neighbours, weights are cosine scores.
    """

    neighbors: np.ndarray
    weights: np.ndarray
    same_category: np.ndarray | None = None


@dataclasses.dataclass
class Artifacts:
    """Everything the trainer loads once from ``artifacts/<name>/``."""

    path: str
    feature_spec: dict
    vocabs: dict  # field -> list[str]; list position p = index p + 1
    item_table: ItemTable
    cooccurrence: NeighbourTable | None
    title_neighbours: NeighbourTable | None
    stats: dict

    @property
    def vocab_sizes(self) -> dict:
        """field -> vocabulary size including the OOV slot 0."""
        return {k: len(v) + 1 for k, v in self.vocabs.items()}

    @property
    def user_fields(self) -> list:
        return list(self.feature_spec.get("user_fields", []))

    @property
    def item_extra_fields(self) -> list:
        return list(self.feature_spec.get("item_extra_fields", []))
