"""Data-only descriptions of what a user hands an optimizer: variable specs (no data) and sparse gradients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class VariableSpec:
    """Shape, dtype and layout of a variable, without data: enough to compile a step."""

    shape: tuple[int, ...]
    dtype: Any
    layout: Any = None
    name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))


@dataclass(frozen=True)
class IndexedSlices:
    """A sparse gradient: rows `indices` of a tensor of `dense_shape` hold `values` (duplicates are summed)."""

    values: Any
    indices: Any
    dense_shape: Any = None

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.values.dtype)


__all__ = ["IndexedSlices", "VariableSpec"]
