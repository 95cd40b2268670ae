"""Constructor-argument handling shared by every optimizer: tf-keras's checks, in tf-keras's order."""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from shardopt.frontend import schedules

log = logging.getLogger("shardopt")

DEPRECATED_KWARGS = ("decay", "gradient_aggregator", "gradient_transformers")


@dataclass(frozen=True)
class GradientsClipOption:
    """The DTensor optimizers' grouped clipping arguments."""

    clipnorm: float | None = None
    clipvalue: float | None = None
    global_clipnorm: float | None = None


@dataclass(frozen=True)
class EMAOption:
    """The DTensor optimizers' grouped EMA arguments."""

    use_ema: bool = False
    ema_momentum: float = 0.99
    ema_overwrite_frequency: int | None = None


# ----- argument types and ranges (issue 13: refuse at construction, naming the argument) ---------------------
def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def check_bool(name: str, value: Any) -> None:
    """`value` must be a bool (Python or numpy): `use_ema='no'` would otherwise be taken as true."""
    if not _is_bool(value):
        raise TypeError(f"`{name}` must be a bool, got {value!r} of type {type(value).__name__}")


def real_value(name: str, value: Any, *, allow_none: bool = False) -> float | None:
    """`value` as a float when it is a real number (Python, numpy or a 0-d array); a TypeError naming `name`
    otherwise (strings, None unless allowed, lists, bools, complex numbers)."""
    if value is None and allow_none:
        return None
    ok = not _is_bool(value) and (isinstance(value, numbers.Real) or (
        isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0
        and np.dtype(value.dtype).kind in "fiu"))
    if not ok:
        kind = "a number or None" if allow_none else "a number"
        raise TypeError(f"`{name}` must be {kind}, got {value!r} of type {type(value).__name__}")
    return float(value)


def check_finite(name: str, value: Any, *, allow_none: bool = False) -> float | None:
    """A real number that is neither NaN nor infinite (one step with it would turn the variables to NaN)."""
    x = real_value(name, value, allow_none=allow_none)
    if x is not None and not math.isfinite(x):
        raise ValueError(f"`{name}` must be a finite number, got {name}={value}")
    return x


def check_integer(name: str, value: Any) -> int | None:
    """None or an integer (Python or numpy, not a bool) as an int."""
    if value is None:
        return None
    if _is_bool(value) or not isinstance(value, (numbers.Real, np.number)):
        raise TypeError(f"`{name}` must be an integer or None, got {value!r} of type {type(value).__name__}")
    if not isinstance(value, (numbers.Integral, np.integer)):  # tf-keras's error for a float
        raise ValueError(f"`{name}` must be an integer > 1 or None. Received: {name}={value}")
    return int(value)


def check_ema(use_ema: bool, ema_momentum: float, ema_overwrite_frequency: Any) -> None:
    check_bool("use_ema", use_ema)
    if not use_ema:
        return
    momentum = check_finite("ema_momentum", ema_momentum)
    if not 0 <= momentum <= 1:
        raise ValueError(f"`ema_momentum` must be in the range [0, 1]. Received: ema_momentum={ema_momentum}")
    if ema_overwrite_frequency is not None:
        frequency = check_integer("ema_overwrite_frequency", ema_overwrite_frequency)
        if frequency and frequency < 1:
            raise ValueError("`ema_overwrite_frequency` must be an integer > 1 or None. Received: "
                             f"ema_overwrite_frequency={ema_overwrite_frequency}")


def check_clip(clipnorm: Any, clipvalue: Any, global_clipnorm: Any) -> None:
    for name, value in (("clipnorm", clipnorm), ("clipvalue", clipvalue), ("global_clipnorm", global_clipnorm)):
        check_finite(name, value, allow_none=True)
    if clipnorm is not None and global_clipnorm is not None:
        raise ValueError("At most one of `clipnorm` and `global_clipnorm` can be set. Received: "
                         f"clipnorm={clipnorm}, global_clipnorm={global_clipnorm}.")
    if clipvalue and (clipnorm or global_clipnorm):
        warnings.warn("`clipvalue` is ignored when `clipnorm` or `global_clipnorm` is set (tf-keras precedence: "
                      "clipnorm, then global_clipnorm, then clipvalue)", UserWarning, stacklevel=4)


def check_kwargs(kwargs: dict[str, Any]) -> None:
    """tf-keras drops `is_legacy_optimizer`; shardopt rejects `lr=` (tf-keras silently ignores it)."""
    kwargs.pop("is_legacy_optimizer", None)
    for k in kwargs:
        if k == "lr":
            raise TypeError("`lr` is not an argument of shardopt optimizers (tf-keras silently ignores it and "
                            "keeps learning_rate=0.001); pass `learning_rate=` instead")
        if k in DEPRECATED_KWARGS:
            raise ValueError(f"{k} is deprecated in the new TF-Keras optimizer, please check the docstring for "
                             "valid arguments, or use the legacy optimizer")
        raise TypeError(f"{k} is not a valid argument, kwargs should be empty for `optimizer_experimental."
                        "Optimizer`.")


