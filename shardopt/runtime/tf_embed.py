"""A compiled step applied to TensorFlow variables through XlaCallModule.

The same artifact that jax runs (the Exported carrying our optimized module) runs in TF: `StepModule` holds the
optimizer state in its own `tf.Variable`s and its `apply(grads)` is a `tf.function` that reads the model's
variables and the state, calls the module once, and assigns every result back. It is a `tf.Module`, so the
state is tracked and a model that holds it survives `tf.saved_model.save` / `load` (the module bytes are
embedded in the saved graph; shardopt is not needed to run the loaded model).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from shardopt.compat.tf_private import call_module
from shardopt.core.contract import COUNTER, GRADIENT, HYPERPARAMETER, VARIABLE
from shardopt.core.errors import StepInputError
from shardopt.core.specs import VariableSpec
from shardopt.runtime.functional import FunctionalStep, load


def load_step(artifact: FunctionalStep | str | os.PathLike[str], mesh: Any = None) -> FunctionalStep:
    """A FunctionalStep as is, or one read from an artifact file with `shardopt.load`."""
    if isinstance(artifact, FunctionalStep):
        return artifact
    if isinstance(artifact, (str, os.PathLike)):
        return load(artifact, mesh=mesh if mesh is not None else _artifact_mesh(artifact))
    raise TypeError(f"expected a compiled step (FunctionalStep) or an artifact path, got {type(artifact).__name__}")


def _artifact_mesh(path: str | os.PathLike[str]) -> Any:
    """A jax mesh of the artifact's shape over this process's first devices (TF runs the module on its own
    device; jax only needs a mesh of the right shape to hold the step). None when there are too few devices:
    `shardopt.load` then says so."""
    import jax
    from jax.sharding import AxisType

    from shardopt.runtime.container import read_manifest

    axes = [(str(n), int(k)) for n, k in read_manifest(path)["mesh"]["axes"]]
    need = int(np.prod([k for _, k in axes]))
    devices = jax.devices()
    if len(devices) < need:
        return None
    return jax.make_mesh([k for _, k in axes], [n for n, _ in axes], axis_types=(AxisType.Auto,) * len(axes),
                         devices=devices[:need])


def _var_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./-]", "_", name)


def variable_specs(variables: Sequence[tf.Variable]) -> list[VariableSpec]:
    """`VariableSpec`s for a list of TF variables (e.g. `model.trainable_variables`), to compile a step whose
    parameter order is that list's order. Names come from the variables when they are unique."""
    names = [getattr(v, "path", None) or v.name.split(":")[0] for v in variables]
    unique = len(set(names)) == len(names)
    return [VariableSpec(tuple(v.shape), np.dtype(v.dtype.as_numpy_dtype), None, n if unique else None)
            for v, n in zip(variables, names, strict=True)]


