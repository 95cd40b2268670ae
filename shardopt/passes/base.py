"""What every shardopt pass is: a name, a docstring, and `run(module) -> statistics`.

Passes are plain classes so a pipeline is data (a list of names); `pipeline.py` runs each one inside MLIR's
`PassManager` as a Python pass.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from jaxlib.mlir import ir


class PassError(ValueError):
    """A pass met IR or layouts it cannot accept; the message names the tensor, dimension and axis."""


class Pass(Protocol):
    NAME: ClassVar[str]

    def run(self, module: ir.Module) -> dict[str, Any]:
        """Rewrites `module` in place and returns statistics (counts, group sizes)."""
        ...
