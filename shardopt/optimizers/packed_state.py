"""The optimizer's packed slots between steps: one buffer per pack and slot, with the slot `Variable`s of the
members turned into views (cut out of the buffer when read, written back when assigned), and the pack's donated
gradient buffer. The plan of the packs is `core/packing.py`'s; this module holds their arrays."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from shardopt.core.layout import auto_mesh
from shardopt.core.packing import PACK_MAX_MEMBERS, PackGroup, plan_packs
from shardopt.optimizers.variables import Variable


@functools.lru_cache(maxsize=4096)
def _cutter(dim: int, shape: tuple[int, ...], piece: tuple[int, ...], sharding: NamedSharding):
    """Cuts one member of `shape` (a `piece` along `dim`) at a runtime offset: one compiled program per member
    shape and layout, not one per member or one with an output per member (2000 outputs took XLA 30 s)."""
    def cut(packed: jax.Array, offset: jax.Array) -> jax.Array:
        piece_value = jax.lax.dynamic_slice_in_dim(packed, offset, piece[dim], axis=dim)
        return piece_value.reshape(shape)

    return jax.jit(cut, out_shardings=sharding)


@functools.lru_cache(maxsize=256)
def _packer(group: PackGroup, sharding: NamedSharding):
    return jax.jit(group.pack, out_shardings=sharding)


@functools.lru_cache(maxsize=4096)
def _member_writer(group: PackGroup, index: int, sharding: NamedSharding):
    member = group.members[index]

    def write(packed: jax.Array, value: jax.Array) -> jax.Array:  # both typed on the Auto-axes mesh
        piece = jnp.reshape(value, group.piece_shape(member.shape))
        return jax.lax.dynamic_update_slice_in_dim(packed, piece, member.offset, axis=group.dim)

    return jax.jit(write, donate_argnums=0, out_shardings=sharding)


def _on_mesh(mesh: Mesh, sharding: NamedSharding) -> NamedSharding:
    return NamedSharding(mesh, sharding.spec)


class PackedBuffer:
    """One packed buffer (a pack's variables, or one of its slots) and the cached values of its members.

    The buffer lives on the Auto-axes copy of the mesh (as the compiled step's results do), so packing and
    cutting need no sharding annotations; members are cut out onto the user's mesh (`member_shardings`).

    `value`/`_set` make it a holder like a `Variable`, so `apply_gradients` passes and stores it the same way."""

    def __init__(self, group: PackGroup, array: jax.Array, sharding: NamedSharding,
                 member_shardings: tuple[NamedSharding, ...]):
        self.group = group
        self.sharding = sharding
        self.member_shardings = member_shardings
        self._array = array
        self._views: list[jax.Array] | None = None

    @property
    def value(self) -> jax.Array:
        return self._array

    def _set(self, array: jax.Array) -> None:
        self._array = array
        self._views = None

    def member(self, index: int) -> jax.Array:
        """Member `index`'s value, cut out on first read after a step (and kept until the next one)."""
        if self._views is None:
            self._views = [None] * len(self.group.members)
        view = self._views[index]
        if view is None:
            m = self.group.members[index]
            packed = jax.device_put(self._array, self.sharding)  # the step may return it typed on the user's mesh
            cut = _cutter(self.group.dim, m.shape, self.group.piece_shape(m.shape), self.member_shardings[index])
            view = self._views[index] = cut(packed, np.int32(m.offset))
        return view

    def write_member(self, index: int, value: jax.Array) -> None:
        """Writes member `index` into the buffer (donating the old one); the cached views stay valid."""
        on_auto = jax.device_put(value, _on_mesh(self.sharding.mesh, self.member_shardings[index]))
        packed = jax.device_put(self._array, self.sharding)
        self._array = _member_writer(self.group, index, self.sharding)(packed, on_auto)
        if self._views is not None:
            self._views[index] = value  # as given (placed on the user's mesh by `Variable.assign`)


class ScratchBuffer:
    """A pack's gradient buffer: donated to each step and handed back (see contract.GRADIENT_BUFFER)."""

    def __init__(self, array: jax.Array):
        self.value = array

    def _set(self, array: jax.Array) -> None:
        self.value = array


@dataclass
class PackedState:
    """The packs of an optimizer's slots and their buffers: `slots[p][slot name]`, `gradients[p]`."""

    packs: tuple[PackGroup, ...]
    slots: list[dict[str, PackedBuffer]]
    gradients: list[ScratchBuffer]
    member_of: dict[str, tuple[int, int]]   # variable (step) name -> (pack index, member index)


def _packed_buffer(group: PackGroup, sharding: NamedSharding, member_shardings: tuple[NamedSharding, ...],
                   slots: list[Variable]) -> PackedBuffer:
    """A new buffer packing the members' slots: zeros at once when every slot is still deferred zeros."""
    if all(s.is_deferred_zeros for s in slots):
        return PackedBuffer(group, jnp.zeros(group.shape, group.dtype, device=sharding), sharding, member_shardings)
    values = jax.device_put([s.value for s in slots], [_on_mesh(sharding.mesh, m) for m in member_shardings])
    return PackedBuffer(group, _packer(group, sharding)(values), sharding, member_shardings)


def pack_state(names: Sequence[str], variables: Sequence[Variable], slots: Sequence[dict[str, Variable]],
               slot_names: Sequence[str], mesh: Mesh, max_elements: int,
               max_members: int = PACK_MAX_MEMBERS) -> PackedState:
    """Packs the slots of the small variables that share a dtype and packable layout and have exactly the slots
    `slot_names`, each of their own shape (Adafactor's factored variables stay loose); the slot `Variable`s
    become views of the packed buffers. The variables themselves stay the user's arrays."""
    mesh_axes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    candidates = []
    by_name: dict[str, dict[str, Variable]] = {}
    for name, var, own in zip(names, variables, slots, strict=True):
        if not slot_names or set(own) != set(slot_names) or any(
                own[s].shape != var.shape or own[s]._view is not None or own[s].layout != var.layout
                for s in slot_names):
            continue  # (slots laid out unlike their variable, e.g. with shard_state_over, stay loose)
        candidates.append((name, var.shape, str(var.dtype), var.layout.spec_tuple()))
        by_name[name] = own
    packs = plan_packs(candidates, mesh_axes, max_elements, max_members) if max_elements > 0 else ()
    state = PackedState(packs, [], [], {})
    for p_index, group in enumerate(packs):
        sharding = NamedSharding(auto_mesh(mesh), PartitionSpec(*group.layout))
        member_shardings = tuple(NamedSharding(mesh, PartitionSpec(*group.member_layout(len(m.shape))))
                                 for m in group.members)
        owns = [by_name[m.name] for m in group.members]
        buffers = {s: _packed_buffer(group, sharding, member_shardings, [own[s] for own in owns])
                   for s in slot_names}
        for i, (member, own) in enumerate(zip(group.members, owns, strict=True)):
            for s in slot_names:
                own[s]._attach(buffers[s], i)
            state.member_of[member.name] = (p_index, i)
        state.slots.append(buffers)
        state.gradients.append(ScratchBuffer(jnp.zeros(group.shape, group.dtype, device=sharding)))
    return state
