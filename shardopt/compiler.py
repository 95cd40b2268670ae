"""The one entry point that compiles a step, for every caller (the stateful optimizer, `compile()`, the CLI, the
benchmarks): contract, frontend lowering, the pass pipeline, then a PJRT executable.

`StepProgram` keeps every stage so users can inspect what each part of the compiler did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jax.sharding import Mesh

from shardopt import ir as sir
from shardopt import kernels
from shardopt.core.contract import StepContract, StepEntry, build_contract
from shardopt.core.errors import PassError
from shardopt.core.packing import PackGroup
from shardopt.core.records import PipelineResult
from shardopt.frontend.lowering import LoweredStep, lower_step
from shardopt.frontend.step import UpdateRule, make_step_fn
from shardopt.passes.pipeline import DEFAULT_PIPELINE, run_pipeline
from shardopt.runtime.executable import CompiledStep


@dataclass
class StepProgram:
    """A compiled optimizer step and the IR of every stage that produced it."""

    lowered: LoweredStep
    pipeline: PipelineResult
    contract: StepContract
    executable: CompiledStep

    @property
    def convention(self) -> StepContract:
        """Deprecated name of `contract`."""
        return self.contract


def finalize_contract(module_text: str, contract: StepContract) -> StepContract:
    """The contract with the layouts the pipeline settled on; every boundary layout must be closed."""
    args, results = sir.boundary_layouts(module_text)
    for spec, lay in [*zip(contract.args, args, strict=True), *zip(contract.results, results, strict=True)]:
        if lay is None:
            raise PassError(f"{spec.name}: the pipeline left its layout open; run propagate-layouts")
    return contract.with_layouts(args, results)


finalize_convention = finalize_contract  # the name before the step contract


def compile_step(rule: UpdateRule, entries: Sequence[StepEntry], mesh: Mesh, *, schedule: Any | None = None,
                 packs: tuple[PackGroup, ...] = (), slot_names: tuple[str, ...] = (),
                 pipeline: Sequence[str] = DEFAULT_PIPELINE) -> StepProgram:
    """Compiles the step of `rule` for `entries` on `mesh`: the learning rate is `schedule` (compiled in) or a
    runtime input; the slots of `packs`' members live packed."""
    mesh_axes = tuple(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    specs = getattr(rule, "optimizer_state_specs", None)  # (name, shape, dtype[, layout]) of state not float32[]
    if specs is not None:
        state = tuple(specs(list(entries)))
    else:
        init = getattr(rule, "optimizer_state_values", getattr(rule, "optimizer_state_init", dict))()
        state = tuple((n, (), "float32") for n in init)
    contract = build_contract(list(entries), mesh_axes, has_lr_input=schedule is None, packs=packs,
                              slot_names=slot_names, optimizer_state=state)
    fn = make_step_fn(rule, contract, list(entries), schedule)
    lowered = lower_step(fn, contract, mesh)
    result = run_pipeline(lowered.module_text, pipeline)
    final = finalize_contract(result.final_text, contract)
    executable = CompiledStep.from_module(result.final_text, final, lowered.exported, mesh)
    if kernels.module_kernels(result.final_text):
        # The same step without compiled kernels, for where they cannot run (TF's XlaCallModule, a process or
        # machine without the library): artifacts store it beside the kernel module and fall back to it.
        # Built when first needed (saving an artifact, TF): its pipeline costs as much as the kernel step's.
        def portable_step() -> CompiledStep:
            portable = run_pipeline(lowered.module_text, [_without_kernels(p) for p in pipeline], keep_ir=False)
            if finalize_contract(portable.final_text, contract) != final:
                raise PassError("the portable step's layouts differ from the kernel step's (a bug in the pipeline)")
            return CompiledStep.from_module(portable.final_text, final, lowered.exported, mesh)

        executable.defer_portable(portable_step)
    return StepProgram(lowered, result, final, executable)


def _without_kernels(spec: str) -> str:
    """`spec` with `lower-to-kernels` turned off (its composites are inlined instead)."""
    return "lower-to-kernels{enabled=false}" if spec.split("{", 1)[0].strip() == "lower-to-kernels" else spec


__all__ = ["StepProgram", "compile_step", "finalize_contract"]
