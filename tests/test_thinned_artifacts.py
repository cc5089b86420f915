"""The sparsity sweep rebuilt from thinned clicks (``preprocess.train_user_fraction``, issue 28).

References are independent of the pipeline: the kept-user rule recomputed from the sha256 hex
digits by Horner's rule mod 10**6 (not ``int(hexdigest, 16)``); the training clicks, evaluation
clicks and histories read off the raw files in plain Python (``test_catalogue_vocab.reference``),
then filtered to the kept users; item counts, frequency order and co-occurrence recounted by
brute force over those clicks (``test_preprocess.brute_force_cooc``).
"""
from __future__ import annotations

import collections
import filecmp
import hashlib
import json
import os

import pytest

import micrec_tf  # noqa: F401  (before tensorflow)
from conftest import read_examples
from micrec_tf.config import ConfigError, from_dict
from pipelines import preprocess
from pipelines.thinning import kept_user, thin_row, thinned_name
from test_catalogue_vocab import reference, reference_vocab
from test_cold_split import digit_rule, make_raw
from test_preprocess import TsvAdapter, brute_force_cooc, make_cfg, read_cooc, read_vocab

H = 5


def horner_rule(user_id: str, fraction: float) -> bool:
    """The documented rule, sha256 mod 10**6 digit by digit (16 * r + d mod 10**6)."""
    r = 0
    for c in hashlib.sha256(user_id.encode("utf-8")).hexdigest():
        r = (r * 16 + int(c, 16)) % 1_000_000
    return r < round(fraction * 1_000_000)


# ------------------------------------------------------------------------------ fast

def test_kept_rule_is_the_documented_hash_and_nests_across_fractions():
    ids = [f"u{k}" for k in range(3000)] + ["1", "42", "Ünïcode", ""]
    fractions = (0.2, 0.5, 0.75, 1.0)
    kept = {f: {u for u in ids if kept_user(u, f)} for f in fractions}
    for f in fractions:
        assert kept[f] == {u for u in ids if horner_rule(u, f)}
    assert kept[0.2] < kept[0.5] < kept[0.75] < kept[1.0] == set(ids)
    # A fixed rule, about the asked-for share (3000 ids: a 5-sigma band is well inside +-0.05).
    for f in (0.2, 0.5, 0.75):
        assert abs(len(kept[f]) / len(ids) - f) < 0.05


def test_config_key_defaults_to_every_user_and_rejects_bad_values():
    assert from_dict({}).preprocess.train_user_fraction == 1.0
    assert from_dict({"preprocess": {"train_user_fraction": 0.2}}).preprocess \
        .train_user_fraction == 0.2
    for bad in (0, 0.0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(ConfigError, match=r"preprocess\.train_user_fraction"):
            from_dict({"preprocess": {"train_user_fraction": bad}})


def test_thin_row_drops_only_a_dropped_users_training_clicks():
    kept = next(f"k{n}" for n in range(100) if horner_rule(f"k{n}", 0.5))
    dropped = next(f"d{n}" for n in range(100) if not horner_rule(f"d{n}", 0.5))
    clicks = ((1, "a"), (2, "b"), (3, "c"), (4, "d"))
    row = (kept, ("F",), clicks, 2, 1, True)
    assert thin_row(row, 0.5) is row
    assert thin_row((dropped, ("F",), clicks, 2, 1, True), 0.5) == (
        dropped, ("F",), ((3, "c"), (4, "d")), 0, 1, True)
    # item_cold_start: the cold clicks stay, their warm-clicks-before count on the kept clicks.
    cold = ((0, "x", "valid", 0), (2, "y", "test", 2), (5, "z", "test", 4))
    assert thin_row((dropped, (), clicks, 2, 1, True, cold), 0.5)[6] == (
        (0, "x", "valid", 0), (2, "y", "test", 0), (5, "z", "test", 2))
    no_train = (dropped, (), clicks[:1], 0, 1, True)
    assert thin_row(no_train, 0.5) is no_train
    assert thin_row((dropped, (), clicks, 2, 1, True), 1.0)[2] == clicks


def test_thinned_name_keeps_the_100_percent_folder_apart():
    assert thinned_name("ml-1m", 1.0) == "ml-1m"
    assert thinned_name("ml-1m", 0.5) == "ml-1m-users50"
    assert thinned_name("ml-1m", 0.2) == "ml-1m-users20"
    assert thinned_name("ml-1m", 0.125) == "ml-1m-users12.5"
    from micrec_tf.config import _check_name
    _check_name(thinned_name("ml-1m", 0.125))  # a valid artifacts name


# ---------------------------------------------------------------------------- the Beam job

@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("raw"))
    make_raw(root)
    return root


