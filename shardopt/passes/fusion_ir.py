"""IR helpers shared by the fusion passes (`fuse-clipping`, `fuse-moments`).

They work on `@main`'s single block: the frontend lowers one flat step and `inline-calls` has removed every
`func.call`, so values are either block arguments of `@main` or results of ops in that block.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any

from jaxlib.mlir import ir, passmanager
from jaxlib.mlir.dialects import sdy
from jaxlib.mlir.dialects import stablehlo as hlo

from shardopt import ir as sir
from shardopt.passes.base import PassError

CONSTRAINT = "sdy.sharding_constraint"

# Ops that compute each result element from the elements at the same index of their operands (rank-0 operands
# are only allowed where StableHLO allows them: the predicate of `select`, the bounds of `clamp`).
ELEMENTWISE = frozenset(f"stablehlo.{n}" for n in (
    "abs add and atan2 cbrt ceil clamp compare convert cosine divide exponential exponential_minus_one floor "
    "is_finite log log_plus_one logistic maximum minimum multiply negate not or popcnt power remainder "
    "round_nearest_afz round_nearest_even rsqrt select shift_left shift_right_arithmetic shift_right_logical "
    "sign sine sqrt subtract tan tanh xor").split())


def op_of(value: ir.Value) -> ir.Operation | None:
    """The operation defining `value`, or None for a block argument."""
    owner = value.owner
    return None if isinstance(owner, ir.Block) else owner.operation


def look_through(value: ir.Value) -> ir.Value:
    """`value` with any chain of `sdy.sharding_constraint` ops removed (they do not change values)."""
    op = op_of(value)
    while op is not None and op.name == CONSTRAINT:
        value = op.operands[0]
        op = op_of(value)
    return value


def shape_of(value: ir.Value) -> list[int]:
    return list(ir.RankedTensorType(value.type).shape)


def element_type(value: ir.Value) -> ir.Type:
    return ir.RankedTensorType(value.type).element_type


def splat_key(value: ir.Value) -> str | None:
    """A key naming the splat constant `value` is (type and value), or None if it is not a splat constant."""
    op = op_of(look_through(value))
    if op is None or op.name != "stablehlo.constant":
        return None
    attr = op.attributes["value"]
    if not isinstance(attr, ir.DenseElementsAttr) or not attr.is_splat:
        return None
    return str(attr.get_splat_value()) + ":" + str(element_type(value))


def is_zero(value: ir.Value) -> bool:
    """True for a splat +0.0 (the identity of a float sum; -0.0 is not accepted)."""
    key = splat_key(value)
    if key is None:
        return False
    attr = op_of(look_through(value)).attributes["value"]
    splat = ir.DenseElementsAttr(attr).get_splat_value()
    if not isinstance(splat, ir.FloatAttr):
        return False
    return splat.value == 0.0 and not str(splat).startswith("-")


def scalar_type(elt: ir.Type) -> ir.RankedTensorType:
    return ir.RankedTensorType.get([], elt)


def main_block(module: ir.Module) -> ir.Block:
    return sir.main_func(module).regions[0].blocks[0]


def users(value: ir.Value) -> list[ir.Operation]:
    return [u.owner.operation for u in value.uses]


class Shardings:
    """The closed layouts of `@main`'s values where they are known without propagation.

    Block arguments carry `sdy.sharding` (closed by propagate-layouts); `sdy.sharding_constraint` and ops with a
    `sdy.sharding` attribute state theirs; elementwise ops take the layout of their first full-rank operand.
    Anything else is unknown (None) and is never grouped with a known layout.
    """

    def __init__(self, module: ir.Module):
        fn = sir.main_func(module)
        self.block = fn.regions[0].blocks[0]
        self.args = [sir.layout_from_sharding(a.get("sdy.sharding")) for a in sir.arg_attrs(fn)]
        self._memo: dict[ir.Value, tuple[Any, ...] | None] = {}

    def of(self, value: ir.Value) -> tuple[Any, ...] | None:
        """The layout of `value` (None if unknown)."""
        stack: list[tuple[ir.Value, bool]] = [(value, False)]
        while stack:  # iterative post-order: chains can be thousands of ops long
            v, ready = stack.pop()
            if v in self._memo:
                continue
            op = op_of(v)
            inputs = [o for o in op.operands if shape_of(o) == shape_of(v)] \
                if op is not None and op.name in ELEMENTWISE else []
            if ready or all(o in self._memo for o in inputs):
                self._memo[v] = self._direct(v)
            else:
                stack.append((v, True))
                stack.extend((o, False) for o in inputs if o not in self._memo)
        return self._memo[value]

    def _direct(self, v: ir.Value) -> tuple[Any, ...] | None:
        owner = v.owner
        if isinstance(owner, ir.Block):
            return self.args[v.arg_number] if owner == self.block else None
        op = owner.operation
        if op.name == CONSTRAINT:
            return sir.layout_from_sharding(op.attributes["sharding"])
        if "sdy.sharding" in op.attributes:
            per_value = sdy.TensorShardingPerValueAttr(op.attributes["sdy.sharding"]).shardings
            return sir.layout_from_sharding(per_value[ir.OpResult(v).result_number])
        if _is_splat_like(v):
            return (None,) * len(shape_of(v))  # splats and scalar broadcasts are the same everywhere
        if op.name in ELEMENTWISE:
            carriers = [o for o in op.operands if shape_of(o) == shape_of(v) and not _is_splat_like(o)]
            return self._memo.get(carriers[0]) if carriers else (None,) * len(shape_of(v))
        return None


def _is_splat_like(value: ir.Value) -> bool:
    """A splat constant or a broadcast of a rank-0 value: no data of its own to lay out."""
    op = op_of(look_through(value))
    if op is None:
        return False
    if op.name == "stablehlo.broadcast_in_dim":
        return not shape_of(op.operands[0])
    return splat_key(value) is not None


def stable_topo_sort(block: ir.Block) -> int:
    """Reorders `block` so every op follows the ops it uses, keeping the original order where it is legal.

    The fusion passes insert a batched op after the last of its operands; users of the ops it replaces may sit
    earlier. Returns the number of ops that moved.
    """
    ops = [op.operation for op in block.operations]
    terminator, body = ops[-1], ops[:-1]
    index = {op: i for i, op in enumerate(body)}
    deps: list[set[int]] = [set() for _ in body]
    for i, op in enumerate(body):
        for v in used_values(op):
            d = op_of(v)
            if d is not None and d in index:  # values defined inside nested regions are not in `index`
                deps[i].add(index[d])
    dependents: list[list[int]] = [[] for _ in body]
    pending = [len(d) for d in deps]
    for i, ds in enumerate(deps):
        for d in ds:
            dependents[d].append(i)
    ready = [i for i, n in enumerate(pending) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in dependents[i]:
            pending[j] -= 1
            if pending[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(body):
        raise PassError("fusion produced a use-before-definition cycle in @main (a bug in the pass)")
    moved = sum(1 for pos, i in enumerate(order) if pos != i)
    if moved:
        for i in order:
            body[i].move_before(terminator)
    return moved


def used_values(op: ir.Operation) -> Iterable[ir.Value]:
    """The values `op` reads: its operands and those of the ops in its regions."""
    yield from op.operands
    for region in op.regions:
        for blk in region.blocks:
            for inner in blk.operations:
                yield from used_values(inner.operation)


def run_textual(module: ir.Module, pipeline: str) -> None:
    """Runs MLIR passes (e.g. "cse") on `module` from inside a Python pass."""
    passmanager.PassManager.parse(f"builtin.module({pipeline})").run(module.operation)


def constraint(value: ir.Value, layout: tuple[Any, ...]) -> ir.Value:
    """`value` pinned to `layout` with an `sdy.sharding_constraint` (at the current insertion point)."""
    attr = sir.sharding_attr(layout, len(shape_of(value)))
    return sdy.ShardingConstraintOp(value, attr).result


def add_body(op: ir.Operation, elt: ir.Type, count: int) -> None:
    """Gives a (variadic) reduce `count` independent sums as its body."""
    s = scalar_type(elt)
    body = op.regions[0].blocks.append(*([s] * (2 * count)))
    with ir.InsertionPoint(body):
        args = list(body.arguments)
        hlo.ReturnOp([hlo.add(args[k], args[count + k]) for k in range(count)])


def _concatenates(fn: Any) -> list[tuple[ir.Operation, int]]:
    """`@main`'s `stablehlo.concatenate` ops (a snapshot: callers rewrite them) with their dimension."""
    ops = [op.operation for op in fn.regions[0].blocks[0].operations]
    return [(op, ir.IntegerAttr(op.attributes["dimension"]).value) for op in ops if op.name == "stablehlo.concatenate"]


