"""Packed optimizer state: which variables share one flat buffer per (dtype, layout), and how a member is cut out.

Between steps, every step (stateful, functional, embedded, loaded from an artifact) keeps the slots of small
variables packed, one buffer per group and slot, so a step takes a few state buffers (plus one variable and one
gradient per variable) and returns a few: XLA:CPU pays ~1.3 µs per result
buffer (`../shared/notes/pipeline-facts.md` §9) and 1-3 µs per loop kernel (optax's step minus the no-op's
over 6000 kernels, across the benchmark runs), which for 2000 small tensors costs more than the math. `fuse-moments`
then turns the per-member updates into one update per group, and the gradients are gathered into a donated
per-pack scratch buffer (convention.GRADIENT_BUFFER). Packing keeps every device's data local (§3):
- replicated members are flattened and concatenated: packed shape `[N]`;
- members sharded on dim 0 only (S shards) become `[S, n/S]` pieces (row k is device k's contiguous block)
  concatenated on dim 1: packed shape `[S, N/S]`, sharded on dim 0.
Packing is a layout decision of the step contract (`core/contract.py`): each packed buffer is an argument whose
spec names its pack, and the frontend writes that into the IR (`shardopt.pack`, `shardopt.members`), where the
passes read it. The variables themselves stay the user's arrays.
Members with other layouts, or larger than `PACK_MAX_ELEMENTS`, stay loose (one buffer each): for a large
tensor the copy that gathers its gradient into the packed buffer (8 bytes per element) costs more than the
per-buffer overheads packing saves. Measured with `apply_gradients` on 7.4M float32 parameters, one CPU device,
packed vs one buffer each: 2000 x 3,700 elements 13-19 vs 48 ms; 400 x 18,500 about 11 vs 15 ms; 100 x 74,000
equal (9-10 ms); 25 x 296,000 about 10 vs 6.5 ms. Hence the threshold of 65,536 elements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PACK_MAX_ELEMENTS = 1 << 16
# At most this many variables share a pack. XLA:CPU's compile time grows faster than linearly with the operands
# of one instruction: one multi-tensor kernel call over 2000 variables of f32[3700] compiled in 15.7 s, over 500 in
# 0.44 s, and 2000 variables as 16 calls of 125 in 0.9 s (64 per call: 0.84 s, 250: 1.2 s); the packs' concatenated
# gradients and fused updates are single instructions over every member too.
PACK_MAX_MEMBERS = 128
PACK_PREFIX = "@pack"  # only a readable name: nothing parses it


@dataclass(frozen=True)
class PackMember:
    """One variable inside a pack: its name, shape, and where its piece starts along the packed dimension."""

    name: str
    shape: tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class PackGroup:
    """Variables of one dtype and packable layout kept in one buffer (and each slot in a buffer like it)."""

    name: str
    dtype: str
    axes: Any                      # the mesh axes of dim 0 for a row-packed group, None for a flat one
    shards: int                    # devices along dim 0 (1 for a flat group)
    members: tuple[PackMember, ...]

    @property
    def dim(self) -> int:
        """The dimension the pieces are concatenated along."""
        return 0 if self.axes is None else 1

    def piece_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        n = int(np.prod(shape, dtype=np.int64))
        return (n,) if self.axes is None else (self.shards, n // self.shards)

    @property
    def length(self) -> int:
        """Extent of the packed dimension."""
        last = self.members[-1]
        return last.offset + self.piece_shape(last.shape)[self.dim]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.length,) if self.axes is None else (self.shards, self.length)

    @property
    def layout(self) -> tuple[Any, ...]:
        return (None,) if self.axes is None else (self.axes, None)

    def member_layout(self, rank: int) -> tuple[Any, ...]:
        return member_layout(self.layout, rank)

    def unpack(self, packed: jax.Array, index: int) -> jax.Array:
        """Member `index` cut out of `packed` (traceable: a static slice and a reshape)."""
        m = self.members[index]
        size = self.piece_shape(m.shape)[self.dim]
        piece = jax.lax.slice_in_dim(packed, m.offset, m.offset + size, axis=self.dim)
        return piece.reshape(m.shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "axes": list(self.axes) if isinstance(self.axes, tuple)
                else self.axes, "shards": self.shards,
                "members": [[m.name, list(m.shape), m.offset] for m in self.members]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PackGroup:
        axes = tuple(d["axes"]) if isinstance(d["axes"], list) else d["axes"]
        return cls(str(d["name"]), str(d["dtype"]), axes, int(d["shards"]),
                   tuple(PackMember(str(n), tuple(int(x) for x in shape), int(o)) for n, shape, o in d["members"]))

    def pack(self, values: Sequence[jax.Array]) -> jax.Array:
        """The packed buffer of `values` (one per member, in order; traceable)."""
        pieces = [jnp.reshape(v, self.piece_shape(m.shape)) for v, m in zip(values, self.members, strict=True)]
        return jnp.concatenate(pieces, axis=self.dim)


def member_layout(pack_layout: tuple[Any, ...], rank: int) -> tuple[Any, ...]:
    """The layout of a rank-`rank` member of a pack laid out as `pack_layout`: `(None,)` is flat and replicated,
    `(axes, None)` is rows whose members are sharded on dim 0 over `axes`."""
    if len(pack_layout) == 1 or rank == 0:
        return (None,) * rank
    return (pack_layout[0],) + (None,) * (rank - 1)


def _packing_key(shape: tuple[int, ...], layout: tuple[Any, ...], mesh_axes: dict[str, int]
                 ) -> tuple[Any, int] | None:
    """(axes, shards) of a packable layout: (None, 1) replicated, (axes of dim 0, S) dim-0-only; else None."""
    if all(a is None for a in layout):
        return None, 1
    if layout[0] is not None and all(a is None for a in layout[1:]):
        names = (layout[0],) if isinstance(layout[0], str) else tuple(layout[0])
        shards = int(np.prod([mesh_axes[a] for a in names]))
        if shape[0] % shards == 0:
            return layout[0], shards
    return None


def plan_packs(variables: Sequence[tuple[str, tuple[int, ...], str, tuple[Any, ...]]],
               mesh_axes: dict[str, int], max_elements: int = PACK_MAX_ELEMENTS,
               max_members: int = PACK_MAX_MEMBERS) -> tuple[PackGroup, ...]:
    """Groups `(name, shape, dtype, layout)` variables into packs; variables left out stay loose.

    A group needs at least two members (one member gains nothing); a bucket of more than `max_members` is split
    into packs of near-equal member counts. Members keep the given order."""
    buckets: dict[tuple[str, Any, int], list[tuple[str, tuple[int, ...]]]] = {}
    for name, shape, dtype, layout in variables:
        if int(np.prod(shape, dtype=np.int64)) > max_elements:
            continue
        key = _packing_key(tuple(shape), tuple(layout), mesh_axes)
        if key is None:
            continue
        axes = tuple(key[0]) if isinstance(key[0], list) else key[0]
        buckets.setdefault((dtype, axes, key[1]), []).append((name, tuple(shape)))
    groups = []
    for (dtype, axes, shards), bucket in buckets.items():
        for members in _near_equal_chunks(bucket, max(2, max_members)):
            if len(members) < 2:
                continue
            offset, placed = 0, []
            for name, shape in members:
                placed.append(PackMember(name, shape, offset))
                offset += int(np.prod(shape, dtype=np.int64)) // shards  # the piece's extent along the packed dim
            groups.append(PackGroup(f"{PACK_PREFIX}{len(groups)}/{dtype}", dtype, axes, shards, tuple(placed)))
    return tuple(groups)


def _near_equal_chunks(items: list[Any], most: int) -> list[list[Any]]:
    """`items` in order, cut into the fewest runs of at most `most`, their lengths differing by at most one."""
    count = -(-len(items) // most) if items else 0
    base, extra = divmod(len(items), max(count, 1))
    runs, start = [], 0
    for k in range(count):
        end = start + base + (1 if k < extra else 0)
        runs.append(items[start:end])
        start = end
    return runs
