"""benchmarks/step_profile.py (issue 31): argument errors, the synthetic world and batches against
pure-Python references, and a tiny run's report keys (a few steps of a tiny model, no fit)."""
import micrec_tf  # noqa: F401

import collections

import numpy as np
import pytest

from benchmarks import step_profile as sp


@pytest.mark.parametrize("kwargs,match", [
    ({"num_items": 0}, "num_items must be an int >= 1. Received: 0"),
    ({"batch_size": 2.5}, "batch_size must be an int >= 1. Received: 2.5"),
    ({"rounds": 0}, "rounds must be an int >= 1"),
    ({"warmup": -1}, "warmup must be an int >= 0. Received: -1"),
    ({"exponent": 0.0}, "exponent must be > 0. Received: 0.0"),
    ({"components": ["step", "optimizer"]}, "components must be a non-empty subset.*optimizer"),
    ({"components": []}, "components must be a non-empty subset"),
    ({"compare": "history_embeddings=slots"}, "--compare must be KEY=A,B.*Received"),
    ({"compare": "history_embeddings"}, "--compare must be KEY=A,B"),
    ({"compare": "history_embeddings=slots,unique;train.optimizer=adam"},
     "--compare must be KEY=A,B.*Received"),
])
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sp.run(**kwargs)


def test_cli_argument_error_exits_2(capsys):
    with pytest.raises(SystemExit) as err:
        sp.main(["--set", "no_equals_sign"])
    assert err.value.code == 2
    assert "--set must be KEY=VALUE" in capsys.readouterr().err


def test_world_tables_against_pure_python():
    v, k = 50, 3
    table, vocab, user_fields, cooc, title, perm = sp.synthetic_world(v, max_tags=4, neighbours=k)
    assert vocab["item_id"] == v and vocab["provider"] == 22 and user_fields == [
        "gender", "age", "region"]
    assert sorted(perm.tolist()) == list(range(1, v))
    lists = {i: cooc.neighbours[cooc.indptr[i]:cooc.indptr[i + 1]].tolist() for i in range(v)}
    assert lists[0] == []
    for i in range(1, v):  # ring: i +- 1..k within 1..v-1, wrapping
        want = {(i - 1 + o) % (v - 1) + 1 for o in range(-k, k + 1) if o}
        assert set(lists[i]) == want and len(lists[i]) == 2 * k
    pairs = {}
    for i in range(1, v):
        for j, c in zip(lists[i], cooc.counts[cooc.indptr[i]:cooc.indptr[i + 1]].tolist()):
            pairs[(i, j)] = c
    assert all(pairs[(j, i)] == c for (i, j), c in pairs.items())  # symmetric counts
    assert (table.tags[0] == 0).all() and table.provider[0] == 0
    assert title.neighbours[0].tolist() == [0] * 10 and (title.neighbours[1:] > 0).all()


def test_zipf_draws_follow_the_rank_law():
    """p(rank r) = r^-1 / sum_{s<V} s^-1 over ranks 1..V-1 (V = 6), mapped through the
    permutation: observed frequencies within 0.01 of the hand-computed law."""
    perm = np.array([5, 3, 1, 2, 4])
    draws = sp.zipf_ids(np.random.default_rng(0), 200_000, 6, 1.0, perm)
    h = sum(1 / r for r in range(1, 6))
    freq = collections.Counter(draws.tolist())
    for rank, item in enumerate(perm.tolist(), start=1):
        assert abs(freq[item] / 200_000 - (1 / rank) / h) < 0.01, (rank, item)


def test_batches_and_tiny_run_report():
    world = sp.synthetic_world(300, max_tags=8)
    batches = sp.random_batches(world[0], world[5], 2, 16, 5, 1.0)
    for b in batches:
        hist, length = b["hist_items"].numpy(), b["hist_len"].numpy()
        for row, n in zip(hist.tolist(), length.tolist()):
            assert 1 <= n <= 5 and all(x > 0 for x in row[:n]) and all(x == 0 for x in row[n:])
        items = b["item"].numpy()
        np.testing.assert_array_equal(b["item_tags"].numpy(), world[0].tags[items])
    out = sp.run(num_items=300, batch_size=16, history_length=5, negatives=10, batches=2,
                 rounds=1, steps=1, warmup=1, components=["step", "grads", "forward", "history"],
                 log=lambda *a: None)
    assert set(out["ms"]) == {"step", "grads", "forward", "history"}
    assert all(t > 0 for t in out["ms"].values())
    assert set(out["shares"]) == {"optimizer_apply", "backward", "forward",
                                  "history_fwd_bwd (inside forward+backward)"}
    assert out["config"]["num_items"] == 300 and out["history_slots"] == 16 * 5
    assert 1 <= out["unique_history_items_per_batch"] <= 16 * 5
    assert set(out["examples_per_s"]) == {"step"}
    assert {"model", "simd_flags", "avx512", "cores"} <= set(out["cpu"])


def test_trace_scopes_by_hand():
    assert sp._scope("Adam/UnsortedSegmentSum_1") == "Adam"
    assert sp._scope("gradient_tape/user_tower/transformer_0/MatMul") == (
        "backward:user_tower/transformer_0")
    assert sp._scope("user_tower/history_projection/Tensordot/MatMul") == (
        "user_tower/history_projection")
    assert sp._scope("user_tower") == "user_tower"
    assert sp._scope("session_cl/LowerBound") == "session_cl"


def test_compare_of_several_keys_sets_each_side():
    key, labels = sp._parse_compare(
        "history_embeddings=slots,unique;train.optimizer=adam,fused_adam")
    assert key == "model.history_embeddings;train.optimizer"
    assert labels == ["slots+adam", "unique+fused_adam"]
    assert sp._compare_settings(key, labels[0]) == {"model.history_embeddings": "slots",
                                                    "train.optimizer": "adam"}
    assert sp._compare_settings(key, labels[1]) == {"model.history_embeddings": "unique",
                                                    "train.optimizer": "fused_adam"}
    assert sp._parse_compare("train.optimizer=adam,fused_adam") == (
        "train.optimizer", ["adam", "fused_adam"])
