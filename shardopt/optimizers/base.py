"""The Keras-shaped optimizer base class: state, `apply_gradients`, config; the math lives in definitions.

A definition (Adam, SGD, ...) subclasses `Optimizer`, passes its default learning rate and name and forwards the
shared arguments (`**kwargs`) to `Optimizer.__init__`, declares its slots once (the class attribute `slots`, or
`slot_groups()` when they depend on arguments; the base's `build` creates them), and implements `update_dense`
(and `update_sparse` when tf-keras's sparse rounding differs) as pure jnp functions of one variable. Optimizer-
level state (Nadam's momentum product) is declared by `optimizer_state_init()` and advanced once per step by
`update_global`. Everything else — clipping, EMA, schedules, the counter, lowering, passes, execution — is shared.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from shardopt.compiler import StepProgram, compile_step
from shardopt.core.contract import (
    COUNTER,
    GRADIENT_BUFFER,
    HYPERPARAMETER,
    OPTIMIZER_STATE,
    SKIPPED_STEPS,
    SLOT,
    VARIABLE,
    StepContract,
    StepEntry,
)
from shardopt.core.packing import PACK_MAX_ELEMENTS, PackGroup
from shardopt.frontend import options
from shardopt.frontend.step import compute_dtype
from shardopt.optimizers import checkpoint, state_sharding
from shardopt.optimizers.functional import compile_functional
from shardopt.optimizers.gradients import dense_entry, gradient_entry
from shardopt.optimizers.hyperparameters import HyperparameterMixin
from shardopt.optimizers.packed_state import PackedState
from shardopt.optimizers.state import STEP_LOCK, StateMixin
from shardopt.optimizers.variables import Variable
from shardopt.passes.pipeline import DEFAULT_PIPELINE
from shardopt.runtime.executable import array_type
from shardopt.runtime.functional import FunctionalStep
from shardopt.runtime.host_gradients import trusts_host_gradients

log = logging.getLogger("shardopt")

MAX_PROGRAMS = 64  # compiled steps kept per optimizer (one per gradient signature)

State = dict[str, jax.Array]


def _mesh_key(mesh: Mesh) -> tuple[Any, ...]:
    return (mesh.axis_names, mesh.devices.shape, tuple(d.id for d in mesh.devices.flat), mesh.axis_types)


class Optimizer(StateMixin, HyperparameterMixin):
    """Base class of shardopt optimizers (tf-keras's `Optimizer` API, compiled per gradient signature)."""

    def __init__(
        self,
        name: str,
        learning_rate: Any = 0.001,
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
        skip_nonfinite: bool = False,
        shard_state_over: state_sharding.ShardStateOver = None,
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
        self._lr_callable = options.callable_name(learning_rate)  # for `learning_rate_source`
        learning_rate = options.learning_rate_value(learning_rate)  # tf-keras checks it after the kwargs
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
        if not isinstance(skip_nonfinite, (bool, np.bool_)):
            raise TypeError(f"`skip_nonfinite` must be a bool, got {skip_nonfinite!r}")
        # Like optax's apply_if_finite: a step whose gradients are not all finite changes no variable or slot and
        # does not advance `iterations`; `skipped_steps` (optimizer state) counts such steps.
        self.skip_nonfinite = bool(skip_nonfinite)
        # Weight-update sharding (optimizers/state_sharding.py): slots sharded over these mesh axes as well.
        self.shard_state_over = state_sharding.check(shard_state_over)
        self.mesh = mesh
        self.pipeline: tuple[str, ...] = DEFAULT_PIPELINE
        self._learning_rate: Any = learning_rate
        self._lr_array: jax.Array | None = None
        self._current_lr: jax.Array | None = None
        self._iterations: Variable | None = None
        self._exclude_from_weight_decay: set[int] = set()
        self._exclude_names: list[str] = []
        self._name_scope = ""  # prefix of slot names while `apply_gradients` builds (tf-keras's name scope)
        self._optimizer_state: dict[str, Variable] = {}  # optimizer-level state (Nadam's u_product), by name
        self._built = False
        self._variables: list[Variable] = []
        self._index: dict[int, int] = {}
        self._model_variables: list[Variable] = []
        self._step_names: list[str] = []  # each variable's unique name in step contracts
        self._slots: list[dict[str, Variable]] = []
        self._programs: dict[Any, StepProgram] = {}
        self._fast_programs: dict[Any, StepProgram] = {}  # keyed by variable indices for the common dense case
        self._schedule_cache: tuple[Any, str] = (None, "")
        # Small variables and their slots live packed between steps (see frontend/packing.py); 0 turns it off.
        self.pack_max_elements = PACK_MAX_ELEMENTS
        self._packed: PackedState | None = None
        self._traced_update: Callable[..., Any] | None = None  # one jax trace per entry kind (frontend/step.py)
        self._lock = STEP_LOCK  # one step (and one build) at a time: a step donates the state it reads
        self._var_avals: list[tuple[tuple[int, ...], np.dtype]] = []  # (shape, dtype) per variable, set by build
        options.check_hyperparameters(self)

    # ----- the definition's math (override) --------------------------------------------------------------
    def update_dense(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                     ) -> tuple[jax.Array, State]:
        """One variable's update, in its compute dtype; returns the new variable and slots."""
        raise NotImplementedError

    def update_sparse(self, var: jax.Array, grad: jax.Array, state: State, lr: jax.Array, t: jax.Array
                      ) -> tuple[jax.Array, State]:
        """The update for a de-duplicated sparse gradient given densely (zero rows elsewhere)."""
        return self.update_dense(var, grad, state, lr, t)

    def optimizer_state_init(self) -> dict[str, float]:
        """Optimizer-level float32 scalars tied to no variable, with their initial values (none by default)."""
        return {}

    def optimizer_state_values(self) -> dict[str, float]:
        """Every optimizer-level state the step carries: the definition's, and `skipped_steps` with
        `skip_nonfinite`."""
        return {**self.optimizer_state_init(), **({SKIPPED_STEPS: 0.0} if self.skip_nonfinite else {})}

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (with `skip_nonfinite=True`; 0 otherwise)."""
        var = self._optimizer_state.get(SKIPPED_STEPS)
        return 0 if var is None else int(var.value)

    def update_global(self, state: State, t: jax.Array) -> State:
        """Advances the optimizer-level state once per step, before the per-variable updates; the new values are
        also in the `state` that `update_dense`/`update_sparse` receive (read-only there)."""
        return state

    # ----- weight decay exclusions (tf-keras's `exclude_from_weight_decay`) ------------------------------
    def exclude_from_weight_decay(self, var_list: Sequence[Variable] | None = None,
                                  var_names: Sequence[str] | None = None) -> None:
        """Excludes variables from weight decay: those in `var_list`, and those whose name matches (`re.search`)
        one of `var_names`. Only before the optimizer is built, as in tf-keras."""
        if self._built:
            raise ValueError("`exclude_from_weight_decay()` can only be configued before the optimizer is built.")
        self._exclude_from_weight_decay = {id(v) for v in var_list or ()}
        self._exclude_names = list(var_names or [])

    def _use_weight_decay(self, step_name: str) -> bool:
        """Whether the variable named `step_name` in step contracts gets weight decay."""
        var = next((v for n, v in zip(self._step_names, self._model_variables, strict=True) if n == step_name),
                   None)
        if var is not None and id(var) in self._exclude_from_weight_decay:
            return False
        name = var.name if var is not None else step_name
        return not any(re.search(pattern, name) is not None for pattern in self._exclude_names)

    # ----- applying gradients ----------------------------------------------------------------------------
    def _program(self, entries: tuple[StepEntry, ...], packs: tuple[PackGroup, ...] = (),
                 mesh: Mesh | None = None, pipeline: tuple[str, ...] | None = None) -> StepProgram:
        """The compiled step for `entries` (cached per entries, packs, mesh, learning-rate schedule and
        pipeline; `pipeline` defaults to the optimizer's)."""
        mesh = mesh or self.mesh
        pipeline = tuple(self.pipeline) if pipeline is None else pipeline
        entries = tuple(self._with_slot_spec(e) for e in entries)
        if self.weight_decay is not None and (self._exclude_from_weight_decay or self._exclude_names):
            entries = tuple(dataclasses.replace(e, weight_decay=self._use_weight_decay(e.name)) for e in entries)
        entries = state_sharding.with_requests(self.shard_state_over, entries)
        key = (entries, packs, _mesh_key(mesh), self._schedule_key(), pipeline)
        program = self._programs.get(key)
        if program is None:
            program = compile_step(self, entries, mesh, schedule=self._schedule(), packs=packs,
                                   slot_names=self._pack_slots(), pipeline=pipeline)
            self._programs[key] = program
            while len(self._programs) > MAX_PROGRAMS:  # bounded: the oldest signature is compiled again if needed
                self._programs.pop(next(iter(self._programs)))
                self._fast_programs.clear()
        return program

    def _with_slot_spec(self, e: StepEntry) -> StepEntry:
        """`e` with the slots a variable of its shape has (`slot_dims`), and the shapes and pinned layouts of
        those of another shape."""
        slots, shapes, layouts = self._slot_spec(e.shape, e.layout)
        if (slots, shapes, layouts) == (e.slots, e.slot_shapes, e.slot_layouts):
            return e
        return dataclasses.replace(e, slots=slots, slot_shapes=shapes, slot_layouts=layouts)

    def _packed_program(self, entries: tuple[StepEntry, ...]) -> StepProgram:
        """The program `apply_gradients` runs for `entries`: the slots of packed members in their packs."""
        state = self._ensure_packed()
        pack_ids = sorted({state.member_of[e.name][0] for e in entries if e.name in state.member_of})
        return self._program(entries, tuple(state.packs[i] for i in pack_ids))

    def _holders(self, contract: StepContract, indices: list[int]) -> tuple[list[Any], list[Any], list[Any]]:
        """What supplies (`.value`) each variable and state argument of `contract` and stores (`._set`) each
        result, read from the contract by role and name: (variable holders, state-argument holders, result
        holders). Gradients (and the learning rate input) come from the call."""
        state = self._ensure_packed()
        by_name: dict[str, Any] = {}
        for p, group in enumerate(state.packs):
            by_name[f"gradient_buffer/{group.name}"] = state.gradients[p]
            for slot, buffer in state.slots[p].items():
                by_name[f"{slot}/{group.name}"] = buffer
        for i in indices:
            name = self._step_names[i]
            by_name[name] = self._model_variables[i]
            for slot, var in self._slots[i].items():
                by_name[f"{slot}/{name}"] = var
        by_name["iterations"] = self.iterations
        by_name.update(self._optimizer_state)
        variables = [by_name[a.name] for a in contract.args if a.role == VARIABLE]
        state_args = [by_name[a.name] for a in contract.args
                      if a.role in (SLOT, GRADIENT_BUFFER, OPTIMIZER_STATE, COUNTER)]
        results = [by_name.get(r.name) for r in contract.results if r.role != HYPERPARAMETER]
        return variables, state_args, results

    def apply_gradients(self, grads_and_vars: Iterable[tuple[Any, Variable]], name: str | None = None,
                        skip_gradients_aggregation: bool = False, *, host_gradients: str = "checked",
                        **kwargs: Any) -> Variable:
        """Applies one step: compiled once per gradient signature, then cached. Returns `iterations`.

        `host_gradients="consistent"`: in a multi-process job, numpy gradients are the same in every process (the
        caller's promise, unchecked) and are placed without jax's per-array cross-process equality check (an
        all-gather per gradient per step); the default "checked" keeps it. One process: no difference.

        Safe to call from several threads: steps run one at a time (each donates the state it reads)."""
        trusts_host_gradients(host_gradients)  # a bad mode is refused before anything runs
        pairs = list(grads_and_vars)
        with self._lock:
            return self._apply(pairs, host_gradients)

    def _apply(self, pairs: list[tuple[Any, Variable]], host_gradients: str = "checked") -> Variable:
        schedule = self._schedule()
        if not pairs:
            if schedule is not None:
                self._current_lr = jnp.asarray(schedule(int(self.iterations.value)), jnp.float32)
            return self.iterations
        if not self._built:
            self._name_scope = f"{self.name}/"  # tf-keras builds inside apply_gradients' name scope
            try:
                self.build([v for _, v in pairs])
            finally:
                self._name_scope = ""
        index_of, avals, exact = self._index, self._var_avals, array_type()
        signature, grad_arrays, indices = [], [], []
        dropped = []
        for g, v in pairs:
            index = index_of.get(id(v))
            if index is None:
                self._var_index(v)  # raises tf-keras's "cannot recognize variable" error
            if g is None:
                dropped.append(v.name)
                continue
            indices.append(index)
            if type(g) is exact and (g.aval.shape, g.aval.dtype) == avals[index]:
                signature.append(index)  # the common case: a dense gradient of the variable's shape and dtype
                grad_arrays.append(g)
            else:
                entry, arrays = gradient_entry(g, v, self._entry_slots(), self._step_names[index])
                signature.append(entry)
                grad_arrays.extend(arrays)
        if not indices:
            raise ValueError(f"No gradients provided for any variable: {[v.name for _, v in pairs]}.")
        if len(set(indices)) != len(indices):
            twice = sorted({self._step_names[i] for i in indices if indices.count(i) > 1})
            raise ValueError(f"variables {twice} are listed more than once in one apply_gradients call; sum "
                             "their gradients first")
        if dropped:
            log.warning("Gradients do not exist for variables %s when minimizing the loss.", dropped)
        key = (tuple(signature), self._schedule_key())
        fast = self._fast_programs.get(key)
        if fast is None:
            entries = [dense_entry(self._model_variables[i], self._entry_slots(), self._step_names[i])
                       if isinstance(sig, int) else sig for i, sig in zip(indices, signature, strict=True)]
            if self.global_clipnorm and not self.clipnorm and len({e.dtype for e in entries}) > 1:
                raise TypeError("global_clipnorm needs every gradient to have the same dtype (tf.clip_by_global_norm "
                                f"stacks the norms); got {sorted({e.dtype for e in entries})}")
            program = self._packed_program(tuple(entries))
            fast = self._fast_programs[key] = (program, *self._holders(program.contract, indices))
        program, var_holders, state_holders, result_holders = fast
        args = [h.value for h in var_holders] + grad_arrays + [h.value for h in state_holders]
        if schedule is None:
            args.append(self._lr_input())
        outs = program.executable(args, host_gradients)
        for holder, value in zip(result_holders, outs, strict=False):
            holder._set(value)
        if schedule is not None:
            self._current_lr = outs[-1]
        return self.iterations

    def compute_gradients(self, loss: Callable[[list[jax.Array]], jax.Array], var_list: Sequence[Variable],
                          tape: Any = None) -> list[tuple[jax.Array, Variable]]:
        """Gradients of `loss(values)` (a callable of the variables' values, in `var_list` order) by jax.grad; a
        non-scalar loss is summed first (as `tf.GradientTape.gradient` sums its target)."""
        if not callable(loss):
            raise TypeError("loss must be a callable of the list of variable values")
        user_loss = loss

        def loss(values: list[jax.Array]) -> jax.Array:
            return jnp.sum(user_loss(values))

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
        """The definition's update for one variable at the current step (no clipping, EMA or counter; the
        optimizer-level state, e.g. Nadam's u_product, advances once per call)."""
        if not self._built:
            self.build([variable])
        index = self._var_index(variable)
        entry, arrays = gradient_entry(gradient, variable, self._entry_slots())
        names = [s for s in self.slot_names() if s in self._slots[index]]
        sparse = entry.sparse_rows is not None
        ct = compute_dtype(variable.dtype)
        lr = self.learning_rate

        @jax.jit
        def one(var, lr, it, glob, *rest):
            g = rest[0].astype(ct)
            if sparse:
                g = jnp.zeros(entry.shape, ct).at[rest[1]].add(g, mode="drop")
            g = jnp.broadcast_to(g, entry.shape)
            if glob:  # optimizer-level state advances first, as in a step
                glob = dict(self.update_global(glob, (it + 1).astype(jnp.float32)))
            state = {**{n: x.astype(ct) for n, x in glob.items()},
                     **{s: x.astype(ct) for s, x in zip(names, rest[len(arrays):], strict=True)}}
            update = self.update_sparse if sparse else self.update_dense
            new_var, new_state = update(var.astype(ct), g, state, lr.astype(ct), (it + 1).astype(ct))
            return new_var.astype(var.dtype), [new_state[s].astype(var.dtype) for s in names], glob

        slots = [self._slots[index][s] for s in names]
        glob = {n: v.value for n, v in self._optimizer_state.items()}
        new_var, new_slots, new_glob = one(variable.value, lr, self.iterations.value, glob, *arrays,
                                           *[s.value for s in slots])
        for n, value in new_glob.items():
            self._optimizer_state[n]._set(jax.device_put(value, self._optimizer_state[n].sharding))
        variable._set(jax.device_put(new_var, variable.sharding))
        for s, val in zip(slots, new_slots, strict=True):
            s._set(jax.device_put(val, s.sharding))

    def program_for(self, grads_and_vars: Iterable[tuple[Any, Variable]]) -> StepProgram:
        """The compiled step (with every stage's IR) that `apply_gradients` would run for these gradients."""
        pairs = [(g, v) for g, v in grads_and_vars if g is not None]
        if not self._built:
            self.build([v for _, v in pairs])
        return self._packed_program(tuple(
            gradient_entry(g, v, self._entry_slots(), self._step_names[self._var_index(v)])[0] for g, v in pairs))

    # checkpoints (optimizers/checkpoint.py): named, sharded state arrays; restore validates and lays them out
    state_dict, load_state_dict, state_dict_specs = (checkpoint.state_dict, checkpoint.load_state_dict,
                                                     checkpoint.state_dict_specs)

    def get_weights(self) -> list[np.ndarray]:
        """The values of `variables` (counter first), as numpy arrays (tf-keras's `get_weights`)."""
        return [np.asarray(v.numpy()) for v in self.variables]

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Assigns `weights` (as `get_weights` returns them) to `variables`, checking count and shapes."""
        weights = list(weights)
        variables = self.variables
        if len(weights) != len(variables):
            raise ValueError(f"You called `set_weights(weights)` on optimizer {self.name} with a weight list of "
                             f"length {len(weights)}, but the optimizer was expecting {len(variables)} weights.")
        for var, w in zip(variables, weights, strict=True):
            if tuple(np.shape(w)) != tuple(var.shape):
                raise ValueError(f"Optimizer variable {var.name} has shape {tuple(var.shape)} not compatible with "
                                 f"provided weight shape {tuple(np.shape(w))}.")
        with self._lock:
            for var, w in zip(variables, weights, strict=True):
                var.assign(np.asarray(w, var.dtype))

    def compile(self, specs: Any, *, scatter_gradients: bool = False) -> FunctionalStep:
        """Compiles the step for a pytree of `VariableSpec`s or `Variable`s, without data (see
        `functional_compile.compile_functional`): `state = step.init(params)`, `params, state = step(...)`.

        `scatter_gradients=True` (with `shard_state_over`): a state-sharded variable's gradient is taken in its
        state's layout, as `jax.lax.psum_scatter(g, axis, scatter_dimension=d, tiled=True)` of per-replica
        gradients returns it inside the user's `shard_map`, so the user's jit has a reduce-scatter and no
        all-reduce of the gradients (the README's "Weight-update sharding")."""
        return compile_functional(self, specs, scatter_gradients=scatter_gradients)
