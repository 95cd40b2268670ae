"""Variables: named, mutable tensors laid out on a mesh (the Keras-shaped API's state holders).

A slot of a small variable is a *view* of its pack's buffer (`optimizers/packed_state.py`): read, it is cut out;
assigned, it is written back. A slot created as zeros is *deferred*: no memory is allocated for it until it is
read, so creating the slots of thousands of small variables costs nothing and packing them allocates one buffer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from shardopt.core.errors import NotInThisProcessError
from shardopt.core.layout import Layout, as_layout
from shardopt.core.specs import IndexedSlices, VariableSpec  # re-exported: users import them from here too


class Variable:
    """A named, mutable tensor with a layout; its value is a `jax.Array` placed per the layout.

    Without a layout the variable is placed replicated on the optimizer's mesh when the optimizer builds.
    """

    def __init__(
        self,
        initial_value: Any,
        name: str | None = None,
        layout: Any = None,
        dtype: Any = None,
        trainable: bool = True,
        mesh: Mesh | None = None,
    ):
        value = jnp.asarray(initial_value, dtype=dtype) if dtype is not None else jnp.asarray(initial_value)
        self.name = name if name is not None else "Variable"  # as tf.Variable names it (eager: never numbered)
        self.trainable = trainable
        self._layout: Layout | None = as_layout(layout, mesh, value.ndim)
        if self._layout is not None:
            self._layout.validate(value.shape, f"variable {self.name!r}")
            value = jax.device_put(value, self._layout.to_named_sharding())
        self._value: jax.Array = value
        self._view: tuple[Any, int] | None = None  # (PackedBuffer, member index) once the optimizer packs it
        self._deferred = False  # zeros not yet allocated (see `zeros`)

    @classmethod
    def zeros(cls, shape: tuple[int, ...], dtype: Any, name: str, layout: Layout) -> Variable:
        """A variable of zeros whose memory is allocated only when it is first read (slots that get packed
        never are: their pack allocates one buffer for all of them)."""
        var = cls.__new__(cls)
        var.name, var.trainable, var._layout, var._view, var._deferred = name, False, layout, None, True
        var._value = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=layout.to_named_sharding())
        return var

    @property
    def value(self) -> jax.Array:
        if self._view is not None:
            return self._view[0].member(self._view[1])
        if self._deferred:
            self._value = jnp.zeros(self._value.shape, self._value.dtype, device=self._layout.to_named_sharding())
            self._deferred = False
        return self._value

    @property
    def is_deferred_zeros(self) -> bool:
        return self._deferred and self._view is None

    def _attach(self, buffer: Any, index: int) -> None:
        """Makes this variable a view of member `index` of a packed buffer (see `frontend/packed_state.py`)."""
        self._view = (buffer, index)
        self._deferred = False
        self._value = jax.ShapeDtypeStruct(self._value.shape, self._value.dtype,
                                           sharding=buffer.member_shardings[index])

    @property
    def layout(self) -> Layout | None:
        return self._layout

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._value.shape)

    @property
    def dtype(self) -> np.dtype:
        return self._value.dtype

    @property
    def sharding(self) -> jax.sharding.Sharding:
        return self._value.sharding

    def place(self, layout: Layout) -> None:
        """Gives the variable `layout` and moves its value there (used by `Optimizer.build`)."""
        if self._view is not None:
            raise RuntimeError(f"variable {self.name!r} is part of an optimizer's packed state; its layout is fixed")
        layout.validate(self.shape, f"variable {self.name!r}")
        self._layout = layout
        self._value = jax.device_put(self.value, layout.to_named_sharding())

    def assign(self, value: Any) -> Variable:
        """Replaces the value (same shape and dtype), keeping the layout."""
        new = jnp.asarray(value, dtype=self.dtype)
        if new.shape != self.shape:
            raise ValueError(f"cannot assign a value of shape {new.shape} to variable {self.name!r} "
                             f"of shape {self.shape}")
        self._set(jax.device_put(new, self.sharding) if self._layout is not None else new)
        return self

    def _set(self, array: jax.Array) -> None:
        """Stores a new value computed by a compiled step (already in the right place)."""
        if self._view is None:
            self._value = array
            self._deferred = False
        else:
            self._view[0].write_member(self._view[1], array)

    def numpy(self) -> np.ndarray:
        """The value as a numpy array. In a multi-process job, a variable split across processes is not in any
        one of them: that raises NotInThisProcessError, which says to call `gather()` in every process (a
        variable whose shards all live in this process, or a replicated one, reads as usual)."""
        value = self.value
        if not _in_this_process(value):
            raise NotInThisProcessError(
                f"variable {self.name!r} {list(self.shape)} is split across processes (layout {self._layout}): "
                f"process {jax.process_index()} holds only {len(value.addressable_shards)} of its "
                f"{len(value.sharding.device_set)} device shards. Call `.gather()` on it in "
                "every process at the same point (a collective: a process that skips it leaves the others "
                "waiting), or read this process's part with `.local_shards()`")
        return np.asarray(value)

    def gather(self) -> np.ndarray:
        """The whole value as a numpy array in every process. With the value split across processes this is a
        collective (`multihost_utils.process_allgather`): every process must call it, at the same point."""
        value = self.value
        if _in_this_process(value):
            return np.asarray(value)
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(value, tiled=True))

    def local_shards(self) -> list[tuple[tuple[slice, ...], np.ndarray]]:
        """This process's distinct pieces of the value: (index into the whole value, numpy array) each."""
        seen: dict[str, tuple[tuple[slice, ...], np.ndarray]] = {}
        for shard in self.value.addressable_shards:
            seen.setdefault(repr(shard.index), (shard.index, np.asarray(shard.data)))
        return list(seen.values())

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.numpy()
        return arr.astype(dtype) if dtype is not None else arr

    def __repr__(self) -> str:
        return f"<shardopt.Variable {self.name!r} shape={self.shape} dtype={self.dtype} layout={self._layout}>"


def _in_this_process(value: Any) -> bool:
    """Whether this process holds every element of `value` (always, outside a multi-process job)."""
    if not isinstance(value, jax.Array) or value.is_fully_addressable:
        return True
    everywhere = value.sharding.devices_indices_map(value.shape)
    here = {repr(everywhere[d]) for d in value.sharding.addressable_devices}
    return here == {repr(i) for i in everywhere.values()}


__all__ = ["IndexedSlices", "Variable", "VariableSpec"]
