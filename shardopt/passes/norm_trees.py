"""IR patterns of norm clipping that `fuse-clipping` rewrites: sums of squares of a gradient, the scalar add
trees that sum them into a global norm, and a global norm over the members of a packed gradient."""

from __future__ import annotations

from dataclasses import dataclass

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo as hlo

from shardopt.passes import fusion_ir as fir


@dataclass
class SumOfSquares:
    """One `reduce(add, all dims, init +0.0)(multiply(x, x))` found in `@main`."""

    reduce: ir.Operation
    square: ir.Value  # the multiply's result, the reduction's input
    x: ir.Value


def match_sum_of_squares(op: ir.Operation) -> SumOfSquares | None:
    """`op` as a full sum of squares of a float tensor, or None."""
    if op.name != "stablehlo.reduce" or len(op.operands) != 2 or len(op.results) != 1:
        return None
    square, init = op.operands[0], op.operands[1]
    rank = len(fir.shape_of(square))
    dims = list(ir.DenseI64ArrayAttr(op.attributes["dimensions"]))
    if rank == 0 or sorted(dims) != list(range(rank)) or not fir.is_zero(init):
        return None
    if not isinstance(fir.element_type(square), (ir.F32Type, ir.F64Type, ir.F16Type, ir.BF16Type)):
        return None
    body = op.regions[0].blocks[0]
    inner = [o.operation for o in body.operations]
    if len(inner) != 2 or inner[0].name != "stablehlo.add" or inner[1].name != "stablehlo.return":
        return None
    if set(inner[0].operands) != set(body.arguments) or inner[1].operands[0] != inner[0].result:
        return None
    square = _without_zero_square(fir.look_through(square))
    mul = fir.op_of(square)
    if mul is None or mul.name != "stablehlo.multiply":
        return None
    a, b = (fir.look_through(v) for v in mul.operands)
    if a != b:
        return None
    return SumOfSquares(op, square, a)


def _is_zero_tensor(value: ir.Value) -> bool:
    """A splat +0.0, or a broadcast of a scalar +0.0 (how jax writes `zeros_like`)."""
    value = fir.look_through(value)
    op = fir.op_of(value)
    if op is not None and op.name == "stablehlo.broadcast_in_dim":
        value = op.operands[0]
    return fir.is_zero(value)


def _without_zero_square(value: ir.Value) -> ir.Value:
    """`x*x` for `x*x + 0*0` (either order), else `value`. optax squares `x.real` and `x.imag` of a real x, which
    jax lowers as `x*x + 0*0`; `x*x` is +0, positive, inf or NaN, so adding +0 changes no bit and the sum of
    squares may read `x*x` itself."""
    op = fir.op_of(value)
    if op is None or op.name != "stablehlo.add":
        return value
    for square, other in ((op.operands[0], op.operands[1]), (op.operands[1], op.operands[0])):
        zero = fir.op_of(fir.look_through(other))
        if _is_zero_tensor(other) or (zero is not None and zero.name == "stablehlo.multiply"
                                      and all(_is_zero_tensor(v) for v in zero.operands)):
            return fir.look_through(square)
    return value


def tree_root(value: ir.Value) -> ir.Operation | None:
    """The root of the scalar add tree that `value` (a sum of squares, maybe halved) is a leaf of, if any."""
    us = fir.users(value)
    if len(us) == 1 and us[0].name == "stablehlo.divide" and fir.splat_key(us[0].operands[1]) is not None:
        value = us[0].results[0]
    node = single_add_user(value)
    if node is None:
        return None
    while (parent := single_add_user(node.results[0])) is not None:
        node = parent
    return node


