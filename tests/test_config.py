"""Config loading and validation: unknown keys and bad values are errors naming the key."""
import glob
import os

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from micrec_tf.config import Config, ConfigError, from_dict, load_config, parse_overrides


def _write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.artifacts_dir.endswith(cfg.name)


def test_defaults_follow_the_paper():
    cfg = from_dict({})
    assert (cfg.loss.lambda_feature, cfg.loss.lambda_semantic, cfg.loss.lambda_session) == (1.0, 0.3, 0.1)
    assert cfg.loss.mask_ratio == 0.5 and cfg.loss.num_cl_negatives == 50
    assert cfg.train.batch_size == 4096 and cfg.train.learning_rate == 0.001
    assert cfg.preprocess.history_length == 20 and cfg.preprocess.session_window_s == 3600
    assert cfg.model.embedding_dim == 64 and cfg.model.output_dim == 64


def test_unknown_key_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="lambda_sesion"):
        load_config(_write(tmp_path, {"loss": {"lambda_sesion": 0.1}}))
    with pytest.raises(ConfigError, match="trian"):
        load_config(_write(tmp_path, {"trian": {}}))


@pytest.mark.parametrize("raw, needle", [
    ({"train": {"batch_size": "big"}}, "train.batch_size"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"loss": {"mask_ratio": 1.5}}, "loss.mask_ratio"),
    ({"model": {"name": "bert4rec"}}, "bert4rec"),
    ({"model": {"cl": ["feature", "graph"]}}, "graph"),
    ({"preprocess": {"split_fractions": [0.5, 0.5, 0.5]}}, "split_fractions"),
    ({"preprocess": {"split": "random"}}, "random"),
    ({"semantic": {"source": "vectors"}}, "vectors_path"),
    ({"loss": {"num_negatives": 0}}, "num_negatives"),
    ({"train": {"mixed_precision": True}}, "train.mixed_precision"),
    ({"loss": {"cl_similarity": "euclid"}}, "loss.cl_similarity.*euclid"),
    ({"loss": {"cl_anchors": "popular"}}, "loss.cl_anchors.*popular"),
    ({"loss": {"session_positives": "sqrt"}}, "loss.session_positives.*sqrt"),
])
def test_bad_values_are_clear_errors(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(raw)


def test_presets_expand():
    cfg = from_dict({"model": {"preset": "rfm_star"}})
    assert cfg.model.name == "ican" and cfg.model.cl == ["feature"]
    assert cfg.loss.feature_dropout == "element"
    cfg = from_dict({"model": {"preset": "cfm"}})
    assert cfg.loss.feature_dropout == "correlated"
    # Explicit keys win over the preset.
    cfg = from_dict({"model": {"preset": "micrec", "cl": ["session"]}})
    assert cfg.model.cl == ["session"]


def test_overrides():
    cfg = from_dict({}).replace(parse_overrides(["loss.lambda_session=0.5", "model.cl=[feature]"]))
    assert cfg.loss.lambda_session == 0.5 and cfg.model.cl == ["feature"]
    with pytest.raises(ConfigError, match="loss.nope"):
        from_dict({}).replace({"loss.nope": 1})
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_missing_file_is_clear():
    with pytest.raises(ConfigError, match="not found"):
        load_config(os.path.join(ROOT, "configs", "does-not-exist.yaml"))