def _run(raw, tmp_path_factory, item_vocabulary, split="global_time", **pre):
    cfg = make_cfg(tmp_path_factory.mktemp("out"), raw, split, history_length=H,
                   item_vocabulary=item_vocabulary, **pre)
    stats = preprocess.run(cfg, ["--direct_num_workers=1"], adapter=TsvAdapter(), data_dir=raw,
                           verbose=False)
    return cfg.artifacts_dir, stats


@pytest.fixture(scope="module")
def full(raw, tmp_path_factory):
    return _run(raw, tmp_path_factory, "catalogue")


@pytest.fixture(scope="module")
def one(raw, tmp_path_factory):
    return _run(raw, tmp_path_factory, "catalogue", train_user_fraction=1.0)


@pytest.fixture(scope="module")
def half(raw, tmp_path_factory):
    return _run(raw, tmp_path_factory, "catalogue", train_user_fraction=0.5)


@pytest.fixture(scope="module")
def fifth_clicked(raw, tmp_path_factory):
    return _run(raw, tmp_path_factory, "clicked", train_user_fraction=0.2)


@pytest.fixture(scope="module")
def cold_half(raw, tmp_path_factory):
    return _run(raw, tmp_path_factory, "catalogue", split="item_cold_start",
                train_user_fraction=0.5)


def _eval_examples(art, decode=False):
    """Counter of (split, user, ts, target, history, history length) of valid + test; raw item
    ids when ``decode`` (index 0 -> None)."""
    vocab = [None] + read_vocab(art, "item_id")
    got = collections.Counter()
    for split in ("valid", "test"):
        for ex in read_examples(art, split):
            hist = ex["hist_items"][:ex["hist_len"][0]]
            item = ex["item"][0]
            if decode:
                item, hist = vocab[item], [vocab[x] for x in hist]
            got[(split, ex["user_id"], ex["timestamp"][0], item, tuple(hist),
                 ex["hist_len"][0])] += 1
    return got


def _check_thinned(raw, art, stats, fraction, catalogue, cold_start=False):
    item_ids, train, evals, _ = reference(raw, cold_start=cold_start)
    users_with_train = {u for u, _, _ in train}
    kept = {u for u in users_with_train if horner_rule(u, fraction)}
    assert kept and kept < users_with_train  # the data exercise both sides
    kept_train = [c for c in train if c[0] in kept]
    # Item vocabulary and counts: a recount over the kept users' training clicks.
    want, want_counts = reference_vocab(item_ids, kept_train, catalogue)
    assert read_vocab(art, "item_id") == want
    with open(os.path.join(art, "vocab", "item_id_counts.txt"), encoding="utf-8") as fh:
        assert [int(x) for x in fh] == want_counts
    # User vocabulary: the kept users only, by training clicks desc, then id.
    n_user = collections.Counter(u for u, _, _ in kept_train)
    assert read_vocab(art, "user_id") == sorted(n_user, key=lambda u: (-n_user[u], u))
    # Co-occurrence: brute force over the kept users' training clicks.
    index = {i: k + 1 for k, i in enumerate(want)}
    table, _ = read_cooc(art)
    assert {k: c for k, (c, _) in table.items()} == {
        (index[a], index[b]): c for (a, b), c in brute_force_cooc(kept_train).items()}
    # Training examples: exactly the kept users' training clicks (hence popularity too).
    got_train = collections.Counter((ex["user_id"], ex["item"][0], ex["timestamp"][0])
                                    for ex in read_examples(art, "train"))
    assert got_train == collections.Counter((u, index[i], t) for u, i, t in kept_train)
    # Evaluation examples: every evaluation click, history from all earlier clicks (dropped
    # training clicks included), on the thinned vocabulary's indices (0 = out of vocabulary).
    assert _eval_examples(art) == collections.Counter(
        (s, u, t, index.get(i, 0), tuple(index.get(x, 0) for x in h), len(h))
        for s, u, t, i, h in evals)
    assert any(u not in kept for _, u, _, _, _ in evals if u in users_with_train)
    block = stats["train_user_fraction"]
    assert block == {"fraction": fraction, "users_kept": len(kept),
                     "users_dropped": len(users_with_train - kept),
                     "train_clicks_dropped": len(train) - len(kept_train)}
    assert stats["events_by_split"]["train"] == len(kept_train)
    assert stats["events"] == len(train) + len(evals)
    return want, kept, evals


