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
    "Adam": "shardopt.frontend.adam",
    "ArtifactError": "shardopt.runtime.container",
    "EMAOption": "shardopt.frontend.options",
    "GradientsClipOption": "shardopt.frontend.options",
    "IndexedSlices": "shardopt.frontend.variables",
    "Layout": "shardopt.frontend.layout",
    "Optimizer": "shardopt.frontend.optimizer",
    "PassError": "shardopt.passes.base",
    "StepInputError": "shardopt.runtime.executable",
    "UNSHARDED": "shardopt.frontend.layout",
    "Variable": "shardopt.frontend.variables",
    "VariableSpec": "shardopt.frontend.variables",
    "as_optax": "shardopt.runtime.jax_embed",
    "load": "shardopt.runtime.artifact",
    "schedules": "shardopt.frontend.schedules",
}

__all__ = [  # the keys of _EXPORTS, spelled out for tools that read __all__ statically
    "Adam", "ArtifactError", "EMAOption", "GradientsClipOption", "IndexedSlices", "Layout", "Optimizer", "PassError",
    "StepInputError", "UNSHARDED", "Variable", "VariableSpec", "as_optax", "load", "schedules", "__version__",
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
    from shardopt.frontend import schedules
    from shardopt.frontend.adam import Adam
    from shardopt.frontend.layout import UNSHARDED, Layout
    from shardopt.frontend.optimizer import Optimizer
    from shardopt.frontend.options import EMAOption, GradientsClipOption
    from shardopt.frontend.variables import IndexedSlices, Variable, VariableSpec
    from shardopt.passes.base import PassError
    from shardopt.runtime.artifact import load
    from shardopt.runtime.container import ArtifactError
    from shardopt.runtime.executable import StepInputError
    from shardopt.runtime.jax_embed import as_optax
