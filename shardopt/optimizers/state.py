"""The optimizer's state: placing variables on the mesh, slots (`add_variable_from_reference`, `get_slot`), and
the packed buffers the slots of small variables live in between steps (optimizers/packed_state.py)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from shardopt import kernels
from shardopt.core.contract import EMA_SLOT
from shardopt.core.layout import Layout, auto_mesh, default_mesh, resolve_mesh, same_mesh
from shardopt.core.packing import PACK_MAX_MEMBERS, PackGroup
from shardopt.optimizers import state_sharding
from shardopt.optimizers.packed_state import PackedState, pack_state
from shardopt.optimizers.variables import Variable

# Steps and builds of every optimizer in the process run one at a time: a step reads, donates and replaces its
# variables' arrays, and two optimizers may update one Variable from two threads (issue 13: one lost every
# update). The lock covers dispatch only; XLA still runs the steps asynchronously.
STEP_LOCK = threading.RLock()


class StateMixin:
    """Variables, slots and packed state of an `Optimizer` (its attributes are set by `Optimizer.__init__`)."""

    mesh: Mesh | None
    name: str
    use_ema: bool
    pack_max_elements: int
    iterations: Variable
    _built: bool
    _variables: list[Variable]
    _index: dict[int, int]
    _model_variables: list[Variable]
    _step_names: list[str]
    _slots: list[dict[str, Variable]]
    _var_avals: list[tuple[tuple[int, ...], np.dtype]]
    _packed: PackedState | None
    _optimizer_state: dict[str, Variable]
    _name_scope: str

    def optimizer_state_init(self) -> dict[str, float]: ...  # Optimizer's hook (the definition's declaration)

    @property
    def variables(self) -> list[Variable]:
        """The optimizer's state in Keras order: iteration, averages, then the definition's slots."""
        return [self.iterations, *self._variables]

    # The definition's slots, declared once; `build` adds each for every variable (tf-keras's names, so
    # `get_slot(var, name)` takes them). A definition whose slots depend on its arguments overrides `slot_groups`.
    slots: tuple[str, ...] = ()

    # ----- state -----------------------------------------------------------------------------------------
    def slot_groups(self) -> tuple[tuple[str, ...], ...]:
        """The slots in tf-keras's build order: group by group, each group variable by variable (Adam adds
        m and v per variable, then every vhat)."""
        return (tuple(type(self).slots),)

    def slot_names(self) -> tuple[str, ...]:
        """The definition's slots, in the order `build` adds them."""
        return tuple(s for group in self.slot_groups() for s in group)

    def slot_dims(self, rank: int) -> dict[str, tuple[int, ...]]:
        """The slots a variable of rank `rank` has, each with the variable's dims it keeps: every slot keeps them
        all by default; Adafactor's factored `r` keeps dims [:-1] and `c` dims [:-2] + [-1:] of a rank >= 2
        variable, and a rank < 2 variable has `v` only. A slot's shape and layout are the kept dims' ones."""
        return {s: tuple(range(rank)) for s in self.slot_names()}

    def _slot_spec(self, shape: tuple[int, ...], layout: tuple[Any, ...]
                   ) -> tuple[tuple[str, ...], tuple[tuple[str, tuple[int, ...]], ...], tuple[tuple[str, Any], ...]]:
        """A variable's step-entry slots (EMA last), and the shapes and layouts of those of another shape."""
        full = tuple(range(len(shape)))
        dims = self.slot_dims(len(shape))
        other = [(s, d) for s, d in dims.items() if d != full]
        return (tuple(dims) + ((EMA_SLOT,) if self.use_ema else ()),
                tuple((s, tuple(shape[i] for i in d)) for s, d in other),
                tuple((s, tuple(layout[i] for i in d)) for s, d in other))

    def _pack_slots(self) -> tuple[str, ...]:
        """The slots of a packed variable: those of a rank-1 variable, when they all keep its shape. A variable
        packs only with exactly these slots, each of its own shape; others (Adafactor's factored matrices) stay
        loose."""
        slots, shapes, _ = self._slot_spec((1,), (None,))
        return () if shapes else slots

    def _pack_max_members(self) -> int:
        """Variables per pack: at most PACK_MAX_MEMBERS where the definition's updates become kernel calls (one
        call's operand count makes XLA:CPU's compile superlinear: 2000 variables in one call 15.7 s, in 16 calls
        0.9 s), unbounded otherwise: XLA's fused StableHLO step got slower with more packs (from_optax's adam on
        2000 x f32[3700]: 30 ms in one pack, 79 ms in 16)."""
        spec = getattr(self, "kernel_spec", None)
        kind = spec() if spec is not None else None
        if kind is None or not kernels.available(kind[0] + kernels.PACK_SUFFIX):
            return 1 << 62
        return PACK_MAX_MEMBERS

    def _packable(self, shape: tuple[int, ...]) -> bool:
        slots, shapes, _ = self._slot_spec(tuple(shape), (None,) * len(shape))
        return not shapes and slots == self._pack_slots()

    def slot_initial_value(self, slot: str) -> float | None:
        """The constant a slot starts at (None: zeros), e.g. Adagrad's `initial_accumulator_value`."""
        return None

    def build(self, var_list: Sequence[Variable]) -> None:
        """Places the variables on the mesh and creates the counter and EMA averages (definitions add slots)."""
        with STEP_LOCK:
            self._build(var_list)

    def _build(self, var_list: Sequence[Variable]) -> None:
        if self._built:
            return
        var_list = list(var_list)
        for v in var_list:
            if not isinstance(v, Variable):
                raise TypeError(f"expected shardopt.Variable, got {type(v).__name__}")
        mesh = resolve_mesh(self.mesh, [v.layout for v in var_list])
        for v in var_list:
            if not jnp.issubdtype(v.dtype, jnp.floating):
                raise TypeError(f"variable {v.name!r} has dtype {v.dtype}: optimizers update floating point "
                                "variables only")
            if v.layout is None:
                v.place(Layout.replicated(mesh, len(v.shape)))
            elif not same_mesh(auto_mesh(v.layout.mesh), auto_mesh(mesh)):
                raise ValueError(f"variable {v.name!r} is laid out on a different mesh ({v.layout}) than the "
                                 f"optimizer's mesh {dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))}")
        if len({id(v) for v in var_list}) != len(var_list):
            raise ValueError(f"the same variable is listed twice in {[v.name for v in var_list]}")
        self.mesh = mesh
        self.iterations.place(Layout.replicated(mesh, 0))
        self._model_variables = var_list
        self._step_names = unique_names([v.name for v in var_list])
        self._index = {id(v): i for i, v in enumerate(var_list)}
        self._var_avals = [(v.shape, np.dtype(v.dtype)) for v in var_list]  # variables never change shape or dtype
        self._slots = [{} for _ in var_list]
        self._built = True
        if self.use_ema:
            for v in var_list:
                self.add_variable_from_reference(v, EMA_SLOT, initial_value=v.value)
        for group in self.slot_groups():
            for v in var_list:
                dims = self.slot_dims(len(v.shape))
                for slot in group:
                    if slot not in dims:
                        continue
                    shape = tuple(v.shape[i] for i in dims[slot])
                    fill = self.slot_initial_value(slot)
                    self.add_variable_from_reference(
                        v, slot, shape=shape, initial_value=None if fill is None else np.full(shape, fill, v.dtype),
                        dims=dims[slot])
        self._optimizer_state = {
            name: Variable(np.asarray(value, np.float32), name=name, layout=Layout.replicated(mesh, 0))
            for name, value in self.optimizer_state_values().items()}

    def add_variable(self, shape: Sequence[int], dtype: Any = None, initializer: str = "zeros",
                     name: str | None = None) -> Variable:
        """A replicated optimizer variable (e.g. a scalar accumulator)."""
        if initializer not in ("zeros", "ones"):
            raise ValueError(f"initializer must be 'zeros' or 'ones', got {initializer!r}")
        fill = np.zeros if initializer == "zeros" else np.ones
        var = Variable(fill(tuple(shape), dtype or np.float32), name=name,
                       layout=Layout.replicated(self.mesh or default_mesh(), len(shape)))
        self._variables.append(var)
        return var

    def add_variable_from_reference(self, model_variable: Variable, variable_name: str,
                                    shape: Sequence[int] | None = None, initial_value: Any = None,
                                    dims: Sequence[int] | None = None) -> Variable:
        """A slot named `<variable_name>/<var name>` — `<optimizer name>/<variable_name>/<var name>` when the first
        `apply_gradients` builds (tf-keras builds inside the optimizer's name scope then: `Adam/m/dense`; an
        explicit `build` has no scope: `m/dense`) — with the variable's layout (zeros unless given; zeros are
        allocated only when read, or as part of the slot's pack). With `dims` (the variable's dims the slot keeps,
        see `slot_dims`) a slot of another shape is laid out as those dims of the variable; without, replicated."""
        shape = tuple(model_variable.shape if shape is None else shape)
        layout = model_variable.layout if shape == model_variable.shape else None
        if layout is None and dims is not None and model_variable.layout is not None:
            spec = model_variable.layout.spec_tuple()
            layout = Layout([spec[i] for i in dims], model_variable.layout.mesh)
            layout.validate(shape, f"slot {variable_name!r} of {model_variable.name!r}")
        if layout is not None and id(model_variable) in self._index:
            layout = self._state_layout(model_variable, layout)
        if layout is None:
            layout = Layout.replicated(self.mesh or default_mesh(), len(shape))
        name = f"{self._name_scope}{variable_name}/{model_variable.name}"
        if initial_value is None:
            slot = Variable.zeros(shape, model_variable.dtype, name, layout)
        else:
            slot = Variable(jnp.array(initial_value, dtype=model_variable.dtype, copy=True), name=name, layout=layout)
        self._variables.append(slot)
        if id(model_variable) in self._index:
            self._slots[self._index[id(model_variable)]][variable_name] = slot
        return slot

    def _state_layout(self, var: Variable, layout: Layout) -> Layout:
        """The layout of `var`'s slots: its own, or sharded over `shard_state_over` as well
        (optimizers/state_sharding.py)."""
        value = getattr(self, "shard_state_over", None)
        if value is None:
            return layout
        mesh = layout.mesh
        axes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
        spec = state_sharding.slot_layout(value, self._step_names[self._index[id(var)]], tuple(var.shape),
                                          layout.spec_tuple(), axes)
        return layout if spec == layout.spec_tuple() else Layout(list(spec), mesh)

    def get_slot(self, var: Variable, slot_name: str) -> Variable:
        """The slot `slot_name` ("m", "v", "vhat", "average", ...) of `var`."""
        index = self._var_index(var)
        try:
            return self._slots[index][slot_name]
        except KeyError:
            raise KeyError(f"variable {var.name!r} has no slot {slot_name!r}; slots: "
                           f"{sorted(self._slots[index])}") from None

    def _var_index(self, var: Variable) -> int:
        try:
            return self._index[id(var)]
        except KeyError:
            raise KeyError(f"The optimizer cannot recognize variable {getattr(var, 'name', var)}. This usually "
                           "means you are trying to call the optimizer to update different parts of the model "
                           "separately. Please call `optimizer.build(variables)` with the full list of "
                           "trainable variables before the training loop.") from None

    def _entry_slots(self) -> tuple[str, ...]:
        return self.slot_names() + ((EMA_SLOT,) if self.use_ema else ())

    @property
    def packs(self) -> tuple[PackGroup, ...]:
        """The packed buffers the slots of small variables live in (empty before the first step, or with
        `pack_max_elements = 0`): names, dtype, layout and members with their offsets."""
        return () if self._packed is None else self._packed.packs

    def _ensure_packed(self) -> PackedState:
        """Packs the slots once, at the first step (after `build`, so definitions have added their slots)."""
        if self._packed is None:
            self._packed = pack_state(self._step_names, self._model_variables, self._slots, self._pack_slots(),
                                      self.mesh, self.pack_max_elements, self._pack_max_members())
        return self._packed

    def state_holder(self, name: str) -> Any:
        """What holds the step argument `name` (a variable, slot or packed buffer): `.value` reads it."""
        state = self._ensure_packed()
        for group, slots, gradients in zip(state.packs, state.slots, state.gradients, strict=True):
            if name == f"gradient_buffer/{group.name}":
                return gradients
            for slot, slot_buffer in slots.items():
                if name == f"{slot}/{group.name}":
                    return slot_buffer
        for step_name, var, own in zip(self._step_names, self._model_variables, self._slots, strict=True):
            if name == step_name:
                return var
            for slot, slot_var in own.items():
                if name == f"{slot}/{step_name}":
                    return slot_var
        if name == "iterations":
            return self.iterations
        if name in self._optimizer_state:
            return self._optimizer_state[name]
        raise KeyError(f"no optimizer state named {name!r}")

    def finalize_variable_values(self, var_list: Sequence[Variable]) -> None:
        """With EMA, sets each variable to its moving average (tf-keras semantics); otherwise a no-op."""
        if not self.use_ema:
            return
        for v in var_list:
            average = self._slots[self._var_index(v)][EMA_SLOT].value + 0
            # with shard_state_over the average is sharded beyond the variable's layout: gather it back
            v._set(average if average.sharding == v.sharding else jax.device_put(average, v.sharding))


def unique_names(names: Sequence[str]) -> list[str]:
    """`names` with repeats told apart (`kernel`, `kernel#2`): Keras 3 layers all call their weight `kernel`, and
    the step contract names each variable's arguments after it."""
    seen: Counter[str] = Counter()
    total = Counter(names)
    out = []
    for n in names:
        seen[n] += 1
        out.append(n if total[n] == 1 else f"{n}#{seen[n]}")
    return out
