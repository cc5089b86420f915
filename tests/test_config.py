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
    lambdas = (cfg.loss.lambda_feature, cfg.loss.lambda_semantic, cfg.loss.lambda_session)
    assert lambdas == (1.0, 0.3, 0.1)
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
    ({"loss": {"lambda_feature": -1.0}}, "loss.lambda_feature must be >= 0"),
    ({"loss": {"lambda_semantic": -0.5}}, "loss.lambda_semantic must be >= 0"),
    ({"loss": {"lambda_session": -0.1}}, "loss.lambda_session must be >= 0"),
    ({"loss": {"feature_dropout": "gaussian"}}, "loss.feature_dropout.*gaussian"),
    ({"loss": {"semantic_positives": "every"}}, "loss.semantic_positives.*every"),
    ({"model": {"history_embeddings": "fast"}}, "model.history_embeddings.*fast"),
    ({"model": {"attention": "flash"}}, "model.attention.*flash"),
    ({"preprocess": {"time_range": [5, 5]}}, r"preprocess.time_range.*got \[5, 5\]"),
    ({"preprocess": {"time_range": [1.5, 9]}}, r"preprocess.time_range.*got \[1.5, 9\]"),
    ({"preprocess": {"time_range": [1]}}, r"preprocess.time_range.*got \[1\]"),
    ({"preprocess": {"time_range": "2026"}}, "preprocess.time_range.*got '2026'"),
    ({"export": {"keep_versions": 1}}, "export.keep_versions.*got 1"),
    ({"export": {"keep_versions": -2}}, "export.keep_versions.*got -2"),
    ({"export": {"keep_versions": True}}, "export.keep_versions.*got True"),
    ({"export": {"keep_versions": 2.5}}, "export.keep_versions.*got 2.5"),
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
    # An explicit key of the same layer that disagrees with the preset is an error naming both.
    with pytest.raises(ConfigError, match=r"model.preset='micrec'.*model.cl=\['session'\]"):
        from_dict({"model": {"preset": "micrec", "cl": ["session"]}})
    # ... and one that agrees is fine.
    assert from_dict({"model": {"preset": "ican", "cl": []}}).model.cl == []


def test_preset_on_the_command_line_sets_what_it_names(tmp_path):
    """``--set model.preset=ican`` over a YAML that lists CL terms trains ICAN."""
    path = _write(tmp_path, {"model": {"name": "ican", "cl": ["feature", "semantic", "session"]}})
    cfg = load_config(path, parse_overrides(["model.preset=ican"]))
    assert (cfg.model.preset, cfg.model.name, cfg.model.cl) == ("ican", "ican", [])
    cfg = load_config(path, parse_overrides(["model.preset=cfm"]))
    assert cfg.model.cl == ["feature"] and cfg.loss.feature_dropout == "correlated"
    # The saved config (config.yaml) reloads to the same model.
    assert from_dict(cfg.to_dict()) == cfg
    # A preset and a disagreeing key in the same overrides: an error naming both.
    with pytest.raises(ConfigError, match=r"model.preset='ican' sets model.cl=\[\].*model.cl="):
        load_config(path, parse_overrides(["model.preset=ican", "model.cl=[feature]"]))
    # Overriding a key the YAML's preset set, to another value, drops the preset's name.
    path = _write(tmp_path, {"model": {"preset": "micrec"}})
    cfg = load_config(path, parse_overrides(["model.cl=[session]"]))
    assert cfg.model.cl == ["session"] and cfg.model.preset == ""
    cfg = load_config(path, parse_overrides(["loss.temperature=0.5"]))
    assert cfg.model.preset == "micrec" and cfg.model.cl == ["feature", "semantic", "session"]
    with pytest.raises(ConfigError, match="model.preset must be one of"):
        load_config(path, parse_overrides(["model.preset=icn"]))


def test_real_dataset_without_data_dir_says_so(tmp_path):
    """No silent fall-back to the synthetic folder."""
    with pytest.raises(ConfigError, match="data.data_dir is missing.*movielens_1m"):
        load_config(_write(tmp_path, {"data": {"dataset": "movielens_1m"}}))
    assert from_dict({}).data.data_dir == "data/generated/synthetic"


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


@pytest.mark.parametrize("override, key", [
    ("train.learning_rate=.nan", "train.learning_rate"),
    ("loss.temperature=.inf", "loss.temperature"),
    ("loss.lambda_session=-.inf", "loss.lambda_session"),
    ("preprocess.split_fractions=[.nan,0,0]", "preprocess.split_fractions"),
    ("preprocess.split_fractions=[.inf,0,0]", "preprocess.split_fractions"),
    ("model.dropout=.nan", "model.dropout"),
])
def test_non_finite_numbers_are_refused(override, key):
    """NaN slips past every ``<``/``>`` range check (each comparison is False) and past the
    split-fraction sum check (``abs(nan - 1) > 1e-6`` is False): refused up front, by key."""
    with pytest.raises(ConfigError, match=rf"{key}.*(nan|inf)"):
        from_dict({}).replace(parse_overrides([override]))


def test_non_finite_number_in_a_yaml_file_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: .NaN\n")
    with pytest.raises(ConfigError, match="train.learning_rate must be a finite number"):
        load_config(str(path))


def test_malformed_config_files_are_config_errors(tmp_path):
    """Every way a config file or an override can be unreadable is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=r"--set model\.cl=\[feature.*not valid YAML"):
        parse_overrides(["model.cl=[feature"])
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml.*not UTF-8.*line 1"):
        load_config(str(latin1))
    as_list = tmp_path / "list.yaml"
    as_list.write_text("- name: x\n- train: {}\n")
    with pytest.raises(ConfigError, match=r"list\.yaml.*must be a mapping.*list"):
        load_config(str(as_list))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match=r"scalar\.yaml.*must be a mapping"):
        load_config(str(scalar))


def test_keep_versions_accepts_zero_and_two_or_more():
    assert from_dict({}).export.keep_versions == 0  # keep every version, as before
    assert from_dict({"export": {"keep_versions": 2}}).export.keep_versions == 2
    assert from_dict({"export": {"keep_versions": 30}}).export.keep_versions == 30
