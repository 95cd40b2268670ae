"""`fixed-order-sums`: every float sum across devices adds the per-device partial sums in one fixed order.

A `reduce(add)` over a sharded dimension is partitioned by XLA as a local reduce plus an `all-reduce`, and an
all-reduce's order of addition belongs to its implementation: XLA's in-process all-reduce and gloo's
cross-process one add the same per-device partials in different orders. So a global norm (`global_clipnorm`,
`clipnorm` of a sharded tensor, the norm `fuse-clipping` batches) computed by one process with 8 devices and by
2 processes with 4 each differed by 1 ulp, and so did every clipped update after it: a job resumed on another
process layout did not continue bit for bit.

This pass rewrites each such reduce so no all-reduce is left in it. Each sharded reduced dimension of size d on
S shards is split into [S, d/S] (a reshape that moves no data), the local dimensions are reduced on every device,
the [S...] partials (one scalar per shard, S at most the device count) are all-gathered (`sdy.sharding_constraint`
to replicated: a copy, exact in any implementation), and every device adds them with the same local reduce. The
per-device program is then the same for any process layout, and so are its results.

Which dimensions are sharded is learned by running Shardy's propagation on a copy of the module (the reduce's
input is often an intermediate: a sum of squares, a packed gradient, `fuse-clipping`'s partials). Reductions
over replicated data, non-float ones and ones whose init is not +0.0 are left as they are, and counted.

Cost: one all-gather of S scalars per reduction instead of an all-reduce of one (XLA combines them as it combines
all-reduces); the per-device additions are the same, so single-process results change only in the order the
shards' partials are added (within the float32 tolerances of the tf-keras tests).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

from jaxlib.mlir import ir, passmanager
from jaxlib.mlir.dialects import sdy
from jaxlib.mlir.dialects import stablehlo as hlo

from shardopt import ir as sir
from shardopt.passes import fusion_ir as fir
from shardopt.passes.base import ModulePass, PassError

TAG = "shardopt.fixed_order_sum"
FLOATS = (ir.F32Type, ir.F64Type, ir.F16Type, ir.BF16Type)

Axes = tuple[str, ...]


def _is_float_add_reduce(op: ir.Operation) -> bool:
    if op.name != "stablehlo.reduce" or len(op.operands) != 2 or len(op.results) != 1:
        return False
    if not isinstance(fir.element_type(op.operands[0]), FLOATS):
        return False
    inner = [o.operation for o in op.regions[0].blocks[0].operations]
    return len(inner) == 2 and inner[0].name == "stablehlo.add" and inner[1].name == "stablehlo.return"


def _axes_of(attr: ir.Attribute | None, rank: int) -> list[Axes] | None:
    """Per dimension, the mesh axes a `#sdy.sharding` splits it over; None if it uses sub-axes."""
    if attr is None:
        return [()] * rank
    out: list[Axes] = []
    for d in sdy.TensorShardingAttr(attr).dimension_shardings:
        refs = [sdy.AxisRefAttr(a) for a in sdy.DimensionShardingAttr(d).axes]
        if any(r.sub_axis_info is not None for r in refs):
            return None
        out.append(tuple(r.name for r in refs))
    return out


def _operand_shardings(module: ir.Module, reduces: list[ir.Operation]) -> list[list[Axes] | None]:
    """The sharding Shardy propagates to each reduce's input, read from a propagated copy of the module."""
    for i, op in enumerate(reduces):
        op.attributes[TAG] = ir.IntegerAttr.get(ir.IntegerType.get_signless(64), i)
    try:
        copy = ir.Module.parse(module.operation.get_asm(enable_debug_info=False))
        passmanager.PassManager.parse("builtin.module(sdy-propagation-pipeline)").run(copy.operation)
    finally:
        for op in reduces:
            del op.attributes[TAG]
    fn = sir.main_func(copy)
    arg_shardings = [a.get("sdy.sharding") for a in sir.arg_attrs(fn)]
    found: dict[int, list[Axes] | None] = {}
    for op in sir.walk_ops(fn.operation):
        if TAG not in op.attributes:
            continue
        x = op.operands[0]
        rank = len(fir.shape_of(x))
        producer = fir.op_of(x)
        if producer is None:
            attr = arg_shardings[x.arg_number] if x.owner == fn.regions[0].blocks[0] else None
        elif producer.name == fir.CONSTRAINT:
            attr = producer.attributes["sharding"]
        elif "sdy.sharding" in producer.attributes:
            per_value = sdy.TensorShardingPerValueAttr(producer.attributes["sdy.sharding"]).shardings
            attr = per_value[ir.OpResult(x).result_number]
        else:
            attr = None
        found[ir.IntegerAttr(op.attributes[TAG]).value] = _axes_of(attr, rank)
    if len(found) != len(reduces):
        raise PassError(f"{len(reduces) - len(found)} reductions were lost in the propagated copy (a bug)")
    return [found[i] for i in range(len(reduces))]