@pytest.mark.slow
def test_thinned_catalogue_artifacts_equal_a_recount_over_kept_users(raw, half, full):
    want, kept, _ = _check_thinned(raw, *half, 0.5, catalogue=True)
    # The catalogue keeps every item; items whose training clicks all came from dropped users
    # now count 0 there.
    assert set(want) == set(read_vocab(full[0], "item_id"))
    # The evaluation examples are the 100 % run's (decoded to raw ids: the order of the
    # vocabulary, hence the indices, follows the thinned counts).
    assert _eval_examples(half[0], decode=True) == _eval_examples(full[0], decode=True)
    assert stats_without_timing(half[1])["events_by_split"]["valid"] == \
        stats_without_timing(full[1])["events_by_split"]["valid"]


@pytest.mark.slow
def test_thinned_clicked_vocabulary_shrinks_and_lost_items_are_misses(raw, fifth_clicked, half):
    want, kept, evals = _check_thinned(raw, *fifth_clicked, 0.2, catalogue=False)
    # Some evaluation click goes to an item that lost all its training clicks: index 0.
    assert any(i not in want for _, _, _, i, _ in evals)
    # The users kept at 0.2 are kept at 0.5 too (the sweep's points nest).
    assert set(read_vocab(fifth_clicked[0], "user_id")) < set(read_vocab(half[0], "user_id"))


@pytest.mark.slow
def test_thinning_composes_with_item_cold_start(raw, cold_half):
    _, _, evals = _check_thinned(raw, *cold_half, 0.5, catalogue=True, cold_start=True)
    # Every cold click stays an evaluation click (cold-valid: sha256 mod 10 = 0).
    cold_valid = [i for s, _, _, i, _ in evals if s == "valid" and digit_rule(i) == 0]
    assert cold_valid and cold_half[1]["cold_split"]["cold_valid_clicks"] == len(cold_valid)


def stats_without_timing(stats):
    return {k: v for k, v in stats.items() if k != "timing"}


@pytest.mark.slow
def test_fraction_one_gives_the_default_artifacts_byte_for_byte(full, one):
    def files(art):
        return sorted(os.path.relpath(os.path.join(d, f), art)
                      for d, _, fs in os.walk(art) for f in fs)

    assert files(full[0]) == files(one[0])
    for rel in files(full[0]):
        if rel == "stats.json":
            continue
        assert filecmp.cmp(os.path.join(full[0], rel), os.path.join(one[0], rel),
                           shallow=False), rel
    assert "train_user_fraction" not in full[1]
    with open(os.path.join(one[0], "stats.json")) as fh:
        assert stats_without_timing(json.load(fh)) == stats_without_timing(full[1])


# ------------------------------------------------------------- the reproduction's sweep (fast)

class FakeRunner:
    """Records the runs the sweep asks for; test HIT@N = the fraction it trained on."""

    made = []

    def __init__(self, cfg, root, grid="full", log=print, cache_dir=None, cached_only=False):
        self.cfg, self.root, self.grid, self.cache_dir = cfg, root, grid, cache_dir
        self.calls, self.run_seconds = [], {}
        FakeRunner.made.append(self)

    def run(self, key, overrides, evaluate_test):
        self.calls.append((key, dict(overrides)))
        self.run_seconds[key] = 1.0
        frac = overrides.get("train.train_fraction", self.cfg.preprocess.train_user_fraction)
        return {"test": {"hit@10": frac}}


