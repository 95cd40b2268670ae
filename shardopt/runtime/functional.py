"""The functional form of a compiled step: `state = step.init(params)`, `params, state = step(params, grads,
state)` over pytrees, with params and state donated. It needs only the calling convention and the compiled
executable, so an artifact loaded in a fresh process (no optimizer definition) runs the same way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shardopt.frontend.convention import COUNTER, HYPERPARAMETER, SLOT, VARIABLE, CallingConvention
from shardopt.runtime.executable import CompiledStep, StepInputError

# How each slot starts: zeros, or a copy of its variable (the EMA average).
SLOT_INIT_FROM_VARIABLE = "variable"
SLOT_INIT_ZEROS = "zeros"


def path_name(path: tuple[Any, ...]) -> str:
    """A pytree key path as a slash-separated name: {'dense': {'kernel': x}} -> 'dense/kernel'."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts) if parts else "param"


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
    def convention(self) -> CallingConvention:
        return self.executable.convention

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.executable.mesh

    def _spec(self, name: str) -> Any:
        return self.convention.args[self.convention.arg_index(name)]

    def _sharding(self, name: str) -> jax.sharding.NamedSharding:
        return self.executable.in_shardings[self.convention.arg_index(name)]

    def flatten_params(self, params: Any, what: str = "params") -> list[Any]:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        if treedef != self.treedef:
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
            spec = self._spec(name)
            arr = jnp.asarray(leaf, dtype=np.dtype(spec.dtype))
            if tuple(arr.shape) != spec.shape:
                raise StepInputError(f"{name}: expected shape {spec.shape}, got {tuple(arr.shape)}")
            placed.append(jax.device_put(arr, self._sharding(name)))
        return jax.tree_util.tree_unflatten(self.treedef, placed)

    def init(self, params: Any) -> dict[str, Any]:
        """Fresh optimizer state for `params`: slots (zeros, or the variable for EMA), counter, learning rate."""
        leaves = self.flatten_params(params)
        slots: dict[str, Any] = {}
        for s in self.slot_names:
            vals = []
            for name, leaf in zip(self.names, leaves, strict=True):
                spec = self._spec(f"{s}/{name}")
                init = (jnp.array(leaf, dtype=np.dtype(spec.dtype), copy=True)
                        if self.slot_init.get(s) == SLOT_INIT_FROM_VARIABLE
                        else jnp.zeros(spec.shape, np.dtype(spec.dtype)))
                vals.append(jax.device_put(init, self._sharding(f"{s}/{name}")))
            slots[s] = jax.tree_util.tree_unflatten(self.treedef, vals)
        state: dict[str, Any] = {"slots": slots}
        ctr = self._spec("iterations")
        state["iterations"] = jax.device_put(np.zeros((), np.dtype(ctr.dtype)), self._sharding("iterations"))
        if self.has_learning_rate_input:
            state["learning_rate"] = jax.device_put(np.float32(self.initial_learning_rate),
                                                    self._sharding("learning_rate"))
        return state

    @property
    def has_learning_rate_input(self) -> bool:
        return any(a.role == HYPERPARAMETER for a in self.convention.args)

    def flat_args(self, params: Any, grads: Any, state: dict[str, Any]) -> list[Any]:
        """params, grads and state in the calling convention's order."""
        p = self.flatten_params(params)
        g = self.flatten_params(grads, "grads")
        slot_leaves = {s: self.flatten_params(state["slots"][s], f"state['slots'][{s!r}]") for s in self.slot_names}
        args = [*p, *g]
        for i in range(len(self.names)):
            args.extend(slot_leaves[s][i] for s in self.slot_names)
        args.append(state["iterations"])
        if self.has_learning_rate_input:
            args.append(state["learning_rate"])
        return args

    def unflatten_results(self, outs: Sequence[Any]) -> tuple[Any, dict[str, Any]]:
        """The step's flat results as (params, state)."""
        n, k = len(self.names), len(self.slot_names)
        params = jax.tree_util.tree_unflatten(self.treedef, list(outs[:n]))
        slots = {s: jax.tree_util.tree_unflatten(self.treedef, [outs[n + i * k + j] for i in range(n)])
                 for j, s in enumerate(self.slot_names)}
        state: dict[str, Any] = {"slots": slots, "iterations": outs[n + n * k]}
        if self.has_learning_rate_input:
            state["learning_rate"] = outs[n + n * k + 1]
        return params, state

    def __call__(self, params: Any, grads: Any, state: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """One step; `params` and `state` are donated (validated first, so a bad call loses nothing)."""
        return self.unflatten_results(self.executable(self.flat_args(params, grads, state)))

    def save(self, path: Any, *, stages: bool = True) -> int:
        """Writes this step to one `.shardopt` file (atomically); `shardopt.load(path)` restores it anywhere,
        without the optimizer's definition. Returns the file size in bytes."""
        from shardopt.runtime.artifact import save

        return save(self, path, stages=stages)

    def inspect(self, stage: str | None = None, diff: tuple[str, str] | None = None, html: Any = None,
                file: Any = None) -> Any:
        """Prints what `shardopt inspect` prints for this step (the report, one stage's IR, or a diff of two
        stages; `html=path` also writes the HTML page) and returns the `inspect.Report`."""
        from shardopt.runtime.inspect import inspect

        return inspect(self, stage=stage, diff=diff, html=html, file=file)

    def variable_names(self) -> list[str]:
        return [a.name for a in self.convention.args if a.role == VARIABLE]

    def state_names(self) -> list[str]:
        return [a.name for a in self.convention.args if a.role in (SLOT, COUNTER)]

    def as_jax_function(self) -> Any:
        """The pure `(params, grads, state) -> (params, state)` step for use inside the user's own `jax.jit`,
        `lax.fori_loop` or `scan` (a `shardopt.runtime.jax_embed.JaxStepFunction`; donation is the caller's)."""
        from shardopt.runtime.jax_embed import as_jax_function

        return as_jax_function(self)
