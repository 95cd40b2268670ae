"""Small helpers over jaxlib's MLIR bindings shared by the frontend, the passes and the runtime."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import func, sdy

from shardopt.compat.jax_private import make_ir_context

__all__ = ["make_ir_context", "parse", "main_func", "arg_attr", "set_arg_attr", "result_attr",
           "set_result_attr", "sharding_attr", "layout_from_sharding", "walk_ops", "op_counts", "mesh_axes"]

MESH_NAME = "mesh"


def parse(text_or_bytes: str | bytes, ctx: ir.Context) -> ir.Module:
    with ctx:
        return ir.Module.parse(text_or_bytes)


def main_func(module: ir.Module) -> func.FuncOp:
    for op in module.body.operations:
        if op.operation.name == "func.func" and ir.StringAttr(op.attributes["sym_name"]).value == "main":
            return op
    raise ValueError("module has no @main function")


def _dict(attrs: Any) -> dict[str, ir.Attribute]:
    d = ir.DictAttr(attrs)
    return {d[i].name: d[i].attr for i in range(len(d))}


def arg_attrs(fn: func.FuncOp) -> list[dict[str, ir.Attribute]]:
    return [_dict(a) for a in fn.arg_attrs]


def result_attrs(fn: func.FuncOp) -> list[dict[str, ir.Attribute]]:
    return [_dict(a) for a in fn.result_attrs]


def arg_attr(fn: func.FuncOp, i: int, key: str) -> ir.Attribute | None:
    return arg_attrs(fn)[i].get(key)


def result_attr(fn: func.FuncOp, i: int, key: str) -> ir.Attribute | None:
    return result_attrs(fn)[i].get(key)


def set_arg_attrs(fn: func.FuncOp, updates: list[dict[str, ir.Attribute]]) -> None:
    """Merges `updates[i]` into argument i's attribute dictionary."""
    merged = [{**old, **new} for old, new in zip(arg_attrs(fn), updates, strict=True)]
    fn.arg_attrs = [ir.DictAttr.get(d) for d in merged]


def set_result_attrs(fn: func.FuncOp, updates: list[dict[str, ir.Attribute]]) -> None:
    merged = [{**old, **new} for old, new in zip(result_attrs(fn), updates, strict=True)]
    fn.result_attrs = ir.ArrayAttr.get([ir.DictAttr.get(d) for d in merged])


def set_arg_attr(fn: func.FuncOp, i: int, key: str, value: ir.Attribute) -> None:
    ups: list[dict[str, ir.Attribute]] = [{} for _ in fn.arg_attrs]
    ups[i] = {key: value}
    set_arg_attrs(fn, ups)


def set_result_attr(fn: func.FuncOp, i: int, key: str, value: ir.Attribute) -> None:
    ups: list[dict[str, ir.Attribute]] = [{} for _ in fn.result_attrs]
    ups[i] = {key: value}
    set_result_attrs(fn, ups)


def string_attr(attr: ir.Attribute | None) -> str | None:
    return None if attr is None else ir.StringAttr(attr).value


def sharding_attr(layout: tuple[Any, ...] | None, rank: int, mesh: str = MESH_NAME) -> ir.Attribute:
    """A closed `#sdy.sharding` for a PartitionSpec-like tuple, or an all-open one when `layout` is None."""
    if layout is None:
        dims = [sdy.DimensionShardingAttr.get([], is_closed=False) for _ in range(rank)]
    else:
        dims = []
        for entry in list(layout) + [None] * (rank - len(layout)):
            axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
            dims.append(sdy.DimensionShardingAttr.get([sdy.AxisRefAttr.get(a) for a in axes], is_closed=True))
    return sdy.TensorShardingAttr.get(mesh, dims)


def sharding_dims(attr: ir.Attribute) -> list[tuple[tuple[str, ...], bool]]:
    """Per dimension: the mesh axes and whether the dimension is closed."""
    ts = sdy.TensorShardingAttr(attr)
    out = []
    for d in ts.dimension_shardings:
        dim = sdy.DimensionShardingAttr(d)
        out.append((tuple(sdy.AxisRefAttr(a).name for a in dim.axes), bool(dim.is_closed)))
    return out


def layout_from_sharding(attr: ir.Attribute | None) -> tuple[Any, ...] | None:
    """The PartitionSpec-like tuple of a sharding, or None if it is missing or has an open dimension."""
    if attr is None:
        return None
    dims = sharding_dims(attr)
    if any(not closed for _, closed in dims):
        return None
    return tuple(None if not axes else (axes[0] if len(axes) == 1 else axes) for axes, _ in dims)


def mesh_axes(module: ir.Module, name: str = MESH_NAME) -> dict[str, int]:
    for op in module.body.operations:
        if op.operation.name == "sdy.mesh" and ir.StringAttr(op.attributes["sym_name"]).value == name:
            mesh = sdy.MeshAttr(op.attributes["mesh"])
            return {sdy.MeshAxisAttr(a).name: sdy.MeshAxisAttr(a).size for a in mesh.axes}
    return {}


def walk_ops(op: ir.Operation) -> Iterator[ir.Operation]:
    """All operations nested in `op` (pre-order), as `ir.Operation`s."""
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield child.operation
                yield from walk_ops(child.operation)


def op_counts(module: ir.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in walk_ops(module.operation):
        counts[op.name] = counts.get(op.name, 0) + 1
    return counts


def boundary_layouts(module_text: str) -> tuple[list[Any], list[Any]]:
    """The PartitionSpec-like layouts of `@main`'s arguments and results (None where still open)."""
    ctx = make_ir_context()
    module = parse(module_text, ctx)
    with ctx:
        fn = main_func(module)
        args = [layout_from_sharding(a.get("sdy.sharding")) for a in arg_attrs(fn)]
        results = [layout_from_sharding(r.get("sdy.sharding")) for r in result_attrs(fn)]
    return args, results
