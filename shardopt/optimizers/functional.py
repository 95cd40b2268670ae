"""`Optimizer.compile(specs)`: a data-free compile of the step for a pytree of variable specs, returned as a
functional step (`state = step.init(params)`, `params, state = step(params, grads, state)`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shardopt.core.contract import EMA_SLOT, StepEntry
from shardopt.core.layout import Layout, as_layout, auto_mesh, default_mesh, same_mesh
from shardopt.core.packing import plan_packs
from shardopt.core.specs import VariableSpec
from shardopt.optimizers import state_sharding
from shardopt.optimizers.variables import Variable
from shardopt.runtime.functional import (
    SLOT_INIT_FROM_VARIABLE,
    SLOT_INIT_ZEROS,
    FunctionalStep,
    fill_init,
    path_name,
)


def compile_functional(opt: Any, specs: Any, scatter_gradients: bool = False
                       ) -> FunctionalStep:  # opt: an optimizers.base.Optimizer
    """Compiles the step for a pytree of `VariableSpec`s or `Variable`s, without data.

    Returns a functional step: `state = step.init(params)`, `params, state = step(params, grads, state)`.
    The optimizer's own state is not used or changed. Params stay the user's pytree; the slots of small
    variables are packed exactly as `apply_gradients` packs them (one contract for every path), so the step
    returned here, its artifact, `as_jax_function` and `as_optax` all run the fused packed update.
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, (VariableSpec, Variable)))
    if not leaves_with_path:
        raise ValueError("compile() needs at least one variable spec")
    mesh = opt.mesh
    if mesh is None:
        layouts = [leaf.layout for _, leaf in leaves_with_path if getattr(leaf, "layout", None) is not None]
        mesh = as_layout(layouts[0], None, 0).mesh if layouts else default_mesh()
    entries, names = [], []
    for path, leaf in leaves_with_path:
        if not isinstance(leaf, (VariableSpec, Variable)):
            raise TypeError(f"compile() takes VariableSpec or Variable leaves, got {type(leaf).__name__} at "
                            f"{path_name(path)}")
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        name = leaf.name if isinstance(leaf, Variable) or leaf.name else path_name(path)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"variable {name!r} has dtype {dtype}: optimizers update floating point variables")
        layout = as_layout(leaf.layout, mesh, len(shape)) or Layout.replicated(mesh, len(shape))
        layout.validate(shape, f"variable {name!r}")
        if not same_mesh(auto_mesh(layout.mesh), auto_mesh(mesh)):
            raise ValueError(f"variable {name!r} is laid out on a different mesh than the optimizer's")
        entries.append(opt._with_slot_spec(StepEntry(name, shape, str(dtype), layout.spec_tuple(), ())))
        names.append(name)
    if len(set(names)) != len(names):
        raise ValueError(f"variable names must be unique, got duplicates in {names}")
    mesh_axes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    slots = opt._pack_slots()  # as `apply_gradients` packs: only variables with exactly these slots
    # variables whose state is sharded beyond their layout stay loose (optimizers/state_sharding.py)
    packable = [(e.name, e.shape, e.dtype, e.layout) for e in entries if opt._packable(e.shape)
                and not state_sharding.is_sharded(opt.shard_state_over, e.name, e.shape, e.layout, mesh_axes)]
    packs = (plan_packs(packable, mesh_axes, opt.pack_max_elements, opt._pack_max_members())
             if slots and opt.pack_max_elements > 0 else ())
    pipeline = tuple(opt.pipeline)
    if scatter_gradients:
        if opt.shard_state_over is None:
            raise ValueError("scatter_gradients=True needs shard_state_over: only state-sharded variables take "
                             "reduce-scattered gradients")
        pipeline = state_sharding.scattered_pipeline(pipeline)
    program = opt._program(tuple(entries), packs, mesh, pipeline)
    schedule = opt._schedule()
    return FunctionalStep(
        executable=program.executable, treedef=treedef, names=tuple(names),
        slot_names=opt._entry_slots(),
        slot_init=_initial_values(opt),
        initial_learning_rate=None if schedule is not None else float(opt._learning_rate),
        optimizer_config=opt.get_config(), pipeline=pipeline, program=program,
        optimizer_class=type(opt).__name__)


def _initial_values(opt: Any) -> dict[str, str]:
    """How each slot and each optimizer-level state starts, as `FunctionalStep.slot_init` records it."""
    init: dict[str, str] = {}
    for s in opt._entry_slots():
        fill = None if s == EMA_SLOT else opt.slot_initial_value(s)
        init[s] = SLOT_INIT_FROM_VARIABLE if s == EMA_SLOT else SLOT_INIT_ZEROS if fill is None else fill_init(fill)
    for name, value in opt.optimizer_state_values().items():
        init[name] = fill_init(value)
    return init
