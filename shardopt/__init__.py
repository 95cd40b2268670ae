"""shardopt: Keras-DTensor-style optimizers compiled to sharded StableHLO, optimized by MLIR passes, run
through PJRT on a device mesh.

The public names are imported lazily (PEP 562): `import shardopt` is cheap, and `shardopt.load(path)` runs a
saved step without ever importing an optimizer definition. Add new exports to `_EXPORTS`, not as imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it (a module itself when the name is the module's last component)
_EXPORTS: dict[str, str] = {
    "Adam": "shardopt.optimizers.adam",
    "SGD": "shardopt.optimizers.sgd",
    "AdamW": "shardopt.optimizers.adamw",
    "RMSprop": "shardopt.optimizers.rmsprop",
    "Adagrad": "shardopt.optimizers.adagrad",
    "Adadelta": "shardopt.optimizers.adadelta",
    "Adamax": "shardopt.optimizers.adamax",
    "Nadam": "shardopt.optimizers.nadam",
    "Ftrl": "shardopt.optimizers.ftrl",
    "Lion": "shardopt.optimizers.lion",
    "Adafactor": "shardopt.optimizers.adafactor",
    "ArtifactError": "shardopt.core.errors",
    "EMAOption": "shardopt.frontend.options",
    "GradientsClipOption": "shardopt.frontend.options",
    "IndexedSlices": "shardopt.core.specs",
    "Layout": "shardopt.core.layout",
    "NotInThisProcessError": "shardopt.core.errors",
    "Optimizer": "shardopt.optimizers.base",
    "PassError": "shardopt.core.errors",
    "StepContract": "shardopt.core.contract",
    "StepInputError": "shardopt.core.errors",
    "UNSHARDED": "shardopt.core.layout",
    "Variable": "shardopt.optimizers.variables",
    "VariableSpec": "shardopt.core.specs",
    "as_optax": "shardopt.runtime.jax_embed",
    "from_optax": "shardopt.optimizers.optax_optimizer",
    "inject_hyperparams": "shardopt.runtime.optax_hyperparams",
    "keras": "shardopt.keras",
    "tf_keras": "shardopt.tf_keras",
    "load": "shardopt.runtime.functional",
    "schedules": "shardopt.frontend.schedules",
}

__all__ = [  # the keys of _EXPORTS, spelled out for tools that read __all__ statically
    "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "ArtifactError", "EMAOption", "Ftrl",
    "GradientsClipOption", "IndexedSlices", "Layout", "Lion", "Nadam", "NotInThisProcessError", "Optimizer",
    "PassError", "RMSprop", "SGD", "StepContract", "StepInputError", "UNSHARDED", "Variable", "VariableSpec",
    "as_optax", "from_optax", "inject_hyperparams", "keras", "load", "schedules", "tf_keras", "__version__",
]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'shardopt' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name.rsplit(".", 1)[-1] == name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from shardopt.core.contract import StepContract
    from shardopt.core.errors import ArtifactError, NotInThisProcessError, PassError, StepInputError
    from shardopt.core.layout import UNSHARDED, Layout
    from shardopt.core.specs import IndexedSlices, VariableSpec
    from shardopt.frontend import schedules
    from shardopt.frontend.options import EMAOption, GradientsClipOption
    from shardopt.optimizers.adadelta import Adadelta
    from shardopt.optimizers.adafactor import Adafactor
    from shardopt.optimizers.adagrad import Adagrad
    from shardopt.optimizers.adam import Adam
    from shardopt.optimizers.adamax import Adamax
    from shardopt.optimizers.adamw import AdamW
    from shardopt.optimizers.base import Optimizer
    from shardopt.optimizers.ftrl import Ftrl
    from shardopt.optimizers.lion import Lion
    from shardopt.optimizers.nadam import Nadam
    from shardopt.optimizers.optax_optimizer import from_optax
    from shardopt.optimizers.rmsprop import RMSprop
    from shardopt.optimizers.sgd import SGD
    from shardopt.optimizers.variables import Variable
    from shardopt.runtime.functional import load
    from shardopt.runtime.jax_embed import as_optax
    from shardopt.runtime.optax_hyperparams import inject_hyperparams
