"""Warm start with grown tables (issue 29, micrec_tf/warm_start.py).

References: the previous checkpoint read back with ``tf.train.load_checkpoint`` (TensorFlow's own
reader, not the code under test), Keras's own optimizer variable list (a checkpoint key
``model/optimizer/_variables/<i>`` is ``optimizer.variables[i]``), values captured before the
restore, hand-written shapes and messages.
"""
import json
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
import yaml

from micrec_tf import warm_start as ws
from micrec_tf.config import ConfigError, from_dict

EMB = "model/layer_with_weights-0/embeddings/.ATTRIBUTES/VARIABLE_VALUE"


def _toy(vocab: int, dim: int = 4, lr: float = 0.01, seed: int = 0):
    """An ID table and a head, compiled with Adam, every slot built."""
    tf_keras.utils.set_random_seed(seed)
    ids = tf_keras.Input(shape=(), dtype="int64")
    vectors = tf_keras.layers.Embedding(vocab, dim, name="item_embedding")(ids)
    model = tf_keras.Model(ids, tf_keras.layers.Dense(1, name="head")(vectors))
    model.compile(optimizer=tf_keras.optimizers.Adam(lr))
    model.optimizer.build(model.trainable_variables)
    return model


def _step(model, ids):
    """One Adam step on a squared output (no Model.fit)."""
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(model(tf.constant(ids, tf.int64))))
    grads = tape.gradient(loss, model.trainable_variables)
    model.optimizer.apply_gradients(zip(grads, model.trainable_variables))


def _trained_toy(tmp_path, vocab=7, dim=4):
    old = _toy(vocab, dim)
    _step(old, [1, 2, 3])
    _step(old, [2, 5])
    prefix = tf.train.Checkpoint(model=old).write(str(tmp_path / "old" / "model"))
    return prefix


def test_grown_table_keeps_old_rows_and_adam_slots_bit_identical(tmp_path):
    prefix = _trained_toy(tmp_path)
    reader = tf.train.load_checkpoint(prefix)
    assert reader.get_variable_to_shape_map()[EMB] == [7, 4]
    new = _toy(10, lr=0.05, seed=1)
    fresh_table = new.layers[1].embeddings.numpy().copy()
    summary = ws.restore_grown(new, prefix, [10], str(tmp_path / "work"))
    table = new.layers[1].embeddings.numpy()
    assert table.shape == (10, 4)
    assert np.array_equal(table[:7], reader.get_tensor(EMB))
    assert np.array_equal(table[7:], fresh_table[7:])  # new ids: rows as initialised at build
    assert summary["grown"][EMB] == [7, 10]
    grown_slots = 0
    for i, var in enumerate(new.optimizer.variables[1:], 1):  # [0] is iterations (below)
        key = f"model/optimizer/_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE"
        old = reader.get_tensor(key)
        value = var.numpy()
        if value.shape == (10, 4):  # the table's m and v
            grown_slots += 1
            assert np.abs(old[[1, 2, 3, 5]]).min() > 0  # trained rows have moments
            assert np.array_equal(value[:7], old) and not value[7:].any()
        else:
            assert np.array_equal(value, old)
    assert grown_slots == 2
    assert int(new.optimizer.iterations.numpy()) == 2  # two apply_gradients above
    assert float(new.optimizer.learning_rate.numpy()) == pytest.approx(0.05)  # the update's
    head = "model/layer_with_weights-1/kernel/.ATTRIBUTES/VARIABLE_VALUE"
    assert np.array_equal(new.layers[2].kernel.numpy(), reader.get_tensor(head))