def _layout(axes: list[Axes]) -> tuple[Any, ...]:
    return tuple(None if not a else (a[0] if len(a) == 1 else a) for a in axes)


@dataclass
class _Partials:
    """A rewritten reduce's per-device partial sums, before they are gathered."""

    reduce: ir.Operation
    value: ir.Value          # the local sums: the kept dims and one dim per sharded reduced dim (its shards)
    shard_dims: list[int]    # which dims of `value` hold shards (summed after the gather)
    axes: list[Axes]         # per dim of `value`, its mesh axes

    @property
    def scalar(self) -> bool:
        return len(self.shard_dims) == len(self.axes)


@dataclass(frozen=True)
class FixedOrderSums(ModulePass):
    """Replaces each sum over sharded dimensions by local sums, an all-gather of the partials and one local sum."""

    NAME: ClassVar[str] = "fixed-order-sums"

    def run(self, module: ir.Module) -> dict[str, Any]:
        block = fir.main_block(module)
        mesh = sir.mesh_axes(module)
        reduces = [op.operation for op in block.operations if _is_float_add_reduce(op.operation)]
        left: Counter[str] = Counter()
        shardings = _operand_shardings(module, reduces) if reduces and mesh else [None] * len(reduces)
        found: list[_Partials] = []
        for op, axes in zip(reduces, shardings, strict=True):
            reason = self._why_not(op, axes, mesh)
            if reason:
                left[reason] += 1
            else:
                found.append(_local_sums(op, axes, mesh))
        # full sums (one scalar each) whose shards lie on the same axes share one all-gather, unless one depends
        # on another (Adafactor's RMS of an update clipped by a global norm): gathered together, it would cycle
        depth = _sum_depths(block, {p.reduce for p in found})
        groups: dict[tuple[Any, ...], list[_Partials]] = {}
        for p in found:
            key = (("scalar", str(p.value.type), tuple(p.axes), depth[p.reduce]) if p.scalar else ("own", id(p)))
            groups.setdefault(key, []).append(p)
        position = {op.operation: i for i, op in enumerate(block.operations)}
        for members in groups.values():
            _gather_and_sum(members, position)
        moved = fir.stable_topo_sort(block) if found else 0
        return {"reductions": len(reduces), "rewritten": len(found), "gathers": len(groups),
                "partials_gathered": sum(_count(p) for p in found), "left": dict(left), "ops_moved": moved}

    @staticmethod
    def _why_not(op: ir.Operation, axes: list[Axes] | None, mesh: dict[str, int]) -> str:
        """Why `op` keeps its all-reduce, or "" (no all-reduce to begin with counts as a reason too)."""
        if not mesh:
            return "no mesh"
        if axes is None:
            return "sub-axis sharding"
        if not fir.is_zero(op.operands[1]):
            return "init not +0.0"
        dims = list(ir.DenseI64ArrayAttr(op.attributes["dimensions"]))
        shape = fir.shape_of(op.operands[0])
        split = [d for d in dims if _shards(axes[d], mesh) > 1]
        if not split:
            return "not across devices"
        if any(shape[d] % _shards(axes[d], mesh) for d in split):
            return "not divisible"
        return ""


