"""Runs an optimized step module on its mesh through PJRT, with donation, validating inputs first.

The module is carried by a `jax.export.Exported` (jax's own export with our module swapped in), so jax's PJRT
client compiles it once, assembles sharded outputs and handles donation. Every input is checked for shape, dtype
and sharding *before* the call, because a donated buffer is gone once the executable starts.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxlib.mlir.dialects import stablehlo as hlo

from shardopt import ir as sir
from shardopt.compat.jax_private import exported_with_module, serialize_portable
from shardopt.core.contract import StepContract, TensorSpec
from shardopt.core.errors import StepInputError
from shardopt.core.layout import same_mesh


@functools.cache
def array_type() -> type:
    """jax's concrete array class (for exact-type fast paths over many arguments), found once jax's backend is up."""
    return type(jax.numpy.zeros(()))


def portable_target() -> str:
    """The StableHLO version artifacts are written for: 4 weeks back, jax.export's default window."""
    return hlo.get_version_from_compatibility_requirement(hlo.StablehloCompatibilityRequirement.WEEK_4)


def module_bytes(module_text: str) -> bytes:
    """Portable (VHLO) bytes of a StableHLO module, as jax.export stores them."""
    ctx = sir.make_ir_context()
    module = sir.parse(module_text, ctx)
    with ctx:
        return serialize_portable(module, portable_target())


def named_sharding(mesh: Mesh, spec: TensorSpec) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(*(spec.layout or ())))


class CompiledStep:
    """One optimized step, callable on flat jax arrays in the step contract's order."""

    def __init__(self, exported: jax.export.Exported, contract: StepContract, mesh: Mesh):
        self.contract = contract
        self.mesh = mesh  # the user's mesh, axis types included, so results live where the user's data does
        self.exported = exported
        self.in_shardings = [named_sharding(self.mesh, a) for a in contract.args]
        self.out_shardings = [named_sharding(self.mesh, r) for r in contract.results]
        self._donated_list = contract.donated_argnums()
        self._dtypes = [np.dtype(a.dtype) for a in contract.args]
        self._shapes = [tuple(a.shape) for a in contract.args]
        self._accepted: list[Any] = [None] * len(contract.args)  # last sharding found equivalent, per argument
        self._fn = jax.jit(exported.call, donate_argnums=contract.donated_argnums())

    @classmethod
    def from_module(cls, module_text: str, contract: StepContract, template: jax.export.Exported,
                    mesh: Mesh) -> CompiledStep:
        """Swaps the optimized module into jax's export of the same step and prepares it for `mesh`."""
        check_mesh(contract, mesh)
        abstract = mesh.abstract_mesh
        ins = tuple(NamedSharding(abstract, PartitionSpec(*(a.layout or ()))) for a in contract.args)
        outs = tuple(NamedSharding(abstract, PartitionSpec(*(r.layout or ()))) for r in contract.results)
        exported = exported_with_module(template, module_bytes(module_text), ins, outs)
        return cls(exported, contract, mesh)

    @property
    def convention(self) -> StepContract:
        """Deprecated name of `contract`."""
        return self.contract

    def validate(self, args: Sequence[Any]) -> list[jax.Array]:
        """Checks every input against the convention; moves non-donated inputs to their sharding.

        Runs on every step, so the common case (a jax array of the right shape and dtype, already placed as last
        time) costs a few attribute reads per argument; anything else takes the full check.
        """
        specs = self.contract.args
        if len(args) != len(specs):
            raise StepInputError(f"the step takes {len(specs)} arrays, got {len(args)}")
        out = list(args)
        accepted, shapes, dtypes = self._accepted, self._shapes, self._dtypes
        exact = array_type()
        for i, a in enumerate(args):
            if type(a) is exact:
                aval = a.aval
                if (aval.shape == shapes[i] and aval.dtype == dtypes[i] and not a.is_deleted()
                        and a.sharding is accepted[i]):
                    continue  # the common case: what was accepted for this argument last time
            out[i] = self._check(i, a)
        uses = Counter(map(id, out))  # a donated array passed twice would be read after XLA reused its buffer
        twice = [specs[i].name for i in self._donated_list if uses[id(out[i])] > 1]
        if twice:
            raise StepInputError(f"the same array is passed as a donated input and as another input: {twice}; "
                                 "pass a copy")
        return out

    def _check(self, i: int, a: Any) -> Any:
        """The full check of argument `i`: the array to pass, or a StepInputError that names it."""
        spec, want, dtype = self.contract.args[i], self.in_shardings[i], self._dtypes[i]
        if a.shape != spec.shape and tuple(a.shape) != spec.shape:
            raise StepInputError(f"{spec.name}: expected shape {spec.shape}, got {tuple(a.shape)}")
        if a.dtype != dtype:
            raise StepInputError(f"{spec.name}: expected dtype {spec.dtype}, got {np.dtype(a.dtype)}")
        if not isinstance(a, jax.Array):
            if spec.donated:
                raise StepInputError(f"{spec.name}: a donated input must be a jax.Array placed as {want.spec}")
            return jax.device_put(a, want)
        if a.is_deleted():
            raise StepInputError(f"{spec.name}: the array was deleted (donated to an earlier call)")
        sharding = a.sharding
        if sharding is self._accepted[i] or sharding == want or sharding.is_equivalent_to(want, len(spec.shape)):
            self._accepted[i] = sharding  # remember it: the next call with this sharding object takes the fast path
            return a
        if spec.donated:
            raise StepInputError(f"{spec.name}: expected sharding {want.spec} on the step's mesh, got {sharding}")
        return jax.device_put(a, want)

    def __call__(self, args: Sequence[Any]) -> list[jax.Array]:
        return list(self._fn(*self.validate(args)))

    def call_unchecked(self, args: Sequence[jax.Array]) -> list[jax.Array]:
        """The compiled executable alone (what the dispatch benchmark compares against)."""
        return list(self._fn(*args))

    def lower(self) -> Any:
        avals = [jax.ShapeDtypeStruct(a.shape, np.dtype(a.dtype), sharding=s)
                 for a, s in zip(self.contract.args, self.in_shardings, strict=True)]
        return self._fn.lower(*avals)


def check_mesh(contract: StepContract, mesh: Mesh) -> None:
    """The step was compiled for a mesh of these axis names and sizes; anything else is an error."""
    have = tuple(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    if tuple(contract.mesh_axes) != have:
        raise StepInputError(f"wrong mesh: the step was compiled for mesh {dict(contract.mesh_axes)}, "
                             f"got {dict(have)}")


__all__ = ["CompiledStep", "StepInputError", "check_mesh", "module_bytes", "portable_target", "same_mesh"]
