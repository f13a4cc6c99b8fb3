"""Adam for the paper's beta_1 = 0, without the first-moment slot."""

from __future__ import annotations

import keras
from keras import ops

from ._compat import private_override, variable_index
from .dtypes import upcast
from .layers import SERIAL_PACKAGE


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class Adam(keras.optimizers.Adam):
    """keras Adam that keeps no first-moment slot when beta_1 == 0 (HA-GAN's setting).

    With beta_1 = 0 the first moment is the gradient itself, so the slot is a 4-byte-per-weight
    copy of it: 320 MB for the full-width model, and Keras's m + (g - m) * 1 is not even exactly
    g in floating point. The update is otherwise Keras's Adam (bias correction, epsilon outside
    the square root); any other beta_1, or amsgrad, runs Keras's code unchanged.
    """

    def _moment_free(self):
        return self.beta_1 == 0 and not self.amsgrad

    def build(self, var_list):
        if not self._moment_free():
            return super().build(var_list)
        if self.built:
            return
        keras.optimizers.Optimizer.build(self, var_list)
        self._velocities = self.add_optimizer_variables(var_list, "velocity")

    def _step_size(self, learning_rate):
        """Adam's bias-corrected step size lr * sqrt(1 - beta_2^t), in lr's type (at least
        float32: float64 where the learning rate is, as under floatx float64)."""
        learning_rate = upcast(learning_rate)
        t = ops.cast(self.iterations + 1, learning_rate.dtype)
        return learning_rate * ops.sqrt(1 - ops.power(float(self.beta_2), t))

    @private_override(keras.optimizers.Adam)
    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        # The step size once per apply, not once per variable (~25 graph nodes each, 2,100 of
        # the traced iteration's 10,900); the graph's size is memory that stays.
        if not self._moment_free():
            return super()._distributed_tf_update_step(distribution, grads_and_vars, learning_rate)
        alpha = self._step_size(learning_rate)
        for grad, var in grads_and_vars:
            distribution.extended.update(var, self._moment_free_step, args=(grad, alpha), group=False)

    def update_step(self, gradient, variable, learning_rate):
        if not self._moment_free():
            return super().update_step(gradient, variable, learning_rate)
        self._moment_free_step(variable, gradient, self._step_size(learning_rate))

    def _moment_free_step(self, variable, gradient, alpha):
        gradient = ops.cast(gradient, variable.dtype)
        alpha = ops.cast(alpha, variable.dtype)
        v = self._velocities[variable_index(self, variable)]
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - self.beta_2))
        # one temporary of the variable's size at a time (TF updates the others in place)
        self.assign_sub(variable, ops.multiply(
            ops.divide(gradient, ops.add(ops.sqrt(v), self.epsilon)), alpha))


@keras.saving.register_keras_serializable(SERIAL_PACKAGE)
class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Keras's dynamic loss scaling (mixed_float16), with two fixes for HA-GAN's trainer.

    - Replicas skip together. Keras 3 tests each replica's own gradients before the inner
      optimizer sums them: when one GPU overflows and another does not, the summed Inf is
      applied and the weights become NaN. Here the replicas agree on one flag first.
    - A skipped step still counts (Keras 2 did this; Keras 3 does not): the D optimizer's
      counter is the trainer's step, which draws r and z, places the input after a resume and
      numbers checkpoints. Without it a run of skipped steps would repeat one r and z and
      fall behind the batches it has read.
    """

    def check_finite(self, grads):
        finite = super().check_finite(grads)
        import tensorflow as tf

        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync == 1:
            return finite
        return ctx.all_reduce("SUM", ops.cast(ops.logical_not(finite), "float32")) == 0

    @private_override(keras.optimizers.LossScaleOptimizer)
    def _stateful_handle_non_finite_grads(self):
        super()._stateful_handle_non_finite_grads()
        self.inner_optimizer.iterations.assign_add(1)