class StepModule(tf.Module):
    """The optimizer state of a compiled step as TF variables, and the step as a `tf.function`.

    Every state argument of the step contract (packed slot buffers, loose slots, gradient buffers, the counter,
    the learning rate) is one `tf.Variable` in `self.buffers`, keyed by its contract name and initialised as
    `step.init` does; the model's variables are the contract's variables, in order.

    Args:
      step: a compiled step (`Optimizer.compile(...)`) or the path of a saved artifact.
      variables: the model's `tf.Variable`s, a nest whose flattening gives the step's parameter order
        (`step.names`), e.g. `model.trainable_variables` for a step compiled from `variable_specs` of it.
      jit_compile: passed to the `tf.function` (`None`: TF's default; XlaCallModule is XLA either way).
      make_variable: `(name, initial numpy value) -> tf.Variable` for the slot and gradient buffers (default a
        plain `tf.Variable`; the tf-keras bridge makes them the optimizer's own variables, so tf-keras saves them).
    """

    def __init__(self, step: FunctionalStep | str | os.PathLike[str], variables: Any, *,
                 jit_compile: bool | None = None, name: str | None = None, mesh: Any = None,
                 make_variable: Any = None):
        super().__init__(name=name or "shardopt_step")
        step = load_step(step, mesh)
        conv = step.contract
        flat = tf.nest.flatten(variables)
        if len(flat) != len(step.names):
            raise StepInputError(f"the step updates {len(step.names)} variables {list(step.names)}, got "
                                 f"{len(flat)}")
        for name_, v in zip(step.names, flat, strict=True):
            spec = conv.arg(name_)
            if not isinstance(v, tf.Variable):
                raise TypeError(f"{name_}: expected a tf.Variable, got {type(v).__name__}")
            if tuple(v.shape) != spec.shape or np.dtype(v.dtype.as_numpy_dtype) != np.dtype(spec.dtype):
                raise StepInputError(f"{name_}: the step expects {spec.dtype}{list(spec.shape)}, the variable "
                                     f"{v.name} is {v.dtype.name}{list(v.shape)}")
        # TF's XlaCallModule cannot call the compiled kernels jax registers: it runs the portable module
        portable = step.executable.portable
        self._exported = (portable or step.executable).exported
        self._arg_roles = tuple((a.role, a.name) for a in conv.args)
        self._result_roles = tuple((r.role, r.name) for r in conv.results)
        self.model_variables = list(flat)
        self._names = tuple(step.names)
        self._step = step
        initial = step.init(jax_values(step, flat))
        plain = lambda k, v: tf.Variable(v, trainable=False, name=_var_name(k))
        roles = {a.name: a.role for a in conv.state}
        self.buffers = {k: (plain if make_variable is None or roles[k] in (COUNTER, HYPERPARAMETER) else make_variable)(
            k, np.asarray(v)) for k, v in initial.items()}
        # A schedule's learning rate is only a result (the rate the last step used, 0 before the first step).
        if not step.has_learning_rate_input:
            lr = [r for r in conv.results if r.role == HYPERPARAMETER][0]
            self.buffers[lr.name] = tf.Variable(np.zeros((), np.dtype(lr.dtype)), trainable=False,
                                              name="learning_rate")
        self.iterations = self.buffers["iterations"]
        self.learning_rate = self.buffers["learning_rate"]
        signature = tf.nest.map_structure(lambda v: tf.TensorSpec(v.shape, v.dtype), variables)
        self.apply = tf.function(self._apply, input_signature=[signature], jit_compile=jit_compile,
                                 autograph=False)

    def _value(self, role: str, name: str) -> tf.Variable:
        return self.model_variables[self._names.index(name)] if role == VARIABLE else self.buffers[name]

    def _apply(self, grads: Any) -> tf.Tensor:
        """One step: XlaCallModule on (variables, grads, state), then every result assigned back."""
        flat_grads = iter(tf.nest.flatten(grads))
        args = [next(flat_grads) if role == GRADIENT else self._value(role, name).read_value()
                for role, name in self._arg_roles]
        outs = call_module(args, self._exported)
        for (role, name), value in zip(self._result_roles, outs, strict=True):
            self._value(role, name).assign(value)
        return self.iterations.read_value()

    def __call__(self, grads: Any) -> tf.Tensor:
        """`apply(grads)`, with `tf.IndexedSlices` gradients made dense first; returns the new `iterations`."""
        dense = tf.nest.map_structure(
            lambda g: tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g, grads)
        return self.apply(dense)

    def state(self) -> dict[str, Any]:
        """The optimizer state as numpy: `{"slots": {slot: [per variable]}, "iterations", "learning_rate"}`."""
        return {"slots": self.slots(), "iterations": self.iterations.numpy(),
                "learning_rate": self.learning_rate.numpy()}

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state as numpy, keyed by the step contract's names (packed buffers as they are)."""
        return {k: v.numpy() for k, v in self.buffers.items()}

    def slots(self) -> dict[str, list[np.ndarray | None]]:
        """Each slot per variable (cut out of the packed buffers), in the step's variable order; None where a
        variable has no such slot (Adafactor's factored `r`/`c` for a vector), so every list lines up with the
        variables."""
        state = {k: v.numpy() for k, v in self.buffers.items() if k in self._step.state_names()}
        trees = self._step.slots(state)
        return {s: [None if x is None else np.asarray(x) for x in jax_leaves(t, keep_none=True)]
                for s, t in trees.items()}


def jax_values(step: FunctionalStep, variables: list[tf.Variable]) -> Any:
    """The TF variables' values as numpy, in the step's params structure (for `step.init`)."""
    import jax

    return jax.tree_util.tree_unflatten(step.treedef, [v.numpy() for v in variables])


def jax_leaves(tree: Any, keep_none: bool = False) -> list[Any]:
    import jax

    return jax.tree_util.tree_leaves(tree, is_leaf=(lambda x: x is None) if keep_none else None)


def step_function(artifact: FunctionalStep | str | os.PathLike[str], variables: Any, *,
                  jit_compile: bool | None = None, mesh: Any = None) -> StepModule:
    """The compiled step as a TF callable over `variables`: `fn(grads)` applies one step and returns the counter.

    The result is a `StepModule` (a `tf.Module` holding the optimizer state) whose `apply` is the `tf.function`
    that runs the step; call it eagerly or from your own `tf.function` (`jit_compile` on or off). Keep it
    reachable from what you save (e.g. `root.optimizer = fn`) so its state is saved with the model.
    """
    return StepModule(artifact, variables, jit_compile=jit_compile, mesh=mesh)


__all__ = ["StepModule", "load_step", "step_function", "variable_specs"]
