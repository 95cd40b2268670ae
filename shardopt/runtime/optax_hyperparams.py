"""`shardopt.inject_hyperparams`: optax's `inject_hyperparams` for a compiled shardopt step.

`optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)` keeps the learning rate in the optimizer state
(`state.hyperparams['learning_rate']`), so a user changes it between steps, or passes a schedule of the step
count. optax does it by calling the factory again at every `update` with the (traced) values; a shardopt step is
compiled once, so calling `shardopt.Adam(traced_lr)` inside `jax.jit` cannot work. Instead this reuses what the
step contract already has: when the learning rate is a number, it is a runtime scalar input of the compiled step
(the `learning_rate` HYPERPARAMETER argument, the one `opt.learning_rate = x` feeds on the stateful path). The
wrapper feeds that input from `state.hyperparams`, so changing it never recompiles.

Only the learning rate is injectable: beta_1, epsilon, weight_decay, ... are constants of the compiled IR (the
fusion and kernel passes read them as attributes); a new value for them means a new optimizer.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from shardopt.runtime.jax_embed import ShardoptState, as_optax

LEARNING_RATE = "learning_rate"
INJECTABLE = (LEARNING_RATE,)


class InjectedState(NamedTuple):
    """The compiled step's state inside `inject_hyperparams` (`inner_state`): a `ShardoptState` without its
    learning rate, whose one place is `hyperparams` (so `optax.tree_utils.tree_get(state, 'learning_rate')`
    finds exactly one)."""

    buffers: dict[str, Any]
    iterations: Any


def _is_schedule(value: Any) -> bool:
    """A callable of the step count (optax's convention inside `inject_hyperparams`), not an array."""
    return callable(value) and not isinstance(value, (np.ndarray, np.generic)) and not hasattr(value, "dtype")


def _refuse_scheduled_constants(cls: type, bound: inspect.BoundArguments) -> None:
    """A schedule given for a hyperparameter other than the learning rate: say why it cannot be injected."""
    params = inspect.signature(cls).parameters
    for name, value in bound.arguments.items():
        default = params[name].default if name in params else None
        numeric = isinstance(default, numbers.Real) and not isinstance(default, bool)
        if name != LEARNING_RATE and numeric and _is_schedule(value):
            raise ValueError(
                f"shardopt.inject_hyperparams: only {list(INJECTABLE)} can be injected or scheduled; `{name}` is a "
                "constant of the compiled step (its passes read it from the IR). Pass a number, and build a new "
                "optimizer to change it.")


def inject_hyperparams(optimizer_class: type, hyperparam_dtype: Any = jnp.float32) -> Callable[..., Any]:
    """optax's `inject_hyperparams` for a shardopt optimizer class: `shardopt.inject_hyperparams(shardopt.Adam)(
    learning_rate=1e-3, beta_1=0.9)` is an optax `GradientTransformationExtraArgs` whose state is optax's
    `InjectStatefulHyperparamsState`; `state.hyperparams['learning_rate']` is the learning rate of the next step.

    The learning rate may be a number (change it between steps by assigning to `state.hyperparams`, e.g.
    `opt.opt_state.hyperparams['learning_rate'][...] = 3e-4` in `nnx.Optimizer`) or a schedule: a callable of the
    step count, as in optax (an optax schedule, a `shardopt.schedules` one, or an optax `StatefulSchedule`).
    Either way it reaches the compiled step as its runtime `learning_rate` input, so nothing recompiles. Every
    other argument goes to `optimizer_class` as it is and is compiled into the step.

    Args:
      optimizer_class: a shardopt optimizer class, e.g. `shardopt.Adam` (any callable with its signature).
      hyperparam_dtype: the dtype the learning rate is kept in; float32, the step's input dtype, by default
        (optax's default, the params' widest dtype, would round it to bfloat16 for bfloat16 params).
    Returns:
      A function taking `optimizer_class`'s arguments and returning the transformation; its `init.steps` is the
      compiled-step cache of `shardopt.as_optax` (one entry per params signature).
    """
    import optax

    if not callable(optimizer_class) or isinstance(optimizer_class, optax.GradientTransformation):
        raise TypeError("shardopt.inject_hyperparams takes a shardopt optimizer class (e.g. shardopt.Adam), got "
                        f"{optimizer_class!r}")
    signature = inspect.signature(optimizer_class)
    if LEARNING_RATE not in signature.parameters:
        raise TypeError(f"shardopt.inject_hyperparams: {optimizer_class!r} has no `learning_rate` argument")

    def make(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        _refuse_scheduled_constants(optimizer_class, bound)
        lr = bound.arguments[LEARNING_RATE]
        schedule = None
        if isinstance(lr, optax.schedules.StatefulSchedule):
            schedule = lr
        elif _is_schedule(lr):
            schedule = optax.schedules.WrappedSchedule(lr)
        # A constant learning rate makes it the step's runtime input (a schedule would be compiled in); the
        # constructor also validates it (a number: finite, a scalar).
        bound.arguments[LEARNING_RATE] = 0.001 if schedule is not None else lr
        optimizer = optimizer_class(*bound.args, **bound.kwargs)
        inner = as_optax(optimizer)
        constant = None if schedule is not None else jnp.asarray(optimizer.learning_rate, hyperparam_dtype)

        def init_fn(params: Any) -> Any:
            states = {LEARNING_RATE: schedule.init()} if schedule is not None else {}
            value = schedule(states[LEARNING_RATE]) if schedule is not None else constant
            full = inner.init(params)
            # Replicated on the step's mesh, where the results of a jitted update land: the user's jit then sees
            # the same input shardings at every step and does not retrace.
            count, hyperparams, states = jax.device_put(
                (jnp.zeros([], jnp.int32), {LEARNING_RATE: jnp.asarray(value, hyperparam_dtype)}, states),
                full.learning_rate.sharding)
            return optax.InjectStatefulHyperparamsState(
                count=count, hyperparams=hyperparams, hyperparams_states=states,
                inner_state=InjectedState(full.buffers, full.iterations))

        def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
            extra = sorted(set(state.hyperparams) - set(INJECTABLE))
            if extra:
                raise ValueError(
                    f"shardopt.inject_hyperparams: state.hyperparams has {extra}; only {list(INJECTABLE)} is a "
                    "runtime input of the compiled step (the others are constants of its IR): build a new "
                    "optimizer to change them")
            states = state.hyperparams_states
            if schedule is not None:
                value = schedule(states[LEARNING_RATE], **extra_args)
                states = {LEARNING_RATE: schedule.update(states[LEARNING_RATE], **extra_args)}
            else:
                value = state.hyperparams[LEARNING_RATE]
            value = jnp.asarray(value, hyperparam_dtype)
            inner_state = ShardoptState(state.inner_state.buffers, state.inner_state.iterations,
                                        jnp.asarray(value, jnp.float32))
            updates, inner_state = inner.update(updates, inner_state, params)
            return updates, optax.InjectStatefulHyperparamsState(
                count=optax.safe_increment(state.count), hyperparams={LEARNING_RATE: value},
                hyperparams_states=states, inner_state=InjectedState(inner_state.buffers, inner_state.iterations))

        init_fn.steps = inner.init.steps  # type: ignore[attr-defined]
        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    make.__signature__ = signature  # type: ignore[attr-defined]
    make.__name__ = f"inject_hyperparams({getattr(optimizer_class, '__name__', 'optimizer')})"
    make.__doc__ = inject_hyperparams.__doc__
    return make


__all__ = ["INJECTABLE", "InjectedState", "inject_hyperparams"]