def _through_reshapes(value: ir.Value) -> ir.Value:
    """The deepest value of the same shape under a chain of reshapes and sharding constraints (a piece cut out of
    a packed buffer comes back as reshape(reshape(slice)))."""
    best, shape, op = value, shape_of(value), op_of(value)
    while op is not None and op.name in ("stablehlo.reshape", CONSTRAINT):
        value = op.operands[0]
        if shape_of(value) == shape:
            best = value
        op = op_of(value)
    return best


def _slice_parts(value: ir.Value, dim: int) -> tuple[ir.Value, int, int] | None:
    """(source, start, limit) along `dim` if `value` is a unit-stride slice taking all of every other dim."""
    op = op_of(_through_reshapes(value))
    if op is None or op.name != "stablehlo.slice":
        return None
    source = op.operands[0]
    start = list(ir.DenseI64ArrayAttr(op.attributes["start_indices"]))
    limit = list(ir.DenseI64ArrayAttr(op.attributes["limit_indices"]))
    strides = list(ir.DenseI64ArrayAttr(op.attributes["strides"]))
    full = shape_of(source)
    if any(s != 1 for s in strides) or any(
            (start[d], limit[d]) != (0, full[d]) for d in range(len(full)) if d != dim):
        return None
    return source, start[dim], limit[dim]


