"""How an optax state tree maps onto a shardopt step (for `from_optax`): which leaves are slots of a parameter,
which is the step counter, which are optimizer-level state, and how each starts.

The rule, read from the state of `tx.init(params)` by tree path:
- a *slot*: a subtree of the state with the params' structure (`mu` of `ScaleByAdamState`, `trace` of
  `TraceState`, `nu` of `ScaleByRmsState`) whose every leaf has its parameter's shape and dtype. It is named by
  its last field (`mu`), or by its whole path where that repeats (`0/mu`, `1/mu`), laid out and packed like its
  parameter;
- the *counter*: an integer scalar field `count` (`ScaleByAdamState.count`, `ScaleByScheduleState.count`, ...)
  is `iterations`, which the step advances by one as optax does; except below a state that advances its inner
  state only on some steps (`ApplyIfFiniteState`, `MultiStepsState`), where it is optimizer-level state;
- everything else is *optimizer-level state* of its own shape and dtype (adafactor's factored `v_row`/`v_col`,
  `inject_hyperparameters`' values, a slot subtree whose leaves differ from their parameters in shape): laid
  out like its parameter when it has that parameter's shape, replicated otherwise.
Every slot and state leaf must start at a constant (`tx.init` of zeros and of ones agree and are uniform): the
functional step's `init` and artifacts record a fill per slot and state. What does not fit is an error naming
the leaf.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shardopt.core.paths import path_name

SLOT_LEAF, COUNTER_LEAF, STATE_LEAF = "slot", "counter", "state"
STATE_PREFIX = "optax/"  # names of optimizer-level state leaves in step contracts: optax/<path in the state>


@dataclass(frozen=True)
class StateLeaf:
    """One leaf of the optax state: what it is in the step (`kind`), and for a slot its slot and parameter."""

    path: tuple[Any, ...]
    kind: str
    shape: tuple[int, ...]
    dtype: str
    name: str = ""            # an optimizer-level state's contract name
    slot: str | None = None
    param: str | None = None  # the parameter (entry name) a slot belongs to, or a state leaf is laid out like
    fill: float = 0.0         # the constant it starts at


@dataclass(frozen=True)
class StateMap:
    """The optax state of one params tree, leaf by leaf (`leaves` in the state's flattening order)."""

    treedef: Any               # the params' tree
    names: tuple[str, ...]     # the params' entry names, in the params' flattening order
    avals: tuple[jax.ShapeDtypeStruct, ...]  # the params' shapes and dtypes, in that order
    state_treedef: Any
    leaves: tuple[StateLeaf, ...]
    slots: tuple[str, ...]

    def state_leaves(self) -> tuple[StateLeaf, ...]:
        return tuple(leaf for leaf in self.leaves if leaf.kind == STATE_LEAF)

    def slot_fill(self, slot: str) -> float:
        return next(leaf.fill for leaf in self.leaves if leaf.slot == slot)


def leaf_label(path: tuple[Any, ...]) -> str:
    """A state path as the slash-separated label errors and contract names use (`1/0/mu/dense`)."""
    return path_name(path) if path else "<state>"


def _conditional_paths(state: Any) -> list[tuple[Any, ...]]:
    """Paths of the states in `state` that advance their inner state only on some steps."""
    import optax

    kinds = (optax.ApplyIfFiniteState, optax.MultiStepsState)
    found = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, kinds))[0]
    return [path for path, node in found if isinstance(node, kinds)]


def _fill(leaf_zeros: Any, leaf_ones: Any, label: str) -> float:
    """The constant a state leaf starts at, from `tx.init` of zero and of one params; an error if it is not one."""
    a, b = np.asarray(leaf_zeros), np.asarray(leaf_ones)
    flat = a.reshape(-1)
    same = a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    if not same or (flat.size and not np.all((flat == flat[0]) | (np.isnan(flat) & np.isnan(flat[0])))):
        raise ValueError(f"from_optax: state leaf {label!r} does not start at a constant (its `init` depends on "
                         "the parameters' values); shardopt's step records one starting value per slot and state")
    return float(flat[0]) if flat.size else 0.0


