"""The functional form of a compiled step: `state = step.init(params)`, `params, state = step(params, grads,
state)` over pytrees, with params and state donated.

Everything here is read from the step contract by key: params are the user's pytree (one array per variable,
in the contract's variable order), `state` is a flat dict from the contract's state names to arrays — the packed
slot buffers, loose slots, gradient buffers, the counter and the learning rate. The state is opaque (as optax's
is): `step.slots(state)` gives each slot as a params-shaped pytree. It needs only the contract and the compiled
executable, so an artifact loaded in a fresh process (no optimizer definition) runs the same way.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from shardopt.core.contract import (
    COUNTER,
    GRADIENT,
    HYPERPARAMETER,
    OPTIMIZER_STATE,
    SLOT,
    VARIABLE,
    StepContract,
    TensorSpec,
)
from shardopt.core.errors import StepInputError
from shardopt.core.layout import auto_mesh
from shardopt.core.packing import PackGroup
from shardopt.core.paths import path_name, same_paths
from shardopt.core.specs import check_state_dict
from shardopt.runtime import artifact
from shardopt.runtime.executable import CompiledStep

# How each slot starts: zeros, or a copy of its variable (the EMA average), or `fill_init(c)`: the constant c
# (Adagrad's accumulator; also optimizer-level state, keyed by its name, e.g. Nadam's u_product = 1).
SLOT_INIT_FROM_VARIABLE = "variable"
SLOT_INIT_ZEROS = "zeros"
SLOT_INIT_FILL = "fill:"


def fill_init(value: float) -> str:
    return f"{SLOT_INIT_FILL}{float(value)!r}"

State = dict[str, Any]
CHECKPOINT_COUNTER = "iteration"  # tf-keras's name of the counter variable


@functools.lru_cache(maxsize=256)
def _packer(group: PackGroup) -> Any:
    return jax.jit(group.pack)


@functools.lru_cache(maxsize=256)
def _unpacker(group: PackGroup) -> Any:
    return jax.jit(lambda a: tuple(group.unpack(a, i) for i in range(len(group.members))))


@dataclass
class FunctionalStep:
    """A compiled optimizer step over pytrees of params and gradients (all gradients dense)."""

    executable: CompiledStep
    treedef: Any
    names: tuple[str, ...]
    slot_names: tuple[str, ...]
    slot_init: dict[str, str]
    initial_learning_rate: float | None
    optimizer_config: dict[str, Any] = field(default_factory=dict)
    pipeline: tuple[str, ...] = ()
    program: Any = None  # the StepProgram when compiled in this process (None when loaded from an artifact)
    optimizer_class: str | None = None  # e.g. "Adam": with optimizer_config, enough to rebuild the optimizer
    artifact: Any = None  # the runtime.artifact.Artifact (file, manifest, stage IR) when loaded from a file

    @property
    def contract(self) -> StepContract:
        return self.executable.contract

    @property
    def convention(self) -> StepContract:
        """Deprecated name of `contract`."""
        return self.executable.contract

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.executable.mesh

    @property
    def packs(self) -> tuple[PackGroup, ...]:
        """The packs the step keeps its slots in (names, dtype, layout, members with offsets)."""
        return self.contract.packs

    def _sharding(self, name: str) -> jax.sharding.NamedSharding:
        return self.executable.in_shardings[self.contract.arg_index(name)]

    def flatten_params(self, params: Any, what: str = "params") -> list[Any]:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        if treedef != self.treedef:
            if treedef.num_leaves == self.treedef.num_leaves and same_paths(params, self.treedef):
                return leaves  # the same structure with other node types (e.g. flax nnx State vs dicts)
            got = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
            missing = [n for n in self.names if n not in got]
            extra = [n for n in got if n not in self.names]
            detail = (f"missing {missing}, unexpected {extra}; " if missing or extra else "")
            raise StepInputError(f"{what} do not match the compiled step's structure: {detail}expected "
                                 f"{self.treedef}, got {treedef}")
        return leaves

    def place_params(self, params: Any) -> Any:
        """Puts `params` where the step wants them (a copy; use it once before the first step)."""
        leaves = self.flatten_params(params)
        placed = []
        for name, leaf in zip(self.names, leaves, strict=True):
            spec = self.contract.arg(name)
            arr = jnp.asarray(leaf, dtype=np.dtype(spec.dtype))
            if tuple(arr.shape) != spec.shape:
                raise StepInputError(f"{name}: expected shape {spec.shape}, got {tuple(arr.shape)}")
            placed.append(jax.device_put(arr, self._sharding(name)))
        return jax.tree_util.tree_unflatten(self.treedef, placed)

    # ----- state ----------------------------------------------------------------------------------------------
    def init(self, params: Any) -> State:
        """Fresh optimizer state for `params`: packed and loose slots (zeros, or the variable for EMA), gradient
        buffers, the counter and the learning rate; a flat dict keyed by the contract's state names."""
        values = dict(zip(self.names, self.flatten_params(params), strict=True))
        state: State = {}
        for spec in self.contract.state:
            state[spec.name] = jax.device_put(self._initial(spec, values), self._sharding(spec.name))
        return state

    def _initial(self, spec: TensorSpec, values: dict[str, Any]) -> Any:
        dtype = np.dtype(spec.dtype)
        if spec.role == COUNTER:
            return np.zeros((), dtype)
        if spec.role == HYPERPARAMETER:
            return np.asarray(self.initial_learning_rate, dtype)
        if spec.role == SLOT and self.slot_init.get(spec.slot or "") == SLOT_INIT_FROM_VARIABLE:
            if spec.pack is not None:
                group = self.contract.pack(spec.pack)
                return _packer(group)([jnp.asarray(values[m.name], dtype) for m in group.members])
            return jnp.array(values[spec.owner], dtype=dtype, copy=True)
        init = self.slot_init.get(spec.slot if spec.role == SLOT else spec.name, SLOT_INIT_ZEROS)
        if init.startswith(SLOT_INIT_FILL):
            return jnp.full(spec.shape, float(init[len(SLOT_INIT_FILL):]), dtype)
        return jnp.zeros(spec.shape, dtype)  # zero slots, gradient buffers, optimizer state

    def slots(self, state: State) -> dict[str, Any]:
        """Each slot as a params-shaped pytree, packed members cut out of their buffers (for inspection and
        checkpoints; the step keeps them packed); None where a variable has no such slot (Adafactor's rank 1)."""
        out: dict[str, Any] = {}
        members = self.contract.member_of()
        cut: dict[str, tuple[Any, ...]] = {}
        for slot in self.slot_names:
            leaves = []
            for name in self.names:
                if slot not in self.contract.slots_of(name):
                    leaves.append(None)
                    continue
                spec, index = self.contract.slot_arg(name, slot)
                if index is None:
                    leaves.append(state[spec.name])
                    continue
                if spec.name not in cut:  # cut on the Auto-axes copy of the mesh, as the step itself does
                    packed = jax.device_put(state[spec.name], NamedSharding(auto_mesh(self.mesh),
                                                                            PartitionSpec(*(spec.layout or ()))))
                    cut[spec.name] = _unpacker(members[name][0])(packed)
                leaves.append(cut[spec.name][index])
            out[slot] = jax.tree_util.tree_unflatten(self.treedef, leaves)
        return out

    # ----- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self, state: State) -> dict[str, jax.Array]:
        """The state as a flat dict of named arrays for a checkpoint (orbax, ...): `<slot>/<variable name>` per
        slot (packed members cut out, each laid out as its variable), `iteration`, optimizer-level state by name,
        and `learning_rate` when it is a runtime input. Any step compiled for the same variables restores it
        (`load_state_dict`). The arrays are copies: the next step, which donates the state, does not delete them."""
        out: dict[str, jax.Array] = {}
        slots = self.slots(state)
        for slot in self.slot_names:
            leaves = jax.tree.leaves(slots[slot], is_leaf=lambda x: x is None)
            out.update({f"{slot}/{n}": v for n, v in zip(self.names, leaves, strict=True) if v is not None})
        for spec in self.contract.state:
            if spec.role == COUNTER:
                out[CHECKPOINT_COUNTER] = state[spec.name]
            elif spec.role in (HYPERPARAMETER, OPTIMIZER_STATE):  # Nadam's u_product, skipped steps
                out[spec.name] = state[spec.name]
        return {k: jnp.array(v, copy=True) for k, v in out.items()}

    def state_dict_specs(self) -> dict[str, jax.ShapeDtypeStruct]:
        """What `state_dict` returns, as shapes, dtypes and shardings (an orbax restore target)."""
        out: dict[str, jax.ShapeDtypeStruct] = {}
        for slot in self.slot_names:
            for name in self.names:
                if slot not in self.contract.slots_of(name):
                    continue
                spec, index = self.contract.slot_arg(name, slot)  # loose: its own shape and layout (Adafactor's r)
                spec = spec if index is None else self.contract.arg(name)
                out[f"{slot}/{name}"] = jax.ShapeDtypeStruct(spec.shape, np.dtype(spec.dtype),
                                                             sharding=self._sharding(spec.name))
        for spec in self.contract.state:
            if spec.role in (COUNTER, HYPERPARAMETER, OPTIMIZER_STATE):
                key = CHECKPOINT_COUNTER if spec.role == COUNTER else spec.name
                out[key] = jax.ShapeDtypeStruct(spec.shape, np.dtype(spec.dtype), sharding=self._sharding(spec.name))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> State:
        """A state (as `init` returns) from a `state_dict`: names, shapes and dtypes are checked, values are laid
        out on this step's layouts and packed into its buffers; gradient buffers start as zeros."""
        values = check_state_dict(self.state_dict_specs(), state_dict)
        state: State = {}
        for spec in self.contract.state:
            sharding = self._sharding(spec.name)
            if spec.role == COUNTER:
                value = values[CHECKPOINT_COUNTER]
            elif spec.role in (HYPERPARAMETER, OPTIMIZER_STATE):
                value = values[spec.name]
            elif spec.role == SLOT and spec.pack is not None:
                group = self.contract.pack(spec.pack)
                value = _packer(group)([jnp.asarray(values[f"{spec.slot}/{m.name}"]) for m in group.members])
            elif spec.role == SLOT:
                value = values[f"{spec.slot}/{spec.owner}"]
            else:
                value = np.zeros(spec.shape, np.dtype(spec.dtype))
            state[spec.name] = jax.device_put(value, sharding, may_alias=False)
        return state

    @property
    def has_learning_rate_input(self) -> bool:
        return any(a.role == HYPERPARAMETER for a in self.contract.args)

    def flat_args(self, params: Any, grads: Any, state: State) -> list[Any]:
        """params, grads and state in the contract's order."""
        p = iter(self.flatten_params(params))
        g = iter(self.flatten_params(grads, "grads"))
        if not isinstance(state, dict):
            raise StepInputError(f"state must be the dict step.init(params) returned, got {type(state).__name__}")
        args = []
        for spec in self.contract.args:
            if spec.role == VARIABLE:
                args.append(next(p))
            elif spec.role == GRADIENT:
                args.append(next(g))
            elif spec.name in state:
                args.append(state[spec.name])
            else:
                missing = [s.name for s in self.contract.state if s.name not in state]
                raise StepInputError(f"state is missing {missing} (expected the keys of step.init(params): "
                                     f"{[s.name for s in self.contract.state]})")
        return args

    def unflatten_results(self, outs: Sequence[Any]) -> tuple[Any, State]:
        """The step's flat results as (params, state)."""
        params, state = [], {}
        for spec, value in zip(self.contract.results, outs, strict=True):
            if spec.role == VARIABLE:
                params.append(value)
            elif spec.role != HYPERPARAMETER or self.has_learning_rate_input:
                state[spec.name] = value  # a schedule's learning rate is only reported, not carried
        return jax.tree_util.tree_unflatten(self.treedef, params), state

    def __call__(self, params: Any, grads: Any, state: State, *, host_gradients: str = "checked"
                 ) -> tuple[Any, State]:
        """One step; `params` and `state` are donated (validated first, so a bad call loses nothing).

        `host_gradients="consistent"`: numpy gradients are the same in every process of a multi-process job (the
        caller's promise, unchecked) and are placed without jax's per-array cross-process equality check; the
        default "checked" keeps it. One process: no difference (runtime/host_gradients.py)."""
        return self.unflatten_results(self.executable(self.flat_args(params, grads, state), host_gradients))

    # ----- artifacts, inspection, embedding -------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], *, stages: bool = True) -> int:
        """Writes this step to one `.shardopt` file (atomically); `shardopt.load(path)` restores it anywhere,
        without the optimizer's definition. Returns the file size in bytes."""
        return artifact.save(self, path, stages=stages)

    def inspect(self, stage: str | None = None, diff: tuple[str, str] | None = None, html: Any = None,
                file: Any = None) -> Any:
        """Prints what `shardopt inspect` prints for this step (the report, one stage's IR, or a diff of two
        stages; `html=path` also writes the HTML page) and returns the `inspect.Report`."""
        from shardopt.runtime.inspect import inspect

        return inspect(self, stage=stage, diff=diff, html=html, file=file)

    def variable_names(self) -> list[str]:
        return list(self.contract.variables)

    def state_names(self) -> list[str]:
        return [a.name for a in self.contract.state]

    def as_jax_function(self) -> Any:
        """The pure `(params, grads, state) -> (params, state)` step for use inside the user's own `jax.jit`,
        `lax.fori_loop` or `scan` (a `shardopt.runtime.jax_embed.JaxStepFunction`; donation is the caller's)."""
        from shardopt.runtime.jax_embed import JaxStepFunction

        return JaxStepFunction(self)


