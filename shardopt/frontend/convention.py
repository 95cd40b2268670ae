"""The calling convention of a compiled step: what each argument and result of `@main` is.

It is data (JSON-serializable) so that an artifact can be run without the optimizer that produced it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

# Argument roles, also written as `shardopt.role` attributes on `@main`'s arguments.
VARIABLE = "variable"
GRADIENT = "gradient"
GRADIENT_INDICES = "gradient_indices"
SLOT = "slot"
COUNTER = "counter"
HYPERPARAMETER = "hyperparameter"
# Scratch memory, donated and handed back each step, that a pack's gradients are gathered into (its contents are
# never read: it only gives XLA a buffer to write the packed gradient to instead of a temporary).
GRADIENT_BUFFER = "gradient_buffer"
ROLES = (VARIABLE, GRADIENT, GRADIENT_INDICES, SLOT, GRADIENT_BUFFER, COUNTER, HYPERPARAMETER)


@dataclass(frozen=True)
class TensorSpec:
    """One argument or result of the step.

    `layout` is a PartitionSpec-like tuple (None = unsharded dim, str or tuple of str = mesh axes), or None
    when the frontend leaves the layout open for the `propagate-layouts` pass to decide.
    """

    name: str
    role: str
    shape: tuple[int, ...]
    dtype: str
    owner: str | None = None
    layout: tuple[Any, ...] | None = None
    donated: bool = False

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["layout"] = None if self.layout is None else [list(a) if isinstance(a, tuple) else a for a in self.layout]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        layout = d.get("layout")
        return cls(
            name=d["name"], role=d["role"], shape=tuple(d["shape"]), dtype=d["dtype"], owner=d.get("owner"),
            layout=None if layout is None else tuple(tuple(a) if isinstance(a, list) else a for a in layout),
            donated=bool(d.get("donated", False)),
        )


@dataclass(frozen=True)
class CallingConvention:
    """Arguments and results of `@main`, in order, plus the mesh they are laid out on."""

    args: tuple[TensorSpec, ...]
    results: tuple[TensorSpec, ...]
    mesh_axes: tuple[tuple[str, int], ...]

    def arg_index(self, name: str) -> int:
        for i, a in enumerate(self.args):
            if a.name == name:
                return i
        raise KeyError(name)

    def donated_argnums(self) -> tuple[int, ...]:
        return tuple(i for i, a in enumerate(self.args) if a.donated)

    def with_layouts(self, arg_layouts: list[tuple[Any, ...]], result_layouts: list[tuple[Any, ...]]
                     ) -> CallingConvention:
        """The same convention with every layout filled in (after layout propagation)."""
        return dataclasses.replace(
            self,
            args=tuple(dataclasses.replace(a, layout=lay) for a, lay in zip(self.args, arg_layouts, strict=True)),
            results=tuple(dataclasses.replace(r, layout=lay)
                          for r, lay in zip(self.results, result_layouts, strict=True)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "args": [a.to_json() for a in self.args],
            "results": [r.to_json() for r in self.results],
            "mesh_axes": [[n, s] for n, s in self.mesh_axes],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CallingConvention:
        return cls(
            args=tuple(TensorSpec.from_json(a) for a in d["args"]),
            results=tuple(TensorSpec.from_json(r) for r in d["results"]),
            mesh_axes=tuple((str(n), int(s)) for n, s in d["mesh_axes"]),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)
