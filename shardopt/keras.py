"""shardopt optimizers as Keras 3 optimizers: `model.compile(optimizer=shardopt.keras.Adam(1e-3))` on the JAX
backend runs shardopt's compiled step inside `model.fit`'s jitted train step.

On the JAX backend `model.fit` calls `optimizer.stateless_apply(optimizer_variables, grads, trainable_variables)`
inside its `jax.jit`; Keras maps its variables to those values and calls `apply`, which clips, decays and calls
`_backend_update_step`. The bridge compiles, in `build` (eager, before fit's first trace), a shardopt
`FunctionalStep` for the model's trainable variables (their shapes, dtypes and shardings), keeps its state (packed
slot buffers, loose slots, gradient buffers) in Keras optimizer variables, and in `_backend_update_step` runs
the step through its `JaxStepFunction`. Keras keeps what it owns: `iterations` (the step reads it and Keras adds
one), the learning rate and its schedule (passed to the step as its learning-rate input), loss scaling, gradient
accumulation and EMA. Clipping and weight decay run in shardopt's step. `.keras` files round-trip: the config
is shardopt's, the variables are Keras's.

Every shardopt optimizer goes through the same bridge: `keras_optimizer(shardopt.Adam)` makes the class.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import keras
import numpy as np

from shardopt.core.contract import COUNTER, HYPERPARAMETER
from shardopt.optimizers.adam import Adam as _ShardoptAdam
from shardopt.runtime.jax_embed import as_jax_function, specs_for

# Options Keras itself handles, passed to keras.optimizers.Optimizer; the rest configure the shardopt optimizer.
_KERAS_OPTIONS = ("use_ema", "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor",
                  "gradient_accumulation_steps")
_SHARDOPT_BASE_OPTIONS = ("weight_decay", "clipnorm", "clipvalue", "global_clipnorm")


def _keras_name(state_name: str) -> str:
    """Keras variable names cannot contain '/': `m/@pack0/float32` -> `m__@pack0__float32`."""
    return state_name.replace("/", "__")


class KerasOptimizer(keras.optimizers.Optimizer):
    """A Keras 3 optimizer running a shardopt optimizer's compiled step (subclasses set `shardopt_class`)."""

    shardopt_class: type = _ShardoptAdam

    def __init__(self, learning_rate: Any = 0.001, name: str | None = None, **kwargs: Any):
        keras_kwargs = {k: kwargs.pop(k) for k in _KERAS_OPTIONS if k in kwargs}
        shardopt_optimizer = self.shardopt_class(learning_rate=0.001, **kwargs)  # validates the options first
        super().__init__(learning_rate=learning_rate, name=name or self.shardopt_class.__name__.lower(),
                         **keras_kwargs)
        self._shardopt_kwargs = kwargs  # the definition's options (beta_1, ..., clipnorm, weight_decay)
        self.shardopt_optimizer = shardopt_optimizer
        self.step: Any = None  # the FunctionalStep, compiled by build
        self._state_names: list[str] = []
        self._state_vars: list[Any] = []

    def build(self, variables: list[Any]) -> None:
        if self.built:
            return
        super().build(variables)
        values = {self._key(i): v.value for i, v in enumerate(variables)}
        self.step = self.shardopt_optimizer.compile(specs_for(values, self.shardopt_optimizer.mesh))
        self._fn = as_jax_function(self.step)
        initial = self.step.init(self.step.place_params(values))
        for spec in self.step.contract.state:
            if spec.role in (COUNTER, HYPERPARAMETER):
                continue  # Keras's own iterations and learning rate
            var = self.add_variable(spec.shape, initializer="zeros", dtype=str(np.dtype(spec.dtype)),
                                    name=_keras_name(spec.name))
            var.assign(np.asarray(initial[spec.name]))
            self._state_names.append(spec.name)
            self._state_vars.append(var)

    @staticmethod
    def _key(i: int) -> str:
        return f"v{i:05d}"  # sorts in Keras's order, so the step's variables are the model's, in order

    def _backend_update_step(self, grads: list[Any], trainable_variables: list[Any], learning_rate: Any) -> None:
        indices = [self._get_variable_index(v) for v in trainable_variables]
        if sorted(indices) != list(range(len(self._trainable_variables))):
            raise ValueError(f"{type(self).__name__} runs one compiled step for all {len(self._trainable_variables)} "
                             f"variables it was built with; got gradients for {len(indices)} of them")
        params = {self._key(i): v.value for i, v in zip(indices, trainable_variables, strict=True)}
        grad_tree = {self._key(i): g for i, g in zip(indices, grads, strict=True)}
        state = {n: v.value for n, v in zip(self._state_names, self._state_vars, strict=True)}
        for spec in self.step.contract.state:
            if spec.role == COUNTER:
                state[spec.name] = jnp.asarray(self.iterations.value).astype(spec.dtype)
            elif spec.role == HYPERPARAMETER:
                state[spec.name] = jnp.asarray(learning_rate).astype(spec.dtype)
        new_params, new_state = self._fn(params, grad_tree, state)
        for i, v in zip(indices, trainable_variables, strict=True):
            v.assign(new_params[self._key(i)])
        for name, var in zip(self._state_names, self._state_vars, strict=True):
            var.assign(new_state[name])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        for k in _SHARDOPT_BASE_OPTIONS:
            config.pop(k, None)  # Keras's are None: these run in shardopt's step
        config.update(self._shardopt_kwargs)
        return config


def keras_optimizer(shardopt_class: type) -> type:
    """The Keras 3 optimizer class for a shardopt optimizer definition (registered for `.keras` files)."""
    cls = type(shardopt_class.__name__, (KerasOptimizer,), {
        "shardopt_class": shardopt_class,
        "__doc__": f"shardopt's `{shardopt_class.__name__}` as a Keras 3 optimizer (see shardopt/keras.py).",
        "__module__": __name__,
    })
    return keras.saving.register_keras_serializable(package="shardopt")(cls)


Adam = keras_optimizer(_ShardoptAdam)

__all__ = ["Adam", "KerasOptimizer", "keras_optimizer"]