def test_loss_scale_of_mixed_precision_is_kept_or_may_come_and_go(tmp_path):
    """Mixed precision wraps Adam in a LossScaleOptimizer: the same keys plus
    model/optimizer/loss_scale/*; an update in float32 (or the other way round) is no mismatch."""
    scale = "model/optimizer/loss_scale/current_loss_scale/.ATTRIBUTES/VARIABLE_VALUE"

    def scaled(vocab, lr):
        model = _toy(vocab, lr=lr)
        model.compile(optimizer=tf_keras.mixed_precision.LossScaleOptimizer(
            tf_keras.optimizers.Adam(lr)))
        model.optimizer.build(model.trainable_variables)
        return model

    old = scaled(7, 0.01)
    old.optimizer.iterations.assign(5)
    old.optimizer._loss_scale.current_loss_scale.assign(1024.0)  # as training leaves it
    prefix = tf.train.Checkpoint(model=old).write(str(tmp_path / "old" / "model"))
    reader = tf.train.load_checkpoint(prefix)
    assert reader.get_tensor(scale) == 1024.0
    new = scaled(10, 0.05)
    ws.restore_grown(new, prefix, [10], str(tmp_path / "work"))
    assert float(new.optimizer.learning_rate.numpy()) == pytest.approx(0.05)
    assert int(new.optimizer.iterations.numpy()) == 5
    assert float(new.optimizer.loss_scale.numpy()) == 1024.0
    assert np.array_equal(new.layers[1].embeddings.numpy()[:7], reader.get_tensor(EMB))
    plain = _toy(10, lr=0.05)  # float32 update of a mixed-precision run
    ws.restore_grown(plain, prefix, [10], str(tmp_path / "work2"))
    assert np.array_equal(plain.layers[1].embeddings.numpy()[:7], reader.get_tensor(EMB))
    back = scaled(10, 0.05)  # mixed-precision update of a float32 run
    ws.restore_grown(back, _trained_toy(tmp_path), [10], str(tmp_path / "work3"))
    assert int(back.optimizer.iterations.numpy()) == 2


def test_restore_into_the_same_shapes_changes_nothing(tmp_path):
    prefix = _trained_toy(tmp_path)
    reader = tf.train.load_checkpoint(prefix)
    new = _toy(7, seed=5)
    summary = ws.restore_grown(new, prefix, [7], str(tmp_path / "work"))
    assert summary["grown"] == {}
    assert np.array_equal(new.layers[1].embeddings.numpy(), reader.get_tensor(EMB))
    for i, var in enumerate(new.optimizer.variables[1:], 1):
        key = f"model/optimizer/_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE"
        assert np.array_equal(var.numpy(), reader.get_tensor(key))
    assert int(new.optimizer.iterations.numpy()) == int(reader.get_tensor(
        "model/optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")) == 2


def test_another_embedding_dim_is_refused_naming_the_variable_and_both_shapes(tmp_path):
    prefix = _trained_toy(tmp_path)
    with pytest.raises(ws.WarmStartError) as err:
        ws.restore_grown(_toy(10, dim=5), prefix, [10], str(tmp_path / "work"))
    msg = str(err.value)
    assert "\n" not in msg and "[7, 4]" in msg and "[10, 5]" in msg
    assert "/.ATTRIBUTES/VARIABLE_VALUE" in msg and "model/" in msg


def test_plan_copies_grows_and_refuses():
    prev = {"model/t/embeddings/.A": [5, 2], "model/d/kernel/.A": [2, 3],
            "model/f/item_id_keep_mask/.A": [5], "model/optimizer/_learning_rate/.A": [],
            ws.OBJECT_GRAPH: []}
    fresh = {"model/t/embeddings/.A": [8, 2], "model/d/kernel/.A": [2, 3],
             "model/f/item_id_keep_mask/.A": [8], "model/optimizer/_learning_rate/.A": [],
             ws.OBJECT_GRAPH: []}
    assert ws.plan_restore(prev, fresh, [8, 3]) == {
        "model/t/embeddings/.A": "grow", "model/d/kernel/.A": "copy",
        "model/f/item_id_keep_mask/.A": "new", "model/optimizer/_learning_rate/.A": "new"}
    cases = [
        ({**fresh, "model/t/embeddings/.A": [4, 2]}, "model/t/embeddings/.A has shape [5, 2] "
         "in the previous checkpoint and [4, 2]"),                       # shrunk
        ({**fresh, "model/d/kernel/.A": [2, 4]}, "model/d/kernel/.A has shape [2, 3]"),
        ({**fresh, "model/x/.A": [1]}, "model/x/.A (shape [1]) is not in the previous"),
        ({k: v for k, v in fresh.items() if k != "model/d/kernel/.A"},
         "model/d/kernel/.A (shape [2, 3]) of the previous checkpoint has no place"),
    ]
    for new, expected in cases:
        with pytest.raises(ws.WarmStartError, match=re.escape(expected)):
            ws.plan_restore(prev, new, [8, 3])
    with pytest.raises(ws.WarmStartError, match=re.escape(  # 8 is no vocabulary size
            "variable model/t/embeddings/.A has shape [5, 2] in the previous checkpoint "
            "and [8, 2]")):
        ws.plan_restore(prev, fresh, [9, 3])
    # Data of the new artifacts (the ID keep mask) may appear or go: built from the new counts.
    mask = "model/f/item_id_keep_mask/.A"
    no_mask = {k: v for k, v in prev.items() if k != mask}
    assert ws.plan_restore(no_mask, fresh, [8, 3])[mask] == "new"
    assert mask not in ws.plan_restore(prev, {k: v for k, v in fresh.items() if k != mask}, [8])


