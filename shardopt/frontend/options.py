"""Constructor-argument handling shared by every optimizer: tf-keras's checks, in tf-keras's order."""

from __future__ import annotations

import logging
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


def check_ema(use_ema: bool, ema_momentum: float, ema_overwrite_frequency: Any) -> None:
    if not use_ema:
        return
    if not 0 <= ema_momentum <= 1:
        raise ValueError(f"`ema_momentum` must be in the range [0, 1]. Received: ema_momentum={ema_momentum}")
    if ema_overwrite_frequency and (not isinstance(ema_overwrite_frequency, int) or ema_overwrite_frequency < 1):
        raise ValueError("`ema_overwrite_frequency` must be an integer > 1 or None. Received: "
                         f"ema_overwrite_frequency={ema_overwrite_frequency}")


def check_clip(clipnorm: Any, clipvalue: Any, global_clipnorm: Any) -> None:
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


def merge_grouped(explicit: dict[str, Any], defaults: dict[str, Any], grouped: Any) -> dict[str, Any]:
    """Takes values from a grouped option object unless the matching keyword was also given explicitly."""
    if grouped is None:
        return explicit
    out = dict(explicit)
    for key, default in defaults.items():
        value = getattr(grouped, key)
        if explicit[key] != default and explicit[key] != value:
            raise ValueError(f"`{key}` was given both directly ({explicit[key]!r}) and in "
                             f"{type(grouped).__name__} ({value!r})")
        out[key] = value
    return out


def learning_rate_value(learning_rate: Any) -> Any:
    """A schedule is kept; a callable is called once and frozen; anything else becomes a float32 scalar."""
    if isinstance(learning_rate, schedules.LearningRateSchedule):
        return learning_rate
    if learning_rate is None:
        raise ValueError("`learning_rate` must not be None (tf.Variable: initial_value must be set)")
    if callable(learning_rate) and not isinstance(learning_rate, (jax.Array, np.ndarray)):
        learning_rate = learning_rate()
    if isinstance(learning_rate, (str, bytes)):
        raise TypeError(f"`learning_rate` must be a number, a schedule or a callable, got {learning_rate!r}")
    try:
        return np.float32(np.asarray(learning_rate, dtype=np.float32))
    except (TypeError, ValueError) as e:
        raise TypeError(f"`learning_rate` must be a number, a schedule or a callable, got {learning_rate!r}") from e
