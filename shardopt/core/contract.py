"""The step contract: what every argument and result of a compiled step is, as frozen, JSON-serializable data.

Like `jax.export.Exported`, it is the one description of a step that every consumer reads by key — the stateful
optimizer, the functional step, the artifact manifest, the TF embedding, inspect, the benchmarks and (through the
IR attributes the frontend writes from it) the passes. It is built in one place, `build_contract`; nothing else
decides positions, names or which buffers are packed.

Every path uses the same shape of contract: variables are the user's arrays (one argument each), gradients one
argument each (two for a sparse gradient), and the slots of small variables live packed (`core/packing.py`), one
buffer per pack and slot, with a donated scratch buffer per pack that the pack's gradients are gathered into.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from shardopt.core.layout import layout_problem
from shardopt.core.packing import PackGroup

CONTRACT_VERSION = 2

# Argument roles, also written as `shardopt.role` attributes on `@main`'s arguments and results.
VARIABLE = "variable"
GRADIENT = "gradient"
GRADIENT_INDICES = "gradient_indices"
SLOT = "slot"
# Scratch memory, donated and handed back each step, that a pack's gradients are gathered into (its contents are
# never read: it only gives XLA a buffer to write the packed gradient to instead of a temporary).
GRADIENT_BUFFER = "gradient_buffer"
OPTIMIZER_STATE = "optimizer_state"  # state of the optimizer tied to no variable (e.g. Nadam's momentum product)
COUNTER = "counter"
HYPERPARAMETER = "hyperparameter"
ROLES = (VARIABLE, GRADIENT, GRADIENT_INDICES, SLOT, GRADIENT_BUFFER, OPTIMIZER_STATE, COUNTER, HYPERPARAMETER)
# What a step carries from one call to the next (besides the variables): the functional step's `state`.
STATE_ROLES = (SLOT, GRADIENT_BUFFER, OPTIMIZER_STATE, COUNTER, HYPERPARAMETER)

COUNTER_NAME = "iterations"
LEARNING_RATE_NAME = "learning_rate"
EMA_SLOT = "average"
SKIPPED_STEPS = "skipped_steps"  # optimizer state of `skip_nonfinite`: steps whose gradients were not all finite


@dataclass(frozen=True)
class TensorSpec:
    """One argument or result of the step.

    `layout` is a PartitionSpec-like tuple (None = unsharded dim, str or tuple of str = mesh axes), or None
    when the frontend leaves the layout open for the `propagate-layouts` pass to decide. `owner` is the variable
    a gradient or loose slot belongs to; `slot` names a slot ("m", "v", "average"); `pack` names the pack a
    packed buffer holds (its members are the pack's, in `StepContract.packs`). On a variable,
    `shard_state_over` names the mesh axes its slots are sharded over as well (weight-update sharding,
    `core.layout.state_layout`); `shard_state_required` makes "no dimension divides" an error instead of a
    fallback to the variable's layout.
    """

    name: str
    role: str
    shape: tuple[int, ...]
    dtype: str
    owner: str | None = None
    layout: tuple[Any, ...] | None = None
    donated: bool = False
    slot: str | None = None
    pack: str | None = None
    shard_state_over: tuple[str, ...] = ()
    shard_state_required: bool = False

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.shard_state_over:  # written only where set: contracts without state sharding read as before
            del d["shard_state_over"], d["shard_state_required"]
        else:
            d["shard_state_over"] = list(self.shard_state_over)
        d["shape"] = list(self.shape)
        d["layout"] = None if self.layout is None else [list(a) if isinstance(a, tuple) else a for a in self.layout]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        layout = d.get("layout")
        return cls(
            name=d["name"], role=d["role"], shape=tuple(d["shape"]), dtype=d["dtype"], owner=d.get("owner"),
            layout=None if layout is None else tuple(tuple(a) if isinstance(a, list) else a for a in layout),
            donated=bool(d.get("donated", False)), slot=d.get("slot"), pack=d.get("pack"),
            shard_state_over=tuple(d.get("shard_state_over", ())),
            shard_state_required=bool(d.get("shard_state_required", False)),
        )


@dataclass(frozen=True)
class StepEntry:
    """One variable that receives a gradient in this step, and how that gradient arrives."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    layout: tuple[Any, ...]          # PartitionSpec-like tuple of the variable, one entry per dimension
    slots: tuple[str, ...]           # slot names in the optimizer's order (EMA average last)
    sparse_rows: int | None = None   # number of IndexedSlices rows, None for a dense gradient
    grad_shape: tuple[int, ...] | None = None  # dense gradients may broadcast to the variable's shape
    index_dtype: str = "int32"
    slot_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # slots whose shape differs from the variable's
    weight_decay: bool = True        # False: excluded from the optimizer's weight decay (exclude_from_weight_decay)
    # layouts of the slots in `slot_shapes` (derived from the variable's: Adafactor's r keeps dims [:-1]); the
    # contract pins them, since `propagate-layouts` cannot tell which of the variable's dims a slot kept
    slot_layouts: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    shard_state_over: tuple[str, ...] = ()  # mesh axes the slots are sharded over too (weight-update sharding)
    shard_state_required: bool = False      # True (asked per variable): no divisible dimension is an error

    def slot_shape(self, slot: str) -> tuple[int, ...]:
        return dict(self.slot_shapes).get(slot, self.shape)

    def slot_layout(self, slot: str) -> tuple[Any, ...] | None:
        """The pinned layout of a slot of another shape (None: the slot follows its variable's layout)."""
        return dict(self.slot_layouts).get(slot)


@dataclass(frozen=True)
class StepContract:
    """Arguments and results of `@main`, in order, the mesh they are laid out on and the packs of the state."""

    args: tuple[TensorSpec, ...]
    results: tuple[TensorSpec, ...]
    mesh_axes: tuple[tuple[str, int], ...]
    packs: tuple[PackGroup, ...] = ()
    version: int = CONTRACT_VERSION

    # ----- lookups --------------------------------------------------------------------------------------------
    @functools.cached_property
    def _arg_positions(self) -> dict[str, int]:
        return {a.name: i for i, a in enumerate(self.args)}

    @functools.cached_property
    def _result_positions(self) -> dict[str, int]:
        return {r.name: i for i, r in enumerate(self.results)}

    def arg_index(self, name: str) -> int:
        index = self._arg_positions.get(name)
        if index is None:
            raise KeyError(f"the step has no argument {name!r}")
        return index

    def arg(self, name: str) -> TensorSpec:
        return self.args[self.arg_index(name)]

    def args_with_role(self, *roles: str) -> tuple[TensorSpec, ...]:
        return tuple(a for a in self.args if a.role in roles)

    @property
    def variables(self) -> tuple[str, ...]:
        """The variables the step updates, in argument order (the params' flattening order)."""
        return tuple(a.name for a in self.args if a.role == VARIABLE)

    @property
    def state(self) -> tuple[TensorSpec, ...]:
        """Every argument the step carries between calls besides the variables (the functional `state`)."""
        return self.args_with_role(*STATE_ROLES)

    def slot_names(self) -> tuple[str, ...]:
        """The slots of the step, in the definition's order."""
        return tuple(dict.fromkeys(a.slot for a in self.args if a.role == SLOT and a.slot is not None))

    def pack(self, name: str) -> PackGroup:
        for p in self.packs:
            if p.name == name:
                return p
        raise KeyError(f"the step has no pack {name!r}")

    @functools.cached_property
    def _members(self) -> dict[str, tuple[PackGroup, int]]:
        return {m.name: (p, i) for p in self.packs for i, m in enumerate(p.members)}

    def member_of(self) -> dict[str, tuple[PackGroup, int]]:
        """Variable name -> (its pack, its index in the pack), for the variables whose slots are packed."""
        return self._members

    @functools.cached_property
    def _slots_by_holder(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for a in self.args:
            if a.role == SLOT and a.slot is not None:
                out.setdefault(a.pack if a.pack is not None else f"variable:{a.owner}", []).append(a.slot)
        return {k: tuple(v) for k, v in out.items()}

    def slots_of(self, variable: str) -> tuple[str, ...]:
        """The slots `variable` has (Adafactor's rank-1 variables have `v` only), in the definition's order."""
        packed = self.member_of().get(variable)
        return self._slots_by_holder.get(f"variable:{variable}" if packed is None else packed[0].name, ())

    def slot_arg(self, variable: str, slot: str) -> tuple[TensorSpec, int | None]:
        """Where `variable`'s slot lives: its own argument (index None) or a packed buffer and the member index."""
        packed = self.member_of().get(variable)
        if packed is not None:
            pack, index = packed
            return self.arg(packed_name(slot, pack.name)), index
        return self.arg(slot_name(slot, variable)), None

    def donated_argnums(self) -> tuple[int, ...]:
        return tuple(i for i, a in enumerate(self.args) if a.donated)

    def result_of(self, arg: TensorSpec) -> int | None:
        """The result that replaces argument `arg` (None for gradients and other inputs that are only read)."""
        return self._result_positions.get(arg.name)

    # ----- derived contracts and serialization ----------------------------------------------------------------
    def with_layouts(self, arg_layouts: list[tuple[Any, ...]], result_layouts: list[tuple[Any, ...]]
                     ) -> StepContract:
        """The same contract with every layout filled in (after layout propagation)."""
        return dataclasses.replace(
            self,
            args=tuple(dataclasses.replace(a, layout=lay) for a, lay in zip(self.args, arg_layouts, strict=True)),
            results=tuple(dataclasses.replace(r, layout=lay)
                          for r, lay in zip(self.results, result_layouts, strict=True)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "args": [a.to_json() for a in self.args],
            "results": [r.to_json() for r in self.results],
            "mesh_axes": [[n, s] for n, s in self.mesh_axes],
            "packs": [p.to_json() for p in self.packs],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StepContract:
        version = int(d.get("version", 1))
        if version != CONTRACT_VERSION:
            raise ValueError(f"step contract version {version}; this shardopt reads version {CONTRACT_VERSION}")
        return cls(
            args=tuple(TensorSpec.from_json(a) for a in d["args"]),
            results=tuple(TensorSpec.from_json(r) for r in d["results"]),
            mesh_axes=tuple((str(n), int(s)) for n, s in d["mesh_axes"]),
            packs=tuple(PackGroup.from_json(p) for p in d.get("packs", [])),
            version=version,
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


# ----- names: readable labels only; consumers read role/owner/slot/pack, never parse these ------------------
def gradient_name(variable: str) -> str:
    return f"grad/{variable}"


def slot_name(slot: str, variable: str) -> str:
    return f"{slot}/{variable}"


def packed_name(slot: str, pack: str) -> str:
    return f"{slot}/{pack}"


def gradient_buffer_name(pack: str) -> str:
    return f"gradient_buffer/{pack}"


def counter_dtype() -> np.dtype:
    """int64 when jax has x64 enabled (as tf-keras), else int32 (as Keras 3 on JAX)."""
    return np.dtype(np.int64) if jax.config.jax_enable_x64 else np.dtype(np.int32)


def build_contract(entries: list[StepEntry], mesh_axes: tuple[tuple[str, int], ...], has_lr_input: bool,
                   packs: tuple[PackGroup, ...] = (), slot_names: tuple[str, ...] = (),
                   optimizer_state: tuple[tuple[Any, ...], ...] = ()) -> StepContract:
    """The one place a step's arguments and results are decided.

    Arguments, in order: every variable (entry order), every gradient (and sparse row indices), the packed slot
    buffers (pack by pack, slot by slot), the loose slots (variable by variable), one gradient buffer per pack,
    the optimizer's own state, the counter, and the learning rate when it is an input. Results replace the
    variables and the state, and end with the learning rate the step used. Loose slots are left with open
    layouts for `propagate-layouts` (slots of another shape than their variable's come pinned, `slot_layouts`);
    packed buffers carry their pack's layout. `slot_names` are the slots of a packed variable.
    """
    packed = {m.name for p in packs for m in p.members}
    args: list[TensorSpec] = []
    for e in entries:
        args.append(TensorSpec(e.name, VARIABLE, e.shape, e.dtype, layout=e.layout, donated=True,
                               shard_state_over=e.shard_state_over, shard_state_required=e.shard_state_required))
    for e in entries:
        if e.sparse_rows is None:
            gshape = e.grad_shape if e.grad_shape is not None else e.shape
            glayout = e.layout if gshape == e.shape else None
            args.append(TensorSpec(gradient_name(e.name), GRADIENT, gshape, e.dtype, owner=e.name, layout=glayout))
        else:
            args.append(TensorSpec(gradient_name(e.name), GRADIENT, (e.sparse_rows, *e.shape[1:]), e.dtype,
                                   owner=e.name))
            args.append(TensorSpec(f"grad_indices/{e.name}", GRADIENT_INDICES, (e.sparse_rows,), e.index_dtype,
                                   owner=e.name))
    for p in packs:
        for s in slot_names:
            args.append(TensorSpec(packed_name(s, p.name), SLOT, p.shape, p.dtype, layout=p.layout, donated=True,
                                   slot=s, pack=p.name))
    for e in entries:
        if e.name in packed:
            continue
        for s in e.slots:
            layout = e.slot_layout(s)
            problem = None if layout is None else layout_problem(e.slot_shape(s), layout, dict(mesh_axes))
            if problem:  # before jax lowers it (whose error names no tensor)
                raise ValueError(f"slot {s!r} of {e.name!r} (shape {e.slot_shape(s)}, layout {layout}): {problem}")
            args.append(TensorSpec(slot_name(s, e.name), SLOT, e.slot_shape(s), e.dtype, owner=e.name,
                                   layout=layout, donated=True, slot=s))
    for p in packs:
        args.append(TensorSpec(gradient_buffer_name(p.name), GRADIENT_BUFFER, p.shape, p.dtype, layout=p.layout,
                               donated=True, pack=p.name))
    for name, shape, dtype, *layout in optimizer_state:  # replicated unless a layout is given
        args.append(TensorSpec(name, OPTIMIZER_STATE, tuple(shape), dtype, donated=True,
                               layout=tuple(layout[0]) if layout else (None,) * len(shape)))
    args.append(TensorSpec(COUNTER_NAME, COUNTER, (), str(counter_dtype()), layout=(), donated=True))
    if has_lr_input:
        args.append(TensorSpec(LEARNING_RATE_NAME, HYPERPARAMETER, (), "float32", layout=()))
    results = [a for a in args if a.role in (VARIABLE, SLOT, GRADIENT_BUFFER, OPTIMIZER_STATE, COUNTER)]
    results.append(TensorSpec(LEARNING_RATE_NAME, HYPERPARAMETER, (), "float32", layout=()))
    return StepContract(tuple(args), tuple(results), tuple(mesh_axes), tuple(packs))


__all__ = ["CONTRACT_VERSION", "COUNTER", "EMA_SLOT", "GRADIENT", "GRADIENT_BUFFER", "GRADIENT_INDICES",
           "HYPERPARAMETER", "OPTIMIZER_STATE", "ROLES", "SLOT", "STATE_ROLES", "VARIABLE", "StepContract",
           "StepEntry", "TensorSpec", "build_contract", "counter_dtype"]
