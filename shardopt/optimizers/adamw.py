"""AdamW as tf-keras 2.21 defines it (`tf_keras/src/optimizers/adamw.py`): Adam's update with the base class's
decoupled weight decay (`var -= var*wd*lr` before the step), which is required (default 0.004). Loshchilov &
Hutter, "Decoupled Weight Decay Regularization" (2019)."""

from __future__ import annotations

from typing import Any

from shardopt.optimizers.adam import Adam


class AdamW(Adam):
    """Adam with decoupled weight decay; tf-keras's arguments, defaults, errors and numerics."""

    def __init__(self, learning_rate: Any = 0.001, weight_decay: float | None = 0.004, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-7, amsgrad: bool = False, name: str = "AdamW",
                 **kwargs: Any):
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         amsgrad=amsgrad, name=name, weight_decay=weight_decay, **kwargs)
        if self.weight_decay is None:
            raise ValueError("Missing value of `weight_decay` which is required and must be a float value.")

