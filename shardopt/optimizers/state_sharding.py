"""`shard_state_over`: which mesh axes each variable's optimizer state is sharded over as well (weight-update
sharding, Xu et al. 2020 — the compiler-side form of ZeRO stage 1/2).

The optimizer argument is one of
- None (default): the slots follow their variable's layout;
- a mesh axis name or a tuple of them (`"batch"`, `("batch", "pipe")`): for every variable, *where possible* —
  a variable with no dimension divisible by the axes keeps replicated state (the pass counts it in
  `state_fallback`);
- a dict from variable name to axes (or None), or a callable `name -> axes | None`: per variable, *required* — a
  variable that cannot be sharded so is an error naming it. Names are the variable's name in the step: its
  `Variable.name` (repeats told apart as `kernel#2`) for `apply_gradients`, its `VariableSpec.name` or pytree path
  (`dense/kernel`) for `compile()`. Variables missing from the dict keep state like their layout.

Where the axes go is `core.layout.state_layout`'s rule (the one `propagate-layouts` applies). Variables whose state
is sharded are kept out of slot packing: a pack's members are sliced out of one buffer, and a sharded pack would
make every member's update gather its slices of every slot instead of gathering the one new variable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from shardopt.core.contract import StepEntry
from shardopt.core.layout import state_axes, state_layout

ShardStateOver = str | tuple[str, ...] | list[str] | Mapping[str, Any] | Callable[[str], Any] | None


def check(value: Any) -> ShardStateOver:
    """`value` validated as a `shard_state_over` argument (a TypeError/ValueError says what is wrong)."""
    if value is None or callable(value) and not isinstance(value, (str, tuple, list, Mapping)):
        return value
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"shard_state_over: dict keys must be variable names, got {k!r}")
            state_axes(v)
        return dict(value)
    axes = state_axes(value)
    return axes[0] if len(axes) == 1 else axes


def request(value: ShardStateOver, name: str) -> tuple[tuple[str, ...], bool]:
    """(axes, required) for the variable named `name` under the optimizer's `shard_state_over`."""
    if value is None:
        return (), False
    if isinstance(value, Mapping):
        axes = state_axes(value.get(name))
        return axes, bool(axes)
    if callable(value) and not isinstance(value, (str, tuple, list)):
        axes = state_axes(value(name))
        return axes, bool(axes)
    return state_axes(value), False


def slot_layout(value: ShardStateOver, name: str, shape: tuple[int, ...], layout: tuple[Any, ...],
                mesh_axes: dict[str, int]) -> tuple[Any, ...]:
    """The layout of the slots of variable `name` (of `shape` and `layout`): the state layout where its request
    can be met, `layout` where it asked for nothing or (not required) no dimension divides; raises ValueError
    when a required request cannot be met."""
    axes, required = request(value, name)
    if not axes:
        return tuple(layout)
    lay, why = state_layout(shape, layout, axes, mesh_axes)
    if lay is None:
        if required:
            raise ValueError(f"shard_state_over: cannot shard the state of {name!r} over {'x'.join(axes)}: {why}")
        return tuple(layout)
    return tuple(lay)


def with_requests(value: ShardStateOver, entries: tuple[StepEntry, ...]) -> tuple[StepEntry, ...]:
    """`entries` with each variable's request recorded for the step contract."""
    if value is None:
        return entries
    out = []
    for e in entries:
        axes, required = request(value, e.name)
        out.append(dataclasses.replace(e, shard_state_over=axes, shard_state_required=required) if axes else e)
    return tuple(out)


def is_sharded(value: ShardStateOver, name: str, shape: tuple[int, ...], layout: tuple[Any, ...],
               mesh_axes: dict[str, int]) -> bool:
    """Whether variable `name`'s slots get a layout other than its own (such variables are not packed)."""
    return slot_layout(value, name, shape, layout, mesh_axes) != tuple(layout)


def config_value(value: ShardStateOver) -> Any:
    """`shard_state_over` as `get_config` writes it (JSON: a name, a list, a dict of lists); a callable has no
    config form and is left out (pass it again to `from_config`)."""
    if value is None or (callable(value) and not isinstance(value, (str, tuple, list, Mapping))):
        return None
    if isinstance(value, Mapping):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


SCATTER_GRADIENTS = "scatter-gradients=true"


def scattered_pipeline(pipeline: tuple[str, ...]) -> tuple[str, ...]:
    """`pipeline` with `propagate-layouts` told that state-sharded variables' gradients arrive reduce-scattered
    (in their state's layout), as `compile(specs, scatter_gradients=True)` asks."""
    out, found = [], False
    for p in pipeline:
        if p == "propagate-layouts" or p.startswith("propagate-layouts{"):
            found = True
            p = (f"{p[:-1]},{SCATTER_GRADIENTS}}}" if p.endswith("}") and not p.endswith("{}") else
                 f"propagate-layouts{{{SCATTER_GRADIENTS}}}")
        out.append(p)
    if not found:
        raise ValueError("scatter_gradients=True needs propagate-layouts in the optimizer's pipeline")
    return tuple(out)
