"""Lion as tf-keras 2.21 defines it (`tf_keras/src/optimizers/lion.py`): Chen et al., "Symbolic Discovery of
Optimization Algorithms" (2023). The sparse path uses `m` as a buffer (interpolate with beta_1, step by its sign,
then re-interpolate to beta_2), which rounds differently from the dense one, so it is mirrored."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from shardopt.optimizers.base import Optimizer, State
from shardopt.optimizers.casts import const, tf_cast


class Lion(Optimizer):
    """Lion with tf-keras's arguments, defaults, errors and numerics."""

    slots = ("m",)

    def __init__(self, learning_rate: Any = 0.0001, beta_1: float = 0.9, beta_2: float = 0.99,
                 name: str = "Lion", **kwargs: Any):
        super().__init__(name=name, learning_rate=learning_rate, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        if beta_1 <= 0 or beta_1 > 1:
            raise ValueError(f"`beta_1`={beta_1} must be between ]0, 1]. Otherwise, the optimizer degenerates to "
                             "SignSGD.")

    def update_dense(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                     ) -> tuple[jax.Array, State]:
        dt = var.dtype
        one = const(1.0, dt)
        b1, b2 = tf_cast(self.beta_1, dt), tf_cast(self.beta_2, dt)
        m = state["m"]
        var = var - lr * jnp.sign(m * b1 + grad * (one - b1))
        return var, {"m": m * b2 + grad * (one - b2)}

    def update_sparse(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                      ) -> tuple[jax.Array, State]:
        dt = var.dtype
        one = const(1.0, dt)
        b1, b2 = tf_cast(self.beta_1, dt), tf_cast(self.beta_2, dt)
        m = state["m"] * b1 + grad * (one - b1)
        var = var - lr * jnp.sign(m)
        return var, {"m": m * b2 / b1 + grad * (one - b2 / b1)}

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"learning_rate": self._serialized_learning_rate(), "beta_1": self.beta_1,
                       "beta_2": self.beta_2})
        return config
