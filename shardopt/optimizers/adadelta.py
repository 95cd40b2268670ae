"""Adadelta as tf-keras 2.21 defines it (`tf_keras/src/optimizers/adadelta.py`). Zeiler, "ADADELTA: An Adaptive
Learning Rate Method" (2012); tf-keras scales the step by the learning rate (default 0.001)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from shardopt.optimizers.base import Optimizer, State
from shardopt.optimizers.casts import const


class Adadelta(Optimizer):
    """Adadelta with tf-keras's arguments, defaults, errors and numerics."""

    slots = ("accumulated_grad", "accumulated_delta_var")

    def __init__(self, learning_rate: Any = 0.001, rho: float = 0.95, epsilon: float = 1e-7,
                 name: str = "Adadelta", **kwargs: Any):
        super().__init__(name=name, learning_rate=learning_rate, **kwargs)
        self.rho = rho
        self.epsilon = epsilon

    def _finish(self, var: jax.Array, grad: jax.Array, accumulated_grad: jax.Array, state: State, lr: jax.Array
                ) -> tuple[jax.Array, State]:
        dt = var.dtype
        eps = const(self.epsilon, dt)
        delta = -jnp.sqrt(state["accumulated_delta_var"] + eps) * grad / jnp.sqrt(accumulated_grad + eps)
        delta_acc = (const(self.rho, dt) * state["accumulated_delta_var"]
                     + const(1 - self.rho, dt) * delta * delta)
        return var + lr * delta, {"accumulated_grad": accumulated_grad, "accumulated_delta_var": delta_acc}

    def update_dense(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                     ) -> tuple[jax.Array, State]:
        dt = var.dtype
        acc = const(self.rho, dt) * state["accumulated_grad"] + const(1 - self.rho, dt) * grad * grad
        return self._finish(var, grad, acc, state, lr)

    def update_sparse(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                      ) -> tuple[jax.Array, State]:
        # tf-keras: acc += (rho - 1) * acc, then scatter-adds (1 - rho) * g² at the rows.
        dt = var.dtype
        acc = state["accumulated_grad"] + const(self.rho - 1, dt) * state["accumulated_grad"]
        acc = acc + const(1 - self.rho, dt) * jnp.square(grad)
        return self._finish(var, grad, acc, state, lr)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"learning_rate": self._serialized_learning_rate(), "rho": self.rho,
                       "epsilon": self.epsilon})
        return config
