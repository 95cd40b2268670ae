"""shardopt optimizers as tf-keras optimizers: `model.compile(optimizer=shardopt.tf_keras.Adam(1e-3))`, then
`model.fit`, running shardopt's compiled step through XlaCallModule (`runtime/tf_embed.py`'s `StepModule`).

tf-keras's `apply_gradients` computes the learning rate (schedules included), clips, decays and calls
`_internal_apply_gradients`; the bridge sets no tf-keras clipping or weight decay (they run inside shardopt's
step) and replaces `_internal_apply_gradients` by one call of the compiled step over all variables, then counts
`iterations` as tf-keras does. The step's slot and gradient buffers are the optimizer's own variables
(`add_variable`), so `model.save` / `load_model` (`.keras`) and `tf.train.Checkpoint` save and restore them; the
step's counter and learning-rate inputs are set from `iterations` and `learning_rate` before each call.

The step is compiled on one jax device, for TF (see `shardopt.tf`). Needs the `tf` extra.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
import tf_keras

from shardopt.optimizers.adam import Adam as _ShardoptAdam
from shardopt.runtime.tf_embed import StepModule, variable_specs

_SHARDOPT_OPTIONS = ("weight_decay", "clipnorm", "clipvalue", "global_clipnorm")


class TFKerasOptimizer(tf_keras.optimizers.Optimizer):
    """A tf-keras optimizer running a shardopt optimizer's compiled step (subclasses set `shardopt_class`)."""

    shardopt_class: type = _ShardoptAdam

    def __init__(self, learning_rate: Any = 0.001, name: str | None = None, **kwargs: Any):
        keras_kwargs = {k: kwargs.pop(k) for k in ("use_ema", "ema_momentum", "ema_overwrite_frequency",
                                                    "jit_compile") if k in kwargs}
        self._shardopt_kwargs = dict(kwargs)
        self.shardopt_optimizer = self.shardopt_class(learning_rate=0.001, **kwargs)  # validates the options
        super().__init__(name=name or self.shardopt_class.__name__, **keras_kwargs)
        self._learning_rate = self._build_learning_rate(learning_rate)
        self._step_module: StepModule | None = None

    def build(self, var_list: Any) -> None:
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        var_list = list(var_list)
        step = self.shardopt_optimizer.compile(variable_specs(var_list))

        def make_variable(name: str, value: Any) -> tf.Variable:
            var = self.add_variable(value.shape, dtype=tf.as_dtype(value.dtype), name=name.replace("@", ""))
            var.assign(value)
            return var

        self._step_module = StepModule(step, var_list, make_variable=make_variable, name=f"{self.name}_step")
        self._built = True

    def _internal_apply_gradients(self, grads_and_vars: Any) -> tf.Variable:
        module = self._step_module
        by_index = {self._index_dict[self._var_key(v)]: g for g, v in grads_and_vars}
        if sorted(by_index) != list(range(len(module.model_variables))):
            raise ValueError(f"{type(self).__name__} runs one compiled step for all {len(module.model_variables)} "
                             f"variables it was built with; got gradients for {len(by_index)} of them")
        module.iterations.assign(tf.cast(self.iterations, module.iterations.dtype))
        module.learning_rate.assign(tf.cast(self.learning_rate, module.learning_rate.dtype))
        grads = [tf.convert_to_tensor(by_index[i]) for i in range(len(by_index))]
        module.apply(grads)
        return self.iterations.assign_add(1)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        for k in _SHARDOPT_OPTIONS:
            config.pop(k, None)
        config.update(self._shardopt_kwargs)
        config["learning_rate"] = self._serialize_hyperparameter(self._learning_rate)
        return config


def tf_keras_optimizer(shardopt_class: type) -> type:
    """The tf-keras optimizer class for a shardopt optimizer definition (registered for saving)."""
    cls = type(shardopt_class.__name__, (TFKerasOptimizer,), {
        "shardopt_class": shardopt_class,
        "__doc__": f"shardopt's `{shardopt_class.__name__}` as a tf-keras optimizer (see shardopt/tf_keras.py).",
        "__module__": __name__,
    })
    return tf_keras.saving.register_keras_serializable(package="shardopt")(cls)


Adam = tf_keras_optimizer(_ShardoptAdam)

__all__ = ["Adam", "TFKerasOptimizer", "tf_keras_optimizer"]