def analyse(tx: Any, treedef: Any, names: Sequence[str], avals: Sequence[jax.ShapeDtypeStruct]) -> StateMap:
    """The `StateMap` of `tx`'s state for params of `treedef` with these entry names and shapes/dtypes."""
    params = jax.tree_util.tree_unflatten(treedef, list(avals))
    try:
        shapes = jax.eval_shape(tx.init, params)
    except Exception as err:  # noqa: BLE001 - any failure here means the state cannot be described ahead of time
        raise ValueError(f"from_optax: `tx.init` cannot be traced for these parameters, so its state has no known "
                         f"shape: {type(err).__name__}: {err}") from err
    state_paths, state_treedef = jax.tree_util.tree_flatten_with_path(shapes)
    param_paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for path, leaf in state_paths:
        if not isinstance(leaf, jax.ShapeDtypeStruct) or not hasattr(leaf, "shape"):
            raise ValueError(f"from_optax: state leaf {leaf_label(path)!r} is not an array ({type(leaf).__name__})")
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.extended):
            raise ValueError(f"from_optax: state leaf {leaf_label(path)!r} has dtype {leaf.dtype}, which a "
                             "compiled step cannot carry between calls")
    zeros = jax.tree_util.tree_unflatten(treedef, [jnp.zeros(a.shape, a.dtype) for a in avals])
    ones = jax.tree_util.tree_unflatten(treedef, [jnp.ones(a.shape, a.dtype) for a in avals])
    init_zeros = jax.tree_util.tree_leaves(tx.init(zeros))
    init_ones = jax.tree_util.tree_leaves(tx.init(ones))
    conditional = _conditional_paths(shapes)

    # slot groups: a prefix under which every parameter's path appears, each leaf shaped like its parameter
    index = {tuple(path): k for k, (path, _) in enumerate(state_paths)}
    groups: dict[tuple[Any, ...], list[int]] = {}
    for path, _ in state_paths:
        for ppath in param_paths:
            n = len(ppath)  # 0: the params are one array, and every state leaf may be its slot
            if len(path) >= n and (n == 0 or tuple(path[-n:]) == tuple(ppath)):
                prefix = tuple(path[:-n])
                if prefix not in groups and all(prefix + tuple(p) in index for p in param_paths):
                    groups[prefix] = [index[prefix + tuple(p)] for p in param_paths]
                break
    slot_of: dict[int, tuple[tuple[Any, ...], int]] = {}  # state leaf index -> (slot prefix, param index)
    layout_of: dict[int, int] = {}            # optimizer-level leaf index -> the param it belongs to
    slot_prefixes = []
    for prefix, members in groups.items():
        if len(members) != len(set(members)):
            continue
        fits = all(tuple(state_paths[k][1].shape) == tuple(avals[i].shape)
                   and np.dtype(state_paths[k][1].dtype) == np.dtype(avals[i].dtype) for i, k in enumerate(members))
        if fits:
            slot_prefixes.append(prefix)
            slot_of.update({k: (prefix, i) for i, k in enumerate(members)})
        else:
            layout_of.update({k: i for i, k in enumerate(members)})
    short = [leaf_label(p[-1:]) for p in slot_prefixes]
    slot_name = {p: s if short.count(s) == 1 else leaf_label(p) for p, s in zip(slot_prefixes, short, strict=True)}

    leaves = []
    for k, (path, shape) in enumerate(state_paths):
        label = leaf_label(path)
        fill = _fill(init_zeros[k], init_ones[k], label)
        dt = str(np.dtype(shape.dtype))
        if k in slot_of:
            prefix, i = slot_of[k]
            leaves.append(StateLeaf(tuple(path), SLOT_LEAF, tuple(shape.shape), dt, slot=slot_name[prefix],
                                    param=names[i], fill=fill))
            continue
        is_count = (shape.shape == () and jnp.issubdtype(shape.dtype, jnp.integer)
                    and getattr(path[-1], "name", None) == "count"
                    and not any(tuple(path[:len(c)]) == tuple(c) for c in conditional))
        if is_count:
            if fill != 0:
                raise ValueError(f"from_optax: counter {label!r} starts at {fill}, not 0 as `iterations` does")
            leaves.append(StateLeaf(tuple(path), COUNTER_LEAF, (), dt))
            continue
        owner = layout_of.get(k)
        leaves.append(StateLeaf(tuple(path), STATE_LEAF, tuple(shape.shape), dt, name=STATE_PREFIX + label,
                                param=None if owner is None or tuple(shape.shape) != tuple(avals[owner].shape)
                                else names[owner], fill=fill))
    smap = StateMap(treedef, tuple(names), tuple(avals), state_treedef, tuple(leaves),
                    tuple(slot_name[p] for p in slot_prefixes))
    for slot in smap.slots:
        fills = {leaf.fill for leaf in smap.leaves if leaf.slot == slot}
        if len(fills) > 1:
            raise ValueError(f"from_optax: slot {slot!r} starts at different constants for different parameters "
                             f"({sorted(fills)}); shardopt records one starting value per slot")
    return smap


def check_update(smap: StateMap, new_state: Any) -> list[Any]:
    """The leaves of the state `tx.update` returned, checked against the state it was given (same tree, shapes
    and dtypes: a step carries fixed buffers from one call to the next)."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(new_state)
    if treedef != smap.state_treedef:
        raise ValueError(f"from_optax: `tx.update` returned a state of another structure than `tx.init`'s "
                         f"({treedef} vs {smap.state_treedef})")
    out = []
    for (path, value), leaf in zip(paths, smap.leaves, strict=True):
        value = jnp.asarray(value)
        if tuple(value.shape) != leaf.shape or np.dtype(value.dtype) != np.dtype(leaf.dtype):
            raise ValueError(f"from_optax: state leaf {leaf_label(path)!r} changes from {leaf.dtype}{list(leaf.shape)}"
                             f" to {value.dtype}{list(value.shape)} in `tx.update`; a step's state keeps its shape")
        out.append(value)
    return out


__all__ = ["COUNTER_LEAF", "SLOT_LEAF", "STATE_LEAF", "StateLeaf", "StateMap", "analyse", "check_update"]
