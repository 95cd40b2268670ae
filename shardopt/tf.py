"""shardopt for TensorFlow: run a compiled step on `tf.Variable`s through XlaCallModule.

    import shardopt, shardopt.tf
    step = shardopt.Adam(1e-3).compile(shardopt.tf.variable_specs(model.trainable_variables))
    opt = shardopt.tf.step_function(step, model.trainable_variables)   # or an artifact path
    ...
    grads = tape.gradient(loss, model.trainable_variables)
    opt(grads)                      # eagerly, or inside your tf.function (jit_compile on or off)

Needs the `tf` extra (`pip install shardopt[tf]`: tensorflow-cpu and tf-keras).
"""

from __future__ import annotations

try:
    import tensorflow  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("shardopt.tf needs TensorFlow: pip install 'shardopt[tf]'") from e

from shardopt.compat.tf_private import call_module_maximum_supported_version
from shardopt.runtime.tf_embed import StepModule, load_step, step_function, variable_specs

__all__ = ["StepModule", "call_module_maximum_supported_version", "load_step", "step_function", "variable_specs"]
