"""`propagate-layouts`: every argument and result of `@main` gets a closed Shardy sharding.

Slots (m, v, vhat, EMA average) follow their variable's layout (slots of another shape, Adafactor's factored
r and c, come pinned by the frontend and are only checked), scalars are replicated, results take the layout
of the state they replace. Layouts the mesh cannot hold (unknown axis, an axis used twice, a dimension not
divisible by its axes) and slots pinned to a layout other than their variable's are errors naming the tensor,
the dimension and the axis, raised before anything is compiled or donated.
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
from shardopt.core.layout import layout_problem
from shardopt.passes.base import ModulePass, PassError

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
        return stats


def _fmt(layout: tuple[Any, ...]) -> str:
    return "[" + ", ".join("{}" if e is None else "{" + repr(e) + "}" for e in layout) + "]"
