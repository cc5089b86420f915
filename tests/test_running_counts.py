"""Running click totals across incremental updates and the recorded item vocabulary mode
(issue 29, items 1 and 2): ``item_id_counts_total.txt`` of a grown artifacts folder
(:mod:`pipelines.lineage`), the ID keep mask of the warm start at ``model.min_id_clicks`` > 1
(:func:`micrec_tf.warm_start.total_keep_mask`), and ``stats.json`` ``item_vocabulary``.

References: hand-computed totals and masks; a pure-Python count of the training clicks of two
windows of the tiny synthetic data (the ``global_time`` rule: the first
``round(0.8 n)`` clicks in time order, ties with the boundary to the later split); the previous
folder's inference rule written out by hand for folders without the key.
"""
from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest

import micrec_tf  # noqa: F401  (before tensorflow)
from micrec_tf import warm_start as ws
from pipelines import lineage
from test_preprocess import TsvAdapter, make_cfg
from tests.conftest import tiny_config

FIELDS = ("item_id", "tag", "provider", "user_id", "user_gender", "user_age", "item_year")


def _folder(root, items=("m1", "m0"), counts="3\n1\n", stats=None, lineage_json=None,
            totals=None):
    """A hand-written artifacts folder of the TsvAdapter schema."""
    os.makedirs(os.path.join(root, "vocab"), exist_ok=True)
    st = {"dataset": "canonical", "adapter": "test_tsv", "items": len(items),
          "items_in_table": len(items)}
    st.update(stats or {})
    with open(os.path.join(root, "stats.json"), "w") as fh:
        json.dump(st, fh)
    for f in FIELDS:
        with open(os.path.join(root, "vocab", f + ".txt"), "w") as fh:
            fh.write("".join(v + "\n" for v in items) if f == "item_id" else "")
    with open(os.path.join(root, "vocab", "item_id_counts.txt"), "w") as fh:
        fh.write(counts)
    if lineage_json is not None:
        with open(os.path.join(root, "lineage.json"), "w") as fh:
            json.dump(lineage_json, fh)
    if totals is not None:
        with open(os.path.join(root, lineage.TOTALS_FILE), "w") as fh:
            fh.write(totals)
    return str(root)


def _read(tmp_path, art, mode="clicked"):
    cfg = make_cfg(tmp_path / "out", tmp_path, item_vocabulary=mode)
    return lineage.read_previous(art, cfg, TsvAdapter())


# ------------------------------------------------------------------------------ fast

def test_running_totals_by_hand():
    assert lineage.running_totals([3, 1, 0], [0, 2, 5, 4, 0]) == [3, 3, 5, 4, 0]
    assert lineage.running_totals([], [2, 1]) == [2, 1]
    with pytest.raises(ValueError, match="Received: 1 lines"):
        lineage.running_totals([1, 2], [1])


def test_previous_totals_generation_0_counts_then_the_totals_file(tmp_path):
    # generation 0: its per-run counts are its running total
    assert _read(tmp_path, _folder(tmp_path / "g0")).item_totals == (3, 1)
    # a grown folder with the file: the file
    gen1 = _folder(tmp_path / "g1", counts="0\n1\n", totals="5\n2\n",
                   lineage_json={"generation": 1, "item_vocabulary": "clicked"})
    assert _read(tmp_path, gen1).item_totals == (5, 2)
    # a grown folder of before (no file): its counts are one window's, no total is known
    old = _folder(tmp_path / "old", counts="0\n1\n",
                  lineage_json={"generation": 1, "item_vocabulary": "clicked"})
    assert _read(tmp_path, old).item_totals is None
    for bad, needle in (("5\nx\n", "line 2 is not a click count"), ("5\n", "has 1 lines")):
        art = _folder(tmp_path / f"bad{len(bad)}", totals=bad,
                      lineage_json={"generation": 1, "item_vocabulary": "clicked"})
        with pytest.raises(lineage.PreviousArtifactsError, match=needle) as err:
            _read(tmp_path, art)
        assert "\n" not in str(err.value) and lineage.TOTALS_FILE in str(err.value)


def test_write_running_totals_and_version_ignores_the_file(tmp_path):
    prev = _read(tmp_path, _folder(tmp_path / "g0"))
    out = _folder(tmp_path / "g1", items=("m1", "m0", "m2"), counts="0\n2\n1\n")
    version = lineage.vocab_version(out)
    assert lineage.write_running_totals(out, prev) == [3, 3, 1]
    with open(os.path.join(out, lineage.TOTALS_FILE)) as fh:
        assert fh.read() == "3\n3\n1\n"
    assert lineage.vocab_version(out) == version  # outside vocab/: not a vocabulary byte
    unknown = lineage.Previous(path="x", version="v", vocabs={}, generation=1,
                               item_vocabulary=None)
    os.remove(os.path.join(out, lineage.TOTALS_FILE))
    assert lineage.write_running_totals(out, unknown) is None
    assert not os.path.exists(os.path.join(out, lineage.TOTALS_FILE))


