"""Architecture hygiene: no module-level mutable state, maintained protos, restored global policy."""
from export import serving


def test_serving_protos_are_the_tensorflow_serving_api_messages():
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    log, request, response = serving.serving_protos()
    assert log is prediction_log_pb2.PredictionLog
    assert request is predict_pb2.PredictRequest
    assert response is predict_pb2.PredictResponse
    assert not hasattr(serving, "_PROTOS")
