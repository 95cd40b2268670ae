"""`Optimizer.compile(specs)`: a data-free compile of the step for a pytree of variable specs, returned as a
functional step (`state = step.init(params)`, `params, state = step(params, grads, state)`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from shardopt.frontend.layout import Layout, as_layout, auto_mesh, default_mesh, same_mesh
from shardopt.frontend.step import EMA_SLOT, StepEntry
from shardopt.frontend.variables import Variable, VariableSpec
from shardopt.runtime.functional import SLOT_INIT_FROM_VARIABLE, SLOT_INIT_ZEROS, FunctionalStep, path_name

if TYPE_CHECKING:
    from shardopt.frontend.optimizer import Optimizer


def compile_functional(opt: Optimizer, specs: Any) -> FunctionalStep:
    """Compiles the step for a pytree of `VariableSpec`s or `Variable`s, without data.

    Returns a functional step: `state = step.init(params)`, `params, state = step(params, grads, state)`.
    The optimizer's own state is not used or changed; variables and slots stay one buffer each (the functional
    step's params and state are pytrees of per-variable arrays).
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
        spec = tuple(layout.to_partition_spec())
        entries.append(StepEntry(name, shape, str(dtype), spec + (None,) * (len(shape) - len(spec)),
                                 opt._entry_slots()))
        names.append(name)
    if len(set(names)) != len(names):
        raise ValueError(f"variable names must be unique, got duplicates in {names}")
    saved_mesh, opt.mesh = opt.mesh, mesh
    try:
        program = opt._program(tuple(entries))
    finally:
        opt.mesh = saved_mesh
    schedule = opt._schedule()
    return FunctionalStep(
        executable=program.executable, treedef=treedef, names=tuple(names),
        slot_names=opt._entry_slots(),
        slot_init={s: (SLOT_INIT_FROM_VARIABLE if s == EMA_SLOT else SLOT_INIT_ZEROS) for s in opt._entry_slots()},
        initial_learning_rate=None if schedule is not None else float(opt._learning_rate),
        optimizer_config=opt.get_config(), pipeline=tuple(opt.pipeline), program=program,
        optimizer_class=type(opt).__name__)
