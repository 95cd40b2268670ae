"""Data-only descriptions of what a user hands an optimizer: variable specs (no data) and sparse gradients."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardopt.core.errors import StepInputError

ShapeDtype = tuple[tuple[int, ...], Any]


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


def differences(want: Mapping[str, ShapeDtype], got: Mapping[str, ShapeDtype]
                ) -> tuple[list[str], list[str], list[tuple[str, ShapeDtype, ShapeDtype]]]:
    """How named (shape, dtype) pairs differ from the expected ones: missing names, unexpected names, and
    (name, expected, got) for each name whose shape or dtype differs, in the expected order."""
    missing = [n for n in want if n not in got]
    extra = [n for n in got if n not in want]
    mismatched = [(n, want[n], got[n]) for n in want
                  if n in got and (tuple(want[n][0]), np.dtype(want[n][1])) != (tuple(got[n][0]), np.dtype(got[n][1]))]
    return missing, extra, mismatched


def _dtype_of(value: Any) -> np.dtype:
    dtype = getattr(value, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.asarray(value).dtype


def check_state_dict(expected: dict[str, Any], given: Any) -> dict[str, Any]:
    """`given` checked against `expected` (name -> anything with `.shape` and `.dtype`): the same names, each
    with the expected shape and dtype; a StepInputError lists everything that differs."""
    if not isinstance(given, dict):
        raise StepInputError(f"a state dict must be a dict of name -> array, got {type(given).__name__}")
    missing, extra, mismatched = differences(
        {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in expected.items()},
        {k: (tuple(np.shape(v)), _dtype_of(v)) for k, v in given.items()})
    problems = [f"missing {missing}"] if missing else []
    problems += [f"unexpected {extra}"] if extra else []
    for name, (want_shape, want_dtype), (shape, dtype) in mismatched:
        problems.append(f"{name}: expected shape {want_shape}, got {shape}" if tuple(shape) != tuple(want_shape)
                        else f"{name}: expected dtype {np.dtype(want_dtype)}, got {dtype}")
    if problems:
        raise StepInputError("the state dict does not match: " + "; ".join(problems))
    return dict(given)


__all__ = ["IndexedSlices", "VariableSpec", "check_state_dict", "differences"]
