"""The whole compiler for one step: frontend lowering, the pass pipeline, then a PJRT executable.

`StepProgram` keeps every stage so users can inspect what each part of the compiler did.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
from jax.sharding import Mesh

from shardopt import ir as sir
from shardopt.frontend.convention import CallingConvention
from shardopt.frontend.lowering import LoweredStep, lower_step
from shardopt.passes.base import PassError
from shardopt.passes.pipeline import DEFAULT_PIPELINE, PipelineResult, run_pipeline
from shardopt.runtime.executable import CompiledStep


@dataclass
class StepProgram:
    """A compiled optimizer step and the IR of every stage that produced it."""

    lowered: LoweredStep
    pipeline: PipelineResult
    convention: CallingConvention
    executable: CompiledStep


def finalize_convention(module_text: str, convention: CallingConvention) -> CallingConvention:
    """The convention with the layouts the pipeline settled on; every boundary layout must be closed."""
    args, results = sir.boundary_layouts(module_text)
    for spec, lay in [*zip(convention.args, args, strict=True), *zip(convention.results, results, strict=True)]:
        if lay is None:
            raise PassError(f"{spec.name}: the pipeline left its layout open; run propagate-layouts")
    return convention.with_layouts(args, results)


def compile_step(fn: Callable[..., tuple[jax.Array, ...]], convention: CallingConvention, mesh: Mesh,
                 pipeline: Sequence[str] = DEFAULT_PIPELINE) -> StepProgram:
    """Lowers `fn`, runs `pipeline` on it and prepares the result for execution on `mesh`."""
    lowered = lower_step(fn, convention, mesh)
    result = run_pipeline(lowered.module_text, pipeline)
    final = finalize_convention(result.final_text, convention)
    executable = CompiledStep.from_module(result.final_text, final, lowered.exported, mesh)
    return StepProgram(lowered, result, final, executable)
