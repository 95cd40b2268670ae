"""`inline-calls`: inlines every `func.call` in `@main` (jaxlib's `inline` pass does not inline func.call).

jax lowers some helpers (`jnp.where`, optax pieces) to private functions; fusion needs one flat body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from jaxlib.mlir import ir

from shardopt import ir as sir
from shardopt.compat.jax_private import inline_func_call
from shardopt.passes.base import ModulePass, PassError


@dataclass(frozen=True)
class InlineCalls(ModulePass):
    """Replaces each `func.call` with a copy of its callee, until none are left."""

    NAME: ClassVar[str] = "inline-calls"

    def run(self, module: ir.Module) -> dict[str, Any]:
        funcs = {ir.StringAttr(op.attributes["sym_name"]).value: op.operation
                 for op in module.body.operations if op.operation.name == "func.func"}
        inlined = 0
        while True:
            calls = [op for op in sir.walk_ops(module.operation) if op.name == "func.call"]
            if not calls:
                break
            for call in calls:
                callee = ir.FlatSymbolRefAttr(call.attributes["callee"]).value
                if callee not in funcs:
                    raise PassError(f"func.call @{callee}: no func.func @{callee} at the top of the module")
                with ir.InsertionPoint(call), call.location:
                    results = inline_func_call(funcs[callee], list(call.operands))
                for old, new in zip(call.results, results, strict=True):
                    old.replace_all_uses_with(new)
                call.erase()
                inlined += 1
        return {"calls_inlined": inlined}


COMPOSITE_PREFIX = "shardopt."  # the frontend's kernel markers (frontend/step.py `_kernel_composite`)


def inline_composites(module: ir.Module, prefix: str = COMPOSITE_PREFIX) -> int:
    """Replaces every `stablehlo.composite` in `@main` whose name starts with `prefix` by its decomposition;
    returns how many. `lower-to-kernels` inlines what it does not lower; passes that need plain elementwise ops
    (fuse-moments) call this first, so a pipeline without `lower-to-kernels` keeps today's IR."""
    funcs = {ir.StringAttr(op.attributes["sym_name"]).value: op.operation
             for op in module.body.operations if op.operation.name == "func.func"}
    ops = [op for op in sir.walk_ops(sir.main_func(module).operation) if op.name == "stablehlo.composite"
           and ir.StringAttr(op.attributes["name"]).value.startswith(prefix)]
    for op in ops:
        inline_composite(op, funcs)
    return len(ops)


def inline_composite(op: ir.Operation, funcs: dict[str, ir.Operation]) -> None:
    """One composite replaced by a copy of its decomposition function's body."""
    callee = ir.FlatSymbolRefAttr(op.attributes["decomposition"]).value
    if callee not in funcs:
        raise PassError(f"stablehlo.composite: no func.func @{callee} (its decomposition) at the top of the module")
    with ir.InsertionPoint(op), op.location:
        results = inline_func_call(funcs[callee], list(op.operands))
    for old, new in zip(op.results, results, strict=True):
        old.replace_all_uses_with(new)
    op.erase()
