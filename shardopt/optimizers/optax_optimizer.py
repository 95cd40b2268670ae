"""`from_optax(tx)`: any optax `GradientTransformation` as a shardopt optimizer.

The step is optax's own update, `tx.update(grads, state, params)` then `optax.apply_updates`, traced into
shardopt's frontend as a rule of the whole tree (`update_tree`) and run through the same passes as every
definition: layout propagation, packing of small variables' slots, fuse-moments, fuse-clipping (which reads
optax's global norm), cleanup. Everything downstream — `apply_gradients` on `Variable`s, `compile(specs)`,
artifacts, `inspect`, `as_optax` — is the base class's. How optax's state maps onto slots, the counter and
optimizer-level state is `optax_state.py`'s rule.

The learning rate, clipping, weight decay and EMA are the transformation's own (optax composes them), so the
shared tf-keras options are not arguments here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from shardopt.compiler import StepProgram
from shardopt.core.contract import StepEntry
from shardopt.core.layout import Layout
from shardopt.core.packing import PackGroup
from shardopt.core.paths import path_name
from shardopt.core.specs import VariableSpec
from shardopt.optimizers import optax_state
from shardopt.optimizers.base import Optimizer
from shardopt.optimizers.optax_state import COUNTER_LEAF, SLOT_LEAF, StateMap
from shardopt.optimizers.state import unique_names
from shardopt.optimizers.variables import Variable
from shardopt.runtime.functional import FunctionalStep

CALLBACK_PRIMITIVES = ("pure_callback", "io_callback", "debug_callback", "callback")


class OptaxOptimizer(Optimizer):
    """A shardopt optimizer whose step is an optax `GradientTransformation`'s update."""

    def __init__(self, tx: Any, mesh: Mesh | None = None, name: str = "optax"):
        import optax

        if not isinstance(tx, optax.GradientTransformation) and callable(getattr(tx, "gradient_transformation",
                                                                                 None)):
            tx = tx.gradient_transformation()  # optax.MultiSteps and other wrappers that build one
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(f"from_optax takes an optax.GradientTransformation, got {type(tx).__name__}")
        super().__init__(name=name, learning_rate=0.0, mesh=mesh)  # the learning rate is inside `tx`
        self.tx = tx
        self._maps: dict[Any, StateMap] = {}
        self._map: StateMap | None = None        # the state of `apply_gradients`' variables (set by build)
        self._compiling: StateMap | None = None  # the state of the params `compile()` is compiling for

    # ----- the state map of the params being compiled --------------------------------------------------------
    def _state_map(self, treedef: Any, names: Sequence[str], avals: Sequence[jax.ShapeDtypeStruct]) -> StateMap:
        key = (treedef, tuple(names), tuple((tuple(a.shape), str(a.dtype)) for a in avals))
        found = self._maps.get(key)
        if found is None:
            found = self._maps[key] = optax_state.analyse(self.tx, treedef, names, avals)
        return found

    def _current(self) -> StateMap | None:
        return self._compiling if self._compiling is not None else self._map

    def slot_groups(self) -> tuple[tuple[str, ...], ...]:
        current = self._current()
        return ((),) if current is None else (current.slots,)

    def slot_initial_value(self, slot: str) -> float | None:
        current = self._current()
        fill = 0.0 if current is None else current.slot_fill(slot)
        return None if fill == 0.0 else fill

    def optimizer_state_values(self) -> dict[str, float]:
        current = self._current()
        return {} if current is None else {leaf.name: leaf.fill for leaf in current.state_leaves()}

    def optimizer_state_specs(self, entries: list[StepEntry]) -> list[tuple[Any, ...]]:
        """(name, shape, dtype, layout) of each optimizer-level leaf: its parameter's layout when it has that
        parameter's shape, replicated otherwise."""
        current = self._current()
        layouts = {e.name: e.layout for e in entries}
        return [(leaf.name, leaf.shape, leaf.dtype,
                 layouts[leaf.param] if leaf.param in layouts else (None,) * len(leaf.shape))
                for leaf in (current.state_leaves() if current is not None else ())]

    def _schedule_key(self) -> Any:
        current = self._current()
        return (super()._schedule_key(), None if current is None else (str(current.treedef), current.names))

    # ----- the step --------------------------------------------------------------------------------------------
    def update_tree(self, entries: list[StepEntry], variables: dict[str, jax.Array], grads: list[jax.Array],
                    slots: dict[str, dict[str, jax.Array]], glob: dict[str, jax.Array], iterations: jax.Array
                    ) -> tuple[dict[str, jax.Array], dict[str, dict[str, jax.Array]], dict[str, jax.Array]]:
        """optax's update of the whole tree: the params, gradients and state rebuilt from the step's arguments,
        `tx.update` and `optax.apply_updates`, and the new state taken apart again."""
        import optax

        smap = self._current()
        assert smap is not None, "update_tree runs inside a compile, after the state map is set"
        got = [e.name for e in entries]
        missing = [n for n in smap.names if n not in got]
        if missing:
            raise ValueError(f"from_optax: optax updates the whole parameter tree at once, so every variable needs "
                             f"a gradient in each step; none for {missing}")
        grad_of = dict(zip(got, grads, strict=True))
        params = jax.tree_util.tree_unflatten(smap.treedef, [variables[n] for n in smap.names])
        grad_tree = jax.tree_util.tree_unflatten(smap.treedef, [grad_of[n] for n in smap.names])
        leaves = []
        for leaf in smap.leaves:
            if leaf.kind == SLOT_LEAF:
                leaves.append(slots[leaf.param][leaf.slot])
            elif leaf.kind == COUNTER_LEAF:
                leaves.append(iterations.astype(np.dtype(leaf.dtype)))  # optax's count is the step counter
            else:
                leaves.append(glob[leaf.name])
        state = jax.tree_util.tree_unflatten(smap.state_treedef, leaves)
        updates, new_state = self.tx.update(grad_tree, state, params)
        new_params = optax.apply_updates(params, updates)
        new_leaves = optax_state.check_update(smap, new_state)
        new_vars = dict(zip(smap.names, jax.tree_util.tree_leaves(new_params), strict=True))
        new_slots: dict[str, dict[str, jax.Array]] = {n: {} for n in smap.names}
        new_glob = dict(glob)
        for leaf, value in zip(smap.leaves, new_leaves, strict=True):
            if leaf.kind == SLOT_LEAF:
                new_slots[leaf.param][leaf.slot] = value
            elif leaf.kind != COUNTER_LEAF:  # the counter's new value is `iterations + 1`, which the step writes
                new_glob[leaf.name] = value
        return new_vars, new_slots, new_glob

    def _program(self, entries: tuple[StepEntry, ...], packs: tuple[PackGroup, ...] = (),
                 mesh: Mesh | None = None, pipeline: tuple[str, ...] | None = None) -> StepProgram:
        try:
            return super()._program(entries, packs, mesh, pipeline)
        except Exception as err:
            if "callback" not in str(err).lower():
                raise
            raise ValueError(f"from_optax: the transformation calls back to Python "
                             f"({', '.join(self._callback_leaves()) or 'in its update'}); a compiled step cannot "
                             "carry a host callback (artifacts and other processes have no Python to call)") from err

    def _callback_leaves(self) -> list[str]:
        """The state leaves and updates that a host callback in `tx.update` computes (for the error message)."""
        smap = self._current()
        if smap is None:
            return []
        avals = [jax.ShapeDtypeStruct(leaf.shape, np.dtype(leaf.dtype)) for leaf in smap.leaves]
        state = jax.tree_util.tree_unflatten(smap.state_treedef, avals)
        params = jax.tree_util.tree_unflatten(smap.treedef, list(smap.avals))
        closed = jax.make_jaxpr(lambda g, s, p: self.tx.update(g, s, p))(params, state, params)
        tainted = _tainted(closed.jaxpr)
        out_paths = [f"update of {path_name(p)}" for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        out_paths += [f"state leaf {optax_state.leaf_label(leaf.path)}" for leaf in smap.leaves]
        return [label for label, var in zip(out_paths, closed.jaxpr.outvars, strict=True)
                if not hasattr(var, "val") and var in tainted]

    # ----- state (build), compile ----------------------------------------------------------------------------
    def _build(self, var_list: Sequence[Variable]) -> None:
        if self._built:
            return
        var_list = list(var_list)
        if all(isinstance(v, Variable) for v in var_list):  # otherwise the base raises its TypeError
            names = unique_names([v.name for v in var_list])
            order, treedef = jax.tree_util.tree_flatten({n: i for i, n in enumerate(names)})
            self._map = self._state_map(treedef, [names[i] for i in order],
                                        [jax.ShapeDtypeStruct(var_list[i].shape, var_list[i].dtype) for i in order])
        super()._build(var_list)
        by_name = dict(zip(self._step_names, self._model_variables, strict=True))
        self._optimizer_state = {
            leaf.name: Variable(np.full(leaf.shape, leaf.fill, leaf.dtype), name=f"{self.name}/{leaf.name}",
                                layout=by_name[leaf.param].layout if leaf.param is not None
                                else Layout.replicated(self.mesh, len(leaf.shape)))
            for leaf in (self._map.state_leaves() if self._map is not None else ())}

    def compile(self, specs: Any, *, scatter_gradients: bool = False) -> FunctionalStep:
        """The functional step for a pytree of `VariableSpec`s or `Variable`s: optax's state for params of that
        tree (masks and labels see the same tree they would see in optax); `scatter_gradients` as for every
        optimizer (`Optimizer.compile`)."""
        from shardopt.optimizers.functional import compile_functional

        leaves, treedef = jax.tree_util.tree_flatten_with_path(
            specs, is_leaf=lambda x: isinstance(x, (VariableSpec, Variable)))
        if not leaves or not all(isinstance(leaf, (VariableSpec, Variable)) for _, leaf in leaves):
            return compile_functional(self, specs, scatter_gradients)  # raises its error about the leaves
        names = [leaf.name if isinstance(leaf, Variable) or leaf.name else path_name(path) for path, leaf in leaves]
        avals = [jax.ShapeDtypeStruct(tuple(leaf.shape), np.dtype(leaf.dtype)) for _, leaf in leaves]
        previous, self._compiling = self._compiling, self._state_map(treedef, names, avals)
        try:
            return compile_functional(self, specs, scatter_gradients)
        finally:
            self._compiling = previous

    # ----- what a definition has and optax does not -------------------------------------------------------------
    @property
    def learning_rate(self) -> Any:
        raise AttributeError("from_optax: the learning rate is part of the optax transformation (a float or a "
                             "schedule of its count); use optax.inject_hyperparameters to read or change it")

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        raise AttributeError("from_optax: the learning rate is part of the optax transformation; build a new one")

    def update_step(self, gradient: Any, variable: Variable) -> None:
        raise NotImplementedError("from_optax: optax updates the whole tree at once; use apply_gradients")

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "from_optax": True}

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: dict[str, Any] | None = None) -> Any:
        raise TypeError("from_optax: an optax transformation is code, not configuration; call "
                        "shardopt.from_optax(tx) again")