def _local_sums(op: ir.Operation, axes: list[Axes], mesh: dict[str, int]) -> _Partials:
    """Before `op`: its input with each sharded reduced dim split into [shards, rest] (a reshape that moves no
    data) and summed over everything each device holds whole, pinned so every device sums its own shard."""
    x, zero = op.operands[0], op.operands[1]
    elt = fir.element_type(x)
    dims = set(ir.DenseI64ArrayAttr(op.attributes["dimensions"]))
    split_shape: list[int] = []
    split_axes: list[Axes] = []
    local: list[int] = []  # dims of the split tensor that each device sums on its own
    kept: list[int] = []   # dims that survive the local sums: the kept ones and the shard counts
    shard_dims: list[int] = []  # positions, among `kept`, of the shard counts
    for d, n in enumerate(fir.shape_of(x)):
        s = _shards(axes[d], mesh)
        if d in dims and s > 1:
            shard_dims.append(len(kept))
            kept.append(len(split_shape))
            split_shape += [s, n // s]
            split_axes += [axes[d], ()]
            local.append(len(split_shape) - 1)
        else:
            (local if d in dims else kept).append(len(split_shape))
            split_shape.append(n)
            split_axes.append(axes[d])
    partial_shape = [split_shape[k] for k in kept]
    partial_axes = [split_axes[k] for k in kept]
    with ir.InsertionPoint(op), op.location:
        xs = hlo.reshape(ir.RankedTensorType.get(split_shape, elt), x)
        _pin(fir.op_of(xs), _layout(split_axes), len(split_shape))
        part = hlo.ReduceOp([ir.RankedTensorType.get(partial_shape, elt)], [xs], [zero], local)
        fir.add_body(part.operation, elt, 1)
        _pin(part.operation, _layout(partial_axes), len(partial_shape))
    return _Partials(op, part.results[0], shard_dims, partial_axes)


def _sum_depths(block: ir.Block, reduces: set[ir.Operation]) -> dict[ir.Operation, int]:
    """Per reduce in `reduces`: how many of them lie on the longest path to it, itself included (one pass in
    block order). Reduces of equal depth do not depend on each other."""
    depth: dict[ir.Value, int] = {}
    out: dict[ir.Operation, int] = {}
    for op in block.operations:
        op = op.operation
        d = max((depth.get(v, 0) for v in fir.used_values(op)), default=0) + (op in reduces)
        if op in reduces:
            out[op] = d
        for r in op.results:
            depth[r] = d
    return out


def _gather_and_sum(members: list[_Partials], position: dict[ir.Operation, int]) -> None:
    """One all-gather of the members' partials (stacked on a new minor dim), then every device sums each
    member's shards with the same local reduce; the results replace the members' reductions."""
    last = max((fir.op_of(p.value) for p in members), key=lambda op: position.get(op, -1))
    first = members[0]
    elt = fir.element_type(first.value)
    zero = first.reduce.operands[1]
    shape = fir.shape_of(first.value)
    kept_axes = [() if i in first.shard_dims else a for i, a in enumerate(first.axes)]
    with ir.InsertionPoint.after(last), last.location:
        if len(members) == 1:
            gathered = fir.constraint(first.value, _layout(kept_axes))  # the all-gather: exact in any
            total = hlo.ReduceOp([first.reduce.results[0].type], [gathered], [zero], first.shard_dims)
            fir.add_body(total.operation, elt, 1)
            first.reduce.results[0].replace_all_uses_with(total.results[0])
            first.reduce.erase()
            return
        column = ir.RankedTensorType.get([*shape, 1], elt)
        stacked = hlo.concatenate([hlo.reshape(column, p.value) for p in members], len(shape))
        _pin(fir.op_of(stacked), _layout([*first.axes, ()]), len(shape) + 1)
        gathered = fir.constraint(stacked, (None,) * (len(shape) + 1))  # one all-gather for the whole group
        sums_type = ir.RankedTensorType.get([len(members)], elt)
        sums = hlo.ReduceOp([sums_type], [gathered], [zero], list(range(len(shape))))
        fir.add_body(sums.operation, elt, 1)
        for j, p in enumerate(members):
            one = hlo.slice(sums.results[0], [j], [j + 1], [1])
            total = hlo.reshape(p.reduce.results[0].type, one)
            p.reduce.results[0].replace_all_uses_with(total)
            p.reduce.erase()


def _count(p: _Partials) -> int:
    shape = fir.shape_of(p.value)
    n = 1
    for i in p.shard_dims:
        n *= shape[i]
    return n


def _pin(op: ir.Operation, layout: tuple[Any, ...], rank: int) -> None:
    """States `op`'s result sharding (`sdy.sharding`), as jax does for ops under explicit shardings."""
    op.attributes["sdy.sharding"] = sdy.TensorShardingPerValueAttr.get([sir.sharding_attr(layout, rank)])


def _shards(axes: Axes, mesh: dict[str, int]) -> int:
    n = 1
    for a in axes:
        n *= mesh.get(a, 1)
    return n
