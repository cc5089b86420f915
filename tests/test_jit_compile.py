"""benchmarks/xla_cpu.py (issue 31, XLA on CPU): the transformer compiled with XLA computes the
uncompiled block's function and gradients (the reference: the same layer, same weights, no
XLA), the error parsing against a hand-written XLA message, argument errors, and (slow) a tiny
run's report: the whole MicRec step fails to compile naming the semantic CL sampler's op."""
import micrec_tf  # noqa: F401

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import xla_cpu
from micrec_tf import layers as L


class _Tower:
    def __init__(self, blocks):
        self.blocks = blocks


class _Model:
    def __init__(self, blocks):
        self.user_tower = _Tower(blocks)


@pytest.mark.parametrize("attention", ["matmul", "einsum"])
def test_compiled_block_matches_the_uncompiled_layer(attention):
    rng = np.random.default_rng(3)
    x = tf.constant(rng.standard_normal((5, 4, 8)).astype(np.float32))
    mask = tf.constant(np.arange(4)[None, :] < np.array([4, 1, 3, 2, 4])[:, None])
    plain = L.TransformerEncoderBlock(2, attention=attention)
    jit = L.TransformerEncoderBlock(2, attention=attention)
    plain(x, mask=mask)
    jit(x, mask=mask)
    jit.set_weights(plain.get_weights())
    assert xla_cpu.jit_transformer_blocks(_Model([jit])) == 1
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ya, yb = plain(x, mask=mask, training=True), jit(x, mask=mask, training=True)
        la, lb = tf.reduce_sum(ya * ya), tf.reduce_sum(yb * yb)
    np.testing.assert_allclose(yb.numpy(), ya.numpy(), rtol=1e-5, atol=1e-5)
    # Padded query positions are zeroed by the block: the compiled one too.
    assert np.all(yb.numpy()[1, 1:] == 0.0)
    for ga, gb in zip(tape.gradient(la, [x] + plain.trainable_variables),
                      tape.gradient(lb, [x] + jit.trainable_variables)):
        ga, gb = tf.convert_to_tensor(ga).numpy(), tf.convert_to_tensor(gb).numpy()
        np.testing.assert_allclose(gb, ga, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(ga).max()))
    # The compiled path is XLA: the function the block ran lowers to an XLA HLO module.
    compiled = jit.call.compiled[True]
    hlo = compiled.experimental_get_compiler_ir(x, mask)(stage="hlo")
    assert "HloModule" in hlo and "dot(" in hlo
    # No mask: all entries real, as the block's own call.
    np.testing.assert_allclose(jit(x).numpy(), plain(x).numpy(), rtol=1e-5, atol=1e-5)
    # Its variables are the block's own (no copies made by the compiled function).
    assert [v.ref() for v in jit.trainable_variables] == [v.ref() for v in jit.weights
                                                          if v.trainable]
    assert len(jit.trainable_variables) == len(plain.trainable_variables)


def test_unsupported_ops_of_a_hand_written_message():
    message = (
        "Graph execution error:\n\n"
        "Detected at node semantic_cl/stateless_categorical/StatelessMultinomial defined at:\n"
        "<stack traces unavailable>\n"
        "Detected unsupported operations when trying to compile graph __inference_x[] on "
        "XLA_CPU_JIT: StatelessMultinomial (No registered 'StatelessMultinomial' OpKernel for "
        "XLA_CPU_JIT devices compatible with node {{node a}}), Foo (No registered 'Foo' "
        "OpKernel ...), StatelessMultinomial (No registered 'StatelessMultinomial' OpKernel)\n")
    out = xla_cpu.unsupported_ops(message)
    assert out["ops"] == ["Foo", "StatelessMultinomial"]
    assert out["nodes"] == ["semantic_cl/stateless_categorical/StatelessMultinomial"]
    assert out["first_line"].startswith("Detected unsupported operations")
    shape = xla_cpu.unsupported_ops("Graph execution error:\n\nDetected at node session_cl/"
                                    "SelectV2_1 defined at\nIncompatible shapes: [4,9] vs. [4,3]")
    assert shape == {"ops": [], "nodes": ["session_cl/SelectV2_1"],
                     "first_line": "Incompatible shapes: [4,9] vs. [4,3]"}


@pytest.mark.parametrize("kwargs,match", [
    ({"num_items": 0}, "num_items must be an int >= 1. Received: 0"),
    ({"rounds": True}, "rounds must be an int >= 1. Received: True"),
    ({"warmup": -1}, "warmup must be an int >= 0. Received: -1"),
    ({"variants": ["step"]}, "variants must be a subset.*'none'.*Received: \\['step'\\]"),
    ({"variants": ["none", "fast"]}, "variants must be a subset.*Received"),
])
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        xla_cpu.run(**kwargs)


def test_cli_argument_error_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        xla_cpu.main(["--set", "model.name"])
    assert info.value.code == 2
    assert "--set must be KEY=VALUE" in capsys.readouterr().err


@pytest.mark.slow  # compiles whole train steps with XLA (tens of seconds on 2 cores)
def test_tiny_run_report():
    out = xla_cpu.run(num_items=300, batch_size=16, history_length=5, negatives=10, batches=2,
                      rounds=2, overrides={"model.transformer_dim": 8}, probe_terms=True,
                      log=lambda msg: None)
    # MicRec's whole step does not compile: the semantic CL sampler's categorical draw.
    assert set(out["failed"]) == {"micrec[step]"}
    assert "StatelessMultinomial" in out["failed"]["micrec[step]"]["ops"]
    assert set(out["ms"]) == {"micrec[none]", "base[none]", "micrec[transformer]",
                              "base[transformer]", "base[step]"}
    assert set(out["ratio_none_over"]) == {"micrec[transformer]", "base[transformer]",
                                           "base[step]"}
    # Same initial weights, same batch: the compiled variants' first losses are today's.
    for name, loss in out["first_loss"].items():
        ref = out["first_loss"][name.split("[")[0] + "[none]"]
        assert loss == pytest.approx(ref, rel=1e-5), name
    assert out["equality"]["user_vec_max_abs_diff"] <= 1e-5 * max(
        1.0, out["equality"]["user_vec_max_abs"])
    assert out["equality"]["grad_max_rel_diff"] < 1e-3
    probe = out["step_per_cl_term"]
    assert probe["none"] == "ok" and probe["feature"] == "ok"
    assert "StatelessMultinomial" in probe["semantic"]["ops"]
    assert probe["session"] != "ok"
