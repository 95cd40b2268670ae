"""`propagate-layouts`: every argument and result of `@main` gets a closed Shardy sharding.

Slots (m, v, vhat, EMA average) follow their variable's layout (slots of another shape, Adafactor's factored
r and c, come pinned by the frontend and are only checked), scalars are replicated, results take the layout
of the state they replace. Layouts the mesh cannot hold (unknown axis, an axis used twice, a dimension not
divisible by its axes) and slots pinned to a layout other than their variable's are errors naming the tensor,
the dimension and the axis, raised before anything is compiled or donated.

Weight-update sharding (Xu et al., "Automatic Cross-Replica Sharding of Weight Update in Data-Parallel
Training", 2020; the compiler-side ZeRO-1/2): a variable whose argument carries `shardopt.shard_state_over`
(written by the frontend from the step contract), or every variable when the option `shard-state-over` names
axes, keeps its own layout while its loose slots are laid out by `core.layout.state_layout`: the axes go onto
the first dimension divisible by them. Each device then holds and updates 1/N of the state, and the new variable
is computed on the same shard and all-gathered (the pass pins it with an `sdy.sharding_constraint` before the
replicated result, so XLA gathers one variable rather than every slot). Gradients keep the variable's layout:
each device slices its shard locally, so `apply_gradients` takes the replicated gradients it always took; inside
a user's jit the gradient's all-reduce then feeds only that slice (XLA:GPU/TPU's reduce-scatter pattern; XLA:CPU
has no such rewrite and keeps all-reduce + dynamic-slice, tests/test_state_sharding.py). With the option
`scatter-gradients` (`compile(..., scatter_gradients=True)`) a state-sharded variable's gradient takes its state's
layout instead: the caller reduce-scatters per-replica gradients itself (`psum_scatter` in its `shard_map`), and
the user's jit has a reduce-scatter and no all-reduce, on CPU too (tests/test_scatter_gradients.py). Where no
dimension divides, the state follows the variable (`state_fallback` in the statistics) unless
`shardopt.shard_state_required` is set, which makes it an error. Packed slots (members of `shardopt.members`)
keep their pack's layout (`state_packed`), and an update already lowered to a whole-tensor kernel call is left
alone (`state_kernel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from jaxlib.mlir import ir

from shardopt import ir as sir
from shardopt.core.contract import (
    COUNTER,
    GRADIENT,
    GRADIENT_BUFFER,
    GRADIENT_INDICES,
    HYPERPARAMETER,
    SLOT,
    VARIABLE,
)
from shardopt.core.layout import layout_problem, state_layout
from shardopt.passes.base import ModulePass, PassError, option

FOLLOWS_OWNER = (SLOT, GRADIENT_BUFFER)
REPLICATED_ROLES = (COUNTER, HYPERPARAMETER, GRADIENT_INDICES)


def _shape(t: ir.Type) -> list[int]:
    return list(ir.RankedTensorType(t).shape)


def check_layout(name: str, shape: list[int], layout: tuple[Any, ...], mesh: dict[str, int]) -> None:
    """Raises PassError when `layout` cannot lay out a tensor of `shape` on `mesh`."""
    problem = layout_problem(shape, layout, mesh)
    if problem:
        raise PassError(f"{name}: {problem}")


@dataclass(frozen=True)
class PropagateLayouts(ModulePass):
    """Closes every boundary sharding of `@main` from the variables' layouts."""

    NAME: ClassVar[str] = "propagate-layouts"
    shard_state_over: str = option("", "mesh axes (comma-separated) every variable's loose slots are sharded over "
                                       "as well, where a dimension divides (weight-update sharding)")
    scatter_gradients: bool = option(False, "a state-sharded variable's gradient arrives in its state's layout "
                                            "(reduce-scattered over the state axes by the caller: psum_scatter in "
                                            "the user's shard_map), not its own")

    def run(self, module: ir.Module) -> dict[str, Any]:
        fn = sir.main_func(module)
        mesh = sir.mesh_axes(module)
        if not mesh:
            raise PassError("module has no `sdy.mesh @mesh`; the frontend must declare the mesh")
        args = sir.arg_attrs(fn)
        types = list(fn.type.inputs)
        names = [sir.string_attr(a.get("shardopt.name")) or f"arg{i}" for i, a in enumerate(args)]
        roles = [sir.string_attr(a.get("shardopt.role")) for a in args]
        layouts: dict[str, tuple[Any, ...]] = {}
        shapes = {n: _shape(t) for n, t in zip(names, types, strict=True)}
        final: list[tuple[Any, ...]] = []
        stats = {"arguments": len(args), "followed_owner": 0, "replicated": 0, "checked": 0}

        # Variables (and anything already closed) first: they are the sources of truth.
        for i, a in enumerate(args):
            lay = sir.layout_from_sharding(a.get("sdy.sharding"))
            if roles[i] == VARIABLE and lay is None:
                raise PassError(f"variable {names[i]}: no layout (its sdy.sharding is missing or open)")
            if lay is not None:
                check_layout(names[i], _shape(types[i]), lay, mesh)
                stats["checked"] += 1
            if roles[i] == VARIABLE:
                layouts[names[i]] = lay
        state = self._state_layouts(fn, args, names, roles, types, layouts, mesh, stats)

        for i, a in enumerate(args):
            lay = sir.layout_from_sharding(a.get("sdy.sharding"))
            rank = len(_shape(types[i]))
            owner = sir.string_attr(a.get("shardopt.owner"))
            if roles[i] == SLOT and owner in shapes and _shape(types[i]) != shapes[owner]:
                # A slot of another shape (Adafactor's factored r and c): only the frontend knows which of the
                # variable's dims it kept, so it arrives pinned (checked against the mesh above).
                if lay is None:
                    raise PassError(f"{names[i]}: a slot of shape {_shape(types[i])} for variable {owner} of shape "
                                    f"{shapes[owner]} needs its layout pinned (derived from the variable's)")
            elif (roles[i] in FOLLOWS_OWNER and owner is not None) or (roles[i] == GRADIENT and owner in layouts
                                               and _shape(types[i]) == shapes.get(owner)):
                if owner not in layouts:
                    raise PassError(f"{names[i]}: its variable {owner!r} is not an argument of @main")
                want = layouts[owner]
                if roles[i] == SLOT and owner in state and _shape(types[i]) == shapes[owner]:
                    want = state[owner]
                    stats["state_sharded_slots"] += 1
                elif roles[i] == GRADIENT and self.scatter_gradients and owner in state:
                    if lay is not None and tuple(lay) == tuple(want):
                        lay = None  # the frontend pins the gradient to its variable's layout: the state's wins
                    want = state[owner]
                    stats["scattered_gradients"] = stats.get("scattered_gradients", 0) + 1
                if lay is not None and tuple(lay) != tuple(want):
                    raise PassError(f"conflicting layouts: {names[i]} is pinned to {_fmt(lay)} but its variable "
                                    f"{owner} has {_fmt(want)}")
                if lay is None:
                    stats["followed_owner"] += 1
                lay = want
            elif lay is None:
                lay = (None,) * rank
                stats["replicated"] += 1
            final.append(tuple(lay))
            layouts.setdefault(names[i], tuple(lay))
        sir.set_arg_attrs(fn, [{"sdy.sharding": sir.sharding_attr(lay, len(lay))} for lay in final])

        results = sir.result_attrs(fn)
        result_types = list(fn.type.results)  # fn.type builds a new FunctionType on every access
        out: list[tuple[Any, ...]] = []
        for j, r in enumerate(results):
            name = sir.string_attr(r.get("shardopt.name"))
            rank = len(_shape(result_types[j]))
            have = sir.layout_from_sharding(r.get("sdy.sharding"))
            want = layouts.get(name, (None,) * rank) if name is not None else have
            if want is None:
                want = (None,) * rank
            if have is not None and tuple(have) != tuple(want):
                raise PassError(f"conflicting layouts: result {name} is pinned to {_fmt(have)} but the state it "
                                f"replaces has {_fmt(want)}")
            out.append(tuple(want))
        sir.set_result_attrs(fn, [{"sdy.sharding": sir.sharding_attr(lay, len(lay))} for lay in out])
        stats["results"] = len(out)
        _pin_updates(fn, results, state)
        return stats

    def _state_layouts(self, fn: Any, args: list[dict[str, ir.Attribute]], names: list[str], roles: list[str | None],
                       types: list[ir.Type], layouts: dict[str, tuple[Any, ...]], mesh: dict[str, int],
                       stats: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
        """Variable name -> its slots' layout, for the variables whose state is sharded over more axes."""
        default = tuple(a.strip() for a in self.shard_state_over.split(",") if a.strip())
        packed = {ir.StringAttr(m).value for a in args if "shardopt.members" in a
                  for m in ir.ArrayAttr(a["shardopt.members"])}
        kernels = _kernel_updates(fn, names)
        out: dict[str, tuple[Any, ...]] = {}
        asked = False
        for i, a in enumerate(args):
            if roles[i] != VARIABLE:
                continue
            own = a.get("shardopt.shard_state_over")
            axes = tuple(ir.StringAttr(x).value for x in ir.ArrayAttr(own)) if own is not None else default
            if not axes:
                continue
            if not asked:
                asked = True
                stats.update({"state_sharded": 0, "state_sharded_slots": 0, "state_fallback": 0,
                              "state_packed": 0, "state_kernel": 0})
            required = own is not None and "shardopt.shard_state_required" in a
            name = names[i]
            lay, why = state_layout(_shape(types[i]), layouts[name], axes, mesh)
            if lay is None:
                if required:
                    raise PassError(f"{name}: cannot shard its state over {'x'.join(axes)}: {why}")
                stats["state_fallback"] += 1
                stats.setdefault("state_fallback_variables", []).append(name)
                continue
            if tuple(lay) == tuple(layouts[name]):
                continue  # already split over the axes
            if name in packed or name in kernels:
                why = "its slots are packed" if name in packed else "its update is a whole-tensor kernel call"
                if required:
                    raise PassError(f"{name}: cannot shard its state over {'x'.join(axes)}: {why}")
                stats["state_packed" if name in packed else "state_kernel"] += 1
                continue
            out[name] = tuple(lay)
            stats["state_sharded"] += 1
        return out


# a kernel's custom call from `lower-to-kernels`, or the manual region running it per device (kernel_regions.py)
KERNEL_CALLS = ("stablehlo.custom_call", "sdy.manual_computation")


def _kernel_updates(fn: Any, names: list[str]) -> set[str]:
    """Variables whose new value is a kernel call's result (`lower-to-kernels`: its slots are updated by it)."""
    ret = _return_op(fn)
    results = sir.result_attrs(fn)
    found = set()
    for j, r in enumerate(results):
        name = sir.string_attr(r.get("shardopt.name"))
        if name in names and sir.string_attr(r.get("shardopt.role")) == VARIABLE:
            owner = ret.operands[j].owner
            if isinstance(owner, ir.OpView | ir.Operation) and owner.operation.name in KERNEL_CALLS:
                found.add(name)
    return found


def _return_op(fn: Any) -> ir.Operation:
    return list(fn.regions[0].blocks[0].operations)[-1].operation


def _pin_updates(fn: Any, results: list[dict[str, ir.Attribute]], state: dict[str, tuple[Any, ...]]) -> None:
    """Pins the new value of each state-sharded variable to its state's layout right before it is returned:
    the update then runs on each device's shard of the slots (gradient and old variable are sliced locally),
    and the partitioner all-gathers the one new variable into its replicated result."""
    if not state:
        return
    ret = _return_op(fn)
    for j, r in enumerate(results):
        name = sir.string_attr(r.get("shardopt.name"))
        if name not in state or sir.string_attr(r.get("shardopt.role")) != VARIABLE:
            continue
        value = ret.operands[j]
        lay = state[name]
        with ir.InsertionPoint(ret):
            pinned = ir.Operation.create("sdy.sharding_constraint", results=[value.type], operands=[value],
                                         attributes={"sharding": sir.sharding_attr(lay, len(lay))}).result
        ret.operands[j] = pinned


def _fmt(layout: tuple[Any, ...]) -> str:
    return "[" + ", ".join("{}" if e is None else "{" + repr(e) + "}" for e in layout) + "]"
