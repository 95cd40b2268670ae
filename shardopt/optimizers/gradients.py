"""Checks a gradient against its variable and describes how it enters the step (dense, broadcast or sparse)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shardopt.core.contract import StepEntry
from shardopt.core.specs import IndexedSlices
from shardopt.optimizers.variables import Variable


def _not_an_array(grad: Any, var: Variable, what: str = "gradient") -> TypeError:
    return TypeError(f"{what} for {var.name!r} must be an array (or None, or shardopt.IndexedSlices), got "
                     f"{type(grad).__name__}")


def gradient_array(grad: Any, var: Variable, what: str = "gradient") -> jax.Array | np.ndarray:
    """`grad` as an array of the variable's dtype (a numpy array as it is, anything else as a jax array). The
    dtype checked is the one `grad` arrives with: without jax x64, `jnp.asarray` would silently narrow a numpy
    float64 gradient for a float32 variable. Anything that is not numeric (a string, dict, object, None inside
    IndexedSlices) is a TypeError naming the variable."""
    if grad is None or isinstance(grad, (str, bytes, dict, set, frozenset)):
        raise _not_an_array(grad, var, what)
    try:
        dtype = np.dtype(grad.dtype) if hasattr(grad, "dtype") else None
    except TypeError:
        raise _not_an_array(grad, var, what) from None
    if dtype is not None and dtype != var.dtype:
        raise TypeError(f"{what} for {var.name!r} has dtype {dtype}, the variable {var.dtype}")
    if isinstance(grad, (jax.Array, np.ndarray)) and dtype is not None:
        return grad  # a numpy one stays on the host: the step places it once, on its sharding
    try:
        g = jnp.asarray(grad)
    except (TypeError, ValueError):
        raise _not_an_array(grad, var, what) from None
    if g.dtype != var.dtype:
        raise TypeError(f"{what} for {var.name!r} has dtype {g.dtype}, the variable {var.dtype}")
    return g


def _sparse_indices(indices: Any, var: Variable) -> jax.Array:
    """The row indices of an IndexedSlices for `var`, range-checked in their own dtype *before* any conversion:
    without jax x64, int64/uint64 indices become int32 and out-of-range ones would wrap onto real rows."""
    where = f"IndexedSlices for {var.name!r}"
    if indices is None or isinstance(indices, (str, bytes, dict, set, frozenset)):
        raise TypeError(f"{where}: indices must be a 1-D integer array, got {type(indices).__name__}")
    if not isinstance(indices, jax.Array):
        try:
            indices = np.asarray(indices)
        except (TypeError, ValueError):
            raise TypeError(f"{where}: indices must be a 1-D integer array, got {type(indices).__name__}") from None
    if indices.ndim != 1 or not np.issubdtype(np.dtype(indices.dtype), np.integer):
        raise TypeError(f"{where}: indices must be a 1-D integer array")
    if indices.size:
        lo, hi = int(indices.min()), int(indices.max())  # Python ints: exact for int64 and uint64
        if lo < 0 or hi >= var.shape[0]:
            raise ValueError(f"{where}: indices must be in [0, {var.shape[0]}), got [{lo}, {hi}]")
    return indices if isinstance(indices, jax.Array) else jnp.asarray(indices)


def row_bucket(rows: int) -> int:
    """The row count a sparse gradient of `rows` rows is compiled for: the next power of two (at least 8), so a
    row count that changes every step compiles a handful of programs, not one per count (issue 13: 85 programs
    and +630 MB RSS in 200 steps)."""
    return max(8, 1 << max(rows - 1, 0).bit_length())


def pad_rows(values: Any, indices: Any, dim0: int) -> tuple[Any, Any]:
    """`values`/`indices` padded to `row_bucket` rows: zero rows at index `dim0`, one past the last row, which the
    step's scatter drops (`mode="drop"`), so padding changes no number. Padded on the host: an eager jax pad would
    compile one program per row count, which is what the buckets are for."""
    rows = int(indices.shape[0])
    pad = row_bucket(rows) - rows
    if not pad:
        return values, indices
    values, indices = np.asarray(values), np.asarray(indices)
    if indices.dtype.itemsize < 4:  # the padding index, one past the last row, must fit
        indices = indices.astype(np.int32)
    values = np.concatenate([values, np.zeros((pad, *values.shape[1:]), values.dtype)])
    indices = np.concatenate([indices, np.full((pad,), dim0, indices.dtype)])
    return values, indices


def gradient_entry(grad: Any, var: Variable, slots: tuple[str, ...], name: str | None = None
                   ) -> tuple[StepEntry, list[Any]]:
    """Validates one gradient against its variable; returns the step entry (named `name`, the variable's unique
    name in the step, by default its own) and the arrays to pass."""
    name = var.name if name is None else name
    lay = var.layout.spec_tuple()
    if isinstance(grad, IndexedSlices):
        values = gradient_array(grad.values, var, "IndexedSlices values")
        if grad.dense_shape is not None:
            try:
                dense_shape = tuple(np.asarray(grad.dense_shape).tolist())
            except (TypeError, ValueError):
                dense_shape = None
            if dense_shape != var.shape:
                raise ValueError(f"IndexedSlices for {var.name!r} has dense_shape {grad.dense_shape!r}, the "
                                 f"variable has shape {var.shape}")
        if not var.shape:
            raise ValueError(f"IndexedSlices for {var.name!r}: a scalar variable has no rows to index")
        indices = _sparse_indices(grad.indices, var)
        if values.shape != (indices.shape[0], *var.shape[1:]):
            raise ValueError(f"IndexedSlices for {var.name!r}: values of shape {values.shape} do not match "
                             f"{indices.shape[0]} rows of a variable of shape {var.shape}")
        values, indices = pad_rows(values, indices, var.shape[0])
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
    return StepEntry(var.name if name is None else name, var.shape, str(var.dtype), var.layout.spec_tuple(), slots)
