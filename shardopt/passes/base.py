"""What every shardopt pass is: a name, a docstring, and `run(module) -> statistics`.

Passes are plain classes so a pipeline is data (a list of names); `pipeline.py` runs each one inside MLIR's
`PassManager` as a Python pass.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from jaxlib.mlir import ir

from shardopt.core.errors import PassError  # defined in the data layer; re-exported for the passes

__all__ = ["Pass", "PassError"]


class Pass(Protocol):
    NAME: ClassVar[str]

    def run(self, module: ir.Module) -> dict[str, Any]:
        """Rewrites `module` in place and returns statistics (counts, group sizes)."""
        ...