def _grouped_argument(defaults: dict[str, Any]) -> tuple[str, type]:
    return ("ema_option", EMAOption) if "use_ema" in defaults else ("gradients_clip_option", GradientsClipOption)


def merge_grouped(explicit: dict[str, Any], defaults: dict[str, Any], grouped: Any) -> dict[str, Any]:
    """Takes values from a grouped option object unless the matching keyword was also given explicitly."""
    if grouped is None:
        return explicit
    name, cls = _grouped_argument(defaults)
    if not isinstance(grouped, cls):
        hint = f" (for a dict d, pass {cls.__name__}(**d))" if isinstance(grouped, dict) else ""
        raise TypeError(f"`{name}` must be a shardopt.{cls.__name__} or None, got {type(grouped).__name__}"
                        f"{hint}")
    out = dict(explicit)
    for key, default in defaults.items():
        value = getattr(grouped, key)
        if explicit[key] != default and explicit[key] != value:
            raise ValueError(f"`{key}` was given both directly ({explicit[key]!r}) and in "
                             f"{type(grouped).__name__} ({value!r})")
        out[key] = value
    return out


def callable_name(learning_rate: Any) -> str | None:
    """The name of a learning rate given as a plain callable (tf-keras calls it once), else None."""
    if isinstance(learning_rate, schedules.LearningRateSchedule) or isinstance(learning_rate, (jax.Array, np.ndarray)):
        return None
    if not callable(learning_rate):
        return None
    return getattr(learning_rate, "__name__", None) or type(learning_rate).__name__


def learning_rate_value(learning_rate: Any) -> Any:
    """A schedule is kept; a callable is called once and frozen; anything else becomes a float32 scalar."""
    if isinstance(learning_rate, schedules.LearningRateSchedule):
        return learning_rate
    if learning_rate is None:
        raise ValueError("`learning_rate` must not be None (tf.Variable: initial_value must be set)")
    if isinstance(learning_rate, jax.core.Tracer):
        raise TypeError("`learning_rate` is a traced value (inside jax.jit, e.g. from `optax.inject_hyperparams`"
                        "): a shardopt optimizer is compiled once, with a concrete learning rate. For a learning "
                        "rate that changes between steps use `shardopt.inject_hyperparams(shardopt.Adam)("
                        "learning_rate=...)` (optax) or assign `opt.learning_rate = x` (stateful)")
    if callable(learning_rate) and not isinstance(learning_rate, (jax.Array, np.ndarray)):
        learning_rate = learning_rate()
    if isinstance(learning_rate, (str, bytes)) or _is_bool(learning_rate) or np.ndim(learning_rate) != 0:
        raise TypeError(f"`learning_rate` must be a number, a schedule or a callable, got {learning_rate!r}")
    try:
        value = np.float32(np.asarray(learning_rate, dtype=np.float32))
    except (TypeError, ValueError) as e:
        raise TypeError(f"`learning_rate` must be a number, a schedule or a callable, got {learning_rate!r}") from e
    if not np.isfinite(value):
        raise ValueError(f"`learning_rate` must be finite, got learning_rate={learning_rate}")
    return value


def check_hyperparameters(optimizer: Any) -> None:
    """The types and ranges of the arguments every optimizer shares (after `check_ema`/`check_clip`, which see
    them first, in tf-keras's order); normalizes a numpy integer `ema_overwrite_frequency` to an int."""
    check_finite("weight_decay", optimizer.weight_decay, allow_none=True)
    if isinstance(optimizer.ema_overwrite_frequency, np.integer):  # get_config stays JSON-serializable
        optimizer.ema_overwrite_frequency = int(optimizer.ema_overwrite_frequency)


def check_adam_hyperparameters(optimizer: Any) -> None:
    """Adam's own arguments: betas in range (beta_1 < 1: 1 - beta_1**t is the bias correction's divisor),
    finite epsilon, bool flags."""
    beta_1 = check_finite("beta_1", optimizer.beta_1)
    if not 0 <= beta_1 < 1:
        raise ValueError(f"`beta_1` must be in the range [0, 1), got beta_1={optimizer.beta_1}")
    beta_2 = check_finite("beta_2", optimizer.beta_2)
    if not 0 <= beta_2 <= 1:
        raise ValueError(f"`beta_2` must be in the range [0, 1], got beta_2={optimizer.beta_2}")
    check_finite("epsilon", optimizer.epsilon)
    check_bool("amsgrad", optimizer.amsgrad)
    check_bool("adaptive_epsilon", optimizer.adaptive_epsilon)
