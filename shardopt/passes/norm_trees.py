"""IR patterns of norm clipping that `fuse-clipping` rewrites: sums of squares of a gradient, the scalar add
trees that sum them into a global norm, and a global norm over the members of a packed gradient (summed in the
fixed order of fixed_order_norm.py when the pack is flat, so the pack kernel's norm gives the same bits)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo as hlo

from shardopt import ir as sir
from shardopt.passes import fusion_ir as fir
from shardopt.passes.fixed_order_norm import fixed_order_sumsq, is_fixed_order_sum


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


def tree_root(value: ir.Value, memo: dict[ir.Operation, ir.Operation] | None = None) -> ir.Operation | None:
    """The root of the scalar add tree that `value` (a sum of squares, maybe halved) is a leaf of, if any.
    `memo` (node -> root, filled in) makes finding the roots of all K leaves of one tree O(K), not O(K^2)."""
    us = fir.users(value)
    if len(us) == 1 and us[0].name == "stablehlo.divide" and fir.splat_key(us[0].operands[1]) is not None:
        value = us[0].results[0]
    node = single_add_user(value)
    if node is None:
        return None
    path = [node]
    memo = {} if memo is None else memo
    while node not in memo and (parent := single_add_user(node.results[0])) is not None:
        node = parent
        path.append(node)
    root = memo.get(node, node)
    memo.update((n, root) for n in path)
    return root


def one_tree(members: list[SumOfSquares | None]) -> bool:
    """Whether these (two or more) sums of squares are all found and all leaves of the same global-norm add tree,
    so only their total matters (a per-tensor `clipnorm` needs each sum)."""
    if len(members) < 2 or any(m is None for m in members):
        return False
    memo: dict[ir.Operation, ir.Operation] = {}
    roots = [tree_root(m.reduce.results[0], memo) for m in members]
    return roots[0] is not None and all(r is not None and r == roots[0] for r in roots)


def global_norm_members(block: ir.Block, xs: list[ir.Value]) -> list[SumOfSquares] | None:
    """The float32 sums of squares of the flat or shaped tensors `xs` in `block`, in `xs` order, when they are
    all leaves of one global-norm add tree (`one_tree`); else None."""
    wanted = set(xs)
    sums = {m.x: m for op in block.operations
            if (m := match_sum_of_squares(op.operation)) is not None and m.x in wanted}
    members = [sums.get(x) for x in xs]
    if any(m is None or not isinstance(fir.element_type(m.square), ir.F32Type) for m in members):
        return None
    return members if one_tree(members) else None


PACK_MARK = "shardopt.fixed_order_pack"  # on a pack member's sum of squares: sum the pack in the fixed order


def mark_fixed_order_pack(block: ir.Block, xs: list[ir.Value]) -> None:
    """Marks the global norm's sums of squares of a pack's gradients `xs` (a pack `lower-to-kernels` would lower
    to the kernel, left StableHLO): fuse-clipping sums them over the packed gradient in the fixed order, the order
    of the kernel path's `shardopt_sumsq`. Other packs keep XLA's reduce (the order of unpacked variables'
    batched norms: packed and unpacked steps of optimizers without a pack kernel stay bitwise equal)."""
    members = global_norm_members(block, xs)
    for m in members or ():
        m.reduce.attributes[PACK_MARK] = ir.UnitAttr.get()


def _marked(members: list[SumOfSquares]) -> bool:
    return all(PACK_MARK in m.reduce.attributes for m in members)


def replace_member_sums(members: list[SumOfSquares], total: ir.Value, zero: ir.Value) -> None:
    """The first member's sum becomes `total` and the others +0 (the add tree is unchanged); their reductions
    and, where unused, their squares are erased."""
    members[0].reduce.results[0].replace_all_uses_with(total)
    for m in members[1:]:
        m.reduce.results[0].replace_all_uses_with(zero)
    for m in members:
        m.reduce.erase()
        square = fir.op_of(m.square)
        if square is not None and not list(m.square.uses):
            square.erase()


def f32_zero() -> ir.Value:
    elt = ir.F32Type.get()
    return hlo.ConstantOp(ir.DenseElementsAttr.get_splat(fir.scalar_type(elt), ir.FloatAttr.get(elt, 0.0))).result


def reduce_packed_gradients(block: ir.Block, found: list[SumOfSquares]) -> tuple[list[SumOfSquares], int]:
    """For a global norm over the members of a packed gradient (the `concatenate` that `fuse-moments` builds for
    a pack's update), sums the squares of the packed gradient once instead of each member's: one contiguous read
    instead of one per member buffer. The first member's sum becomes the packed sum and the others zero, so the
    add tree that makes the global norm is unchanged. Only when every member's sum is a leaf of the same tree
    (`one_tree`). A flat float32 pack is summed in the fixed order of fixed_order_norm.py, the order of the pack
    kernel's `shardopt_sumsq` (lower-to-kernels), so both paths give the same norm."""
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
        if any(m is None or id(m) in done for m in members) or not one_tree(members):
            continue
        elt = fir.element_type(members[0].square)
        packed_x = op.results[0]
        rank = len(fir.shape_of(packed_x))
        with ir.InsertionPoint.after(op), op.location:
            zero = hlo.ConstantOp(ir.DenseElementsAttr.get_splat(fir.scalar_type(elt), ir.FloatAttr.get(elt, 0.0)))
            if rank == 1 and isinstance(elt, ir.F32Type) and _marked(members):  # the pack kernel's order
                total = fixed_order_sumsq(packed_x)
            else:
                square = hlo.multiply(packed_x, packed_x)
                reduce = hlo.ReduceOp([fir.scalar_type(elt)], [square], [zero.result], list(range(rank)))
                fir.add_body(reduce.operation, elt, 1)
                total = reduce.results[0]
        replace_member_sums(members, total, zero.result)
        done.update(id(m) for m in members)
        packed += 1
    return [s for s in found if id(s) not in done], packed


def _argument_of(x: ir.Value, block: ir.Block) -> int | None:
    """The `@main` argument `x` is, or converts (a bfloat16 gradient clipped in float32), else None."""
    op = fir.op_of(x)
    if op is not None and op.name == "stablehlo.convert":
        x = op.operands[0]
    return ir.BlockArgument(x).arg_number if isinstance(x.owner, ir.Block) and x.owner == block else None


def loose_gradient_sums(module: ir.Module, above: int) -> list[tuple[SumOfSquares, ir.Value]]:
    """The float32 sums of squares of gradients kept in buffers of their own: (sum, the gradient's `@main`
    argument) for each gradient argument (or its float32 convert) with more than `above` elements, replicated
    (no mesh axis of size > 1 splits it) and of a variable in no pack (a pack's members are summed together)."""
    main = sir.main_func(module)
    block = main.regions[0].blocks[0]
    attrs = sir.arg_attrs(main)
    axes = sir.mesh_axes(module)
    packed = {ir.StringAttr(n).value for a in attrs if "shardopt.members" in a
              for n in ir.ArrayAttr(a["shardopt.members"])}
    out = []
    for op in block.operations:
        m = match_sum_of_squares(op.operation)
        if m is None or not isinstance(fir.element_type(m.square), ir.F32Type):
            continue
        i = _argument_of(m.x, block)
        if i is None or sir.string_attr(attrs[i].get("shardopt.role")) != "gradient" or \
                sir.string_attr(attrs[i].get("shardopt.owner")) in packed or int(np.prod(fir.shape_of(m.x))) <= above:
            continue
        sharding = attrs[i].get("sdy.sharding")
        if sharding is not None and any(axes.get(ax, 1) > 1 for dim, _ in sir.sharding_dims(sharding) for ax in dim):
            continue
        out.append((m, block.arguments[i]))
    return out


def sum_flat_pack_gradients(module: ir.Module, found: list[SumOfSquares]) -> tuple[list[SumOfSquares], int]:
    """A global norm over the members of a flat pack whose gradients no `concatenate` gathered (fuse-moments left
    the pack, as it does for bfloat16 state) summed over their concatenation in the fixed order of
    fixed_order_norm.py: the order the pack kernel's `shardopt_sumsq` keeps. The pack and its members are read
    from the arguments' attributes (`shardopt.role` gradient_buffer and gradient, `shardopt.members`,
    `shardopt.owner`)."""
    main = sir.main_func(module)
    block = main.regions[0].blocks[0]
    attrs = sir.arg_attrs(main)
    by_owner = {sir.string_attr(a.get("shardopt.owner")): i for i, a in enumerate(attrs)
                if sir.string_attr(a.get("shardopt.role")) == "gradient"}
    by_arg = {i: m for m in found if (i := _argument_of(m.x, block)) is not None}
    done: set[int] = set()
    packed = 0
    for i, a in enumerate(attrs):
        if sir.string_attr(a.get("shardopt.role")) != "gradient_buffer" or "shardopt.members" not in a or \
                ir.RankedTensorType(block.arguments[i].type).rank != 1:
            continue
        names = [ir.StringAttr(n).value for n in ir.ArrayAttr(a["shardopt.members"])]
        members = [by_arg.get(by_owner.get(n, -1)) for n in names]
        if any(m is None or id(m) in done or not isinstance(fir.element_type(m.square), ir.F32Type)
               for m in members) or not one_tree(members) or not _marked(members):
            continue
        first = next(op.operation for op in block.operations if op.operation in {m.reduce for m in members})
        with ir.InsertionPoint(first), first.location:
            flat = [hlo.reshape(ir.RankedTensorType.get([int(np.prod(fir.shape_of(m.x)))], ir.F32Type.get()), m.x)
                    for m in members]
            replace_member_sums(members, fixed_order_sumsq(hlo.concatenate(flat, 0)), f32_zero())
        done.update(id(m) for m in members)
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
        if is_fixed_order_sum(fir.look_through(op.operands[0])):
            return True  # a packed gradient's sum (fixed_order_norm.py), in StableHLO or the kernel's call
        op = fir.op_of(fir.look_through(op.operands[0]))
    while op is not None and op.name == "stablehlo.reduce" and len(op.results) == 1 \
            and match_sum_of_squares(op) is None:
        op = fir.op_of(op.operands[0])  # the second stage of a partly local batched reduction
    if op is None or op.name != "stablehlo.reduce":
        return False
    return len(op.results) > 1 or match_sum_of_squares(op) is not None
