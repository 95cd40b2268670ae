"""Adafactor as tf-keras 2.21 defines it (`tf_keras/src/optimizers/adafactor.py`): Shazeer and Stern,
"Adafactor: Adaptive Learning Rates with Sublinear Memory Cost" (2018).

A variable of rank >= 2 keeps the row means `r` (its dims [:-1]) and column means `c` (dims [:-2] + [-1:]) of
the squared gradient, and, as tf-keras does, also a full-shape `v` that each step overwrites with their
outer product; a variable of rank < 2 keeps `v` only (tf-keras's dummy `r`/`c` there are scalars outside
`variables` that nothing reads, so shardopt has none). Slots keep the layout of the dims they keep (`slot_dims`),
so on a mesh `r` of a `[batch, model]` matrix is laid out `[batch]` and `c` `[model]`. The factored slots are
not packed (a packed variable has exactly `v`, core/packing.py's rule is per shape). tf-keras turns a sparse
gradient into a dense one (`tf.square`, `convert_to_tensor`), so the sparse update is the dense one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from shardopt.optimizers.base import Optimizer, State
from shardopt.optimizers.casts import const, tf_cast


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x)))


class Adafactor(Optimizer):
    """Adafactor with tf-keras's arguments, defaults, slots and numerics."""

    slots = ("r", "c", "v")

    def __init__(self, learning_rate: Any = 0.001, beta_2_decay: float = -0.8, epsilon_1: float = 1e-30,
                 epsilon_2: float = 1e-3, clip_threshold: float = 1.0, relative_step: bool = True,
                 name: str = "Adafactor", **kwargs: Any):
        super().__init__(name=name, learning_rate=learning_rate, **kwargs)
        self.beta_2_decay = beta_2_decay
        self.epsilon_1 = epsilon_1
        self.epsilon_2 = epsilon_2
        self.clip_threshold = clip_threshold
        self.relative_step = relative_step

    def slot_dims(self, rank: int) -> dict[str, tuple[int, ...]]:
        dims = tuple(range(rank))
        if rank < 2:
            return {"v": dims}
        return {"r": dims[:-1], "c": dims[:-2] + dims[-1:], "v": dims}

    def update_dense(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                     ) -> tuple[jax.Array, State]:
        dt = var.dtype
        one = jnp.asarray(1.0, dt)
        rsqrt_t = jax.lax.rsqrt(t)
        if self._schedule() is None and self.relative_step:  # the relative step: a constant rate decays
            lr = jnp.minimum(lr, rsqrt_t)
        rho_t = jnp.minimum(lr, rsqrt_t)
        alpha_t = jnp.maximum(tf_cast(self.epsilon_2, dt), _rms(var)) * rho_t
        regulated_grad_square = jnp.square(grad) + const(self.epsilon_1, dt)
        beta_2_t = const(1, dt) - jnp.power(t, const(self.beta_2_decay, dt))
        new: State = {}
        if var.ndim >= 2:
            r = beta_2_t * state["r"] + (one - beta_2_t) * jnp.mean(regulated_grad_square, axis=-1)
            c = beta_2_t * state["c"] + (one - beta_2_t) * jnp.mean(regulated_grad_square, axis=-2)
            v = jnp.expand_dims(r / jnp.mean(r, axis=-1, keepdims=True), -1) * jnp.expand_dims(c, -2)
            new.update(r=r, c=c)
        else:
            v = beta_2_t * state["v"] + (one - beta_2_t) * regulated_grad_square
        u_t = grad * jax.lax.rsqrt(v)
        u_t_hat = u_t / jnp.maximum(one, _rms(u_t) / const(self.clip_threshold, dt))
        new["v"] = v
        return var + (-alpha_t) * u_t_hat, new

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"learning_rate": self._serialized_learning_rate(), "beta_2_decay": self.beta_2_decay,
                       "epsilon_1": self.epsilon_1, "epsilon_2": self.epsilon_2,
                       "clip_threshold": self.clip_threshold, "relative_step": self.relative_step})
        return config