def test_stats_item_vocabulary_is_read_and_old_folders_are_inferred(tmp_path):
    # every item clicked, no 0 count, no key: both modes wrote the same files (inferred None)
    both = _folder(tmp_path / "both")
    assert _read(tmp_path, both, "clicked").item_vocabulary is None
    assert _read(tmp_path, both, "catalogue").item_vocabulary is None
    # old folders without the key: inferred as before (items < table -> clicked; a 0 -> catalogue)
    clicked = _folder(tmp_path / "clicked", stats={"items_in_table": 5})
    assert _read(tmp_path, clicked).item_vocabulary == "clicked"
    with pytest.raises(lineage.PreviousArtifactsError, match="item_vocabulary 'clicked'"):
        _read(tmp_path, clicked, "catalogue")
    catalogue = _folder(tmp_path / "catalogue", counts="3\n0\n")
    assert _read(tmp_path, catalogue, "catalogue").item_vocabulary == "catalogue"
    with pytest.raises(lineage.PreviousArtifactsError, match="item_vocabulary 'catalogue'"):
        _read(tmp_path, catalogue, "clicked")
    # the key, where inference would say "either": the recorded mode is held to
    rec = _folder(tmp_path / "rec", stats={"item_vocabulary": "catalogue"})
    assert _read(tmp_path, rec, "catalogue").item_vocabulary == "catalogue"
    with pytest.raises(lineage.PreviousArtifactsError, match="item_vocabulary 'catalogue'"):
        _read(tmp_path, rec, "clicked")
    bad = _folder(tmp_path / "bad", stats={"item_vocabulary": "all"})
    with pytest.raises(lineage.PreviousArtifactsError, match="Received: 'all'"):
        _read(tmp_path, bad)


def test_total_keep_mask_from_the_file(tmp_path):
    art = str(tmp_path)
    assert ws.total_keep_mask(art, 2) is None  # no file: the mask of before
    with open(os.path.join(art, ws.TOTALS_FILE), "w") as fh:
        fh.write("3\n1\n0\n2\n")
    assert ws.total_keep_mask(art, 1) is None and ws.total_keep_mask(art, 0) is None
    assert ws.total_keep_mask(art, 2).tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]  # row 0 = padding
    assert ws.total_keep_mask(art, 3).tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    with open(os.path.join(art, ws.TOTALS_FILE), "w") as fh:
        fh.write("3\n-1\n")
    with pytest.raises(ws.WarmStartError, match=r":2 is not a click count.*'-1'"):
        ws.total_keep_mask(art, 2)


def test_keep_mask_ors_the_running_totals(tmp_path):
    import tensorflow as tf

    class Masked(tf.Module):
        def __init__(self, table, mask):
            super().__init__()
            self.item_embedding = tf.Variable(np.asarray(table, np.float32))
            self.item_id_keep_mask = tf.Variable(np.asarray(mask, np.float32))

    prefix = tf.train.Checkpoint(model=Masked(np.zeros((5, 2)), [1, 1, 0, 1, 0])).write(
        str(tmp_path / "prev" / "model"))
    built = [1, 0, 0, 1, 0, 1, 0]  # the new build's mask (this window's counts)
    totals = [1, 0, 1, 0, 1, 1, 0]  # totals >= min_id_clicks
    cases = ((None, [1, 1, 0, 1, 0, 1, 0]), (totals, [1, 1, 1, 1, 1, 1, 0]))
    for i, (total_keep, expected) in enumerate(cases):  # by hand: built | previous | totals
        new = Masked(np.zeros((7, 2)), built)
        ws.restore_grown(new, prefix, [7], str(tmp_path / f"w{i}"), total_keep=total_keep)
        assert new.item_id_keep_mask.numpy().tolist() == expected
    with pytest.raises(ws.WarmStartError, match="running click totals"):
        ws.restore_grown(Masked(np.zeros((7, 2)), built), prefix, [7], str(tmp_path / "w9"),
                         total_keep=[1, 1, 1])


# ------------------------------------------------------------------ two windows (slow)

