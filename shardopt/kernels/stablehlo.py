"""Emitting a kernel's `stablehlo.custom_call` from a pass, with the attributes `jax.ffi.ffi_call` lowers to.

    with ctx, ir.Location.unknown(ctx), ir.InsertionPoint(before_op):
        op = custom_call(adam_call(beta_1=0.9, beta_2=0.999), [p, m, v, alpha, eps, *grads])
        # op.results: new p, m, v (aliasing operands 0, 1, 2)

The module must then be compiled in a process where `shardopt.kernels.available(...)` is true (the target is
registered with XLA when the library loads); otherwise XLA fails with an unknown custom-call target.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo as hlo

from shardopt.kernels.calls import KernelCall


def _attr(value: Any) -> ir.Attribute:
    if isinstance(value, (bool, np.bool_)):
        return ir.BoolAttr.get(bool(value))
    if isinstance(value, np.float32):
        return ir.FloatAttr.get(ir.F32Type.get(), float(value))
    if isinstance(value, (int, np.integer)):
        return ir.IntegerAttr.get(ir.IntegerType.get_signless(64), int(value))
    raise TypeError(f"no custom-call attribute for {value!r}")


def _layout(t: ir.Type) -> ir.Attribute:
    rank = ir.RankedTensorType(t).rank
    return ir.DenseIntElementsAttr.get(np.arange(rank - 1, -1, -1, dtype=np.int64).reshape(rank),
                                       type=ir.IndexType.get())


def custom_call(call: KernelCall, operands: Sequence[ir.Value], result_types: Sequence[ir.Type] | None = None
                ) -> ir.Operation:
    """The custom call of `call` on `operands` (named operands in `call.operands` order, then the gradients).

    Results default to the types of the state operands they alias. Same attributes as jax 0.10.2's
    `ffi_call` lowering (mlir.custom_call with a dict backend config): api_version 1 with the attributes in
    `mhlo.backend_config`, default (major-to-minor) layouts, and `output_operand_aliases`.
    """
    operands = list(operands)
    if len(operands) < len(call.operands):
        raise ValueError(f"{call.target} needs operands {call.operands} before the gradients")
    aliases = call.aliases
    if result_types is None:
        result_types = [operands[i].type for i in sorted(aliases, key=aliases.get)]
    result_types = list(result_types)
    attributes = {
        "call_target_name": ir.StringAttr.get(call.target),
        # has_side_effect false, api_version 1 and no called computations are the defaults (not printed).
        "backend_config": ir.StringAttr.get(""),
        "output_operand_aliases": ir.ArrayAttr.get([
            hlo.OutputOperandAlias.get(output_tuple_indices=[out] if len(result_types) > 1 else [],
                                       operand_index=operand, operand_tuple_indices=[])
            for operand, out in aliases.items()
        ]),
        "operand_layouts": ir.ArrayAttr.get([_layout(v.type) for v in operands]),
        "result_layouts": ir.ArrayAttr.get([_layout(t) for t in result_types]),
    }
    op = hlo.CustomCallOp.build_generic(results=result_types, operands=operands, attributes=attributes)
    op.operation.attributes["mhlo.backend_config"] = ir.DictAttr.get(
        {k: _attr(v) for k, v in call.attributes.items()})
    return op.operation
