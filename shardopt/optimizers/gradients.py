"""Checks a gradient against its variable and describes how it enters the step (dense, broadcast or sparse)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shardopt.core.contract import StepEntry
from shardopt.core.specs import IndexedSlices
from shardopt.optimizers.variables import Variable


def gradient_array(grad: Any, var: Variable) -> jax.Array:
    """`grad` as a jax array of the variable's dtype. The dtype checked is the one `grad` arrives with: without
    jax x64, `jnp.asarray` would silently narrow a numpy float64 gradient for a float32 variable."""
    dtype = np.dtype(grad.dtype) if hasattr(grad, "dtype") else None
    g = grad if isinstance(grad, jax.Array) else jnp.asarray(grad)
    if (dtype or g.dtype) != var.dtype:
        raise TypeError(f"gradient for {var.name!r} has dtype {dtype or g.dtype}, the variable {var.dtype}")
    return g


def gradient_entry(grad: Any, var: Variable, slots: tuple[str, ...], name: str | None = None
                   ) -> tuple[StepEntry, list[Any]]:
    """Validates one gradient against its variable; returns the step entry (named `name`, the variable's unique
    name in the step, by default its own) and the arrays to pass."""
    name = var.name if name is None else name
    layout = var.layout.to_partition_spec()
    lay = tuple(layout) + (None,) * (len(var.shape) - len(layout))
    if isinstance(grad, IndexedSlices):
        values = gradient_array(grad.values, var)
        indices = jnp.asarray(grad.indices)
        if grad.dense_shape is not None and tuple(np.asarray(grad.dense_shape).tolist()) != var.shape:
            raise ValueError(f"IndexedSlices for {var.name!r} has dense_shape {tuple(np.asarray(grad.dense_shape))}"
                             f", the variable has shape {var.shape}")
        if indices.ndim != 1 or not jnp.issubdtype(indices.dtype, jnp.integer):
            raise TypeError(f"IndexedSlices for {var.name!r}: indices must be a 1-D integer array")
        if values.shape != (indices.shape[0], *var.shape[1:]):
            raise ValueError(f"IndexedSlices for {var.name!r}: values of shape {values.shape} do not match "
                             f"{indices.shape[0]} rows of a variable of shape {var.shape}")
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= var.shape[0]):
            raise ValueError(f"IndexedSlices for {var.name!r}: indices must be in [0, {var.shape[0]}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        entry = StepEntry(name, var.shape, str(var.dtype), lay, slots, sparse_rows=int(indices.shape[0]),
                          index_dtype=str(indices.dtype))
        return entry, [values, indices]
    g = gradient_array(grad, var)
    gshape = tuple(g.shape)
    if gshape != var.shape:
        try:
            ok = np.broadcast_shapes(gshape, var.shape) == var.shape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"gradient for {var.name!r} has shape {gshape}, which does not broadcast to the "
                             f"variable's shape {var.shape}")
    entry = StepEntry(name, var.shape, str(var.dtype), lay, slots,
                      grad_shape=None if gshape == var.shape else gshape)
    return entry, [g]


def dense_entry(var: Variable, slots: tuple[str, ...], name: str | None = None) -> StepEntry:
    """The step entry of `var` receiving a dense gradient of its own shape."""
    spec = tuple(var.layout.to_partition_spec())
    return StepEntry(var.name if name is None else name, var.shape, str(var.dtype),
                     spec + (None,) * (len(var.shape) - len(spec)), slots)