def _sweep(monkeypatch, tmp_path, mode):
    import experiments.reproduce as R
    from experiments.variants import BASE, FINAL

    cfg = from_dict({"name": "x", "artifacts_root": str(tmp_path / "artifacts"),
                     "data": {"dataset": "canonical", "data_dir": str(tmp_path)},
                     "eval": {"hit_n": [10, 50]}})
    real = R.thinned_artifacts
    monkeypatch.setattr(R, "Runner", FakeRunner)
    # The thinned config without running the Beam jobs.
    monkeypatch.setattr(R, "thinned_artifacts", lambda c, f, log=print: real(c, f, build=False))
    FakeRunner.made = []
    main = FakeRunner(cfg, str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache" / "x"))
    per_seed = {BASE: [{"test": {"hit@10": 0.3}}] * 2, FINAL: [{"test": {"hit@10": 0.4}}] * 2}
    settings = {BASE: {"train.learning_rate": 0.003}, FINAL: {"train.learning_rate": 0.001}}
    sweep = R.sparsity_sweep(cfg, main, settings, per_seed, 2, mode, log=lambda *a: None)
    return sweep, main


def test_rebuilt_sweep_trains_each_fraction_on_its_own_artifacts(monkeypatch, tmp_path):
    sweep, main = _sweep(monkeypatch, tmp_path, "rebuilt")
    assert sweep[1.0] == ([0.3, 0.3], [0.4, 0.4])  # the main runs
    assert sweep[0.5] == ([0.5, 0.5], [0.5, 0.5]) and sweep[0.2] == ([0.2, 0.2], [0.2, 0.2])
    assert main.calls == []  # nothing on the 100 % artifacts
    by_name = {r.cfg.name: r for r in FakeRunner.made if r is not main}
    assert sorted(by_name) == ["x-users20", "x-users50"]
    for name, frac in (("x-users50", 0.5), ("x-users20", 0.2)):
        r = by_name[name]
        assert r.cfg.preprocess.train_user_fraction == frac
        assert r.cfg.artifacts_dir == str(tmp_path / "artifacts" / name)
        assert r.cache_dir == str(tmp_path / "cache" / name)  # beside the 100 % cache
        assert [k for k, _ in r.calls] == ["ican/seed0", "ican/seed1", "micrec__final/seed0",
                                           "micrec__final/seed1"]
        assert all("train.train_fraction" not in ov for _, ov in r.calls)
    # The chosen settings and seeds travel with every run.
    ican = by_name["x-users50"].calls[1][1]
    assert ican["train.learning_rate"] == 0.003 and ican["train.seed"] == 1


def test_batch_sweep_is_the_sweep_of_before(monkeypatch, tmp_path):
    sweep, main = _sweep(monkeypatch, tmp_path, "batch")
    assert sweep[0.5] == ([0.5, 0.5], [0.5, 0.5])
    assert FakeRunner.made == [main]  # the 100 % artifacts only
    keys = [k for k, _ in main.calls]
    assert keys[:2] == ["sparsity/ican/f50/seed0", "sparsity/ican/f50/seed1"]
    assert all(ov["train.train_fraction"] in (0.5, 0.2) for _, ov in main.calls)
    with pytest.raises(ValueError, match="sparsity mode.*Received"):
        _sweep(monkeypatch, tmp_path, "thinned")


def test_thinned_artifacts_are_reused_only_on_the_same_split(tmp_path):
    from experiments.reproduce import _same_split

    def write(d, **stats):
        os.makedirs(os.path.join(d, "title_neighbours"), exist_ok=True)
        base = {"split": "global_time", "split_fractions": [0.8, 0.1, 0.1],
                "split_boundaries": {"valid_start": 5, "test_start": 9}, "items_in_table": 7,
                "num_examples": {"train": 10, "valid": 3, "test": 2}}
        with open(os.path.join(d, "stats.json"), "w") as fh:
            json.dump({**base, **stats}, fh)
        with open(os.path.join(d, "title_neighbours", "stats.json"), "w") as fh:
            json.dump({}, fh)

    full, thin = str(tmp_path / "full"), str(tmp_path / "thin")
    assert not _same_split(full, thin, 0.5)  # nothing built
    write(full)
    write(thin, train_user_fraction={"fraction": 0.5},
          num_examples={"train": 4, "valid": 3, "test": 2})
    assert _same_split(full, thin, 0.5)
    assert not _same_split(full, thin, 0.2)  # another fraction
    write(thin, train_user_fraction={"fraction": 0.5}, split="item_cold_start")
    assert not _same_split(full, thin, 0.5)  # another split
    write(thin, train_user_fraction={"fraction": 0.5},
          num_examples={"train": 4, "valid": 2, "test": 2})
    assert not _same_split(full, thin, 0.5)  # other evaluation examples
    os.remove(os.path.join(thin, "title_neighbours", "stats.json"))
    write(full)
    assert not _same_split(full, thin, 0.5)
