"""The pass pipeline: a list of pass names, each run as a Python pass inside MLIR's `PassManager`, with the IR
and statistics of every stage kept for `inspect`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from jaxlib.mlir import ir, passmanager

from shardopt import ir as sir
from shardopt.core.records import PipelineResult, Stage
from shardopt.passes.base import Pass, PassError
from shardopt.passes.cleanup import Cleanup
from shardopt.passes.fuse_clipping import FuseClipping
from shardopt.passes.fuse_moments import FuseMoments, FuseMomentsUnpacked
from shardopt.passes.inline_calls import InlineCalls
from shardopt.passes.propagate_layouts import PropagateLayouts

REGISTRY: dict[str, type] = {
    p.NAME: p for p in (PropagateLayouts, InlineCalls, FuseClipping, FuseMoments, FuseMomentsUnpacked, Cleanup)
}
# fuse-moments fuses the members of packed state (frontend/packing.py); variables returned in buffers of their own
# are left alone, because XLA:CPU loses on them (fuse-moments-unpacked measures that; see its module docstring).
# fuse-moments runs first so that fuse-clipping can take a global norm over a pack's gradient in one reduction.
DEFAULT_PIPELINE: tuple[str, ...] = ("inline-calls", "propagate-layouts", "fuse-moments", "fuse-clipping", "cleanup")


def register(pass_cls: type) -> type:
    """Adds a pass class to the registry under its NAME (usable as a decorator)."""
    REGISTRY[pass_cls.NAME] = pass_cls
    return pass_cls


def _as_mlir_pass(p: Pass, module: ir.Module, stats: dict[str, Any]):
    def run(op: ir.Operation, pass_: Any) -> None:
        stats.update(p.run(module))

    return run


def run_pipeline(module_text: str, names: Sequence[str] = DEFAULT_PIPELINE, keep_ir: bool = True
                 ) -> PipelineResult:
    """Runs the named passes in order on a copy of `module_text`; raises PassError with the pass's message."""
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise PassError(f"unknown pass(es) {unknown}; known: {sorted(REGISTRY)}")
    ctx = sir.make_ir_context()
    module = sir.parse(module_text, ctx)
    stages = [Stage("frontend", module_text)]
    with ctx, ir.Location.unknown():
        for name in names:
            p = REGISTRY[name]()
            stats: dict[str, Any] = {}
            pm = passmanager.PassManager("builtin.module")
            pm.add(_as_mlir_pass(p, module, stats), name=f"shardopt-{name}")
            pm.enable_verifier(True)
            t0 = time.perf_counter()
            pm.run(module.operation)
            elapsed = time.perf_counter() - t0
            text = module.operation.get_asm(enable_debug_info=False) if keep_ir or name == names[-1] else ""
            stages.append(Stage(name, text, stats, elapsed))
        if not keep_ir:
            stages[-1].text = module.operation.get_asm(enable_debug_info=False)
    return PipelineResult(stages)
