"""The sum of squares of a pack's gradient in one fixed order, written in StableHLO or as the kernel's custom call.

A global clip norm over a pack's members must give the same bits whether the pack is updated by the compiled
kernel (`lower-to-kernels`: the members' gradients stay separate buffers, read in place by `shardopt_sumsq`) or
by StableHLO (the portable twin: `fuse-moments` concatenates them and `fuse-clipping` sums the packed gradient),
and so must the sum of squares of a large gradient kept in a buffer of its own (`lower-to-kernels`, either way).
XLA's own reduce gives no such promise: XLA:CPU hands a reduce to a library (YNNPACK) whose order of addition
is its own, and it reorders a column reduction too (measured: 3% of lanes equal to a sequential sum). So both
paths spell out one order (kernels.cc `SumsqImpl`, `shardopt.kernels.calls.sumsq_width`) over the flattened
concatenation x of N elements, in operations XLA computes element by element:

    W = min(2^16, the power of two >= N) lanes; acc = zeros[W]
    while b < N // W:  acc = acc + x[b*W : (b+1)*W] * x[b*W : (b+1)*W]        (stablehlo.while, dynamic_slice)
    acc = acc + t * t, t = x[(N // W) * W :] padded with +0 to W lanes          (when W does not divide N)
    while W > 1:  acc = acc[:W/2] + acc[W/2:]                                    (slices, elementwise adds)

Every addition of the sum is an elementwise add of two float32 values, so XLA has no freedom in it; the one
choice left is LLVM's contraction of `acc + x*x` into an FMA (the product has one use), which the kernel makes
exactly where XLA:CPU does (update_loops.inc `MulAdd`). Adding +0 to a sum of squares changes no bit, so the
padded tail lanes equal the kernel's untouched ones. Without a whole row (N < W) XLA folds `+0 + x*x` and fuses
the squares into the first halving add, contracting its first product: fma(x[i], x[i], x[i + W/2]^2); the
kernel does the same there. Measured (tests/test_fixed_order_norm.py): bitwise equal to the kernel for packs of
7 to 135,000 elements, float32 and bfloat16, through the whole pipeline; on 2000 x f32[3700] the while loop
reads the packed gradient once (3.5 ms where XLA's reduce took 1.3 ms, under load 9).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo as hlo

from shardopt.kernels.calls import sumsq_call, sumsq_width
from shardopt.kernels.stablehlo import custom_call

TAG = "shardopt.fixed_order_norm"  # unit attribute on the op whose result is a fixed-order sum of squares


def _constant(value: float | int, t: ir.RankedTensorType) -> ir.Value:
    dtype = np.float32 if isinstance(t.element_type, ir.F32Type) else np.int64
    return hlo.ConstantOp(ir.DenseElementsAttr.get(np.full(t.shape, value, dtype), type=t)).result


def fixed_order_sumsq(x: ir.Value) -> ir.Value:
    """The float32 scalar sum of squares of the rank-1 float32 `x`, in the fixed order (at the insertion point)."""
    xt = ir.RankedTensorType(x.type)
    if xt.rank != 1 or not isinstance(xt.element_type, ir.F32Type):
        raise ValueError(f"fixed-order sum of squares needs a flat float32 tensor, not {xt}")
    f32 = ir.F32Type.get()
    n = xt.shape[0]
    w = sumsq_width(n)
    rows, tail = divmod(n, w)
    lanes = ir.RankedTensorType.get([w], f32)
    index = ir.RankedTensorType.get([], ir.IntegerType.get_signless(64))
    acc = _constant(0.0, lanes)
    if rows:
        loop = hlo.WhileOp([index, lanes, xt], [_constant(0, index), acc, x])
        cond = loop.cond.blocks.append(index, lanes, xt)
        with ir.InsertionPoint(cond):
            less = hlo.compare(cond.arguments[0], _constant(rows, index),
                               hlo.ComparisonDirectionAttr.get("LT"), compare_type=hlo.ComparisonTypeAttr.get("SIGNED"))
            hlo.ReturnOp([less])
        body = loop.body.blocks.append(index, lanes, xt)
        with ir.InsertionPoint(body):
            b, a, xs = body.arguments
            start = hlo.multiply(b, _constant(w, index))
            row = hlo.DynamicSliceOp(xs, [start], ir.DenseI64ArrayAttr.get([w])).result
            hlo.ReturnOp([hlo.add(b, _constant(1, index)), hlo.add(a, hlo.multiply(row, row)), xs])
        acc = loop.results[1]
    if tail:
        t = hlo.slice(x, ir.DenseI64ArrayAttr.get([rows * w]), ir.DenseI64ArrayAttr.get([n]),
                      ir.DenseI64ArrayAttr.get([1]))
        padded = hlo.PadOp(t, _constant(0.0, ir.RankedTensorType.get([], f32)), ir.DenseI64ArrayAttr.get([0]),
                           ir.DenseI64ArrayAttr.get([w - tail]), ir.DenseI64ArrayAttr.get([0])).result
        acc = hlo.add(acc, hlo.multiply(padded, padded))
    while w > 1:
        w //= 2
        lo = hlo.slice(acc, ir.DenseI64ArrayAttr.get([0]), ir.DenseI64ArrayAttr.get([w]), ir.DenseI64ArrayAttr.get([1]))
        hi = hlo.slice(acc, ir.DenseI64ArrayAttr.get([w]), ir.DenseI64ArrayAttr.get([2 * w]),
                       ir.DenseI64ArrayAttr.get([1]))
        acc = hlo.add(lo, hi)
    total = hlo.ReshapeOp(ir.RankedTensorType.get([], f32), acc)
    total.operation.attributes[TAG] = ir.UnitAttr.get()
    return total.result


def kernel_sumsq(xs: Sequence[ir.Value]) -> ir.Value:
    """The same sum over the concatenation of `xs` (float32 or bfloat16 buffers) as one `shardopt_sumsq` call."""
    op = custom_call(sumsq_call(), list(xs), [ir.RankedTensorType.get([], ir.F32Type.get())])
    op.attributes[TAG] = ir.UnitAttr.get()
    return op.results[0]


def is_fixed_order_sum(value: ir.Value) -> bool:
    """Whether `value` is a sum of squares this module built (either form)."""
    owner = value.owner
    return not isinstance(owner, ir.Block) and TAG in owner.operation.attributes
