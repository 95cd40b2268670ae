"""Helpers of the fusion-pass tests: FileCheck runs, compiling a pipeline stage, running it on random inputs, and
reading compiled HLO (kernels, collectives, bytes per element)."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo as hlo

from shardopt import ir as sir
from shardopt.compiler import StepProgram, finalize_convention
from shardopt.opt import split_input
from shardopt.passes.pipeline import run_pipeline
from shardopt.runtime.executable import CompiledStep

FILECHECK_DIR = Path(__file__).parent / "filecheck"
FILECHECK = str(Path(sys.executable).parent / "filecheck")
COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|all-to-all|ragged-all-to-all|collective-permute|"
                        r"collective-broadcast|reduce-scatter)(?:-start)?\(")
FRONT = ("inline-calls", "propagate-layouts")


def filecheck(pass_name: str, spec: str | None = None, prefixes: tuple[str, ...] = ("CHECK",)
              ) -> tuple[int, str, list[dict[str, Any]]]:
    """Runs `spec` (default: `pass_name` without options) alone on every chunk of tests/filecheck/<pass_name>.mlir,
    in-process, and FileChecks the outputs with `prefixes`; returns FileCheck's status and stderr and every chunk's
    statistics. (tests/test_filecheck.py runs the same files through their RUN lines and `shardopt.opt`.)"""
    path = FILECHECK_DIR / f"{pass_name}.mlir"
    results = [run_pipeline(chunk, [spec or pass_name]) for chunk in chunks(pass_name)]
    output = "\n".join(r.final_text for r in results)
    proc = subprocess.run([FILECHECK, str(path), f"--check-prefixes={','.join(prefixes)}"], input=output, text=True,
                          capture_output=True, check=False)
    return proc.returncode, proc.stderr, [r.stages[-1].stats for r in results]


def adam(mesh: Mesh, packed: bool = True, **kwargs: Any) -> Any:
    """`shardopt.Adam` on `mesh`; `packed=False` keeps every variable and slot in a buffer of its own (the calling
    convention of `compile()`), so passes see one result per variable."""
    import shardopt

    opt = shardopt.Adam(mesh=mesh, **kwargs)
    if not packed:
        opt.pack_max_elements = 0
    return opt


def one_device_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:1]), ("replica",), axis_types=(AxisType.Auto,))


@dataclass
class Built:
    """One pipeline stage of a step, compiled once (XLA) and runnable."""

    step: CompiledStep
    exe: Any
    text: str

    @property
    def hlo(self) -> str:
        return self.exe.as_text()


def build(program: StepProgram, names: tuple[str, ...], stage: str, mesh: Mesh) -> Built:
    """The step compiled from the IR `stage` leaves when `names` run on `program`'s frontend module."""
    result = run_pipeline(program.lowered.module_text, names)
    text = result.stage(stage).text
    convention = finalize_convention(text, program.lowered.convention)
    step = CompiledStep.from_module(text, convention, program.lowered.exported, mesh)
    return Built(step, step.lower().compile(), text)


def random_inputs(built: Built, seed: int = 0) -> list[np.ndarray]:
    """Host inputs for `step`: gradients large enough that norm clipping is active, valid sparse row indices,
    non-negative second moments."""
    rng = np.random.default_rng(seed)
    shapes = {a.name: a.shape for a in built.step.convention.args}
    out: list[np.ndarray] = []
    for spec in built.step.convention.args:
        dtype = jnp.dtype(spec.dtype)
        if spec.role == "gradient_indices":
            out.append(rng.integers(0, shapes[spec.owner][0], spec.shape).astype(dtype))
        elif spec.role == "counter":
            out.append(np.asarray(4, dtype))
        elif spec.role == "hyperparameter":
            out.append(np.asarray(0.01, dtype))
        else:
            x = rng.normal(size=spec.shape) * (3.0 if spec.role == "gradient" else 1.0)
            if spec.name.split("/", 1)[0] in ("v", "vhat"):
                x = np.abs(x) * 1e-2
            out.append(np.asarray(x).astype(dtype))
    return out


def run(built: Built, inputs: list[np.ndarray]) -> list[np.ndarray]:
    args = [jax.device_put(x, s) for x, s in zip(inputs, built.step.in_shardings, strict=True)]
    return [np.asarray(o) for o in built.exe(*args)]


def interpret(text: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """`@main` of `text` evaluated by StableHLO's reference interpreter (exact IEEE semantics of every op, no
    compiler rewrites); sharding constraints and the mesh are dropped first (they do not change values)."""
    ctx = sir.make_ir_context()
    module = sir.parse(text, ctx)
    with ctx:
        fn = sir.main_func(module)
        for op in list(fn.regions[0].blocks[0].operations):
            if op.operation.name == "sdy.sharding_constraint":
                op.operation.results[0].replace_all_uses_with(op.operation.operands[0])
                op.operation.erase()
        for op in list(module.body.operations):
            if op.operation.name == "sdy.mesh":
                op.operation.erase()
        args = [ir.DenseElementsAttr.get(np.ascontiguousarray(x), type=t)
                for x, t in zip(inputs, fn.type.inputs, strict=True)]
        return [np.array(r) for r in hlo.eval_module(module, args)]


def normal_inputs(text: str, seed: int = 0) -> list[np.ndarray]:
    """Standard-normal float32 inputs for every argument of `@main` in `text` (all float32 in the test inputs)."""
    ctx = sir.make_ir_context()
    module = sir.parse(text, ctx)
    rng = np.random.default_rng(seed)
    with ctx:
        shapes = [list(ir.RankedTensorType(t).shape) for t in sir.main_func(module).type.inputs]
    return [np.asarray(rng.normal(size=s), np.float32) for s in shapes]


def bits(x: np.ndarray) -> np.ndarray:
    """The raw bits of `x` (so NaNs and signed zeros compare exactly)."""
    return np.ascontiguousarray(x).view(np.dtype(f"u{x.dtype.itemsize}"))


def entry(hlo: str) -> str:
    return hlo.split("\nENTRY", 1)[1]


def collectives(hlo: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in COLLECTIVE.findall(hlo):
        counts[name] = counts.get(name, 0) + 1
    return counts


def loop_kernels(hlo: str) -> list[str]:
    """The entry computation's loop-fusion kernels, one line each."""
    return [line for line in entry(hlo).splitlines() if "kind=kLoop" in line]


def bytes_per_element(built: Built, elements: int) -> float:
    return float(built.exe.cost_analysis()["bytes accessed"]) / elements


def chunks(pass_name: str) -> list[str]:
    """The chunks of tests/filecheck/<pass_name>.mlir, split as `shardopt.opt --split-input-file` splits them."""
    return split_input((FILECHECK_DIR / f"{pass_name}.mlir").read_text())