def fold_concatenated_slices(fn: Any) -> int:
    """Rewrites `concatenate(slice(x, a:b), slice(x, b:c), ...)` runs into one slice, and into `x` itself when
    they cover it: packing the pieces a packed buffer was cut into is no copy. Returns the runs merged."""
    folded = 0
    for op, dim in _concatenates(fn):
        merged: list[ir.Value] = []
        runs: list[tuple[ir.Value, int, int] | None] = []
        changed = False
        for value in op.operands:
            parts = _slice_parts(value, dim)
            last = runs[-1] if runs else None
            if parts and last and parts[0] == last[0] and parts[1] == last[2]:
                runs[-1] = (last[0], last[1], parts[2])
                merged[-1] = None  # rebuilt below
                changed = True
                continue
            runs.append(parts)
            merged.append(value)
        if not changed:
            continue
        operands = []
        with ir.InsertionPoint(op), op.location:
            for value, run in zip(merged, runs, strict=True):
                if value is not None:
                    operands.append(value)
                    continue
                source, start, limit = run
                full = shape_of(source)
                if (start, limit) == (0, full[dim]):
                    operands.append(source)
                    continue
                lo, hi = [0] * len(full), list(full)
                lo[dim], hi[dim] = start, limit
                operands.append(hlo.slice(source, lo, hi, [1] * len(full)))
            if len(operands) == 1:
                op.results[0].replace_all_uses_with(operands[0])
            else:
                new = hlo.ConcatenateOp(operands, dim)
                op.results[0].replace_all_uses_with(new.result)
        op.erase()
        folded += 1
    return folded


def flatten_concatenates(fn: Any) -> int:
    """Rewrites `concatenate(a, concatenate(b, c), d)` (same dim) into `concatenate(a, b, c, d)`: jax lowers a
    concatenation of many pieces as a tree of concatenates of at most 16, and a pack's pieces are its members."""
    flattened = 0
    for op, dim in _concatenates(fn):
        operands: list[ir.Value] = []
        stack = list(reversed(list(op.operands)))
        nested = False
        while stack:
            value = stack.pop()
            inner = op_of(value)
            if (inner is not None and inner.name == "stablehlo.concatenate"
                    and ir.IntegerAttr(inner.attributes["dimension"]).value == dim):
                stack.extend(reversed(list(inner.operands)))
                nested = True
            else:
                operands.append(value)
        if not nested:
            continue
        with ir.InsertionPoint(op), op.location:
            new = hlo.ConcatenateOp(operands, dim)
        op.results[0].replace_all_uses_with(new.result)
        op.erase()
        flattened += 1
    return flattened