def _tainted(jaxpr: Any) -> set[Any]:
    """The variables of `jaxpr` computed from a host callback (one inside a nested jaxpr taints the whole eqn)."""
    tainted: set[Any] = set()
    for eqn in jaxpr.eqns:
        if _calls_back(eqn) or any(not hasattr(v, "val") and v in tainted for v in eqn.invars):
            tainted.update(eqn.outvars)
    return tainted


def _calls_back(eqn: Any) -> bool:
    if eqn.primitive.name in CALLBACK_PRIMITIVES:
        return True
    for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else (param,):
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns") and any(_calls_back(e) for e in inner.eqns):
                return True
    return False


def from_optax(tx: Any, mesh: Mesh | None = None, name: str = "optax") -> OptaxOptimizer:
    """A shardopt optimizer running `tx` (an optax `GradientTransformation`): `apply_gradients` on Variables,
    `compile(specs)`, artifacts, `inspect`, `as_optax`, with the step compiled through shardopt's passes.

    Args:
      tx: the transformation, e.g. `optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))`.
      mesh: the device mesh (default: the variables' mesh, or all devices).
      name: the optimizer's name (slot variables are named `<name>/<slot>/<variable>`).
    """
    return OptaxOptimizer(tx, mesh=mesh, name=name)


__all__ = ["OptaxOptimizer", "from_optax"]
