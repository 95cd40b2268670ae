"""Lowers a flat step function to an annotated StableHLO module with Shardy shardings on every argument and
result, donation for variables, slots and the counter, and readable `shardopt.name` attributes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxlib.mlir import ir

from shardopt import ir as sir
from shardopt.frontend.convention import CallingConvention, TensorSpec
from shardopt.frontend.layout import auto_mesh


@dataclass
class LoweredStep:
    """The frontend's output: StableHLO text, what each argument/result is, and jax's export of the step
    (the carrier the runtime swaps the optimized module into)."""

    module_text: str
    convention: CallingConvention
    exported: jax.export.Exported


def _sharding(mesh: Mesh, spec: TensorSpec) -> NamedSharding | None:
    return None if spec.layout is None else NamedSharding(mesh, PartitionSpec(*spec.layout))


def lower_step(fn: Callable[..., tuple[jax.Array, ...]], convention: CallingConvention, mesh: Mesh
               ) -> LoweredStep:
    """Traces `fn` with jax (on the Auto-axes mesh) and annotates the module for our passes."""
    mesh = auto_mesh(mesh)
    in_shardings = tuple(_sharding(mesh, a) for a in convention.args)
    out_shardings = tuple(_sharding(mesh, r) for r in convention.results)
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=convention.donated_argnums(), keep_unused=True)  # gradient buffers are unread
    avals = [jax.ShapeDtypeStruct(a.shape, np.dtype(a.dtype)) for a in convention.args]
    exported = jax.export.export(jitted, platforms=(jax.default_backend(),))(*avals)
    ctx = sir.make_ir_context()
    module = sir.parse(exported.mlir_module(), ctx)
    with ctx, ir.Location.unknown():
        annotate(module, convention)
        text = module.operation.get_asm(enable_debug_info=False)
    return LoweredStep(text, convention, exported)


def _spec_attrs(spec: TensorSpec, current: ir.Attribute | None) -> dict[str, ir.Attribute]:
    attrs: dict[str, ir.Attribute] = {
        "shardopt.name": ir.StringAttr.get(spec.name),
        "shardopt.role": ir.StringAttr.get(spec.role),
    }
    if spec.owner is not None:
        attrs["shardopt.owner"] = ir.StringAttr.get(spec.owner)
    rank = len(spec.shape)
    if current is None or "@empty_mesh" in str(current):
        attrs["sdy.sharding"] = sir.sharding_attr(spec.layout if rank else (), rank)
    return attrs


def annotate(module: ir.Module, convention: CallingConvention) -> None:
    """Names every argument/result and gives the ones jax left unannotated an open sharding on @mesh."""
    fn = sir.main_func(module)
    if len(fn.arg_attrs) != len(convention.args):
        raise AssertionError(f"lowered @main has {len(fn.arg_attrs)} arguments, expected {len(convention.args)}")
    current_args, current_results = sir.arg_attrs(fn), sir.result_attrs(fn)
    sir.set_arg_attrs(fn, [_spec_attrs(s, current_args[i].get("sdy.sharding"))
                           for i, s in enumerate(convention.args)])
    sir.set_result_attrs(fn, [_spec_attrs(s, current_results[i].get("sdy.sharding"))
                              for i, s in enumerate(convention.results)])
    for op in list(module.body.operations):
        if op.operation.name == "sdy.mesh" and ir.StringAttr(op.attributes["sym_name"]).value == "empty_mesh":
            op.operation.erase()
