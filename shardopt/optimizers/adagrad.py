"""Adagrad as tf-keras 2.21 defines it (`tf_keras/src/optimizers/adagrad.py`). Duchi et al., "Adaptive
Subgradient Methods for Online Learning and Stochastic Optimization" (2011).

The accumulator starts at `initial_accumulator_value`. tf-keras's sparse path (scatter-add g², gather the
denominator, scatter-add -lr*g/den) is bit-for-bit the dense formula with zero rows elsewhere.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from shardopt.optimizers.base import Optimizer, State
from shardopt.optimizers.casts import const


class Adagrad(Optimizer):
    """Adagrad with tf-keras's arguments, defaults, errors and numerics."""

    slots = ("accumulator",)

    def __init__(self, learning_rate: Any = 0.001, initial_accumulator_value: float = 0.1,
                 epsilon: float = 1e-7, name: str = "Adagrad", **kwargs: Any):
        super().__init__(name=name, learning_rate=learning_rate, **kwargs)
        self.initial_accumulator_value = initial_accumulator_value
        self.epsilon = epsilon

    def slot_initial_value(self, slot: str) -> float | None:
        return self.initial_accumulator_value

    def update_dense(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                     ) -> tuple[jax.Array, State]:
        accumulator = state["accumulator"] + grad * grad
        return var - lr * grad / jnp.sqrt(accumulator + const(self.epsilon, var.dtype)), {"accumulator": accumulator}

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"learning_rate": self._serialized_learning_rate(),
                       "initial_accumulator_value": self.initial_accumulator_value, "epsilon": self.epsilon})
        return config
