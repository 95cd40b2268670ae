"""SGD with (Nesterov) momentum as tf-keras 2.21 defines it (`tf_keras/src/optimizers/sgd.py`).

tf-keras always creates the `m` slot (even with `momentum=0`, where it holds the last step, `-g*lr`) and writes
the velocity with the learning rate folded in: `m = -g*lr + m*momentum`, `var += m` (Nesterov: `var += -g*lr +
m*momentum`). Sutskever et al., "On the importance of initialization and momentum in deep learning" (2013).
"""

from __future__ import annotations

import numbers
from typing import Any

import jax

from shardopt.optimizers.base import Optimizer, State
from shardopt.optimizers.casts import tf_cast


class SGD(Optimizer):
    """Gradient descent with momentum, tf-keras's arguments, defaults, errors and numerics."""

    slots = ("m",)

    def __init__(self, learning_rate: Any = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 name: str = "SGD", **kwargs: Any):
        super().__init__(name=name, learning_rate=learning_rate, **kwargs)
        self.momentum = momentum
        self.nesterov = nesterov
        if isinstance(momentum, (int, float)) and (momentum < 0 or momentum > 1):
            raise ValueError("`momentum` must be between [0, 1].")

    def kernel_spec(self) -> tuple[str, dict[str, Any]] | None:
        """What the compiled one-pass SGD kernel needs to run `update_dense` (passes/lower_to_kernels.py): the
        momentum (rounded to float32 by the kernel, as `tf_cast` rounds it) and nesterov; None for a momentum
        that is not a Python number."""
        if not isinstance(self.momentum, numbers.Real):
            return None
        return "sgd", {"momentum": float(self.momentum), "nesterov": bool(self.nesterov)}

    def update_dense(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                     ) -> tuple[jax.Array, State]:
        momentum = tf_cast(self.momentum, var.dtype)
        m = -grad * lr + state["m"] * momentum
        if self.nesterov:
            return var + (-grad * lr + m * momentum), {"m": m}
        return var + m, {"m": m}

    def update_sparse(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                      ) -> tuple[jax.Array, State]:
        # tf-keras: m *= momentum; m.scatter_add(-g*lr); Nesterov: var.scatter_add(-g*lr); var += m*momentum.
        momentum = tf_cast(self.momentum, var.dtype)
        add = -grad * lr
        m = state["m"] * momentum + add
        if self.nesterov:
            return (var + add) + m * momentum, {"m": m}
        return var + m, {"m": m}

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"learning_rate": self._serialized_learning_rate(), "momentum": self.momentum,
                       "nesterov": self.nesterov})
        return config