def load(path: str | os.PathLike[str], mesh: jax.sharding.Mesh | None = None) -> FunctionalStep:
    """Restores a step saved with `step.save(path)`; it runs on `mesh` (default: all devices, the saved shape).

    Raises ArtifactError when the file is not a valid artifact or does not fit this process (mesh, device
    count, platform); nothing from the file is unpickled or executed as Python.
    """
    loaded = artifact.read(path, mesh)
    executable = CompiledStep(loaded.exported, loaded.contract, loaded.mesh)
    if loaded.portable is not None:
        executable.portable = CompiledStep(loaded.portable, loaded.contract, loaded.mesh)
    return FunctionalStep(
        executable=executable, treedef=loaded.treedef,
        names=loaded.names, slot_names=loaded.slot_names, slot_init=loaded.slot_init,
        initial_learning_rate=loaded.initial_learning_rate, optimizer_config=loaded.optimizer_config,
        pipeline=loaded.pipeline, optimizer_class=loaded.optimizer_class, artifact=loaded.artifact)


__all__ = ["CHECKPOINT_COUNTER", "FunctionalStep", "SLOT_INIT_FILL", "SLOT_INIT_FROM_VARIABLE", "SLOT_INIT_ZEROS",
           "check_state_dict", "fill_init", "load", "path_name"]
