"""The pass pipeline: passes named in MLIR's textual spelling (`fuse-moments{unpacked=true}`, see spec.py), each
run as a Python pass inside MLIR's `PassManager`, with the IR and statistics of every stage kept for `inspect`.

Pass modules are imported only when a pipeline names them (registry.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from jaxlib.mlir import ir, passmanager

from shardopt import ir as sir
from shardopt.core.records import PipelineResult, Stage
from shardopt.passes.base import ModulePass, PassError
from shardopt.passes.registry import REGISTRY, build_pipeline, register
from shardopt.passes.spec import split_pipeline

# fuse-moments fuses the members of packed state (frontend/packing.py); variables returned in buffers of their own
# are left alone, because XLA:CPU loses on them (fuse-moments{unpacked=true} measures that; see its module
# docstring). fuse-moments runs first so that fuse-clipping can take a global norm over a pack's gradient in one
# reduction.
#
# lower-to-kernels runs right after inline-calls: it replaces the update of each variable kept in buffers of its
# own by the compiled kernel's custom call where one exists, and inlines the frontend's composite everywhere else,
# so every later pass sees plain StableHLO.
DEFAULT_PIPELINE: tuple[str, ...] = ("inline-calls", "lower-to-kernels", "propagate-layouts", "fuse-moments",
                                     "fuse-clipping", "fixed-order-sums", "cleanup")

PipelineSpec = str | Sequence[str | ModulePass]  # "a,b{x=1}", ("a", "b{x=1}") or pass instances

__all__ = ["DEFAULT_PIPELINE", "REGISTRY", "PassError", "PipelineResult", "PipelineSpec", "Stage", "build_pipeline",
           "register", "run_pipeline", "split_pipeline"]


def _as_mlir_pass(p: ModulePass, module: ir.Module, stats: dict[str, Any]):
    def run(op: ir.Operation, pass_: Any) -> None:
        stats.update(p.run(module))

    return run


def run_pipeline(module_text: str, names: PipelineSpec = DEFAULT_PIPELINE, keep_ir: bool = True) -> PipelineResult:
    """Runs the pipeline's passes in order on a copy of `module_text`; raises PassError with the pass's message.

    `names` is a textual pipeline ("inline-calls,fuse-moments{unpacked=true}"), or a sequence of pass specs and/or
    pass instances; every spec is parsed (and every named pass imported) before any pass runs.
    """
    passes = build_pipeline(names)
    ctx = sir.make_ir_context()
    module = sir.parse(module_text, ctx)
    stages = [Stage("frontend", module_text)]
    with ctx, ir.Location.unknown():
        for k, p in enumerate(passes):
            stats: dict[str, Any] = {}
            pm = passmanager.PassManager("builtin.module")
            pm.add(_as_mlir_pass(p, module, stats), name=f"shardopt-{p.NAME}")
            pm.enable_verifier(True)
            t0 = time.perf_counter()
            pm.run(module.operation)
            elapsed = time.perf_counter() - t0
            last = k == len(passes) - 1
            text = module.operation.get_asm(enable_debug_info=False) if keep_ir or last else ""
            stages.append(Stage(p.NAME, text, stats, elapsed, spec=p.spec()))
    return PipelineResult(stages)
