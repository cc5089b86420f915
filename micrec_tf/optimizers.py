"""The training optimizer (``train.optimizer``): tf_keras's Adam, or the same Adam applied by one
fused kernel per variable (issue 31, item 1).

    optimizer = make_optimizer(cfg.train)        # what micrec_tf/train.py compiles with
    model.compile(optimizer=optimizer)

``train.optimizer``:

* ``adam`` (default): ``tf_keras.optimizers.Adam(train.learning_rate)``, exactly the optimizer
  of before the key, bit for bit.
* ``lazy_adam``: :class:`LazyAdam`, row-sparse Adam: only the rows a sparse gradient names
  update their moments and values. A different optimizer (results differ from ``adam``): it
  needs its own quality run before anyone relies on it.
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
    ``amsgrad=True`` is refused. Works under tf.distribute strategies (the kernel runs in the
    strategy's per-variable update, on each replica's copy) and inside ``LossScaleOptimizer``
    (mixed precision).

    ``update_step(gradient, variable)``: ``gradient`` a dense tensor of ``variable``'s shape, or
    an ``IndexedSlices`` with ``values [n, ...]`` and ``indices [n]`` (repeats allowed, summed)
    into ``variable [rows, ...]``.
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 adaptive_epsilon=False, amsgrad=False, name="Adam", **kwargs):
        cls = type(self).__name__
        if amsgrad:
            raise ValueError(f"{cls} does not implement amsgrad (ResourceApplyAdam has no "
                             f"v_hat); use tf_keras.optimizers.Adam. Received: amsgrad={amsgrad!r}")
        for key, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not callable(value) and not 0.0 <= float(value) < 1.0:
                raise ValueError(f"{cls}'s {key} must be in [0, 1). Received: {key}={value!r}")
        if not callable(epsilon) and not float(epsilon) >= 0.0:
            raise ValueError(f"{cls}'s epsilon must be >= 0. Received: epsilon={epsilon!r}")
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2,
                         epsilon=epsilon, adaptive_epsilon=adaptive_epsilon, amsgrad=False,
                         name=name, **kwargs)

    def _hyper(self, dtype):
        """(lr, beta_1, beta_2, epsilon hat, beta_1^t, beta_2^t) as ``dtype`` scalars, t = step."""
        lr = tf.cast(self.learning_rate, dtype)
        local_step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        beta_1_power = tf.pow(beta_1, local_step)
        beta_2_power = tf.pow(beta_2, local_step)
        epsilon = tf.cast(self.epsilon, dtype)
        if self.adaptive_epsilon:
            epsilon = epsilon * tf.sqrt(1 - beta_2_power)
        return lr, beta_1, beta_2, epsilon, beta_1_power, beta_2_power

    def _slots(self, variable):
        index = self._index_dict[self._var_key(variable)]
        return self._momentums[index], self._velocities[index]

    def update_step(self, gradient, variable):
        """Applies one Adam step to ``variable`` with one fused kernel (see the class)."""
        dtype = variable.dtype
        lr, beta_1, beta_2, epsilon, beta_1_power, beta_2_power = self._hyper(dtype)
        m, v = self._slots(variable)
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


@tf_keras.utils.register_keras_serializable(package="micrec_tf")
class LazyAdam(FusedAdam):
    """Row-sparse ("lazy") Adam: a DIFFERENT optimizer from Adam, not a faster path to it.

    On an ``IndexedSlices`` gradient only the rows it names (repeats summed) update their
    moments and values; every other row keeps ``m``, ``v`` and its value (Adam decays every
    row's moments and keeps moving rows with momentum left). For the rows it names, with the
    global step t::

        m_r <- m_r + (g_r - m_r)(1 - b1);   v_r <- v_r + (g_r^2 - v_r)(1 - b2)
        var_r <- var_r - lr sqrt(1 - b2^t) / (1 - b1^t) m_r / (sqrt(v_r) + eps)

    (TensorFlow Addons' LazyAdam). Dense gradients get :class:`FusedAdam`'s step, so a model
    without sparse gradients trains as with Adam. Same arguments and slot variables as
    FusedAdam (checkpoints restore across adam / fused_adam / lazy_adam), but results differ:
    a run with it needs its own quality comparison.
    """

    def __init__(self, *args, name="Adam", **kwargs):
        # tf.unique (repeats) has no XLA kernel: apply outside XLA even on a GPU.
        kwargs.setdefault("jit_compile", False)
        super().__init__(*args, name=name, **kwargs)

    def update_step(self, gradient, variable):
        """Row-sparse step for ``IndexedSlices`` (values ``[n, ...]``, indices ``[n]``, repeats
        summed) into ``variable [rows, ...]``; dense gradients: FusedAdam's fused step."""
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        dtype = variable.dtype
        lr, beta_1, beta_2, epsilon, beta_1_power, beta_2_power = self._hyper(dtype)
        m, v = self._slots(variable)
        rows, position = tf.unique(gradient.indices)  # [u], [n]
        g = tf.cast(tf.math.unsorted_segment_sum(gradient.values, position, tf.shape(rows)[0]),
                    dtype)  # [u, ...]
        m_rows = tf.gather(m, rows)
        m_rows = m_rows + (g - m_rows) * (1 - beta_1)
        v_rows = tf.gather(v, rows)
        v_rows = v_rows + (tf.square(g) - v_rows) * (1 - beta_2)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        variable.scatter_sub(tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + epsilon), rows))


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
    if name == "lazy_adam":
        return LazyAdam(train_cfg.learning_rate)
    raise ValueError(f"train.optimizer must be one of {list(OPTIMIZERS)}. Received: {name!r}")
