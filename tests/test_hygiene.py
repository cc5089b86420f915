"""Architecture hygiene: no module-level mutable state, maintained protos, restored dtype policy."""
from export import serving


def test_serving_protos_are_the_tensorflow_serving_api_messages():
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    log, request, response = serving.serving_protos()
    assert log is prediction_log_pb2.PredictionLog
    assert request is predict_pb2.PredictRequest
    assert response is predict_pb2.PredictResponse
    assert not hasattr(serving, "_PROTOS")


# ----------------------------------------------------------------------------- global dtype policy
def _policy_name():
    import tf_keras

    return tf_keras.mixed_precision.global_policy().name


def test_policy_scope_restores_the_previous_policy_also_on_error():
    import pytest
    import tf_keras

    from micrec_tf.precision import policy_scope

    tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        with policy_scope("float32") as policy:
            assert policy.name == "float32" == _policy_name()
            with policy_scope("mixed_float16"):
                assert _policy_name() == "mixed_float16"
                assert tf_keras.layers.Dense(2).dtype_policy.compute_dtype == "float16"
            assert _policy_name() == "float32"
        assert _policy_name() == "mixed_bfloat16"
        with pytest.raises(RuntimeError, match="boom"):
            with policy_scope("mixed_float16"):
                raise RuntimeError("boom")
        assert _policy_name() == "mixed_bfloat16"
        with pytest.raises(ValueError, match="Received: name='float16'"):
            with policy_scope("float16"):
                pass
        assert _policy_name() == "mixed_bfloat16"
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")


def test_train_and_export_leave_the_global_policy_as_they_found_it(tiny_pipeline, tmp_path):
    """A caller's policy (here mixed_bfloat16, which neither train nor export uses on a CPU) is
    the global policy again after ``train()`` and after ``export_run()``; the exported model was
    still built in float32."""
    import tf_keras

    from conftest import tiny_config
    from export import export_model
    from micrec_tf.train import train

    _, tmp = tiny_pipeline
    cfg = tiny_config(tmp, train={"epochs": 1, "runs_dir": str(tmp_path / "runs")},
                      export={"exports_dir": str(tmp_path / "exports"), "index": "brute_force"})
    tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        res = train(cfg, evaluate_test=False, log=lambda *a: None)
        assert _policy_name() == "mixed_bfloat16"
        assert {layer.dtype_policy.name for layer in res["model"].submodules
                if isinstance(layer, tf_keras.layers.Layer)} == {"float32"}
        export_model.export_run(cfg, log=lambda *a: None)
        assert _policy_name() == "mixed_bfloat16"
        model, _, _ = export_model.restore_for_export(cfg.run_dir)
        assert _policy_name() == "mixed_bfloat16"
        assert model.item_embeddings().dtype == "float32"
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
