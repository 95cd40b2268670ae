"""FTRL-Proximal as tf-keras 2.21 defines it (`tf_keras/src/optimizers/ftrl.py`): McMahan et al., "Ad Click
Prediction: a View from the Trenches" (2013), with tf-keras's L2 shrinkage and `beta`.

tf-keras uses one formula for dense and sparse gradients (a sparse one is densified), so `update_sparse` is the
dense update. The accumulator starts at `initial_accumulator_value`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from shardopt.optimizers.base import Optimizer, State
from shardopt.optimizers.casts import const


class Ftrl(Optimizer):
    """FTRL with tf-keras's arguments, defaults, errors and numerics."""

    slots = ("accumulator", "linear")

    def __init__(self, learning_rate: Any = 0.001, learning_rate_power: float = -0.5,
                 initial_accumulator_value: float = 0.1, l1_regularization_strength: float = 0.0,
                 l2_regularization_strength: float = 0.0, l2_shrinkage_regularization_strength: float = 0.0,
                 beta: float = 0.0, name: str = "Ftrl", **kwargs: Any):
        super().__init__(name=name, learning_rate=learning_rate, **kwargs)
        for arg, value, sign in [("initial_accumulator_value", initial_accumulator_value, "positive or zero"),
                                 ("learning_rate_power", -learning_rate_power, "negative or zero"),
                                 ("l1_regularization_strength", l1_regularization_strength, "positive or zero"),
                                 ("l2_regularization_strength", l2_regularization_strength, "positive or zero"),
                                 ("l2_shrinkage_regularization_strength", l2_shrinkage_regularization_strength,
                                  "positive or zero")]:
            if value < 0.0:
                shown = -value if arg == "learning_rate_power" else value
                raise ValueError(f"`{arg}` needs to be {sign}. Received: {arg}={shown}.")
        self.learning_rate_power = learning_rate_power
        self.initial_accumulator_value = initial_accumulator_value
        self.l1_regularization_strength = l1_regularization_strength
        self.l2_regularization_strength = l2_regularization_strength
        self.l2_shrinkage_regularization_strength = l2_shrinkage_regularization_strength
        self.beta = beta

    def slot_initial_value(self, slot: str) -> float | None:
        return self.initial_accumulator_value if slot == "accumulator" else None

    def update_dense(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                     ) -> tuple[jax.Array, State]:
        dt = var.dtype
        accum, linear = state["accumulator"], state["linear"]
        power = const(-self.learning_rate_power, dt)
        l2_reg = const(self.l2_regularization_strength, dt) + const(self.beta, dt) / (const(2.0, dt) * lr)
        grad_to_use = grad + const(2 * self.l2_shrinkage_regularization_strength, dt) * var
        new_accum = accum + jnp.power(grad, const(2, dt))
        linear = linear + (grad_to_use - (jnp.power(new_accum, power) - jnp.power(accum, power)) / lr * var)
        quadratic = jnp.power(new_accum, power) / lr + const(2, dt) * l2_reg
        l1 = self.l1_regularization_strength
        clipped = jnp.clip(linear, const(-l1, dt), const(l1, dt))
        return (clipped - linear) / quadratic, {"accumulator": new_accum, "linear": linear}

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "learning_rate": self._serialized_learning_rate(),
            "learning_rate_power": self.learning_rate_power,
            "initial_accumulator_value": self.initial_accumulator_value,
            "l1_regularization_strength": self.l1_regularization_strength,
            "l2_regularization_strength": self.l2_regularization_strength,
            "l2_shrinkage_regularization_strength": self.l2_shrinkage_regularization_strength,
            "beta": self.beta,
        })
        return config
