"""A compiled step as a pure jax function, and as an optax `GradientTransformation`.

Both call `step.executable.exported.call`: the Exported that carries our optimized module. Traced inside a
user's `jax.jit` (or `lax.fori_loop`/`scan`), jax inlines it as `call @call_exported_<name>`, so the whole
training step — gradients and the fused update — is one XLA program, and the fused passes keep paying.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, SingleDeviceSharding

from shardopt.core.errors import StepInputError
from shardopt.core.layout import Layout, auto_mesh, resolve_mesh, same_mesh
from shardopt.core.paths import path_name
from shardopt.core.specs import VariableSpec, differences

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


def _as_jit_returns(x: jax.Array) -> jax.Array:
    """`x` with its sharding spelled as a jitted update returns it (`P()`, not `P(None,)`): jit's cache tells the
    two apart, so a state straight from `init` would retrace the user's training step once."""
    s = x.sharding
    if not isinstance(s, NamedSharding):
        return x
    spec = tuple(s.spec)
    strip = spec[: max((i + 1 for i, a in enumerate(spec) if a is not None), default=0)]
    return x if strip == spec else jax.device_put(x, NamedSharding(s.mesh, jax.sharding.PartitionSpec(*strip),
                                                                    memory_kind=s.memory_kind))


def _same_spec(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Partition specs equal up to trailing unsharded dimensions."""
    strip = lambda t: tuple(t[: max((i + 1 for i, x in enumerate(t) if x is not None), default=0)])
    return strip(a) == strip(b)


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


def _pure(params: Params) -> Params:
    """`params` with flax nnx `Variable` wrappers (`nnx.Param`) replaced by their values, as `nnx.Optimizer`
    passes them to `update` (it calls `init` with the wrappers). Other trees are returned as they are."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return params
    return nnx.as_pure(params)


Signature = tuple[tuple[str, tuple[int, ...], str], ...]


def _signature(params: Params) -> Signature:
    """What a compiled step is keyed on: each leaf's path (by name), shape and dtype, not the tree's node types
    (flax passes an nnx `State` of `Param`s to `init` and one of plain arrays to `update`; a linen TrainState,
    `optax.chain` or `optax.MultiSteps` may rebuild dicts as other mappings)."""
    leaves = jax.tree_util.tree_flatten_with_path(_pure(params))[0]
    return tuple((path_name(p), tuple(np.shape(x)), str(np.dtype(x.dtype))) for p, x in leaves)


def _layouts(params: Params) -> tuple[Any, ...]:
    """Each leaf's partition spec where it is known (a concrete array, or a tracer typed on an Explicit-axes
    mesh), else None: inside `jax.jit` on Auto axes the placement of a tracer is not known."""
    out = []
    for x in jax.tree.leaves(_pure(params)):
        s = _leaf_sharding(x)
        if s is None:
            s = _explicit_sharding(x)
        out.append(tuple(s.spec) if isinstance(s, NamedSharding) else None)
    return tuple(out)


def _differences(want: Signature, got: Signature) -> str:
    """What differs between two signatures, in words."""
    want_names, got_names = {n: (s, d) for n, s, d in want}, {n: (s, d) for n, s, d in got}
    missing, extra, mismatched = differences(want_names, got_names)
    parts = [f"missing {missing}"] if missing else []
    parts += [f"unexpected {extra}"] if extra else []
    parts += [f"{n}: compiled for {w[1]}{list(w[0])}, got {g[1]}{list(g[0])}" for n, w, g in mismatched]
    if not parts and [n for n, _, _ in want] != [n for n, _, _ in got]:
        parts.append(f"the leaves come in another order: compiled for {list(want_names)}, got {list(got_names)}")
    return "; ".join(parts[:8])


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
      `optax.GradientTransformation(init, update)`; `tx.init.steps` maps each params signature (leaf names,
      shapes and dtypes; layouts) to its compiled step (a `JaxStepFunction`; `.step` is the `FunctionalStep`).
    """
    import optax

    steps: dict[tuple[Signature, tuple[Any, ...]], JaxStepFunction] = {}  # (signature, layouts) -> step

    def lookup(params: Params) -> JaxStepFunction:
        key = _signature(params)
        found = {layouts: fn for (sig, layouts), fn in steps.items() if sig == key}
        if not found:
            if not steps:
                raise RuntimeError("shardopt.as_optax: `update` was called before `init`: call `init(params)` "
                                   "eagerly (outside jax.jit) first; it compiles the step. (A transformation "
                                   "rebuilt at every update, as `optax.inject_hyperparams` does, never finds its "
                                   "step: for a learning rate that changes between steps use "
                                   "`shardopt.inject_hyperparams(shardopt.Adam)(learning_rate=...)`.)")
            nearest = min({sig for sig, _ in steps}, key=lambda k: len(_differences(k, key)))
            raise StepInputError("shardopt.as_optax: these params differ from those `init(params)` compiled the "
                                 f"step for: {_differences(nearest, key)}")
        if len(found) == 1:
            return next(iter(found.values()))
        known = _layouts(params)
        fits = [fn for layouts, fn in found.items()
                if all(k is None or _same_spec(k, w) for k, w in zip(known, layouts, strict=True))]
        if len(fits) != 1:
            raise StepInputError(
                f"shardopt.as_optax: {len(fits) or 'none'} of the {len(found)} steps `init` compiled for these "
                "shapes and dtypes fit the params' shardings; place the params as they were placed for `init`")
        return fits[0]

    def init_fn(params: Params) -> ShardoptState:
        params = _pure(params)
        specs = specs_for(params, optimizer.mesh)
        key = (_signature(params), tuple(tuple(s.layout.to_partition_spec()) for s in jax.tree.leaves(specs)))
        if key not in steps:
            steps[key] = as_jax_function(optimizer.compile(specs))
        return ShardoptState.from_step_state(jax.tree.map(_as_jit_returns, steps[key].init(params)))

    def update_fn(updates: Params, state: ShardoptState, params: Params | None = None
                  ) -> tuple[Params, ShardoptState]:
        if params is None:
            raise ValueError("shardopt.as_optax: `update(grads, state, params)` needs `params`: the compiled "
                             "step computes the new params from them")
        fn = lookup(params)
        new_params, new_state = fn(_pure(params), _pure(updates), state.to_step_state())
        old, treedef = jax.tree_util.tree_flatten(_pure(params))
        deltas = [n - p for n, p in zip(jax.tree.leaves(new_params), old, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, deltas), ShardoptState.from_step_state(new_state)

    tx = optax.GradientTransformation(init_fn, update_fn)
    init_fn.steps = steps  # type: ignore[attr-defined]
    return tx


__all__ = ["JaxStepFunction", "ShardoptState", "as_jax_function", "as_optax", "specs_for"]
