"""How `lower-to-kernels` reads a frontend composite and builds the kernel's operands: the composite's attributes,
which values are donated `@main` arguments, the global-norm clip scale folded out of a scaled gradient, a bfloat16
gradient seen through its convert, Adam's scalars (alpha, eps) as scalar StableHLO, and the pack's gradient
scratch buffer handed back untouched."""

from __future__ import annotations

from typing import Any

import numpy as np
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo as hlo

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
    (donated by the step contract) not sharded over a mesh axis of size > 1."""
    positions = [main_arg_index(x, block) for x in state]
    if any(p is None for p in positions):
        return "state is not a @main argument"
    attrs = sir.arg_attrs(main)  # once: reading one argument's attributes decodes them all
    for p in positions:
        sharding = attrs[p].get("sdy.sharding")
        if sharding is not None and any(axes.get(ax, 1) > 1 for dim, _ in sir.sharding_dims(sharding) for ax in dim):
            return "variable sharded over the mesh (the kernel updates whole tensors)"
    return None


def common_scale(grads: list[ir.Value]) -> tuple[list[ir.Value], ir.Value | None]:
    """Gradients all scaled by one global-norm clip scale -> (unscaled gradients, the scale); else unchanged."""
    split = [split_scale(g) for g in grads]
    scales = {s for _, s in split}
    if len(scales) == 1 and None not in scales:
        return [x for x, _ in split], split[0][1]
    return grads, None


def pass_gradient_buffer_through(main: Any, block: ir.Block, pack: str) -> bool:
    """The pack's donated gradient scratch buffer returned as it came in: with the kernel reading the gradients
    in place, nothing needs the gathered gradient any more (`cleanup` removes the concatenation)."""
    def is_buffer(attrs: dict[str, ir.Attribute]) -> bool:
        return sir.string_attr(attrs.get("shardopt.role")) == "gradient_buffer" and \
            sir.string_attr(attrs.get("shardopt.pack")) == pack
    args = [i for i, attrs in enumerate(sir.arg_attrs(main)) if is_buffer(attrs)]
    results = [i for i, attrs in enumerate(sir.result_attrs(main)) if is_buffer(attrs)]
    if len(args) != 1 or len(results) != 1:
        return False
    ret = block.operations[len(block.operations) - 1]
    ret.operands[results[0]] = block.arguments[args[0]]
    return True


def f32_scalar(x: float) -> ir.Value:
    t = ir.RankedTensorType.get([], ir.F32Type.get())
    return hlo.ConstantOp(ir.DenseElementsAttr.get(np.asarray(np.float32(x)).reshape(()), type=t)).result


def alpha_eps(a: dict[str, Any], lr: ir.Value, t: ir.Value) -> tuple[ir.Value, ir.Value]:
    """optimizers/adam.py `alpha_eps` as scalar StableHLO, op for op (float32 betas, as `_via_float32`)."""
    one = f32_scalar(1.0)
    b1_power = hlo.PowOp(f32_scalar(a["beta_1"]), t).result
    b2_power = hlo.PowOp(f32_scalar(a["beta_2"]), t).result
    num = hlo.MulOp(lr, hlo.SqrtOp(hlo.SubtractOp(one, b2_power).result).result).result
    alpha = hlo.DivOp(num, hlo.SubtractOp(one, b1_power).result).result
    return alpha, f32_scalar(a["epsilon"])
