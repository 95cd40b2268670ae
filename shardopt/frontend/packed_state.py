"""The optimizer's packed state between steps: one buffer per pack for its variables and one per slot, with the
`Variable`s of the members turned into views (cut out of the buffer when read, written back when assigned)."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from shardopt.frontend.layout import auto_mesh
from shardopt.frontend.packing import PackGroup, plan_packs
from shardopt.frontend.variables import Variable


@functools.lru_cache(maxsize=256)
def _unpacker(group: PackGroup, shardings: tuple[NamedSharding, ...]):
    return jax.jit(lambda a: tuple(group.unpack(a, i) for i in range(len(group.members))), out_shardings=shardings)


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
        """Member `index`'s value; the first read after a step cuts out every member in one call."""
        if self._views is None:
            packed = jax.device_put(self._array, self.sharding)  # the step may return it typed on the user's mesh
            self._views = list(_unpacker(self.group, self.member_shardings)(packed))
        return self._views[index]

    def write_member(self, index: int, value: jax.Array) -> None:
        """Writes member `index` into the buffer (donating the old one); the cached views stay valid."""
        on_auto = jax.device_put(value, _on_mesh(self.sharding.mesh, self.member_shardings[index]))
        packed = jax.device_put(self._array, self.sharding)
        self._array = _member_writer(self.group, index, self.sharding)(packed, on_auto)
        if self._views is not None:
            self._views[index] = value  # as given (placed on the user's mesh by `Variable.assign`)


class ScratchBuffer:
    """A pack's gradient buffer: donated to each step and handed back (see convention.GRADIENT_BUFFER)."""

    def __init__(self, array: jax.Array):
        self.value = array

    def _set(self, array: jax.Array) -> None:
        self.value = array


@dataclass
class PackedState:
    """The packs of an optimizer and their buffers: `variables[p]`, `slots[p][slot name]`, `gradients[p]`."""

    packs: tuple[PackGroup, ...]
    variables: list[PackedBuffer]
    slots: list[dict[str, PackedBuffer]]
    gradients: list[ScratchBuffer]
    member_of: dict[str, tuple[int, int]]   # variable name -> (pack index, member index)


def _packed_buffer(group: PackGroup, sharding: NamedSharding, member_shardings: tuple[NamedSharding, ...],
                   values: list[jax.Array]) -> PackedBuffer:
    """A new buffer packing `values` (one per member, wherever they live)."""
    values = jax.device_put(values, [_on_mesh(sharding.mesh, m) for m in member_shardings])
    return PackedBuffer(group, _packer(group, sharding)(values), sharding, member_shardings)


def pack_state(variables: Sequence[Variable], slots: Sequence[dict[str, Variable]], slot_names: Sequence[str],
               mesh: Mesh, max_elements: int) -> PackedState:
    """Packs the small variables (and their slots) that share a dtype and packable layout; attaches views."""
    mesh_axes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    candidates = []
    by_name: dict[str, tuple[Variable, dict[str, Variable]]] = {}
    counts = Counter(v.name for v in variables)
    for var, own in zip(variables, slots, strict=True):
        if var._view is not None:
            continue  # already packed by another optimizer: stays in that buffer, updated through its view
        if counts[var.name] > 1 or any(s not in own or own[s].shape != var.shape for s in slot_names):
            continue
        spec = tuple(var.layout.to_partition_spec())
        layout = spec + (None,) * (len(var.shape) - len(spec))
        candidates.append((var.name, var.shape, str(var.dtype), layout))
        by_name[var.name] = (var, own)
    packs = plan_packs(candidates, mesh_axes, max_elements) if max_elements > 0 else ()
    state = PackedState(packs, [], [], [], {})
    for p_index, group in enumerate(packs):
        sharding = NamedSharding(auto_mesh(mesh), PartitionSpec(*group.layout))
        member_shardings = tuple(NamedSharding(mesh, PartitionSpec(*group.member_layout(len(m.shape))))
                                 for m in group.members)
        holders = [by_name[m.name] for m in group.members]
        var_buffer = _packed_buffer(group, sharding, member_shardings, [v.value for v, _ in holders])
        slot_buffers = {s: _packed_buffer(group, sharding, member_shardings, [own[s].value for _, own in holders])
                        for s in slot_names}
        for i, (var, own) in enumerate(holders):
            var._attach(var_buffer, i)
            for s in slot_names:
                own[s]._attach(slot_buffers[s], i)
            state.member_of[var.name] = (p_index, i)
        state.variables.append(var_buffer)
        state.slots.append(slot_buffers)
        state.gradients.append(ScratchBuffer(jnp.zeros(group.shape, group.dtype, device=sharding)))
    return state
