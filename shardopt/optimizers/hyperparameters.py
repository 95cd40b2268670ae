"""The learning rate (constant or schedule), the step counter and `get_config`/`from_config`: the part of the
Keras optimizer API that is configuration rather than state or math."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shardopt.core.contract import counter_dtype
from shardopt.core.layout import Layout
from shardopt.frontend import options, schedules
from shardopt.optimizers import state_sharding
from shardopt.optimizers.variables import Variable


class HyperparameterMixin:
    """Learning rate, `iterations` and config of an `Optimizer` (its attributes are set by `Optimizer.__init__`)."""

    _learning_rate: Any
    _lr_array: jax.Array | None
    _current_lr: jax.Array | None
    _iterations: Variable | None
    _built: bool
    _schedule_cache: tuple[Any, str]
    _lr_callable: str | None
    mesh: Any
    pipeline: tuple[str, ...]

    # ----- hyperparameters -------------------------------------------------------------------------------
    def _build_learning_rate(self, learning_rate: Any) -> Any:
        return options.learning_rate_value(learning_rate)

    @property
    def learning_rate(self) -> jax.Array:
        """The current learning rate (for a schedule: its value at the last step, as tf-keras reports it)."""
        if isinstance(self._learning_rate, schedules.LearningRateSchedule):
            if self._current_lr is None:
                self._current_lr = jnp.asarray(self._learning_rate(int(self.iterations.value)), jnp.float32)
            return self._current_lr
        return jnp.asarray(self._learning_rate, jnp.float32)

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        if isinstance(value, schedules.LearningRateSchedule):
            self._learning_rate, self._current_lr = value, None
            return
        if isinstance(self._learning_rate, schedules.LearningRateSchedule):
            raise TypeError("This optimizer was created with a `LearningRateSchedule` object as its "
                            "`learning_rate` constructor argument, hence its learning rate is not settable. If "
                            "you need the learning rate to be settable, you should instantiate the optimizer "
                            "with a float `learning_rate` argument.")
        self._lr_callable = options.callable_name(value)
        self._learning_rate = options.learning_rate_value(value)
        self._lr_array = None

    lr = learning_rate

    @property
    def learning_rate_source(self) -> str:
        """Where the learning rate comes from, in words: a constant (a runtime input of the step), a schedule
        (compiled into the step) or a callable (called once, its value frozen)."""
        lr = self._learning_rate
        if isinstance(lr, schedules.LearningRateSchedule):
            config = ", ".join(f"{k}={v:.7g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in lr.get_config().items() if k != "name" and v is not None)
            return (f"schedule {type(lr).__name__}({config}), compiled into the step and evaluated at "
                    "`iterations`")
        value = f"{float(lr):.7g}"
        if getattr(self, "_lr_callable", None):
            return f"callable {self._lr_callable}, called once when set: {value} (a runtime input of the step)"
        return f"constant {value} (a runtime input of the step: `opt.learning_rate = x` changes it, no recompile)"

    @property
    def iterations(self) -> Variable:
        """The step counter (int64 with jax x64 enabled, int32 otherwise)."""
        if self._iterations is None:  # laid out (replicated) at once with mesh=, as tf-keras DTensor does
            mesh = self.mesh
            self._iterations = Variable(np.asarray(0, counter_dtype()), name="iteration",
                                        layout=None if mesh is None else Layout.replicated(mesh, 0))
        return self._iterations

    @iterations.setter
    def iterations(self, value: Any) -> None:
        if self._built:
            raise RuntimeError("Cannot set `iterations` to a new Variable after the Optimizer weights have "
                               "been created. Here it is attempting to set `iterations` after build().")
        raw = value.value if isinstance(value, Variable) else value
        self._iterations = Variable(np.asarray(raw, counter_dtype()), name="iteration",
                                    layout=None if self.mesh is None else Layout.replicated(self.mesh, 0))

    def _schedule(self) -> schedules.LearningRateSchedule | None:
        lr = self._learning_rate
        return lr if isinstance(lr, schedules.LearningRateSchedule) else None

    def _lr_input(self) -> jax.Array:
        if self._lr_array is None:
            self._lr_array = jax.device_put(np.float32(self._learning_rate),
                                            Layout.replicated(self.mesh, 0).to_named_sharding())
        return self._lr_array

    def _schedule_key(self) -> Any:
        """What of the learning rate the compiled step depends on: the schedule's config (cached per object)."""
        schedule = self._schedule()
        if schedule is None:
            return (None, self.pipeline)
        if self._schedule_cache[0] is not schedule:
            self._schedule_cache = (schedule, repr(schedules.serialize(schedule)))
        return (self._schedule_cache[1], self.pipeline)

    # ----- config ----------------------------------------------------------------------------------------
    def _serialized_learning_rate(self) -> Any:
        lr = self._learning_rate
        return schedules.serialize(lr) if isinstance(lr, schedules.LearningRateSchedule) else np.float32(lr)

    def get_config(self) -> dict[str, Any]:
        """tf-keras's keys and values (jit_compile is the effective flag: False without a GPU); shardopt's own
        `skip_nonfinite` and `shard_state_over` only when set, so a default config stays tf-keras's."""
        extra = {"skip_nonfinite": True} if getattr(self, "skip_nonfinite", False) else {}
        shard_state = state_sharding.config_value(getattr(self, "shard_state_over", None))
        if shard_state is not None:
            extra["shard_state_over"] = shard_state
        return {**extra, **{
            "name": self.name,
            "weight_decay": self.weight_decay,
            "clipnorm": self.clipnorm,
            "global_clipnorm": self.global_clipnorm,
            "clipvalue": self.clipvalue,
            "use_ema": self.use_ema,
            "ema_momentum": self.ema_momentum,
            "ema_overwrite_frequency": self.ema_overwrite_frequency,
            "jit_compile": bool(self.jit_compile and jax.default_backend() == "gpu"),
            "is_legacy_optimizer": False,
        }}

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: dict[str, Any] | None = None) -> Any:
        """Rebuilds an optimizer from `get_config()` output (a dict learning rate is a serialized schedule)."""
        config = dict(config)
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = schedules.deserialize(config["learning_rate"], custom_objects=custom_objects)
        return cls(**config)
