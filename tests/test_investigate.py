"""The norm / popularity statistic of the investigation, against a hand computation."""
import numpy as np
import pytest

from micrec_tf.evaluation.investigate import STUDIES, norm_popularity


def test_norm_popularity_against_hand_computation():
    # 6 items (row 0 is padding); norms 5, 4, 3, 2, 1 for click counts 10, 20, 30, 40, 50.
    vectors = np.array([[9.0, 0], [5, 0], [0, 4], [3, 0], [0, 2], [1, 0]])
    counts = np.array([0, 10, 20, 30, 40, 50])
    rho, ratio = norm_popularity(vectors, counts)
    assert rho == pytest.approx(-1.0)  # norms fall exactly as clicks rise
    # head = the top 20 % of 5 items = 1 item (count 50, norm 1); rest mean = (5+4+3+2)/4
    assert ratio == pytest.approx(1.0 / 3.5)
    with pytest.raises(ValueError, match="one count per item, got 5 vectors and 4 counts"):
        norm_popularity(vectors, counts[:-1])


def test_every_study_starts_with_its_ican_reference():
    for study in STUDIES.values():
        variants = study(0.003)
        first = next(iter(variants.values()))
        assert next(iter(variants)) == "ICAN" and first["model.cl"] == []
