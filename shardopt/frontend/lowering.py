"""Lowers a flat step function to an annotated StableHLO module with Shardy shardings on every argument and
result, donation for variables, slots and the counter, and the step contract written into the IR: every argument
and result carries `shardopt.name`, `shardopt.role` and, where they apply, `shardopt.owner`, `shardopt.slot`,
`shardopt.pack` and (on packed buffers) `shardopt.members`, the names of the pack's members in order; a variable
whose state is sharded over more axes (weight-update sharding) carries `shardopt.shard_state_over` (and
`shardopt.shard_state_required` when asked per variable). Passes
learn what they need from these attributes alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxlib.mlir import ir

from shardopt import ir as sir
from shardopt.core.contract import StepContract, TensorSpec
from shardopt.core.layout import auto_mesh


@dataclass
class LoweredStep:
    """The frontend's output: StableHLO text, what each argument/result is, and jax's export of the step
    (the carrier the runtime swaps the optimized module into)."""

    module_text: str
    contract: StepContract
    exported: jax.export.Exported

    @property
    def convention(self) -> StepContract:
        """Deprecated name of `contract`."""
        return self.contract


def _sharding(mesh: Mesh, spec: TensorSpec) -> NamedSharding | None:
    return None if spec.layout is None else NamedSharding(mesh, PartitionSpec(*spec.layout))


def lower_step(fn: Callable[..., tuple[jax.Array, ...]], contract: StepContract, mesh: Mesh
               ) -> LoweredStep:
    """Traces `fn` with jax (on the Auto-axes mesh) and annotates the module for our passes.

    The trace runs outside any ambient `jax.set_mesh`: under an Explicit-axes mesh jax would type every
    intermediate with that mesh's shardings (replicated for fresh values like zeros), pin results to them and
    contradict the layouts the contract gives them.
    """
    with jax.set_mesh(None):
        return _lower_step(fn, contract, mesh)


def _lower_step(fn: Callable[..., tuple[jax.Array, ...]], contract: StepContract, mesh: Mesh) -> LoweredStep:
    mesh = auto_mesh(mesh)
    in_shardings = tuple(_sharding(mesh, a) for a in contract.args)
    out_shardings = tuple(_sharding(mesh, r) for r in contract.results)
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=contract.donated_argnums(), keep_unused=True)  # gradient buffers are unread
    avals = [jax.ShapeDtypeStruct(a.shape, np.dtype(a.dtype)) for a in contract.args]
    exported = jax.export.export(jitted, platforms=(jax.default_backend(),))(*avals)
    ctx = sir.make_ir_context()
    module = sir.parse(exported.mlir_module(), ctx)
    with ctx, ir.Location.unknown():
        annotate(module, contract)
        text = module.operation.get_asm(enable_debug_info=False)
    return LoweredStep(text, contract, exported)


def _spec_attrs(spec: TensorSpec, current: ir.Attribute | None, members: dict[str, ir.Attribute]
                ) -> dict[str, ir.Attribute]:
    attrs: dict[str, ir.Attribute] = {
        "shardopt.name": ir.StringAttr.get(spec.name),
        "shardopt.role": ir.StringAttr.get(spec.role),
    }
    for key in ("owner", "slot", "pack"):
        value = getattr(spec, key)
        if value is not None:
            attrs[f"shardopt.{key}"] = ir.StringAttr.get(value)
    if spec.pack is not None:
        attrs["shardopt.members"] = members[spec.pack]
    if spec.shard_state_over:  # weight-update sharding asked for this variable's slots (propagate-layouts)
        attrs["shardopt.shard_state_over"] = ir.ArrayAttr.get([ir.StringAttr.get(a) for a in spec.shard_state_over])
        if spec.shard_state_required:
            attrs["shardopt.shard_state_required"] = ir.BoolAttr.get(True)
    rank = len(spec.shape)
    if current is None or "@empty_mesh" in str(current):
        attrs["sdy.sharding"] = sir.sharding_attr(spec.layout if rank else (), rank)
    return attrs


def annotate(module: ir.Module, contract: StepContract) -> None:
    """Names every argument/result and gives the ones jax left unannotated an open sharding on @mesh."""
    fn = sir.main_func(module)
    if len(fn.arg_attrs) != len(contract.args):
        raise AssertionError(f"lowered @main has {len(fn.arg_attrs)} arguments, expected {len(contract.args)}")
    current_args, current_results = sir.arg_attrs(fn), sir.result_attrs(fn)
    members = {p.name: ir.ArrayAttr.get([ir.StringAttr.get(m.name) for m in p.members]) for p in contract.packs}
    sir.set_arg_attrs(fn, [_spec_attrs(s, current_args[i].get("sdy.sharding"), members)
                           for i, s in enumerate(contract.args)])
    sir.set_result_attrs(fn, [_spec_attrs(s, current_results[i].get("sdy.sharding"), members)
                              for i, s in enumerate(contract.results)])
    for op in list(module.body.operations):
        if op.operation.name == "sdy.mesh" and ir.StringAttr(op.attributes["sym_name"]).value == "empty_mesh":
            op.operation.erase()
