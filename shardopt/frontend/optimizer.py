"""The Keras-shaped optimizer base class: state, `apply_gradients`, config; the math lives in definitions.

A definition (Adam, and later SGD, AdamW, ...) subclasses `Optimizer`, adds its slots in `build`, and implements
`update_dense` (and `update_sparse` when its sparse rounding differs) as pure jnp functions of one variable.
Everything else — clipping, EMA, schedules, the counter, lowering, passes, execution — is shared.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from shardopt.compiler import StepProgram, compile_step
from shardopt.frontend import options, schedules
from shardopt.frontend.layout import Layout, as_layout, auto_mesh, default_mesh, same_mesh
from shardopt.frontend.packed_state import PackedState, pack_state
from shardopt.frontend.packing import PACK_MAX_ELEMENTS, PackGroup
from shardopt.frontend.step import (
    EMA_SLOT,
    StepEntry,
    build_convention,
    compute_dtype,
    counter_dtype,
    make_step_fn,
)
from shardopt.frontend.variables import IndexedSlices, Variable, VariableSpec
from shardopt.passes.pipeline import DEFAULT_PIPELINE
from shardopt.runtime.functional import SLOT_INIT_FROM_VARIABLE, SLOT_INIT_ZEROS, FunctionalStep, path_name

log = logging.getLogger("shardopt")

State = dict[str, jax.Array]


def _gradient_array(grad: Any, var: Variable) -> jax.Array:
    """`grad` as a jax array of the variable's dtype. The dtype checked is the one `grad` arrives with: without
    jax x64, `jnp.asarray` would silently narrow a numpy float64 gradient for a float32 variable."""
    dtype = np.dtype(grad.dtype) if hasattr(grad, "dtype") else None
    g = grad if isinstance(grad, jax.Array) else jnp.asarray(grad)
    if (dtype or g.dtype) != var.dtype:
        raise TypeError(f"gradient for {var.name!r} has dtype {dtype or g.dtype}, the variable {var.dtype}")
    return g


class Optimizer:
    """Base class of shardopt optimizers (tf-keras's `Optimizer` API, compiled per gradient signature)."""

    def __init__(
        self,
        name: str,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        jit_compile: bool = True,
        mesh: Mesh | None = None,
        gradients_clip_option: options.GradientsClipOption | None = None,
        ema_option: options.EMAOption | None = None,
        **kwargs: Any,
    ):
        ema = options.merge_grouped(
            {"use_ema": use_ema, "ema_momentum": ema_momentum, "ema_overwrite_frequency": ema_overwrite_frequency},
            {"use_ema": False, "ema_momentum": 0.99, "ema_overwrite_frequency": None}, ema_option)
        clip = options.merge_grouped(
            {"clipnorm": clipnorm, "clipvalue": clipvalue, "global_clipnorm": global_clipnorm},
            {"clipnorm": None, "clipvalue": None, "global_clipnorm": None}, gradients_clip_option)
        options.check_ema(ema["use_ema"], ema["ema_momentum"], ema["ema_overwrite_frequency"])
        options.check_clip(clip["clipnorm"], clip["clipvalue"], clip["global_clipnorm"])
        options.check_kwargs(dict(kwargs))
        if mesh is not None and not isinstance(mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        self.name = name
        self.weight_decay = weight_decay
        self.clipnorm = clip["clipnorm"]
        self.clipvalue = clip["clipvalue"]
        self.global_clipnorm = clip["global_clipnorm"]
        self.use_ema = bool(ema["use_ema"])
        self.ema_momentum = ema["ema_momentum"]
        self.ema_overwrite_frequency = ema["ema_overwrite_frequency"]
        self.jit_compile = jit_compile
        self.mesh = mesh
        self.pipeline: tuple[str, ...] = DEFAULT_PIPELINE
        self._learning_rate: Any = np.float32(0.001)
        self._lr_array: jax.Array | None = None
        self._current_lr: jax.Array | None = None
        self._iterations: Variable | None = None
        self._built = False
        self._variables: list[Variable] = []
        self._index: dict[int, int] = {}
        self._model_variables: list[Variable] = []
        self._slots: list[dict[str, Variable]] = []
        self._programs: dict[Any, StepProgram] = {}
        self._fast_programs: dict[Any, StepProgram] = {}  # keyed by variable indices for the common dense case
        self._schedule_cache: tuple[Any, str] = (None, "")
        # Small variables and their slots live packed between steps (see frontend/packing.py); 0 turns it off.
        self.pack_max_elements = PACK_MAX_ELEMENTS
        self._packed: PackedState | None = None

    # ----- hyperparameters -------------------------------------------------------------------------------
    def _build_learning_rate(self, learning_rate: Any) -> Any:
        return options.learning_rate_value(learning_rate)

    @property
    def learning_rate(self) -> jax.Array:
        """The current learning rate (for a schedule: its value at the last step, as tf-keras reports it)."""
        if isinstance(self._learning_rate, schedules.LearningRateSchedule):
            if self._current_lr is None:
                self._current_lr = jnp.asarray(self._learning_rate(int(self.iterations.value)), jnp.float32)
            return self._current_lr
        return jnp.asarray(self._learning_rate, jnp.float32)

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        if isinstance(value, schedules.LearningRateSchedule):
            self._learning_rate, self._current_lr = value, None
            return
        if isinstance(self._learning_rate, schedules.LearningRateSchedule):
            raise TypeError("This optimizer was created with a `LearningRateSchedule` object as its "
                            "`learning_rate` constructor argument, hence its learning rate is not settable. If "
                            "you need the learning rate to be settable, you should instantiate the optimizer "
                            "with a float `learning_rate` argument.")
        self._learning_rate = options.learning_rate_value(value)
        self._lr_array = None

    lr = learning_rate

    @property
    def iterations(self) -> Variable:
        """The step counter (int64 with jax x64 enabled, int32 otherwise)."""
        if self._iterations is None:
            self._iterations = Variable(np.asarray(0, counter_dtype()), name="iteration")
        return self._iterations

    @iterations.setter
    def iterations(self, value: Any) -> None:
        if self._built:
            raise RuntimeError("Cannot set `iterations` to a new Variable after the Optimizer weights have "
                               "been created. Here it is attempting to set `iterations` after build().")
        raw = value.value if isinstance(value, Variable) else value
        self._iterations = Variable(np.asarray(raw, counter_dtype()), name="iteration")

    @property
    def variables(self) -> list[Variable]:
        """The optimizer's state in Keras order: iteration, averages, then the definition's slots."""
        return [self.iterations, *self._variables]

    # ----- state -----------------------------------------------------------------------------------------
    def slot_names(self) -> tuple[str, ...]:
        """The definition's slots, in the order `build` adds them."""
        return ()

    def _resolve_mesh(self, var_list: Sequence[Variable]) -> Mesh:
        if self.mesh is not None:
            return self.mesh
        for v in var_list:
            if v.layout is not None:
                return v.layout.mesh
        return default_mesh()

    def build(self, var_list: Sequence[Variable]) -> None:
        """Places the variables on the mesh and creates the counter and EMA averages (definitions add slots)."""
        if self._built:
            return
        var_list = list(var_list)
        mesh = self._resolve_mesh(var_list)
        for v in var_list:
            if not isinstance(v, Variable):
                raise TypeError(f"expected shardopt.Variable, got {type(v).__name__}")
            if not jnp.issubdtype(v.dtype, jnp.floating):
                raise TypeError(f"variable {v.name!r} has dtype {v.dtype}: optimizers update floating point "
                                "variables only")
            if v.layout is None:
                v.place(Layout.replicated(mesh, len(v.shape)))
            elif not same_mesh(auto_mesh(v.layout.mesh), auto_mesh(mesh)):
                raise ValueError(f"variable {v.name!r} is laid out on a different mesh ({v.layout}) than the "
                                 f"optimizer's mesh {dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))}")
        self.mesh = mesh
        it = self.iterations
        it.place(Layout.replicated(mesh, 0))
        self._model_variables = var_list
        self._index = {id(v): i for i, v in enumerate(var_list)}
        self._slots = [{} for _ in var_list]
        self._built = True
        if self.use_ema:
            for v in var_list:
                self.add_variable_from_reference(v, EMA_SLOT, initial_value=v.value)

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
                                    shape: Sequence[int] | None = None, initial_value: Any = None) -> Variable:
        """A slot named `<variable_name>/<var name>` with the variable's layout (zeros unless given)."""
        shape = tuple(model_variable.shape if shape is None else shape)
        layout = model_variable.layout if shape == model_variable.shape else None
        if layout is None:
            layout = Layout.replicated(self.mesh or default_mesh(), len(shape))
        if initial_value is None:
            init = jnp.zeros(shape, model_variable.dtype, device=layout.to_named_sharding())
        else:
            init = jnp.array(initial_value, dtype=model_variable.dtype, copy=True)
        slot = Variable(init, name=f"{variable_name}/{model_variable.name}", layout=layout)
        self._variables.append(slot)
        if id(model_variable) in self._index:
            self._slots[self._index[id(model_variable)]][variable_name] = slot
        return slot

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

    # ----- the definition's math (override) --------------------------------------------------------------
    def update_dense(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                     ) -> tuple[jax.Array, State]:
        """One variable's update, in its compute dtype; returns the new variable and slots."""
        raise NotImplementedError

    def update_sparse(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                      ) -> tuple[jax.Array, State]:
        """The update for a de-duplicated sparse gradient given densely (zero rows elsewhere)."""
        return self.update_dense(var, grad, state, lr, t)

    # ----- applying gradients ----------------------------------------------------------------------------
    def _schedule(self) -> schedules.LearningRateSchedule | None:
        lr = self._learning_rate
        return lr if isinstance(lr, schedules.LearningRateSchedule) else None

    def _lr_input(self) -> jax.Array:
        if self._lr_array is None:
            self._lr_array = jax.device_put(np.float32(self._learning_rate),
                                            Layout.replicated(self.mesh, 0).to_named_sharding())
        return self._lr_array

    def _gradient_entry(self, grad: Any, var: Variable) -> tuple[StepEntry, list[Any]]:
        """Validates one gradient against its variable; returns the step entry and the arrays to pass."""
        layout = var.layout.to_partition_spec()
        lay = tuple(layout) + (None,) * (len(var.shape) - len(layout))
        slots = self._entry_slots()
        if isinstance(grad, IndexedSlices):
            values = _gradient_array(grad.values, var)
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
            entry = StepEntry(var.name, var.shape, str(var.dtype), lay, slots, sparse_rows=int(indices.shape[0]),
                              index_dtype=str(indices.dtype))
            return entry, [values, indices]
        g = _gradient_array(grad, var)
        gshape = tuple(g.shape)
        if gshape != var.shape:
            try:
                ok = np.broadcast_shapes(gshape, var.shape) == var.shape
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"gradient for {var.name!r} has shape {gshape}, which does not broadcast to the "
                                 f"variable's shape {var.shape}")
        entry = StepEntry(var.name, var.shape, str(var.dtype), lay, slots,
                          grad_shape=None if gshape == var.shape else gshape)
        return entry, [g]

    def _dense_entry(self, var: Variable) -> StepEntry:
        """The step entry of `var` receiving a dense gradient of its own shape."""
        spec = tuple(var.layout.to_partition_spec())
        return StepEntry(var.name, var.shape, str(var.dtype), spec + (None,) * (len(var.shape) - len(spec)),
                         self._entry_slots())

    def _schedule_key(self) -> Any:
        """What of the learning rate the compiled step depends on: the schedule's config (cached per object)."""
        schedule = self._schedule()
        if schedule is None:
            return (None, self.pipeline)
        if self._schedule_cache[0] is not schedule:
            self._schedule_cache = (schedule, repr(schedules.serialize(schedule)))
        return (self._schedule_cache[1], self.pipeline)

    def _ensure_packed(self) -> PackedState:
        """Packs the state once, at the first step (after `build`, so definitions have added their slots)."""
        if self._packed is None:
            self._packed = pack_state(self._model_variables, self._slots, self._entry_slots(), self.mesh,
                                      self.pack_max_elements)
        return self._packed

    def _packs_for(self, entries: Sequence[StepEntry]) -> tuple[int, ...]:
        """Indices of the packs with at least one member among `entries`."""
        member_of = self._ensure_packed().member_of
        return tuple(sorted({member_of[e.name][0] for e in entries if e.name in member_of}))

    def _program(self, entries: tuple[StepEntry, ...], packs: tuple[PackGroup, ...] = ()) -> StepProgram:
        key = (entries, packs, self._schedule_key())
        program = self._programs.get(key)
        if program is None:
            schedule = self._schedule()
            mesh_axes = tuple(zip(self.mesh.axis_names, self.mesh.devices.shape, strict=True))
            slot_names = self._entry_slots()
            convention = build_convention(list(entries), mesh_axes, has_lr_input=schedule is None, packs=packs,
                                          pack_slots=slot_names)
            fn = make_step_fn(self, list(entries), schedule, packs, slot_names)
            program = compile_step(fn, convention, self.mesh, self.pipeline)
            self._programs[key] = program
        return program

    def _packed_program(self, entries: tuple[StepEntry, ...]) -> tuple[StepProgram, tuple[int, ...]]:
        """The program `apply_gradients` runs for `entries` over the packed state, and the packs it takes."""
        pack_ids = self._packs_for(entries)
        packs = tuple(self._ensure_packed().packs[i] for i in pack_ids)
        return self._program(entries, packs), pack_ids

    def apply_gradients(self, grads_and_vars: Iterable[tuple[Any, Variable]], name: str | None = None,
                        skip_gradients_aggregation: bool = False, **kwargs: Any) -> Variable:
        """Applies one step: compiled once per gradient signature, then cached. Returns `iterations`."""
        pairs = list(grads_and_vars)
        schedule = self._schedule()
        if not pairs:
            if schedule is not None:
                self._current_lr = jnp.asarray(schedule(int(self.iterations.value)), jnp.float32)
            return self.iterations
        if not self._built:
            self.build([v for _, v in pairs])
        present = [(g, v) for g, v in pairs if g is not None]
        for _, v in pairs:
            self._var_index(v)
        if not present:
            raise ValueError(f"No gradients provided for any variable: {[v.name for _, v in pairs]}.")
        dropped = [v.name for g, v in pairs if g is None]
        if dropped:
            log.warning("Gradients do not exist for variables %s when minimizing the loss.", dropped)
        signature, grad_arrays, indices = [], [], []
        for g, v in present:
            index = self._index[id(v)]
            indices.append(index)
            if isinstance(g, jax.Array) and g.dtype == v.dtype and g.shape == v.shape:
                signature.append(index)  # the common case: a dense gradient of the variable's shape and dtype
                grad_arrays.append(g)
            else:
                entry, arrays = self._gradient_entry(g, v)
                signature.append(entry)
                grad_arrays.extend(arrays)
        key = (tuple(signature), self._schedule_key())
        fast = self._fast_programs.get(key)
        if fast is None:
            entries = [self._dense_entry(self._model_variables[i]) if isinstance(sig, int) else sig
                       for i, sig in zip(indices, signature, strict=True)]
            if self.global_clipnorm and not self.clipnorm and len({e.dtype for e in entries}) > 1:
                raise TypeError("global_clipnorm needs every gradient to have the same dtype (tf.clip_by_global_norm "
                                f"stacks the norms); got {sorted({e.dtype for e in entries})}")
            program, pack_ids = self._packed_program(tuple(entries))
            fast = self._fast_programs[key] = (program, *self._holders(indices, pack_ids))
        program, var_holders, slot_holders = fast
        args = [h.value for h in var_holders] + grad_arrays + [h.value for h in slot_holders] + [self.iterations.value]
        if schedule is None:
            args.append(self._lr_input())
        outs = program.executable(args)
        for holder, value in zip([*var_holders, *slot_holders, self.iterations], outs, strict=False):
            holder._set(value)
        if schedule is not None:
            self._current_lr = outs[-1]
        return self.iterations

    def _holders(self, indices: list[int], pack_ids: tuple[int, ...]) -> tuple[list[Any], list[Any]]:
        """What supplies (`.value`) and stores (`._set`) each variable and slot argument of a packed program:
        the packed buffers of `pack_ids`, then the loose variables of `indices` (the convention's order)."""
        state = self._ensure_packed()
        slot_names = self._entry_slots()
        loose = [i for i in indices if self._model_variables[i].name not in state.member_of]
        var_holders: list[Any] = [state.variables[p] for p in pack_ids]
        var_holders += [self._model_variables[i] for i in loose]
        slot_holders: list[Any] = [state.slots[p][s] for p in pack_ids for s in slot_names]
        slot_holders += [self._slots[i][s] for i in loose for s in slot_names]
        return var_holders, slot_holders

    def compute_gradients(self, loss: Callable[[list[jax.Array]], jax.Array], var_list: Sequence[Variable],
                          tape: Any = None) -> list[tuple[jax.Array, Variable]]:
        """Gradients of `loss(values)` (a callable of the variables' values, in `var_list` order) by jax.grad."""
        if not callable(loss):
            raise TypeError("loss must be a callable of the list of variable values")
        values = [v.value for v in var_list]
        mesh = self.mesh if self.mesh is not None else next(
            (v.layout.mesh for v in var_list if v.layout is not None), None)
        if mesh is not None and any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
            with jax.set_mesh(mesh):  # values on an Explicit-axes mesh carry their sharding in their types
                grads = jax.grad(loss)(values)
        else:
            grads = jax.grad(loss)(values)
        return list(zip(grads, var_list, strict=True))

    def minimize(self, loss: Callable[[list[jax.Array]], jax.Array], var_list: Sequence[Variable],
                 tape: Any = None) -> Variable:
        """compute_gradients then apply_gradients."""
        return self.apply_gradients(self.compute_gradients(loss, var_list, tape))

    def update_step(self, gradient: Any, variable: Variable) -> None:
        """The definition's update for one variable at the current step (no clipping, EMA or counter)."""
        if not self._built:
            self.build([variable])
        index = self._var_index(variable)
        entry, arrays = self._gradient_entry(gradient, variable)
        names = self.slot_names()
        sparse = entry.sparse_rows is not None
        ct = compute_dtype(variable.dtype)
        lr = self.learning_rate

        @jax.jit
        def one(var, lr, it, *rest):
            g = rest[0].astype(ct)
            if sparse:
                g = jnp.zeros(entry.shape, ct).at[rest[1]].add(g, mode="drop")
            g = jnp.broadcast_to(g, entry.shape)
            state = {s: x.astype(ct) for s, x in zip(names, rest[len(arrays):], strict=True)}
            update = self.update_sparse if sparse else self.update_dense
            new_var, new_state = update(var.astype(ct), g, state, lr.astype(ct), (it + 1).astype(ct))
            return new_var.astype(var.dtype), [new_state[s].astype(var.dtype) for s in names]

        slots = [self._slots[index][s] for s in names]
        new_var, new_slots = one(variable.value, lr, self.iterations.value, *arrays, *[s.value for s in slots])
        variable._set(jax.device_put(new_var, variable.sharding))
        for s, val in zip(slots, new_slots, strict=True):
            s._set(jax.device_put(val, s.sharding))

    def finalize_variable_values(self, var_list: Sequence[Variable]) -> None:
        """With EMA, sets each variable to its moving average (tf-keras semantics); otherwise a no-op."""
        if not self.use_ema:
            return
        for v in var_list:
            v._set(self._slots[self._var_index(v)][EMA_SLOT].value + 0)

    def program_for(self, grads_and_vars: Iterable[tuple[Any, Variable]]) -> StepProgram:
        """The compiled step (with every stage's IR) that `apply_gradients` would run for these gradients."""
        pairs = [(g, v) for g, v in grads_and_vars if g is not None]
        if not self._built:
            self.build([v for _, v in pairs])
        return self._packed_program(tuple(self._gradient_entry(g, v)[0] for g, v in pairs))[0]

    def compile(self, specs: Any) -> FunctionalStep:
        """Compiles the step for a pytree of `VariableSpec`s or `Variable`s, without data.

        Returns a functional step: `state = step.init(params)`, `params, state = step(params, grads, state)`.
        This optimizer's own state is not used or changed.
        """
        leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(
            specs, is_leaf=lambda x: isinstance(x, (VariableSpec, Variable)))
        if not leaves_with_path:
            raise ValueError("compile() needs at least one variable spec")
        mesh = self.mesh
        if mesh is None:
            layouts = [leaf.layout for _, leaf in leaves_with_path if getattr(leaf, "layout", None) is not None]
            mesh = as_layout(layouts[0], None, 0).mesh if layouts else default_mesh()
        entries, names = [], []
        for path, leaf in leaves_with_path:
            if not isinstance(leaf, (VariableSpec, Variable)):
                raise TypeError(f"compile() takes VariableSpec or Variable leaves, got {type(leaf).__name__} at "
                                f"{path_name(path)}")
            shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
            name = leaf.name if isinstance(leaf, Variable) or leaf.name else path_name(path)
            if not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(f"variable {name!r} has dtype {dtype}: optimizers update floating point variables")
            layout = as_layout(leaf.layout, mesh, len(shape)) or Layout.replicated(mesh, len(shape))
            layout.validate(shape, f"variable {name!r}")
            if not same_mesh(auto_mesh(layout.mesh), auto_mesh(mesh)):
                raise ValueError(f"variable {name!r} is laid out on a different mesh than the optimizer's")
            spec = tuple(layout.to_partition_spec())
            entries.append(StepEntry(name, shape, str(dtype), spec + (None,) * (len(shape) - len(spec)),
                                     self._entry_slots()))
            names.append(name)
        if len(set(names)) != len(names):
            raise ValueError(f"variable names must be unique, got duplicates in {names}")
        saved_mesh, self.mesh = self.mesh, mesh
        try:
            program = self._program(tuple(entries))
        finally:
            self.mesh = saved_mesh
        schedule = self._schedule()
        return FunctionalStep(
            executable=program.executable, treedef=treedef, names=tuple(names),
            slot_names=self._entry_slots(),
            slot_init={s: (SLOT_INIT_FROM_VARIABLE if s == EMA_SLOT else SLOT_INIT_ZEROS) for s in self._entry_slots()},
            initial_learning_rate=None if schedule is not None else float(self._learning_rate),
            optimizer_config=self.get_config(), pipeline=tuple(self.pipeline), program=program,
            optimizer_class=type(self).__name__)

    # ----- config ----------------------------------------------------------------------------------------
    def _serialized_learning_rate(self) -> Any:
        lr = self._learning_rate
        return schedules.serialize(lr) if isinstance(lr, schedules.LearningRateSchedule) else np.float32(lr)

    def get_config(self) -> dict[str, Any]:
        """tf-keras's keys and values (jit_compile is the effective flag: False without a GPU)."""
        return {
            "name": self.name,
            "weight_decay": self.weight_decay,
            "clipnorm": self.clipnorm,
            "global_clipnorm": self.global_clipnorm,
            "clipvalue": self.clipvalue,
            "use_ema": self.use_ema,
            "ema_momentum": self.ema_momentum,
            "ema_overwrite_frequency": self.ema_overwrite_frequency,
            "jit_compile": bool(self.jit_compile and jax.default_backend() == "gpu"),
            "is_legacy_optimizer": False,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: dict[str, Any] | None = None) -> Optimizer:
        """Rebuilds an optimizer from `get_config()` output (a dict learning rate is a serialized schedule)."""
        config = dict(config)
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = schedules.deserialize(config["learning_rate"])
        return cls(**config)
