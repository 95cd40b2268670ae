"""RMSprop as tf-keras 2.21 defines it (`tf_keras/src/optimizers/rmsprop.py`): Hinton's lecture 6e, with optional
momentum and Graves's centered form ("Generating Sequences With Recurrent Neural Networks", 2013).

tf-keras's sparse path decays every row, scatter-adds the de-duplicated rows and gathers the denominator at
them; with the gradient zero elsewhere that is bit-for-bit the dense formula, so one function serves both.
`ema_overwrite_frequency` defaults to 100 here, as in tf-keras.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from shardopt.optimizers.base import Optimizer, State
from shardopt.optimizers.casts import const


class RMSprop(Optimizer):
    """RMSprop with tf-keras's arguments, defaults, errors and numerics."""

    def __init__(self, learning_rate: Any = 0.001, rho: float = 0.9, momentum: float = 0.0,
                 epsilon: float = 1e-7, centered: bool = False, name: str = "RMSprop", **kwargs: Any):
        if kwargs.get("ema_option") is None:  # tf-keras's default here (an EMAOption brings its own)
            kwargs.setdefault("ema_overwrite_frequency", 100)
        super().__init__(name=name, learning_rate=learning_rate, **kwargs)
        self.rho = rho
        self.momentum = momentum
        self.epsilon = epsilon
        self.centered = centered

    def slot_groups(self) -> tuple[tuple[str, ...], ...]:
        return (("velocity",), *((("momentum",),) if self.momentum > 0 else ()),
                *((("average_gradient",),) if self.centered else ()))

    def update_dense(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                     ) -> tuple[jax.Array, State]:
        dt = var.dtype
        rho, one_minus_rho = const(self.rho, dt), const(1 - self.rho, dt)
        new = {"velocity": rho * state["velocity"] + one_minus_rho * jnp.square(grad)}
        if self.centered:
            new["average_gradient"] = rho * state["average_gradient"] + one_minus_rho * grad
            denominator = new["velocity"] - jnp.square(new["average_gradient"]) + const(self.epsilon, dt)
        else:
            denominator = new["velocity"] + const(self.epsilon, dt)
        increment = lr * grad * jax.lax.rsqrt(denominator)
        if self.momentum > 0:
            new["momentum"] = const(self.momentum, dt) * state["momentum"] + increment
            return var + (-new["momentum"]), new
        return var + (-increment), new

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"learning_rate": self._serialized_learning_rate(), "rho": self.rho,
                       "momentum": self.momentum, "epsilon": self.epsilon, "centered": self.centered})
        return config
