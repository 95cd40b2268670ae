"""DTensor-style layouts: one mesh axis name (or UNSHARDED) per tensor dimension.

`Layout(sharding_specs, mesh)` mirrors `tf.experimental.dtensor.Layout`; it converts to and from
`jax.sharding.PartitionSpec` / `NamedSharding` so both are accepted wherever a layout is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

UNSHARDED = "unsharded"

AxisSpec = str | tuple[str, ...]  # a mesh axis, several axes (major to minor), or UNSHARDED


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axes with Auto axis types: shardopt lowers on Auto meshes so that jax does not
    pin a sharding constraint after every op (Explicit is `jax.make_mesh`'s default)."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def same_mesh(a: Mesh, b: Mesh) -> bool:
    """Two meshes are the same for shardopt when axis names, sizes and device order agree."""
    return (
        a.axis_names == b.axis_names
        and a.devices.shape == b.devices.shape
        and [d.id for d in a.devices.flat] == [d.id for d in b.devices.flat]
    )


def _normalize_axis(spec: Any) -> AxisSpec:
    if spec is None or spec == UNSHARDED:
        return UNSHARDED
    if isinstance(spec, str):
        return spec
    if isinstance(spec, (tuple, list)):
        axes = tuple(spec)
        if not axes:
            return UNSHARDED
        if not all(isinstance(a, str) for a in axes):
            raise TypeError(f"a sharding spec entry must be a mesh axis name, got {spec!r}")
        return axes[0] if len(axes) == 1 else axes
    raise TypeError(f"a sharding spec entry must be a mesh axis name or UNSHARDED, got {spec!r}")


class Layout:
    """Where each dimension of a tensor lives on a device mesh (DTensor's `Layout`)."""

    def __init__(self, sharding_specs: Sequence[Any], mesh: Mesh):
        if not isinstance(mesh, Mesh):
            raise TypeError(f"Layout needs a jax.sharding.Mesh, got {type(mesh).__name__}")
        self.sharding_specs: tuple[AxisSpec, ...] = tuple(_normalize_axis(s) for s in sharding_specs)
        self.mesh = mesh

    @classmethod
    def replicated(cls, mesh: Mesh, rank: int) -> Layout:
        """A layout that keeps a full copy of the tensor on every device."""
        return cls([UNSHARDED] * rank, mesh)

    @classmethod
    def from_partition_spec(cls, spec: PartitionSpec, mesh: Mesh, rank: int) -> Layout:
        """Converts a PartitionSpec (shorter specs are padded with UNSHARDED, as jax does)."""
        entries = list(spec)
        if len(entries) > rank:
            raise ValueError(f"PartitionSpec {spec} has {len(entries)} entries for a rank-{rank} tensor")
        return cls(entries + [UNSHARDED] * (rank - len(entries)), mesh)

    @classmethod
    def from_sharding(cls, sharding: NamedSharding, rank: int) -> Layout:
        """Converts a NamedSharding."""
        return cls.from_partition_spec(sharding.spec, sharding.mesh, rank)

    @property
    def rank(self) -> int:
        return len(self.sharding_specs)

    def axes_of(self, dim: int) -> tuple[str, ...]:
        """The mesh axes that split dimension `dim` (empty when it is not split)."""
        spec = self.sharding_specs[dim]
        if spec == UNSHARDED:
            return ()
        return (spec,) if isinstance(spec, str) else spec

    def shards_of(self, dim: int) -> int:
        """How many pieces dimension `dim` is cut into."""
        sizes = dict(zip(self.mesh.axis_names, self.mesh.devices.shape, strict=True))
        return int(np.prod([sizes[a] for a in self.axes_of(dim)], dtype=np.int64))

    def is_fully_replicated(self) -> bool:
        return all(s == UNSHARDED for s in self.sharding_specs)

    def spec_tuple(self) -> tuple[Any, ...]:
        """One PartitionSpec entry per dimension (None where unsharded): how the step contract spells layouts."""
        return tuple(None if s == UNSHARDED else s for s in self.sharding_specs)

    def to_partition_spec(self) -> PartitionSpec:
        return PartitionSpec(*(None if s == UNSHARDED else s for s in self.sharding_specs))

    def to_named_sharding(self) -> NamedSharding:
        """The NamedSharding on this layout's mesh (its axis types kept: values live where the user's data does;
        only lowering switches to Auto axes)."""
        return NamedSharding(self.mesh, self.to_partition_spec())

    def validate(self, shape: Sequence[int], what: str) -> None:
        """Raises a ValueError naming `what`, the dimension and the axis when this layout cannot hold `shape`."""
        if len(shape) != self.rank:
            raise ValueError(f"{what}: layout {self} has rank {self.rank} but the tensor has shape {tuple(shape)}")
        sizes = dict(zip(self.mesh.axis_names, self.mesh.devices.shape, strict=True))
        problem = layout_problem(shape, [self.axes_of(d) for d in range(self.rank)], sizes)
        if problem:
            raise ValueError(f"{what}: {problem}")

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Layout)
            and self.sharding_specs == other.sharding_specs
            and same_mesh(self.mesh, other.mesh)
        )

    def __hash__(self) -> int:
        return hash((self.sharding_specs, self.mesh.axis_names, self.mesh.devices.shape))

    def __repr__(self) -> str:
        mesh = ",".join(f"{n}={s}" for n, s in zip(self.mesh.axis_names, self.mesh.devices.shape, strict=True))
        return f"Layout({list(self.sharding_specs)}, mesh<{mesh}>)"


