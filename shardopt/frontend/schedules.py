"""Learning-rate schedules with tf-keras 2.21 semantics, traceable inside ``jax.jit``.

The formulas follow ``tf_keras.optimizers.schedules`` (and Keras 3's) op for op in float32: called eagerly a
schedule gives tf-keras's learning rate bit for bit; under ``jax.jit`` XLA's fusion may move the last bit
(see ``_f32`` for the rewrite that would do worse). ``serialize`` emits exactly tf-keras's dict, so configs
move freely between shardopt, tf-keras and Keras 3.

Differences from tf-keras, all deliberate (see ``adam-semantics.md``):

* ``decay_steps`` / ``first_decay_steps`` must be > 0 (tf-keras gives NaN or 0 instead).
* ``PiecewiseConstantDecay`` rejects decreasing boundaries at construction (tf-keras fails at call
  time on the steps where two intervals overlap) and returns float32 (tf-keras: int32 for int values).
* The result is always float32 (tf-keras gives float64 for an ``np.float64`` initial learning rate).
* ``deserialize`` raises ValueError for an unknown class name (tf-keras and Keras 3 return the name string).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LearningRateSchedule", "ExponentialDecay", "PiecewiseConstantDecay", "PolynomialDecay", "InverseTimeDecay",
    "CosineDecay", "CosineDecayRestarts", "deserialize", "is_schedule", "serialize",
]

_MODULE = "keras.optimizers.schedules"
_PI = np.float32(math.pi)


def _f32(value: float) -> jax.Array:
    """A float32 constant that XLA may not rewrite around.

    Under ``jax.jit`` XLA turns ``x / c`` for a constant ``c`` into ``x * (1/c)``, which is off by an ulp:
    Keras 3's ``PolynomialDecay(0.1, 13, power=0.5)`` then gives ``(1 - 13 * (1/13)) ** 0.5 = NaN`` after
    step 13. Behind an optimization barrier the constant is opaque, so jitted values equal eager tf-keras's.
    """
    return jax.lax.optimization_barrier(jnp.float32(value))


def _plain(value: Any) -> Any:
    """Turn a numpy / concrete jax scalar into the Python scalar it holds; leave anything else alone."""
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray | jax.Array) and value.ndim == 0):
        return value.item()
    return value


def _number(arg: str, value: Any) -> int | float:
    """Check that an argument is a real Python number (numpy scalars accepted) and return it plain."""
    value = _plain(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"Argument `{arg}` must be a Python number. Received: {arg}={value!r}")
    return value


def _numbers(arg: str, values: Sequence[Any]) -> list[int | float] | tuple[int | float, ...]:
    """``_number`` of each element; a tuple stays a tuple (as in tf-keras's config), anything else is a list."""
    out = [_number(arg, v) for v in values]
    return tuple(out) if isinstance(values, tuple) else out


def _positive(arg: str, value: Any) -> int | float:
    """Check a step count that the schedule divides by: it must be > 0 (NaN is rejected too)."""
    value = _number(arg, value)
    if not value > 0:
        raise ValueError(f"Argument `{arg}` must be > 0. Received: {arg}={value!r}")
    return value


def _check_step(step: Any) -> Any:
    """Reject steps that are not numbers; a float step is accepted (tf-keras and Keras 3 cast it to float32)."""
    if isinstance(step, bool | np.bool_):
        raise TypeError(f"The schedule step must be a number, not a bool. Received: {step!r}")
    if isinstance(step, int | np.integer | float | np.floating):
        return step
    dtype = getattr(step, "dtype", None)
    if dtype is None or not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise TypeError(f"The schedule step must be an integer or float scalar or array. Received: {step!r}")
    return step


def _float_step(step: Any) -> jax.Array:
    """``float32(step)``, rounded as tf.cast rounds, without overflowing a Python int into int32 first."""
    step = _check_step(step)
    if isinstance(step, int | np.integer | float | np.floating | np.ndarray):
        return jnp.asarray(np.asarray(step).astype(np.float32))
    return jnp.asarray(step).astype(jnp.float32)


class LearningRateSchedule:
    """Base of all schedules: a serializable function from the optimizer step to a float32 learning rate."""

    def __call__(self, step: Any) -> jax.Array:
        raise NotImplementedError(
            f"Learning rate schedule '{type(self).__name__}' must override `__call__(self, step)`."
        )

    # Constructor argument names in tf-keras's order; get_config reads the attributes of the same names.
    _CONFIG: tuple[str, ...] = ()

    def get_config(self) -> dict[str, Any]:
        if not self._CONFIG:
            raise NotImplementedError(
                f"Learning rate schedule '{type(self).__name__}' must override `get_config()` "
                "in order to be serializable."
            )
        return {k: getattr(self, k) for k in self._CONFIG}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LearningRateSchedule:
        return cls(**config)

    def __repr__(self) -> str:
        try:
            args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        except NotImplementedError:
            args = ""
        return f"{type(self).__name__}({args})"


class ExponentialDecay(LearningRateSchedule):
    """``init * decay_rate ** (step / decay_steps)``: smooth (or staircase) geometric decay."""

    _CONFIG = ("initial_learning_rate", "decay_steps", "decay_rate", "staircase", "name")

    def __init__(self, initial_learning_rate: float, decay_steps: int | float, decay_rate: float,
                 staircase: bool = False, name: str | None = None) -> None:
        self.initial_learning_rate = _number("initial_learning_rate", initial_learning_rate)
        self.decay_steps = _positive("decay_steps", decay_steps)
        self.decay_rate = _number("decay_rate", decay_rate)
        self.staircase = bool(_plain(staircase))
        self.name = name

    def __call__(self, step: Any) -> jax.Array:
        p = _float_step(step) / _f32(self.decay_steps)
        if self.staircase:
            p = jnp.floor(p)
        return _f32(self.initial_learning_rate) * jnp.power(_f32(self.decay_rate), p)


class PiecewiseConstantDecay(LearningRateSchedule):
    """``values[i]`` on ``(boundaries[i-1], boundaries[i]]``: fixed learning rates for ranges of steps."""

    _CONFIG = ("boundaries", "values", "name")

    def __init__(self, boundaries: Sequence[int | float], values: Sequence[float],
                 name: str | None = None) -> None:
        if len(boundaries) != len(values) - 1:
            raise ValueError(
                "The length of boundaries should be 1 less than the length of values. "
                f"Received: boundaries={boundaries} of length {len(boundaries)}, "
                f"and values={values} of length {len(values)}."
            )
        self.boundaries = _numbers("boundaries", boundaries)
        self.values = _numbers("values", values)
        self.name = name
        # tf-keras converts a float boundary to float32, then casts it to the step's int dtype (truncation).
        self._int_boundaries = [b if isinstance(b, int) else int(np.float32(b)) for b in self.boundaries]
        if any(lo > hi for lo, hi in zip(self._int_boundaries, self._int_boundaries[1:], strict=False)):
            raise ValueError(f"Argument `boundaries` must be increasing. Received: boundaries={boundaries}")

    def __call__(self, step: Any) -> jax.Array:
        step = _check_step(step)
        if jnp.issubdtype(getattr(step, "dtype", None) or np.result_type(step), jnp.floating):
            # a float step (tf-keras casts the boundaries to float32, the step's dtype, and compares)
            step = jnp.asarray(step, jnp.float32)
            result = jnp.full(step.shape, np.float32(self.values[-1]))
            for b, v in zip(reversed(self.boundaries), reversed(self.values[:-1]), strict=True):
                result = jnp.where(step <= np.float32(b), np.float32(v), result)
            return result
        concrete = isinstance(step, int | np.integer | np.ndarray)
        xp = np if concrete else jnp
        step = np.asarray(step, dtype=np.int64) if concrete else jnp.asarray(step)
        info = np.iinfo(step.dtype)

        def at_most(b: int) -> Any:  # step <= b, exact even where b does not fit the step's dtype
            if b < info.min or b >= info.max:
                return xp.full(step.shape, b >= info.max)
            return step <= b

        result = xp.full(step.shape, np.float32(self.values[-1]))
        for b, v in zip(reversed(self._int_boundaries), reversed(self.values[:-1]), strict=True):
            result = xp.where(at_most(b), np.float32(v), result)
        return jnp.asarray(result, jnp.float32)


class PolynomialDecay(LearningRateSchedule):
    """``(init - end) * (1 - step/decay_steps) ** power + end``: reach ``end`` at ``decay_steps`` or cycle."""

    _CONFIG = ("initial_learning_rate", "decay_steps", "end_learning_rate", "power", "cycle", "name")

    def __init__(self, initial_learning_rate: float, decay_steps: int | float,
                 end_learning_rate: float = 0.0001, power: float = 1.0, cycle: bool = False,
                 name: str | None = None) -> None:
        self.initial_learning_rate = _number("initial_learning_rate", initial_learning_rate)
        self.decay_steps = _positive("decay_steps", decay_steps)
        self.end_learning_rate = _number("end_learning_rate", end_learning_rate)
        self.power = _number("power", power)
        self.cycle = bool(_plain(cycle))
        self.name = name

    def __call__(self, step: Any) -> jax.Array:
        s, ds = _float_step(step), _f32(self.decay_steps)
        if self.cycle:
            ds = ds * jnp.where(s == 0, np.float32(1.0), jnp.ceil(s / ds))
        else:
            s = jnp.minimum(s, ds)
        init, end = _f32(self.initial_learning_rate), _f32(self.end_learning_rate)
        return (init - end) * jnp.power(1 - s / ds, _f32(self.power)) + end


class InverseTimeDecay(LearningRateSchedule):
    """``init / (1 + decay_rate * step / decay_steps)``: 1/t decay, smooth or staircase."""

    _CONFIG = ("initial_learning_rate", "decay_steps", "decay_rate", "staircase", "name")

    def __init__(self, initial_learning_rate: float, decay_steps: int | float, decay_rate: float,
                 staircase: bool = False, name: str | None = None) -> None:
        self.initial_learning_rate = _number("initial_learning_rate", initial_learning_rate)
        self.decay_steps = _positive("decay_steps", decay_steps)
        self.decay_rate = _number("decay_rate", decay_rate)
        self.staircase = bool(_plain(staircase))
        self.name = name

    def __call__(self, step: Any) -> jax.Array:
        p = _float_step(step) / _f32(self.decay_steps)
        if self.staircase:
            p = jnp.floor(p)
        return _f32(self.initial_learning_rate) / (_f32(1) + _f32(self.decay_rate) * p)


class CosineDecay(LearningRateSchedule):
    """Half-cosine from the start rate down to ``alpha`` times it, after an optional linear warmup (SGDR)."""

    _CONFIG = ("initial_learning_rate", "decay_steps", "alpha", "name", "warmup_target", "warmup_steps")

    def __init__(self, initial_learning_rate: float, decay_steps: int | float, alpha: float = 0.0,
                 name: str | None = None, warmup_target: float | None = None,
                 warmup_steps: int | float = 0) -> None:
        self.initial_learning_rate = _number("initial_learning_rate", initial_learning_rate)
        self.decay_steps = _positive("decay_steps", decay_steps)
        self.alpha = _number("alpha", alpha)
        self.name = name
        self.warmup_target = None if warmup_target is None else _number("warmup_target", warmup_target)
        self.warmup_steps = _number("warmup_steps", warmup_steps)

    def _decay(self, s: jax.Array, ds: jax.Array, start: jax.Array) -> jax.Array:
        cosine = 0.5 * (1.0 + jnp.cos(_PI * (s / ds)))
        # As in the reference, (1 - alpha) is computed in Python (double), then rounded to float32.
        return start * (_f32(1 - self.alpha) * cosine + _f32(self.alpha))

    def __call__(self, step: Any) -> jax.Array:
        s, ds = _float_step(step), _f32(self.decay_steps)
        init = _f32(self.initial_learning_rate)
        if self.warmup_target is None:
            return self._decay(jnp.minimum(s, ds), ds, init)
        target, ws = _f32(self.warmup_target), _f32(self.warmup_steps)
        s = jnp.minimum(s, ds + ws)
        warm = (target - init) * (s / ws) + init  # not selected (and maybe NaN) when warmup_steps == 0
        return jnp.where(s < ws, warm, self._decay(s - ws, ds, target))


class CosineDecayRestarts(LearningRateSchedule):
    """Cosine decay with warm restarts (SGDR): periods grow by ``t_mul``, peaks shrink by ``m_mul``."""

    _CONFIG = ("initial_learning_rate", "first_decay_steps", "t_mul", "m_mul", "alpha", "name")

    def __init__(self, initial_learning_rate: float, first_decay_steps: int | float, t_mul: float = 2.0,
                 m_mul: float = 1.0, alpha: float = 0.0, name: str | None = None) -> None:
        self.initial_learning_rate = _number("initial_learning_rate", initial_learning_rate)
        self.first_decay_steps = _positive("first_decay_steps", first_decay_steps)
        self.t_mul = _number("t_mul", t_mul)
        self.m_mul = _number("m_mul", m_mul)
        self.alpha = _number("alpha", alpha)
        self.name = name

    def __call__(self, step: Any) -> jax.Array:
        frac = _float_step(step) / _f32(self.first_decay_steps)
        t_mul, m_mul, alpha = _f32(self.t_mul), _f32(self.m_mul), _f32(self.alpha)
        if np.float32(self.t_mul) == 1.0:  # the reference's tf.cond(float32(t_mul) == 1), decided statically
            i = jnp.floor(frac)
            frac = frac - i
        else:
            i = jnp.floor(jnp.log(1.0 - frac * (1.0 - t_mul)) / jnp.log(t_mul))
            sum_r = (1.0 - jnp.power(t_mul, i)) / (1.0 - t_mul)
            frac = (frac - sum_r) / jnp.power(t_mul, i)
        cosine = 0.5 * jnp.power(m_mul, i) * (1.0 + jnp.cos(_PI * frac))
        return _f32(self.initial_learning_rate) * ((1 - alpha) * cosine + alpha)


_BUILTIN: dict[str, type[LearningRateSchedule]] = {
    c.__name__: c for c in (ExponentialDecay, PiecewiseConstantDecay, PolynomialDecay, InverseTimeDecay,
                            CosineDecay, CosineDecayRestarts)
}


def is_schedule(obj: Any) -> bool:
    """Whether ``obj`` is a shardopt learning-rate schedule (as opposed to a constant or a callable)."""
    return isinstance(obj, LearningRateSchedule)


def serialize(schedule: LearningRateSchedule) -> dict[str, Any]:
    """The dict ``tf_keras.optimizers.schedules.serialize`` gives for the equivalent tf-keras schedule."""
    if not is_schedule(schedule):
        raise TypeError(f"Expected a LearningRateSchedule, got {type(schedule).__name__}: {schedule!r}")
    name = type(schedule).__name__
    builtin = _BUILTIN.get(name) is type(schedule)
    return {  # a user's schedule: no module, registered under its class name (as tf-keras writes it)
        "module": _MODULE if builtin else None,
        "class_name": name,
        "config": schedule.get_config(),
        "registered_name": None if builtin else name,
    }


def deserialize(
    config: Mapping[str, Any],
    custom_objects: Mapping[str, type[LearningRateSchedule]] | None = None,
) -> LearningRateSchedule:
    """Rebuild a schedule from ``serialize``'s dict, or from the short ``{"class_name", "config"}`` form.

    Dicts written by tf-keras and Keras 3 are accepted too. ``custom_objects`` maps extra class names
    (user subclasses of ``LearningRateSchedule``) to their classes.
    """
    if not isinstance(config, Mapping) or "class_name" not in config or "config" not in config:
        raise ValueError(
            f"A serialized schedule must be a dict with 'class_name' and 'config' keys. Received: {config!r}"
        )
    known = {**_BUILTIN, **(custom_objects or {})}
    name = config["class_name"]
    cls = known.get(name) or known.get(config.get("registered_name"))
    if cls is None:
        raise ValueError(f"Unknown learning rate schedule class_name {name!r}. Expected one of {sorted(known)}.")
    return cls.from_config(dict(config["config"]))
