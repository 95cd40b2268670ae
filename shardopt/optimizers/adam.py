"""Adam as tf-keras 2.21 defines it (the class behind `tf.keras.dtensor.experimental.optimizers.Adam`).

Kingma & Ba, "Adam: A Method for Stochastic Optimization" (2014), with tf-keras's "epsilon hat" form: epsilon is
added to sqrt(v) of the *uncorrected* v, and AMSGrad keeps the max of the raw v.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shardopt.frontend import options
from shardopt.optimizers.base import Optimizer, State


def _via_float32(x: float, dtype: Any) -> jax.Array:
    """`tf.cast(<python float>, dt)` goes through float32 first, so float64 betas are float32-rounded."""
    return jnp.asarray(np.float32(x), dtype)


class Adam(Optimizer):
    """Adam with tf-keras's arguments, defaults, errors and numerics."""

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        adaptive_epsilon: bool = False,
        amsgrad: bool = False,
        name: str = "Adam",
        **kwargs: Any,
    ):
        super().__init__(name=name, learning_rate=learning_rate, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.adaptive_epsilon = adaptive_epsilon
        self.amsgrad = amsgrad
        options.check_adam_hyperparameters(self)

    def slot_groups(self) -> tuple[tuple[str, ...], ...]:
        return (("m", "v"), ("vhat",)) if self.amsgrad else (("m", "v"),)

    def kernel_spec(self) -> tuple[str, dict[str, Any]] | None:
        """What a compiled one-pass kernel needs to run `update_dense` (passes/lower_to_kernels.py), or None when
        this configuration has no kernel: `adaptive_epsilon` scales epsilon by a runtime factor the kernel lacks.
        The frontend wraps each loose variable's dense update in a `stablehlo.composite "shardopt.adam"` with
        these attributes; the pass recomputes `_alpha_eps` from them exactly as written here."""
        if self.adaptive_epsilon:
            return None
        return "adam", {"beta_1": float(self.beta_1), "beta_2": float(self.beta_2), "epsilon": float(self.epsilon),
                        "amsgrad": bool(self.amsgrad)}

    def _alpha_eps(self, lr: jax.Array, t: jax.Array, dt: Any) -> tuple[jax.Array, jax.Array]:
        b1_power = jnp.power(_via_float32(self.beta_1, dt), t)
        b2_power = jnp.power(_via_float32(self.beta_2, dt), t)
        one = jnp.asarray(1, dt)
        alpha = lr * jnp.sqrt(one - b2_power) / (one - b1_power)
        eps = jnp.asarray(self.epsilon, dt)
        if self.adaptive_epsilon:
            eps = eps * jnp.sqrt(one - b2_power)
        return alpha, eps

    def _finish(self, var: jax.Array, m: jax.Array, v: jax.Array, state: State, alpha: jax.Array,
                eps: jax.Array) -> tuple[jax.Array, State]:
        new = {"m": m, "v": v}
        v_use = v
        if self.amsgrad:
            v_use = new["vhat"] = jnp.maximum(state["vhat"], v)
        return var - (m * alpha) / (jnp.sqrt(v_use) + eps), new

    def update_dense(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                     ) -> tuple[jax.Array, State]:
        dt = var.dtype
        alpha, eps = self._alpha_eps(lr, t, dt)
        m = state["m"] + (grad - state["m"]) * jnp.asarray(1 - self.beta_1, dt)
        v = state["v"] + (jnp.square(grad) - state["v"]) * jnp.asarray(1 - self.beta_2, dt)
        return self._finish(var, m, v, state, alpha, eps)

    def update_sparse(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                      ) -> tuple[jax.Array, State]:
        # tf-keras decays every row, then scatter-adds the de-duplicated rows; `grad` is zero off those rows.
        dt = var.dtype
        alpha, eps = self._alpha_eps(lr, t, dt)
        c1, c2 = jnp.asarray(1 - self.beta_1, dt), jnp.asarray(1 - self.beta_2, dt)
        m = state["m"] + (-state["m"] * c1)
        m = m + grad * c1
        v = state["v"] + (-state["v"] * c2)
        v = v + jnp.square(grad) * c2
        return self._finish(var, m, v, state, alpha, eps)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "learning_rate": self._serialized_learning_rate(),
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "amsgrad": self.amsgrad,
        })
        return config