def layout_problem(shape: Sequence[int], dims: Sequence[Any], mesh_axes: dict[str, int]) -> str | None:
    """Why a tensor of `shape` cannot be laid out with mesh axes `dims` (one entry per dimension: None, an axis
    or a tuple of axes) on a mesh of `mesh_axes`, or None when it can: an unknown axis, an axis used twice, or a
    dimension not divisible by its axes. The one rule behind `Layout.validate` and `propagate-layouts`."""
    used: dict[str, int] = {}
    for dim, entry in enumerate(dims):
        axes = () if entry is None or entry == UNSHARDED else ((entry,) if isinstance(entry, str) else tuple(entry))
        shards = 1
        for axis in axes:
            if axis not in mesh_axes:
                return (f"dimension {dim} is sharded over unknown mesh axis {axis!r}; the mesh has axes "
                        f"{list(mesh_axes)}")
            if axis in used:
                return f"mesh axis {axis!r} shards both dimension {used[axis]} and dimension {dim}"
            used[axis] = dim
            shards *= mesh_axes[axis]
        if shape[dim] % shards:
            return (f"dimension {dim} of size {shape[dim]} is not divisible by mesh axis {'x'.join(axes)} of size "
                    f"{shards}")
    return None


def resolve_mesh(mesh: Mesh | None, sources: Sequence[Any], device: Any = None) -> Mesh:
    """The one rule for which mesh a step runs on: the optimizer's mesh; else the mesh of the first layout or
    NamedSharding among `sources`; else a one-device mesh (on `device`, default the first device)."""
    if mesh is not None:
        return mesh
    for src in sources:
        found = getattr(src, "mesh", None)
        if isinstance(found, Mesh):
            return found
    return default_mesh(device)


def as_layout(obj: Any, mesh: Mesh | None, rank: int) -> Layout | None:
    """Accepts a Layout, NamedSharding, PartitionSpec (needs `mesh`) or None; returns a Layout or None."""
    if obj is None or isinstance(obj, Layout):
        return obj
    if isinstance(obj, NamedSharding):
        return Layout.from_sharding(obj, rank)
    if isinstance(obj, PartitionSpec):
        if mesh is None:
            raise ValueError("a PartitionSpec layout needs a mesh: pass mesh= or use a NamedSharding")
        return Layout.from_partition_spec(obj, mesh, rank)
    raise TypeError(f"layout must be a shardopt.Layout, NamedSharding or PartitionSpec, got {type(obj).__name__}")


def default_mesh(device: Any = None) -> Mesh:
    """A one-device mesh for optimizers created without `mesh=` (on `device`, default the first device)."""
    return Mesh(np.array([device if device is not None else jax.devices()[0]]), ("replica",),
                axis_types=(AxisType.Auto,))


def state_axes(spec: Any) -> tuple[str, ...]:
    """A `shard_state_over` value for one variable (None, a mesh axis name, or a tuple/list of them) as a tuple
    of axis names (empty: the state follows the variable)."""
    if spec is None:
        return ()
    if isinstance(spec, str):
        return (spec,)
    if isinstance(spec, (tuple, list)) and all(isinstance(a, str) for a in spec):
        if len(set(spec)) != len(spec):
            raise ValueError(f"shard_state_over names a mesh axis twice: {tuple(spec)}")
        return tuple(spec)
    raise TypeError(f"shard_state_over must be a mesh axis name or a tuple of them, got {spec!r}")


def state_layout(shape: Sequence[int], layout: Sequence[Any], axes: Sequence[str], mesh_axes: dict[str, int]
                 ) -> tuple[tuple[Any, ...] | None, str]:
    """Where weight-update sharding (Xu et al. 2020) puts the optimizer state of a variable of `shape` and
    `layout` when its state is sharded over the mesh `axes` as well: (the slots' layout, why) — the one rule
    behind `propagate-layouts` and the optimizers' slot placement.

    Axes the layout already uses are dropped (the state is already split over them); axes of size 1 change
    nothing and are dropped too. The remaining axes go together, minor to any axes already there, onto the
    first dimension whose size is divisible by its existing shards times their sizes. When no dimension is,
    the layout is None and `why` says so (the caller falls back to the variable's layout or raises)."""
    for a in axes:
        if a not in mesh_axes:
            return None, f"unknown mesh axis {a!r}; the mesh has axes {list(mesh_axes)}"
    dims = [() if e is None or e == UNSHARDED else ((e,) if isinstance(e, str) else tuple(e)) for e in layout]
    used = {a for d in dims for a in d}
    extra = tuple(a for a in axes if a not in used and mesh_axes[a] > 1)
    if not extra:
        return tuple(layout), "already split over " + "x".join(axes) if axes else "no axes"
    factor = int(np.prod([mesh_axes[a] for a in extra], dtype=np.int64))
    for d, size in enumerate(shape):
        shards = int(np.prod([mesh_axes[a] for a in dims[d]], dtype=np.int64))
        if size % (shards * factor) == 0 and size > 0:
            new = dims[d] + extra
            out = list(layout)
            out[d] = new[0] if len(new) == 1 else new
            return tuple(None if e == UNSHARDED else e for e in out), f"dimension {d}"
    return None, (f"no dimension of shape {tuple(shape)} is divisible by its shards times {'x'.join(extra)} "
                  f"(size {factor})")
