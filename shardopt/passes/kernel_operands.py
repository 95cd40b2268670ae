"""How `lower-to-kernels` reads a frontend composite and builds the kernel's operands: the composite's attributes,
which values are donated `@main` arguments, the global-norm clip scale folded out of a scaled gradient, a bfloat16
gradient seen through its convert, and the packs' gradient scratch buffers handed back untouched. (Each
definition's call and scalars: kernel_lowerings.py; per-device regions: kernel_regions.py.)"""

from __future__ import annotations

from typing import Any

from jaxlib.mlir import ir

from shardopt import ir as sir


def composite_attributes(op: ir.Operation) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for named in ir.DictAttr(op.attributes["composite_attributes"]):
        a = named.attr
        if isinstance(a, ir.BoolAttr):
            out[named.name] = bool(a.value)
        elif isinstance(a, ir.FloatAttr):
            out[named.name] = float(a.value)
        elif isinstance(a, ir.IntegerAttr):
            out[named.name] = int(a.value)
        elif isinstance(a, ir.StringAttr):
            out[named.name] = a.value
        else:
            out[named.name] = a
    return out


def defining_op(value: ir.Value) -> ir.Operation | None:
    owner = value.owner
    if isinstance(owner, ir.Block):
        return None
    return owner.operation if isinstance(owner, ir.OpView) else owner


def main_arg_index(value: ir.Value, main_block: ir.Block) -> int | None:
    if isinstance(value.owner, ir.Block) and value.owner == main_block:
        return ir.BlockArgument(value).arg_number
    return None


def element_name(value: ir.Value) -> str:
    return str(ir.RankedTensorType(value.type).element_type)


def split_scale(g: ir.Value) -> tuple[ir.Value, ir.Value | None]:
    """`x * broadcast_in_dim(s)` with a rank-0 float32 `s` (clipping.py's global-norm scale) -> (x, s)."""
    op = defining_op(g)
    if op is None or op.name != "stablehlo.multiply":
        return g, None
    for x, b in ((op.operands[0], op.operands[1]), (op.operands[1], op.operands[0])):
        bop = defining_op(b)
        if bop is not None and bop.name == "stablehlo.broadcast_in_dim":
            s = bop.operands[0]
            st = ir.RankedTensorType(s.type)
            if st.rank == 0 and str(st.element_type) == "f32" and x.type == g.type:
                return x, s
    return g, None


def unconverted(g: ir.Value) -> ir.Value:
    """A float32 gradient that is `convert` of a bfloat16 value: that value (exact, and half the bytes)."""
    op = defining_op(g)
    if op is not None and op.name == "stablehlo.convert" and element_name(op.operands[0]) == "bf16":
        return op.operands[0]
    return g


def state_problem(state: list[ir.Value], main: Any, block: ir.Block, axes: dict[str, int]) -> str | None:
    """Why these state values cannot be updated in place by a kernel, or None: each must be a `@main` argument
    (donated by the step contract). (Shardings: `kernel_regions.call_shardings`.)"""
    if any(main_arg_index(x, block) is None for x in state):
        return "state is not a @main argument"
    return None


def common_scale(grads: list[ir.Value]) -> tuple[list[ir.Value], ir.Value | None]:
    """Gradients all scaled by one global-norm clip scale -> (unscaled gradients, the scale); else unchanged."""
    split = [split_scale(g) for g in grads]
    scales = {s for _, s in split}
    if len(scales) == 1 and None not in scales:
        return [x for x, _ in split], split[0][1]
    return grads, None


def pass_gradient_buffers_through(main: Any, block: ir.Block, packs: set[str]) -> int:
    """Each of `packs`' donated gradient scratch buffers returned as it came in: with the kernel reading the
    gradients in place, nothing needs the gathered gradient any more (`cleanup` removes the concatenation).
    Returns how many were. One walk over the attributes for all packs (per pack it was quadratic)."""
    def buffers(all_attrs: list[dict[str, ir.Attribute]]) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        for i, attrs in enumerate(all_attrs):
            if sir.string_attr(attrs.get("shardopt.role")) == "gradient_buffer":
                found.setdefault(sir.string_attr(attrs.get("shardopt.pack")), []).append(i)
        return found
    args, results = buffers(sir.arg_attrs(main)), buffers(sir.result_attrs(main))
    ret = block.operations[len(block.operations) - 1]
    freed = 0
    for pack in packs:
        if len(args.get(pack, ())) == 1 and len(results.get(pack, ())) == 1:
            ret.operands[results[pack][0]] = block.arguments[args[pack][0]]
            freed += 1
    return freed


def replicated(values: list[ir.Value], main: Any, block: ir.Block, axes: dict[str, int]) -> bool:
    """Every value is a `@main` argument not sharded over a mesh axis of size > 1 (a kernel outside a manual
    computation then reads whole tensors, which every device holds)."""
    attrs = main.arg_attrs  # one argument's dictionary at a time: decoding them all per value is quadratic
    for x in values:
        i = main_arg_index(x, block)
        if i is None:
            return False
        d = ir.DictAttr(attrs[i])
        sharding = d["sdy.sharding"] if "sdy.sharding" in d else None
        if sharding is not None and any(axes.get(ax, 1) > 1 for dim, _ in sir.sharding_dims(sharding) for ax in dim):
            return False
    return True
