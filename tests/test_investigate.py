"""The norm / popularity statistic of the investigation, against a hand computation."""
import numpy as np
import pytest

from experiments.investigate import STUDIES, norm_popularity


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


def test_mean_metrics_averages_seeds_and_final_losses():
    from experiments.investigate import mean_metrics

    runs = [{"valid": {"hit@50": 0.4}, "test": {"hit@50": 0.3},
             "history": {"loss": [5.0, 4.0]}},
            {"valid": {"hit@50": 0.5}, "test": {"hit@50": 0.2},
             "history": {"loss": [6.0, 3.0, 2.0]}}]
    out = mean_metrics(runs)
    assert out["valid"]["hit@50"] == pytest.approx(0.45)
    assert out["test"]["hit@50"] == pytest.approx(0.25)
    assert out["history"]["loss"] == [pytest.approx(3.0)]  # mean of the last epochs 4 and 2
    assert mean_metrics(runs[:1]) is runs[0]


def test_sampling_study_varies_one_sampling_knob_at_a_time():
    variants = STUDIES["sampling"](0.003)
    reference = variants["MicRec (config setting: batch anchors, 50 CL negatives, "
                         "count positives)"]
    for name, ov in list(variants.items())[2:]:
        changed = {k for k in ov if ov.get(k) != reference.get(k)}
        assert changed and changed <= {"loss.cl_anchors", "loss.num_cl_negatives",
                                       "loss.session_positives", "loss.lambda_feature",
                                       "loss.lambda_semantic", "loss.lambda_session"}, name
