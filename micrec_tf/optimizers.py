"""The training optimizer (``train.optimizer``): tf_keras's Adam, or the same Adam applied by one
fused kernel per variable (issue 31, item 1).

    optimizer = make_optimizer(cfg.train)        # what micrec_tf/train.py compiles with
    model.compile(optimizer=optimizer)

``train.optimizer``:

* ``adam`` (default): ``tf_keras.optimizers.Adam(train.learning_rate)``, exactly the optimizer
  of before the key, bit for bit.
* ``fused_adam``: :class:`FusedAdam`, the same algorithm (tf_keras's formula, hyper-parameters,
  slot variables ``m`` / ``v`` with the same names and shapes, so a checkpoint or backup written
  with one restores into the other) whose update of every variable is one
  ``tf.raw_ops.ResourceApplyAdam`` kernel. A sparse (``tf.IndexedSlices``) gradient, e.g. of an
  embedding table, is first summed into a dense ``[rows, ...]`` tensor
  (``tf.math.unsorted_segment_sum``: repeated indices add up, as Keras's de-duplication does).
  tf_keras's Adam spends several separate dense passes over each table on a sparse gradient
  (decay of ``m``, of ``v``, then the variable update, each reading and writing the whole
  table); the kernel does it in one pass. Equal to ``adam`` up to float32 rounding, not bit for
  bit: the kernel computes ``1 - beta`` in float32 from the float32 beta (``1 - 0.999f`` =
  0.00099998713 where tf_keras multiplies by ``0.001f``: ``v`` 1.3e-5 relative lower, each step
  ~6.5e-6 relative larger), and the sparse rows' moments as ``m + (g - m)(1 - b1)`` instead of
  ``m - m(1 - b1) + g(1 - b1)``. Measured (tests/test_fused_adam.py): 8e-6 largest weight
  difference after 6 MicRec steps at lr 0.01 that moved weights by up to 0.06.

Both use tf_keras's update (Kingma and Ba's formulation just before their section 2.1, epsilon
being "epsilon hat")::

    m <- m + (g - m)(1 - b1);   v <- v + (g^2 - v)(1 - b2)
    alpha = lr sqrt(1 - b2^t) / (1 - b1^t);   var <- var - alpha m / (sqrt(v) + eps)

which is also the formula of TensorFlow's ``ApplyAdam`` kernels (CPU and GPU).
"""
from __future__ import annotations

import tensorflow as tf
import tf_keras

from micrec_tf.config import OPTIMIZERS


@tf_keras.utils.register_keras_serializable(package="micrec_tf")
class FusedAdam(tf_keras.optimizers.Adam):
    """tf_keras's Adam whose per-variable update is one ``ResourceApplyAdam`` kernel.

    Same arguments, defaults and slot variables as ``tf_keras.optimizers.Adam`` (learning_rate
    0.001, beta_1 0.9, beta_2 0.999, epsilon 1e-7, adaptive_epsilon False) and the same default
    name ``Adam``, so its slot variables are named as Adam's (``Adam/m/<var>``, ``Adam/v/<var>``);
    ``amsgrad=True`` is refused. Works under tf.distribute strategies (the kernel runs in the strategy's per-variable
    update, on each replica's copy) and inside ``LossScaleOptimizer`` (mixed precision).

    ``update_step(gradient, variable)``: ``gradient`` a dense tensor of ``variable``'s shape, or
    an ``IndexedSlices`` with ``values [n, ...]`` and ``indices [n]`` (repeats allowed, summed)
    into ``variable [rows, ...]``.
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 adaptive_epsilon=False, amsgrad=False, name="Adam", **kwargs):
        if amsgrad:
            raise ValueError(f"FusedAdam does not implement amsgrad (ResourceApplyAdam has no "
                             f"v_hat); use tf_keras.optimizers.Adam. Received: amsgrad={amsgrad!r}")
        for key, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not callable(value) and not 0.0 <= float(value) < 1.0:
                raise ValueError(f"FusedAdam's {key} must be in [0, 1). Received: "
                                 f"{key}={value!r}")
        if not callable(epsilon) and not float(epsilon) >= 0.0:
            raise ValueError(f"FusedAdam's epsilon must be >= 0. Received: epsilon={epsilon!r}")
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2,
                         epsilon=epsilon, adaptive_epsilon=adaptive_epsilon, amsgrad=False,
                         name=name, **kwargs)

    def update_step(self, gradient, variable):
        """Applies one Adam step to ``variable`` with one fused kernel (see the class)."""
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        local_step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        beta_1_power = tf.pow(beta_1, local_step)
        beta_2_power = tf.pow(beta_2, local_step)
        epsilon = tf.cast(self.epsilon, dtype)
        if self.adaptive_epsilon:
            epsilon = epsilon * tf.sqrt(1 - beta_2_power)
        index = self._index_dict[self._var_key(variable)]
        m, v = self._momentums[index], self._velocities[index]
        if isinstance(gradient, tf.IndexedSlices):
            # [n, ...] rows at [n] indices -> [rows, ...]; repeated indices add up.
            gradient = tf.math.unsorted_segment_sum(gradient.values, gradient.indices,
                                                    tf.shape(variable)[0])
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=m.handle, v=v.handle, beta1_power=beta_1_power,
            beta2_power=beta_2_power, lr=lr, beta1=beta_1, beta2=beta_2, epsilon=epsilon,
            grad=tf.cast(gradient, dtype), use_locking=False, use_nesterov=False)

    def get_config(self):
        config = super().get_config()
        config["adaptive_epsilon"] = self.adaptive_epsilon
        return config


def make_optimizer(train_cfg) -> tf_keras.optimizers.Optimizer:
    """The optimizer ``train.optimizer`` names, at ``train.learning_rate`` (see the module).

    ``adam`` (the default) returns ``tf_keras.optimizers.Adam(learning_rate)``, the optimizer of
    before the key. Call it inside the strategy's scope, as ``model.compile`` is.
    """
    name = getattr(train_cfg, "optimizer", "adam")
    if name == "adam":
        return tf_keras.optimizers.Adam(train_cfg.learning_rate)
    if name == "fused_adam":
        return FusedAdam(train_cfg.learning_rate)
    raise ValueError(f"train.optimizer must be one of {list(OPTIMIZERS)}. Received: {name!r}")
