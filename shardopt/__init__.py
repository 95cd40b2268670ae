"""shardopt: Keras-DTensor-style optimizers compiled to sharded StableHLO, optimized by MLIR passes, run
through PJRT on a device mesh."""

from shardopt.frontend import schedules
from shardopt.frontend.adam import Adam
from shardopt.frontend.layout import UNSHARDED, Layout
from shardopt.frontend.optimizer import Optimizer
from shardopt.frontend.options import EMAOption, GradientsClipOption
from shardopt.frontend.variables import IndexedSlices, Variable, VariableSpec
from shardopt.passes.base import PassError
from shardopt.runtime.executable import StepInputError

__version__ = "0.1.0"

__all__ = [
    "Adam", "EMAOption", "GradientsClipOption", "IndexedSlices", "Layout", "Optimizer", "PassError",
    "StepInputError", "UNSHARDED", "Variable", "VariableSpec", "schedules", "__version__",
]
