"""Nadam as tf-keras 2.21 defines it (`tf_keras/src/optimizers/nadam.py`): Dozat, "Incorporating Nesterov
Momentum into Adam" (2016), with the momentum schedule `u_t = beta_1 * (1 - 0.5 * 0.96**t)`.

The product of the `u_t` (`u_product`, starting at 1) is optimizer-level state: tf-keras advances it once per
step (its first variable's update) and every variable reads the advanced value; here `update_global` does that,
in float32, before the per-variable updates.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from shardopt.optimizers.base import Optimizer, State
from shardopt.optimizers.casts import const, tf_cast

U_PRODUCT = "u_product"


class Nadam(Optimizer):
    """Nadam with tf-keras's arguments, defaults, errors and numerics."""

    slots = ("m", "v")

    def __init__(self, learning_rate: Any = 0.001, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-7, name: str = "Nadam", **kwargs: Any):
        super().__init__(name=name, learning_rate=learning_rate, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon

    def optimizer_state_init(self) -> dict[str, float]:
        return {U_PRODUCT: 1.0}

    def _u(self, t: jax.Array, dt: Any) -> jax.Array:
        beta_1, decay = tf_cast(self.beta_1, dt), tf_cast(0.96, dt)
        return beta_1 * (const(1.0, dt) - const(0.5, dt) * jnp.power(decay, t))

    def update_global(self, state: State, t: jax.Array) -> State:
        return {U_PRODUCT: state[U_PRODUCT] * self._u(t, state[U_PRODUCT].dtype)}

    def _finish(self, var: jax.Array, grad: jax.Array, m: jax.Array, v: jax.Array, state: State, lr: jax.Array,
                t: jax.Array) -> tuple[jax.Array, State]:
        dt = var.dtype
        one = jnp.asarray(1, dt)
        u_t, u_t_1 = self._u(t, dt), self._u(t + one, dt)
        u_product_t = state[U_PRODUCT]
        u_product_t_1 = u_product_t * u_t_1
        beta_2_power = jnp.power(tf_cast(self.beta_2, dt), t)
        m_hat = u_t_1 * m / (one - u_product_t_1) + (one - u_t) * grad / (one - u_product_t)
        v_hat = v / (one - beta_2_power)
        return var - (m_hat * lr) / (jnp.sqrt(v_hat) + const(self.epsilon, dt)), {"m": m, "v": v}

    def update_dense(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                     ) -> tuple[jax.Array, State]:
        dt = var.dtype
        one = jnp.asarray(1, dt)
        c1, c2 = one - tf_cast(self.beta_1, dt), one - tf_cast(self.beta_2, dt)
        m = state["m"] + (grad - state["m"]) * c1
        v = state["v"] + (jnp.square(grad) - state["v"]) * c2
        return self._finish(var, grad, m, v, state, lr, t)

    def update_sparse(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                      ) -> tuple[jax.Array, State]:
        dt = var.dtype
        one = jnp.asarray(1, dt)
        c1, c2 = one - tf_cast(self.beta_1, dt), one - tf_cast(self.beta_2, dt)
        m = state["m"] + (-state["m"] * c1)
        m = m + grad * c1
        v = state["v"] + (-state["v"] * c2)
        v = v + jnp.square(grad) * c2
        return self._finish(var, grad, m, v, state, lr, t)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"learning_rate": self._serialized_learning_rate(), "beta_1": self.beta_1,
                       "beta_2": self.beta_2, "epsilon": self.epsilon})
        return config