def _split_windows(raw, dst1, dst2):
    """The tiny synthetic clicks split at their median time into two raw folders (items and
    users whole in both); returns the two windows' clicks [(user, item, ts)]."""
    with open(os.path.join(raw, "interactions.tsv"), encoding="utf-8") as fh:
        lines = fh.readlines()
    clicks = [ln.rstrip("\n").split("\t") for ln in lines[1:]]
    mid = sorted(int(c[2]) for c in clicks)[len(clicks) // 2]
    out = []
    for dst, keep in ((dst1, lambda t: t < mid), (dst2, lambda t: t >= mid)):
        os.makedirs(dst)
        rows = [ln for ln, c in zip(lines[1:], clicks) if keep(int(c[2]))]
        with open(os.path.join(dst, "interactions.tsv"), "w", encoding="utf-8") as fh:
            fh.writelines([lines[0]] + rows)
        for name in ("items.tsv", "users.tsv"):
            os.symlink(os.path.join(raw, name), os.path.join(dst, name))
        out.append([(u, i, int(t)) for u, i, t in (r.rstrip("\n").split("\t") for r in rows)])
    return out


def _train_counts(clicks, f_train=0.8):
    """Training clicks per item under global_time: the clicks before the time of the click of
    rank round(0.8 n) in time order (ties with it are validation clicks)."""
    ts = sorted(t for _, _, t in clicks)
    boundary = ts[int(np.floor(f_train * len(ts) + 0.5))]
    return collections.Counter(i for _, i, t in clicks if t < boundary)


def _keep_mask(model, folder):
    """The model's ID keep mask, read back from a checkpoint of it (every copy equal)."""
    import tensorflow as tf

    prefix = tf.train.Checkpoint(model=model).write(os.path.join(folder, "model"))
    reader = tf.train.load_checkpoint(prefix)
    masks = [reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
             if "/item_id_keep_mask/" in k]
    assert masks and all(np.array_equal(m, masks[0]) for m in masks)
    return masks[0]


@pytest.mark.slow
def test_two_windows_total_and_the_mask_at_min_id_clicks_2(tmp_path):
    import tf_keras

    from micrec_tf.data.artifacts import load_artifacts
    from micrec_tf.data.input import make_dataset
    from micrec_tf.data.synthetic import ensure_generated
    from micrec_tf.model import build_model
    from micrec_tf.train import train
    from pipelines import preprocess

    raw = ensure_generated(tiny_config(str(tmp_path)))
    w1, w2 = _split_windows(raw, str(tmp_path / "w1"), str(tmp_path / "w2"))

    def cfg(name, data_dir, previous=""):
        return tiny_config(str(tmp_path), data={"dataset": "canonical", "data_dir": data_dir},
                           preprocess={"item_vocabulary": "catalogue",
                                       "previous_artifacts": previous},
                           model={"cl": [], "min_id_clicks": 2}).replace({"name": name})

    c1 = cfg("win1", str(tmp_path / "w1"))
    preprocess.run(c1, verbose=False)
    c2 = cfg("win2", str(tmp_path / "w2"), previous=c1.artifacts_dir)
    preprocess.run(c2, verbose=False)

    def lines(c, *path):
        with open(os.path.join(c.artifacts_dir, *path), encoding="utf-8") as fh:
            return fh.read().split("\n")[:-1]

    for c in (c1, c2):  # stats.json records the mode
        with open(os.path.join(c.artifacts_dir, "stats.json")) as fh:
            assert json.load(fh)["item_vocabulary"] == "catalogue"
    assert not os.path.exists(os.path.join(c1.artifacts_dir, lineage.TOTALS_FILE))
    n1, n2 = _train_counts(w1), _train_counts(w2)
    ids = lines(c2, "vocab", "item_id.txt")
    totals = [int(v) for v in lines(c2, lineage.TOTALS_FILE)]
    assert totals == [n1[i] + n2[i] for i in ids]  # the pure-Python count over both windows
    assert [int(v) for v in lines(c2, "vocab", "item_id_counts.txt")] == [n2[i] for i in ids]
    split = [i for i in ids if n1[i] == 1 and n2[i] == 1]
    assert split, "no item with one training click in each window"

    # After window 1: trained at min_id_clicks 2, the split items' ID rows are masked.
    run1 = str(tmp_path / "runs" / "win1")
    res = train(c1.replace({"train.epochs": 1}), run_dir=run1, evaluate_test=False,
                log=lambda *a: None)
    ids1 = lines(c1, "vocab", "item_id.txt")
    mask1 = _keep_mask(res["model"], str(tmp_path / "ck1"))
    assert mask1.tolist() == [1.0] + [float(n1[i] >= 2) for i in ids1]
    assert all(mask1[ids1.index(i) + 1] == 0.0 for i in split)
    del res
    tf_keras.backend.clear_session()

    # After window 2: the warm start's mask is the total's, the split items unmasked.
    c2w = c2.replace({"train.warm_start_from": run1})
    art = load_artifacts(c2w.artifacts_dir)
    model = build_model(c2w, art.item_table, art.vocab_sizes, art.user_fields,
                        art.cooccurrence, art.title_neighbours)
    model.compile(optimizer=tf_keras.optimizers.Adam(c2w.train.learning_rate))
    model.compute_losses(next(iter(make_dataset(c2w.artifacts_dir, "valid", 8))))
    model.optimizer.build(model.trainable_variables)
    os.makedirs(tmp_path / "run2")
    ws.warm_start(model, c2w, str(tmp_path / "run2"), art.vocab_sizes.values(),
                  log=lambda *a: None)
    mask2 = _keep_mask(model, str(tmp_path / "ck2"))
    assert mask2.tolist() == [1.0] + [float(t >= 2) for t in totals]
    assert all(mask2[ids.index(i) + 1] == 1.0 for i in split)
    # (the window's own counts would have masked them: not vacuous)
    assert all(n2[i] < 2 for i in split)
