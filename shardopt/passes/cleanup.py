"""`cleanup`: MLIR's canonicalize, CSE and symbol DCE, which remove what the other passes left dead."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from jaxlib.mlir import ir, passmanager

from shardopt import ir as sir
from shardopt.passes.base import ModulePass

TEXTUAL = "builtin.module(canonicalize,cse,symbol-dce)"


@dataclass(frozen=True)
class Cleanup(ModulePass):
    """Standard cleanup; reports the op count before and after."""

    NAME: ClassVar[str] = "cleanup"

    def run(self, module: ir.Module) -> dict[str, Any]:
        before = sum(sir.op_counts(module).values())
        passmanager.PassManager.parse(TEXTUAL).run(module.operation)
        after = sum(sir.op_counts(module).values())
        return {"ops_before": before, "ops_after": after}