class _Masked(tf.Module):
    """An item table and, when given, an ID keep mask, under the checkpoint names of the model
    (``.../item_id_keep_mask/...``)."""

    def __init__(self, table, mask=None):
        super().__init__()
        self.item_embedding = tf.Variable(np.asarray(table, np.float32))
        if mask is not None:
            self.item_id_keep_mask = tf.Variable(np.asarray(mask, np.float32))


def test_keep_mask_keeps_old_ids_in_use_and_takes_new_ids_from_the_new_counts(tmp_path):
    table = np.arange(10, dtype=np.float32).reshape(5, 2)
    grown = np.full((7, 2), -1.0, np.float32)
    cases = [  # (previous mask or None, the new build's mask, expected by hand)
        ([1, 1, 0, 1, 0], [1, 0, 1, 0, 0, 1, 0], [1, 1, 1, 1, 0, 1, 0]),
        (None, [1, 0, 0, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1, 0]),  # no mask before: all in use
    ]
    for i, (before, built, expected) in enumerate(cases):
        prefix = tf.train.Checkpoint(model=_Masked(table, before)).write(
            str(tmp_path / f"prev{i}" / "model"))
        new = _Masked(grown, built)
        ws.restore_grown(new, prefix, [7], str(tmp_path / f"work{i}"))
        assert new.item_id_keep_mask.numpy().tolist() == expected
        assert np.array_equal(new.item_embedding.numpy()[:5], table)
        assert (new.item_embedding.numpy()[5:] == -1).all()
    # The text table is data of the new artifacts: the new build's rows, old items' too.
    prev_text, new_text = tf.Module(), tf.Module()
    prev_text.item_text_table = tf.Variable(np.ones((5, 3), np.float32))
    new_text.item_text_table = tf.Variable(np.full((7, 3), 2.0, np.float32))
    prefix = tf.train.Checkpoint(model=prev_text).write(str(tmp_path / "prev_text" / "model"))
    ws.restore_grown(new_text, prefix, [7], str(tmp_path / "work_text"))
    assert (new_text.item_text_table.numpy() == 2.0).all()
    # A mask that goes (every item now has enough clicks) is no mismatch.
    prefix = tf.train.Checkpoint(model=_Masked(table, [1, 0, 1, 1, 1])).write(
        str(tmp_path / "prev_mask" / "model"))
    new = _Masked(grown)
    ws.restore_grown(new, prefix, [7], str(tmp_path / "work_mask"))
    assert np.array_equal(new.item_embedding.numpy()[:5], table)


def _vocab(folder, name, lines):
    os.makedirs(os.path.join(folder, "vocab"), exist_ok=True)
    with open(os.path.join(folder, "vocab", name), "w", encoding="utf-8") as fh:
        fh.write("".join(f"{x}\n" for x in lines))


def test_append_only_check_names_the_field_and_the_moved_line(tmp_path):
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    _vocab(old, "item_id.txt", ["a", "b", "c"])
    _vocab(old, "item_id_counts.txt", [5, 3, 1])
    _vocab(old, "tag.txt", ["x"])
    _vocab(new, "item_id.txt", ["a", "b", "c", "d"])
    _vocab(new, "item_id_counts.txt", [9, 3, 1, 4])  # counts change: not checked
    _vocab(new, "tag.txt", ["x", "y"])
    assert ws.check_append_only(old, new) is None
    _vocab(new, "item_id.txt", ["a", "c", "b", "d"])  # re-sorted by frequency
    with pytest.raises(ws.WarmStartError, match=r"vocab/item_id.txt is not append-only: line 2 "
                                                r"was 'b' .* now 'c'"):
        ws.check_append_only(old, new)
    _vocab(new, "item_id.txt", ["a", "b", "c"])
    _vocab(new, "tag.txt", [])
    with pytest.raises(ws.WarmStartError, match=r"tag.txt .* line 1 was 'x' .* now nothing"):
        ws.check_append_only(old, new)
    assert "not checked" in ws.check_append_only(str(tmp_path / "gone"), new)


