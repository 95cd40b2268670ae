"""How tf-keras turns Python hyperparameters into tensors of a variable's dtype, which decides the last bit.

`tf.cast(0.9, tf.float64)` converts the Python float to a float32 tensor first, so the float64 value is float32-
rounded; a Python float used directly in an op with a float64 tensor (`rho * v`, `1 - self.beta_1`) is converted
at full precision. Definitions say which of the two tf-keras does, hyperparameter by hyperparameter.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def tf_cast(x: float, dtype: Any) -> jax.Array:
    """`tf.cast(<python float>, dtype)`: through float32 first."""
    return jnp.asarray(np.float32(x), dtype)


def const(x: float, dtype: Any) -> jax.Array:
    """A Python float as the operand of a tensor op of `dtype` (converted directly)."""
    return jnp.asarray(x, dtype)
