"""Adamax as tf-keras 2.21 defines it (`tf_keras/src/optimizers/adamax.py`): Adam with the infinity norm,
Kingma & Ba (2014) §7.1. Slots `m` and `u` (the exponentially weighted infinity norm)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from shardopt.optimizers.base import Optimizer, State
from shardopt.optimizers.casts import const, tf_cast


class Adamax(Optimizer):
    """Adamax with tf-keras's arguments, defaults, errors and numerics."""

    slots = ("m", "u")

    def __init__(self, learning_rate: Any = 0.001, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7, name: str = "Adamax", **kwargs: Any):
        super().__init__(name=name, learning_rate=learning_rate, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon

    def _finish(self, var: jax.Array, m: jax.Array, u: jax.Array, lr: jax.Array, t: jax.Array
                ) -> tuple[jax.Array, State]:
        dt = var.dtype
        b1_power = jnp.power(tf_cast(self.beta_1, dt), t)
        step = (lr * m) / ((jnp.asarray(1, dt) - b1_power) * (u + const(self.epsilon, dt)))
        return var - step, {"m": m, "u": u}

    def update_dense(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                     ) -> tuple[jax.Array, State]:
        dt = var.dtype
        m = state["m"] + (grad - state["m"]) * const(1 - self.beta_1, dt)
        u = jnp.maximum(const(self.beta_2, dt) * state["u"], jnp.abs(grad))
        return self._finish(var, m, u, lr, t)

    def update_sparse(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                      ) -> tuple[jax.Array, State]:
        # tf-keras decays every row of m and u, then scatter-adds the rows' increments (zero elsewhere).
        dt = var.dtype
        c1 = const(1 - self.beta_1, dt)
        m = state["m"] + (-state["m"] * c1)
        m = m + grad * c1
        u = state["u"] * const(self.beta_2, dt)
        u = u + (jnp.maximum(u, jnp.abs(grad)) - u)
        return self._finish(var, m, u, lr, t)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"learning_rate": self._serialized_learning_rate(), "beta_1": self.beta_1,
                       "beta_2": self.beta_2, "epsilon": self.epsilon})
        return config