def reduce_packed_gradients(block: ir.Block, found: list[SumOfSquares]) -> tuple[list[SumOfSquares], int]:
    """For a global norm over the members of a packed gradient (the `concatenate` that `fuse-moments` builds for
    a pack's update), sums the squares of the packed gradient once instead of each member's: one contiguous read
    instead of one per member buffer. The first member's sum becomes the packed sum and the others zero, so the
    add tree that makes the global norm is unchanged. Only when every member's sum is a leaf of the same tree
    (a per-tensor `clipnorm` needs each sum)."""
    by_x: dict[ir.Value, SumOfSquares] = {s.x: s for s in found}
    done: set[int] = set()
    packed = 0
    for op in list(block.operations):
        op = op.operation
        if op.name != "stablehlo.concatenate" or len(op.operands) < 2:
            continue
        members = []
        for piece in op.operands:
            value = fir.look_through(piece)
            producer = fir.op_of(value)
            if value not in by_x and producer is not None and producer.name == "stablehlo.reshape":
                value = fir.look_through(producer.operands[0])
            members.append(by_x.get(value))
        if any(m is None or id(m) in done for m in members):
            continue
        roots = [tree_root(m.reduce.results[0]) for m in members]
        if roots[0] is None or any(r is None or r != roots[0] for r in roots):
            continue
        elt = fir.element_type(members[0].square)
        packed_x = op.results[0]
        rank = len(fir.shape_of(packed_x))
        with ir.InsertionPoint.after(op), op.location:
            square = hlo.multiply(packed_x, packed_x)
            zero = hlo.ConstantOp(ir.DenseElementsAttr.get_splat(fir.scalar_type(elt), ir.FloatAttr.get(elt, 0.0)))
            total = hlo.ReduceOp([fir.scalar_type(elt)], [square], [zero.result], list(range(rank)))
            fir.add_body(total.operation, elt, 1)
        members[0].reduce.results[0].replace_all_uses_with(total.results[0])
        for m in members[1:]:
            m.reduce.results[0].replace_all_uses_with(zero.result)
        for m in members:
            m.reduce.erase()
            square = fir.op_of(m.square)
            if square is not None and not list(m.square.uses):
                square.erase()
            done.add(id(m))
        packed += 1
    return [s for s in found if id(s) not in done], packed


def is_scalar_add(op: ir.Operation) -> bool:
    return (op.name == "stablehlo.add" and not fir.shape_of(op.results[0])
            and isinstance(fir.element_type(op.results[0]), (ir.F32Type, ir.F64Type)))


def single_add_user(value: ir.Value) -> ir.Operation | None:
    """The scalar add that is `value`'s only user, if that is how `value` is used."""
    us = fir.users(value)
    return us[0] if len(us) == 1 and is_scalar_add(us[0]) else None


def tree_leaves(root: ir.Operation) -> list[ir.Value]:
    """The tree's leaves, left to right."""
    leaves: list[ir.Value] = []
    stack = list(reversed(list(root.operands)))
    while stack:
        v = stack.pop()
        d = fir.op_of(v)
        if d is not None and is_scalar_add(d) and single_add_user(v) is not None:
            stack.extend(reversed(list(d.operands)))
        else:
            leaves.append(v)
    return leaves


def erase_tree(root: ir.Operation) -> None:
    stack = [root]
    while stack:
        op = stack.pop()
        inner = [fir.op_of(v) for v in op.operands]
        op.erase()
        stack.extend(d for d in inner if d is not None and is_scalar_add(d) and not list(d.results[0].uses))


def from_batched_norm(value: ir.Value) -> bool:
    op = fir.op_of(fir.look_through(value))
    if op is not None and op.name == "stablehlo.divide" and fir.splat_key(op.operands[1]) is not None:
        op = fir.op_of(fir.look_through(op.operands[0]))
    while op is not None and op.name == "stablehlo.reduce" and len(op.results) == 1 \
            and match_sum_of_squares(op) is None:
        op = fir.op_of(op.operands[0])  # the second stage of a partly local batched reduction
    if op is None or op.name != "stablehlo.reduce":
        return False
    return len(op.results) > 1 or match_sum_of_squares(op) is not None