def _finished_run(folder):
    """A folder that passes as a finished run from before run_state.json."""
    os.makedirs(folder, exist_ok=True)
    for name, text in (("config.yaml", "name: x\n"), ("metrics.json", "{}")):
        with open(os.path.join(folder, name), "w") as fh:
            fh.write(text)
    return str(folder)


def test_update_config_defaults_and_validation(tmp_path):
    cfg = from_dict({})
    assert cfg.train.warm_start_from == "" and cfg.train.warm_start_epochs == 1
    assert ws.update_config(cfg) is cfg and cfg.train.epochs == 10  # today's behaviour
    run = _finished_run(tmp_path / "run")
    update = ws.update_config(cfg.replace({"train.warm_start_from": run}))
    assert update.train.epochs == 1
    three = cfg.replace({"train.warm_start_from": run, "train.warm_start_epochs": 3})
    assert ws.update_config(three).train.epochs == 3
    with pytest.raises(ws.WarmStartError, match="is not a folder"):
        ws.update_config(cfg.replace({"train.warm_start_from": str(tmp_path / "nowhere")}))
    with pytest.raises(ConfigError, match="train.warm_start_epochs"):
        cfg.replace({"train.warm_start_epochs": 0})


def test_train_command_refuses_a_bad_source_in_one_line_before_touching_the_run(tmp_path,
                                                                               capsys):
    from micrec_tf import cli
    from micrec_tf.train import main

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "t", "artifacts_root": str(tmp_path / "a")}))
    run = tmp_path / "runs" / "update"
    code = cli.run(main, ["--config", str(config), "--run-dir", str(run), "--set",
                          f"train.warm_start_from={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "train.warm_start_from" in err[0]
    assert "is not a folder" in err[0] and not run.exists()


def test_model_keys_must_match():
    cfg = from_dict({"model": {"embedding_dim": 16}})
    ws.check_same_model({"model": {"name": cfg.model.name, "embedding_dim": 16}}, cfg)
    with pytest.raises(ws.WarmStartError, match="model.embedding_dim is 16 but the previous "
                                                "run's is 32"):
        ws.check_same_model({"model": {"name": cfg.model.name, "embedding_dim": 32}}, cfg)
    with pytest.raises(ws.WarmStartError, match="model.name"):
        ws.check_same_model({"model": {"name": "other", "embedding_dim": 16}}, cfg)


def test_source_folders(tmp_path):
    with pytest.raises(ws.WarmStartError, match="is not a folder"):
        ws.resolve_run_dir(str(tmp_path / "nowhere"))
    with pytest.raises(ws.WarmStartError, match="neither a run folder"):
        ws.resolve_run_dir(str(tmp_path))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")
    with pytest.raises(ws.WarmStartError, match="did not finish|no run_state.json"):
        ws.resolve_run_dir(str(run))  # no finished training
    (run / "metrics.json").write_text("{}")  # a run from before run_state.json
    version = tmp_path / "exports" / "3"
    version.mkdir(parents=True)
    (version / "metadata.json").write_text(json.dumps({"run_dir": str(run)}))
    assert ws.resolve_run_dir(str(version)) == str(run)
    (version / "metadata.json").write_text(json.dumps(
        {"run_dir": str(run), "config": {"name": "x", "export": {"top_k": 7}},
         "training_metrics": {}}))  # the export's own settings do not count
    assert ws.resolve_run_dir(str(version)) == str(run)
    for meta in ({"config": {"name": "y"}}, {"training_metrics": {"valid": {"hit@50": 0.3}}}):
        (version / "metadata.json").write_text(json.dumps({"run_dir": str(run), **meta}))
        with pytest.raises(ws.WarmStartError, match="was trained again since"):
            ws.resolve_run_dir(str(version))  # the run folder no longer holds that training
    (version / "metadata.json").write_text("{not json")
    with pytest.raises(ws.WarmStartError, match="metadata.json cannot be read"):
        ws.resolve_run_dir(str(version))
    (version / "metadata.json").write_text(json.dumps({"run_dir": str(tmp_path / "gone")}))
    with pytest.raises(ws.WarmStartError, match="is gone"):
        ws.resolve_run_dir(str(version))


# ---- end to end on the tiny pipeline (slow: a training) ----

NEW_ITEMS = 3


def _grow_artifacts(src: str, dst: str) -> None:
    """A copy of ``src`` as the append-only preprocess would write it after NEW_ITEMS new
    items (one with a new tag) and one new user arrived: every vocabulary extended at its end,
    the item table and the co-occurrence table (empty rows) with them; the examples unchanged."""
    shutil.copytree(src, dst)
    voc = os.path.join(dst, "vocab")

    def append(name, lines):
        with open(os.path.join(voc, name), "a", encoding="utf-8") as fh:
            fh.write("".join(f"{x}\n" for x in lines))

    with open(os.path.join(voc, "item_id.txt"), encoding="utf-8") as fh:
        old_items = sum(1 for _ in fh)
    with open(os.path.join(voc, "tag.txt"), encoding="utf-8") as fh:
        old_tags = sum(1 for _ in fh)
    append("item_id.txt", [f"new{i}" for i in range(NEW_ITEMS)])
    if os.path.exists(os.path.join(voc, "item_id_counts.txt")):
        append("item_id_counts.txt", [0] * NEW_ITEMS)
    append("tag.txt", ["brand-new-tag"])
    append("user_id.txt", ["new-user"])
    items_path = os.path.join(dst, "items", "items.jsonl")
    with open(items_path, encoding="utf-8") as fh:
        extra = {k: 1 for k in json.loads(fh.readline())["extra"]}
    with open(items_path, "a", encoding="utf-8") as fh:
        for i in range(NEW_ITEMS):
            fh.write(json.dumps({"item": old_items + 1 + i, "item_id": f"new{i}",
                                 "title": "A fresh arrival", "tags": [1, old_tags + 1],
                                 "provider": 1, "extra": extra}) + "\n")
    spec_path = os.path.join(dst, "examples", "feature_spec.json")
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    for field, n in (("item_id", NEW_ITEMS), ("tag", 1), ("user_id", 1)):
        spec["vocab_sizes"][field] += n
    with open(spec_path, "w", encoding="utf-8") as fh:
        json.dump(spec, fh)
    co_path = os.path.join(dst, "cooccurrence", "cooccurrence.npz")
    with np.load(co_path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["indptr"] = np.concatenate(
        [arrays["indptr"], np.full(NEW_ITEMS, arrays["indptr"][-1], arrays["indptr"].dtype)])
    np.savez_compressed(co_path, **arrays)


@pytest.fixture(scope="module")
def previous(tiny_pipeline, tmp_path_factory):
    """(cfg, tmp, the previous run folder, its checkpoint prefix): one epoch on the tiny data."""
    from micrec_tf.train import train

    cfg, _ = tiny_pipeline
    tmp = str(tmp_path_factory.mktemp("warm"))
    run_dir = os.path.join(tmp, "runs", "previous")
    train(cfg.replace({"train.epochs": 1}), run_dir=run_dir, evaluate_test=False,
          log=lambda *a: None)
    return cfg, tmp, run_dir, os.path.join(run_dir, "checkpoint", "model")


def _built_model(cfg):
    """The model of ``cfg`` built as micrec_tf.train builds it (every variable and slot)."""
    from micrec_tf.data.artifacts import load_artifacts
    from micrec_tf.data.input import make_dataset
    from micrec_tf.model import build_model

    art = load_artifacts(cfg.artifacts_dir)
    model = build_model(cfg, art.item_table, art.vocab_sizes, art.user_fields, art.cooccurrence,
                        art.title_neighbours)
    model.compile(optimizer=tf_keras.optimizers.Adam(cfg.train.learning_rate))
    model.compute_losses(next(iter(make_dataset(cfg.artifacts_dir, "valid", 8))))
    model.optimizer.build(model.trainable_variables)
    return model, art


def _checkpoint_of(model, path):
    return tf.train.load_checkpoint(tf.train.Checkpoint(model=model).write(path))


@pytest.mark.slow
def test_zero_steps_on_grown_artifacts_keep_every_old_value(previous, tmp_path):
    cfg, tmp, run_dir, prefix = previous
    old = tf.train.load_checkpoint(prefix)
    old_shapes = old.get_variable_to_shape_map()
    item_key = ("model/user_tower/item_field_embeddings/item_embedding/embeddings/"
                ".ATTRIBUTES/VARIABLE_VALUE")
    grown_root = str(tmp_path / "artifacts")
    _grow_artifacts(cfg.artifacts_dir, os.path.join(grown_root, cfg.name))
    for root, added in ((cfg.artifacts_root, 0), (grown_root, NEW_ITEMS)):
        new_cfg = cfg.replace({"artifacts_root": root, "train.warm_start_from": run_dir})
        model, art = _built_model(new_cfg)
        out = str(tmp_path / f"run{added}")
        os.makedirs(out)
        summary = ws.warm_start(model, new_cfg, out, art.vocab_sizes.values(), log=lambda *a: None)
        assert not [p for p in os.listdir(out) if p.startswith(".warm_start")]  # scratch removed
        new = _checkpoint_of(model, str(tmp_path / f"after{added}" / "model"))
        new_shapes = new.get_variable_to_shape_map()
        # Only data of the new artifacts may appear: the ID keep mask, once unclicked new items
        # are masked (model.min_id_clicks), built from the new item counts.
        appeared = set(new_shapes) - set(old_shapes)
        assert set(old_shapes) <= set(new_shapes)
        assert appeared == ({"model/user_tower/item_field_embeddings/item_id_keep_mask/"
                             ".ATTRIBUTES/VARIABLE_VALUE"} if added and cfg.model.min_id_clicks
                            else set())
        for key in appeared:  # 1 = the ID row is used: every old item, no new (unclicked) one
            assert new.get_tensor(key).tolist() == [1.0] * old_shapes[item_key][0] + [0.0] * added
        grown = 0
        for key, shape in old_shapes.items():
            a, b = old.get_tensor(key), new.get_tensor(key)
            if key == ws.OBJECT_GRAPH:
                continue
            assert np.array_equal(b[:shape[0]] if shape else b, a), key
            if list(new_shapes[key]) != shape:
                grown += 1
                assert new_shapes[key][1:] == shape[1:], key
                if "/optimizer/_variables/" in key:
                    assert not b[shape[0]:].any(), key  # new Adam rows are zero
        assert new_shapes[item_key][0] == old_shapes[item_key][0] + added
        if added:
            assert summary["rows_added"][item_key.split("/.ATTRIBUTES")[0]] == NEW_ITEMS
            # The item ID and tag tables (MicRec embeds no user ID), each with Adam's m and v.
            assert grown == 2 * 3
            assert {k.split("/")[-2] for k in summary["rows_added"]} == {"item_embedding",
                                                                        "tag_embedding"}
            assert np.abs(new.get_tensor(item_key)[-NEW_ITEMS:]).max() > 0  # initialised rows
        else:
            assert grown == 0 and summary["grown"] == {}


@pytest.mark.slow
def test_refused_mismatch_names_the_variable(previous, tmp_path):
    cfg, tmp, run_dir, _ = previous
    other = cfg.replace({"model.cl": ["feature", "semantic"], "train.warm_start_from": run_dir})
    model, art = _built_model(other)
    out = str(tmp_path / "out")
    os.makedirs(out)
    with pytest.raises(ws.WarmStartError, match=r"variable model/\S*session_cl\S* \(shape \[") as e:
        ws.warm_start(model, other, out, art.vocab_sizes.values(), log=lambda *a: None)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_one_pass_update_on_grown_artifacts_gives_new_items_vectors(previous, tmp_path):
    from micrec_tf.train import train

    cfg, tmp, run_dir, prefix = previous
    grown_root = str(tmp_path / "artifacts")
    _grow_artifacts(cfg.artifacts_dir, os.path.join(grown_root, cfg.name))
    # From an export version of the previous run: its metadata.json names the run folder.
    from export.export_model import export_run

    version = export_run(cfg, run_dir=run_dir, export_root=str(tmp_path / "exports"),
                         log=lambda *a: None)
    update = cfg.replace({"artifacts_root": grown_root, "train.warm_start_from": version,
                          "train.epochs": 5})
    out = str(tmp_path / "runs" / "update")
    lines = []
    res = train(update, run_dir=out, evaluate_test=False, log=lines.append)
    assert res["epochs_run"] == 1  # one pass (train.warm_start_epochs), not train.epochs 5
    assert len(res["history"]["sampled_softmax_loss"]) == 1
    assert any(str(line).startswith("[train] warm start from") for line in lines)
    with open(os.path.join(out, "config.yaml"), encoding="utf-8") as fh:
        assert yaml.safe_load(fh)["train"]["warm_start_from"] == version
    old_iterations = int(tf.train.load_checkpoint(prefix).get_tensor(
        "model/optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))
    with open(os.path.join(update.artifacts_dir, "examples", "feature_spec.json")) as fh:
        n_train = json.load(fh)["num_examples"]["train"]
    steps = -(-n_train // update.train.batch_size)  # ceil: one epoch's batches
    assert old_iterations == steps  # the previous run's single epoch
    assert int(res["model"].optimizer.iterations.numpy()) == old_iterations + steps
    vectors = res["model"].item_embeddings().numpy()
    old_items = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()[
        "model/user_tower/item_field_embeddings/item_embedding/embeddings/.ATTRIBUTES/"
        "VARIABLE_VALUE"][0]
    assert vectors.shape[0] == old_items + NEW_ITEMS
    new_vectors = vectors[-NEW_ITEMS:]
    assert np.all(np.isfinite(new_vectors)) and np.linalg.norm(new_vectors, axis=1).min() > 0
    assert res["warm_start"]["from"] == os.path.abspath(run_dir)


@pytest.mark.slow
def test_update_on_append_only_artifacts_of_the_preprocess(tiny_pipeline, tmp_path):
    """With the real append-only preprocess (preprocess.previous_artifacts): yesterday's
    catalogue lacks 10 items; today's artifacts grow from yesterday's, and the update
    warm-starts from yesterday's run, with a row per new vocabulary line (plain reads)."""
    from pipelines import preprocess, title_neighbours
    from micrec_tf.train import train

    cfg, tmp = tiny_pipeline
    full = os.path.join(tmp, "data")
    day1 = str(tmp_path / "day1")
    os.makedirs(day1)
    held = {f"i{k}" for k in range(290, 300)}
    for name in ("interactions.tsv", "items.tsv", "users.tsv"):
        with open(os.path.join(full, name), encoding="utf-8") as fh:
            lines = fh.readlines()
        column = 1 if name == "interactions.tsv" else 0
        keep = [ln for n, ln in enumerate(lines)
                if n == 0 or name == "users.tsv" or ln.split("\t")[column] not in held]
        with open(os.path.join(day1, name), "w", encoding="utf-8") as fh:
            fh.writelines(keep)

    def artifacts(name, data_dir, previous=""):
        c = cfg.replace({"name": name, "data.dataset": "canonical", "data.data_dir": data_dir,
                         "artifacts_root": str(tmp_path / "artifacts"),
                         "preprocess.previous_artifacts": previous,
                         "train.runs_dir": str(tmp_path / "runs")})
        preprocess.run(c, verbose=False)
        title_neighbours.run(c, verbose=False)
        return c

    c1 = artifacts("day1", day1)
    run1 = os.path.join(str(tmp_path / "runs"), "day1")
    train(c1.replace({"train.epochs": 1}), run_dir=run1, evaluate_test=False,
          log=lambda *a: None)
    c2 = artifacts("day2", full, previous=c1.artifacts_dir)

    def lines(c, name):
        with open(os.path.join(c.artifacts_dir, "vocab", name), encoding="utf-8") as fh:
            return fh.read().split("\n")[:-1]

    old_ids, new_ids = lines(c1, "item_id.txt"), lines(c2, "item_id.txt")
    assert new_ids[:len(old_ids)] == old_ids and set(new_ids[len(old_ids):]) <= held
    assert len(new_ids) > len(old_ids)
    res = train(c2.replace({"train.warm_start_from": run1}), run_dir=str(tmp_path / "runs" / "d2"),
                evaluate_test=False, log=lambda *a: None)
    added = res["warm_start"]["rows_added"]
    assert added["model/user_tower/item_field_embeddings/item_embedding/embeddings"] == \
        len(new_ids) - len(old_ids)
    tags_added = len(lines(c2, "tag.txt")) - len(lines(c1, "tag.txt"))
    assert added.get("model/user_tower/item_field_embeddings/tag_embedding/embeddings",
                     0) == tags_added
    vectors = res["model"].item_embeddings().numpy()
    assert vectors.shape[0] == len(new_ids) + 1 and np.all(np.isfinite(vectors))
    assert np.linalg.norm(vectors[len(old_ids) + 1:], axis=1).min() > 0


@pytest.mark.slow
def test_update_on_an_empty_window_leaves_every_value_as_the_previous_run(previous, tmp_path):
    import glob

    from micrec_tf.train import train

    cfg, tmp, run_dir, prefix = previous
    root = str(tmp_path / "artifacts")
    art = os.path.join(root, cfg.name)
    shutil.copytree(cfg.artifacts_dir, art)
    for path in glob.glob(os.path.join(art, "examples", "train-*")):
        os.remove(path)
    with tf.io.TFRecordWriter(os.path.join(art, "examples", "train-00000-of-00001.tfrecord.gz"),
                              options="GZIP"):
        pass  # a window without a training click
    spec_path = os.path.join(art, "examples", "feature_spec.json")
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    spec["num_examples"]["train"] = 0
    with open(spec_path, "w", encoding="utf-8") as fh:
        json.dump(spec, fh)
    out = str(tmp_path / "runs" / "empty")
    res = train(cfg.replace({"artifacts_root": root, "train.warm_start_from": run_dir}),
                run_dir=out, evaluate_test=False, log=lambda *a: None)
    assert res["epochs_run"] == 0
    old = tf.train.load_checkpoint(prefix)
    new = tf.train.load_checkpoint(os.path.join(out, "checkpoint", "model"))
    keys = set(old.get_variable_to_shape_map()) - {ws.OBJECT_GRAPH}
    assert keys == set(new.get_variable_to_shape_map()) - {ws.OBJECT_GRAPH}
    for key in sorted(keys):
        assert np.array_equal(new.get_tensor(key), old.get_tensor(key)), key


@pytest.mark.slow
def test_streaming_frequency_state_grows_with_the_prior_for_new_items(tiny_pipeline, tmp_path):
    """loss.in_batch_negatives: the logQ estimator's [V] state (last step seen, mean gap) keeps
    the old items' values and starts the new items where a build does: gap = max(1, (V - 1) /
    batch), last seen 0 (the formula of losses.StreamingFrequencyEstimator, by hand)."""
    from micrec_tf.train import train

    cfg, _ = tiny_pipeline
    cfg = cfg.replace({"loss.in_batch_negatives": True})
    run_dir = str(tmp_path / "runs" / "previous")
    train(cfg.replace({"train.epochs": 1}), run_dir=run_dir, evaluate_test=False,
          log=lambda *a: None)
    grown_root = str(tmp_path / "artifacts")
    _grow_artifacts(cfg.artifacts_dir, os.path.join(grown_root, cfg.name))
    new_cfg = cfg.replace({"artifacts_root": grown_root, "train.warm_start_from": run_dir})
    model, art = _built_model(new_cfg)
    ws.warm_start(model, new_cfg, str(tmp_path), art.vocab_sizes.values(), log=lambda *a: None)
    old = tf.train.load_checkpoint(os.path.join(run_dir, "checkpoint", "model"))
    new = _checkpoint_of(model, str(tmp_path / "after" / "model"))
    keys = {name: [k for k in old.get_variable_to_shape_map() if f"/frequency/{name}/" in k]
            for name in ("delta", "last_seen", "step")}
    assert all(len(k) == 1 for k in keys.values()), keys
    delta_old, delta_new = (r.get_tensor(keys["delta"][0]) for r in (old, new))
    seen_old, seen_new = (r.get_tensor(keys["last_seen"][0]) for r in (old, new))
    v_old = delta_old.shape[0]
    v_new = v_old + NEW_ITEMS
    assert delta_new.shape == seen_new.shape == (v_new,)
    prior = max(1.0, (v_new - 1) / cfg.train.batch_size)
    assert (delta_old != max(1.0, (v_old - 1) / cfg.train.batch_size)).any()  # it was trained
    assert np.array_equal(delta_new[:v_old], delta_old)
    assert np.array_equal(seen_new[:v_old], seen_old) and seen_old.max() > 0
    np.testing.assert_allclose(delta_new[v_old:], prior, rtol=1e-6)
    assert not seen_new[v_old:].any()
    assert new.get_tensor(keys["step"][0]) == old.get_tensor(keys["step"][0]) > 0
