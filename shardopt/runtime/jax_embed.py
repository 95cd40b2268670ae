"""A compiled step as a pure jax function, and as an optax `GradientTransformation`.

Both call `step.executable.exported.call`: the Exported that carries our optimized module. Traced inside a
user's `jax.jit` (or `lax.fori_loop`/`scan`), jax inlines it as `call @call_exported_<name>`, so the whole
training step — gradients and the fused update — is one XLA program, and the fused passes keep paying.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, SingleDeviceSharding

from shardopt.core.errors import StepInputError
from shardopt.core.layout import Layout, auto_mesh, resolve_mesh, same_mesh
from shardopt.core.specs import VariableSpec

Params = Any
State = dict[str, Any]


class JaxStepFunction:
    """`(params, grads, state) -> (params, state)`, pure and traceable: the compiled step for use inside jit.

    Unlike calling the `FunctionalStep` directly, nothing is donated or moved here: the enclosing `jax.jit`
    decides donation (`donate_argnums`) and placement. It must run on as many devices as the step's mesh
    (place params with `step.place_params` and the state with `step.init`).
    """

    def __init__(self, step: Any):  # a runtime.functional.FunctionalStep
        self.step = step
        self.exported = step.executable.exported
        self.__name__ = f"shardopt_step_{step.optimizer_config.get('name', 'step')}"
        self.__doc__ = JaxStepFunction.__doc__

    def init(self, params: Params) -> State:
        """Fresh optimizer state (eager; see `FunctionalStep.init`)."""
        return self.step.init(params)

    def place_params(self, params: Params) -> Params:
        """`params` placed on the step's mesh with the step's layouts (eager)."""
        return self.step.place_params(params)

    def _check(self, flat: list[Any]) -> list[Any]:
        """Names the offending tensor on a shape/dtype mismatch (jax's own error gives only a position)."""
        out = []
        for x, spec in zip(flat, self.step.contract.args, strict=True):
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                x = np.asarray(x, np.dtype(spec.dtype))
            elif not hasattr(x, "dtype"):
                x = np.asarray(x)
            shape, dtype = tuple(np.shape(x)), np.dtype(x.dtype)
            if shape != spec.shape:
                raise StepInputError(f"{spec.name}: expected shape {spec.shape}, got {shape}")
            if dtype != np.dtype(spec.dtype):
                raise StepInputError(f"{spec.name}: expected dtype {spec.dtype}, got {dtype}")
            out.append(x)
        return out

    def __call__(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        flat = self._check(self.step.flat_args(params, grads, state))
        try:
            outs = self.exported.call(*flat)
        except ValueError as e:
            if "was exported for" not in str(e) and "size of the mesh" not in str(e):
                raise
            raise StepInputError(
                f"{e} The step was compiled for the mesh {dict(self.step.contract.mesh_axes)} "
                f"({self.exported.nr_devices} devices): run the enclosing jax.jit on that mesh, e.g. with params "
                "from `step.place_params` and state from `step.init`.") from e
        return self.step.unflatten_results(self._match_types(flat, list(outs)))

    def _match_types(self, flat: list[Any], outs: list[Any]) -> list[Any]:
        """Gives each result the sharding *type* of the input it replaces.

        The step is compiled on an Auto-axes mesh; a user whose params live on an Explicit-axes mesh
        (`jax.make_mesh`'s default) would otherwise get results whose type differs from the inputs, which
        breaks `fori_loop`/`scan` carries and arithmetic mixing the two (`new - old` in `as_optax`).
        """
        conv = self.step.contract
        inputs = {a.name: x for a, x in zip(conv.args, flat, strict=True)}
        fixed = []
        for spec, out in zip(conv.results, outs, strict=True):
            want = _explicit_sharding(inputs[spec.name]) if spec.name in inputs else None
            fixed.append(out if want is None else jax.sharding.reshard(out, want))
        return fixed

    def __repr__(self) -> str:
        return f"JaxStepFunction({len(self.step.names)} variables, mesh={dict(self.step.contract.mesh_axes)})"


def _explicit_sharding(x: Any) -> Any:
    """`x`'s sharding when its type carries one (an Explicit-axes mesh), else None."""
    try:
        sharding = jax.typeof(x).sharding
    except (AttributeError, TypeError):
        return None
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not any(t == AxisType.Explicit for t in mesh.axis_types):
        return None
    return sharding


def as_jax_function(step: Any) -> JaxStepFunction:
    """The pure `(params, grads, state) -> (params, state)` function of a compiled step, for the user's jit."""
    return JaxStepFunction(step)


# ----- optax ---------------------------------------------------------------------------------------------------


class ShardoptState(NamedTuple):
    """The optax state of `as_optax`: the compiled step's own state — its (packed) slot and gradient buffers by
    contract name, the counter and the learning rate. `tx.init.steps[...].step.slots(...)` reads the slots."""

    buffers: dict[str, Any]
    iterations: Any
    learning_rate: Any = None  # None when the learning rate is a schedule compiled into the step

    @property
    def slots(self) -> dict[str, Any]:
        """Deprecated: the slot buffers by contract name (packed ones hold several variables). Use
        `tx.init.steps[...].step.slots(state.to_step_state())` for per-variable slots."""
        import warnings

        warnings.warn("ShardoptState.slots is deprecated: the state is packed; read slots with "
                      "step.slots(state.to_step_state())", DeprecationWarning, stacklevel=2)
        return {k: v for k, v in self.buffers.items() if not k.startswith("gradient_buffer/")}

    @classmethod
    def from_step_state(cls, state: State) -> ShardoptState:
        buffers = {k: v for k, v in state.items() if k not in ("iterations", "learning_rate")}
        return cls(buffers, state["iterations"], state.get("learning_rate"))

    def to_step_state(self) -> State:
        state: State = {**self.buffers, "iterations": self.iterations}
        if self.learning_rate is not None:
            state["learning_rate"] = self.learning_rate
        return state


def _signature(params: Params) -> tuple[Any, ...]:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return (treedef, tuple((tuple(np.shape(x)), str(np.dtype(x.dtype))) for x in leaves))


def _leaf_sharding(x: Any) -> Any:
    """A concrete array's sharding (None for tracers and host arrays, whose placement is not known)."""
    if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
        return None
    return x.sharding


def specs_for(params: Params, mesh: Mesh | None = None) -> Any:
    """`VariableSpec`s for a params pytree: its shapes and dtypes, and the layouts of its `NamedSharding`s
    when they are on the optimizer's mesh (anything else is compiled replicated)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    shardings = [_leaf_sharding(x) for x in leaves]
    single = [s for s in shardings if isinstance(s, SingleDeviceSharding)]
    mesh = resolve_mesh(mesh, [s for s in shardings if isinstance(s, NamedSharding)],
                        next(iter(single[0].device_set)) if single else None)
    specs = []
    for x, s in zip(leaves, shardings, strict=True):
        rank = len(np.shape(x))
        if isinstance(s, NamedSharding) and same_mesh(auto_mesh(s.mesh), auto_mesh(mesh)):
            layout = Layout.from_sharding(s, rank)
        else:
            layout = Layout.replicated(mesh, rank)
        specs.append(VariableSpec(tuple(np.shape(x)), np.dtype(x.dtype), layout))
    return jax.tree_util.tree_unflatten(treedef, specs)


def as_optax(optimizer: Any) -> Any:
    """An optax `GradientTransformation` whose `update` runs the compiled shardopt step.

    `init(params)` compiles the step for the params' shapes, dtypes and layouts (once per signature) and
    returns a `ShardoptState`. Call it eagerly, outside `jax.jit`: compiling is not a traceable operation.
    `update(grads, state, params)` needs `params` (the step computes new params) and returns
    `updates = new_params - params`, so `optax.apply_updates(params, updates)` gives the step's new params:
    exactly whenever new and old value are within a factor of 2 (Sterbenz: the subtraction and the re-addition
    are then exact, which an Adam step almost always is), otherwise within an ulp of the larger.

    Args:
      optimizer: a shardopt optimizer, e.g. `shardopt.Adam(1e-3)`. Its own (stateful) state is not used.
    Returns:
      `optax.GradientTransformation(init, update)`; `tx.init.steps` maps each params signature to its
      compiled step (a `JaxStepFunction`; `.step` is the `FunctionalStep`), for inspection.
    """
    import optax

    steps: dict[tuple[Any, ...], JaxStepFunction] = {}

    def lookup(params: Params) -> JaxStepFunction:
        fn = steps.get(_signature(params))
        if fn is None:
            raise RuntimeError(
                "shardopt.as_optax: no compiled step for these params. Call `init(params)` eagerly (outside "
                "jax.jit) with params of the same structure, shapes and dtypes before `update` is traced.")
        return fn

    def init_fn(params: Params) -> ShardoptState:
        key = _signature(params)
        if key not in steps:
            steps[key] = as_jax_function(optimizer.compile(specs_for(params, optimizer.mesh)))
        return ShardoptState.from_step_state(steps[key].init(params))

    def update_fn(updates: Params, state: ShardoptState, params: Params | None = None
                  ) -> tuple[Params, ShardoptState]:
        if params is None:
            raise ValueError("shardopt.as_optax: `update(grads, state, params)` needs `params`: the compiled "
                             "step computes the new params from them")
        fn = lookup(params)
        new_params, new_state = fn(params, updates, state.to_step_state())
        deltas = jax.tree.map(lambda n, p: n - p, new_params, params)
        return deltas, ShardoptState.from_step_state(new_state)

    tx = optax.GradientTransformation(init_fn, update_fn)
    init_fn.steps = steps  # type: ignore[attr-defined]
    return tx


__all__ = ["JaxStepFunction", "ShardoptState", "as_jax_function", "as_optax", "specs_for"]
