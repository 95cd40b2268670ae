"""Runs an optimized step module on its mesh through PJRT, with donation, validating inputs first.

The module is carried by a `jax.export.Exported` (jax's own export with our module swapped in), so jax's PJRT
client compiles it once, assembles sharded outputs and handles donation. Every input is checked for shape, dtype
and sharding *before* the call, because a donated buffer is gone once the executable starts.
"""

from __future__ import annotations

import functools
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding
from jaxlib.mlir.dialects import stablehlo as hlo

from shardopt import ir as sir
from shardopt.compat.jax_private import exported_with_module, serialize_portable
from shardopt.core.contract import GRADIENT, GRADIENT_INDICES, StepContract, TensorSpec
from shardopt.core.errors import StepInputError
from shardopt.core.layout import same_mesh
from shardopt.runtime.host_gradients import CHECKED, place_consistent, trusts_host_gradients

# The ids of the arrays each compiled step returned from its last call, which it keeps alive (so an id here
# is never another object's): XLA gave each its own buffers (or a donated input's, in place), so none shares a
# buffer with another live array unless someone built a new array over them, and that one is not in here.
_STEP_OUTPUTS: set[int] = set()


def _forget_outputs(ids: list[int]) -> None:
    _STEP_OUTPUTS.difference_update(ids)


def buffer_pointers(a: jax.Array) -> list[int]:
    """The device buffers under `a`, one address per addressable shard."""
    return [s.data.unsafe_buffer_pointer() for s in a.addressable_shards]


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
        self._donated_flags = [a.donated for a in contract.args]
        self._risky: list[bool] | None = None  # per argument: its accepted sharding is also a donated argument's
        # (dtype, shard shape) per argument: two arrays can share a device buffer only when these are equal
        self._buffer_keys = [(self._dtypes[i], tuple(sh.shard_shape(self._shapes[i])))
                             for i, sh in enumerate(self.in_shardings)]
        self._last_outputs: list[Any] = []  # kept alive while their ids are in _STEP_OUTPUTS
        self._output_ids: list[int] = []
        weakref.finalize(self, _forget_outputs, self._output_ids)
        self._fn = jax.jit(exported.call, donate_argnums=contract.donated_argnums())
        self._portable: CompiledStep | None = None  # the same step without compiled kernels, when it calls any
        self._portable_factory: Callable[[], CompiledStep] | None = None
        self._mesh_devices = frozenset(self.mesh.devices.flat)
        # the gradient inputs (values and sparse indices): what host_gradients="consistent" places unchecked
        self.gradient_args = frozenset(i for i, a in enumerate(contract.args) if a.role in (GRADIENT, GRADIENT_INDICES))

    @property
    def portable(self) -> CompiledStep | None:
        """The same step without compiled kernels (artifacts, TF, a process without the library), built on first
        use: its pipeline costs as much as the step's own, and most steps never need it."""
        if self._portable is None and self._portable_factory is not None:
            factory, self._portable_factory = self._portable_factory, None
            self._portable = factory()
        return self._portable

    @portable.setter
    def portable(self, step: CompiledStep | None) -> None:
        self._portable, self._portable_factory = step, None

    def defer_portable(self, factory: Callable[[], CompiledStep]) -> None:
        """Builds `portable` with `factory` when it is first read."""
        self._portable, self._portable_factory = None, factory

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

    def validate(self, args: Sequence[Any], host_gradients: str = CHECKED) -> list[jax.Array]:
        """Checks every input against the convention; moves non-donated inputs to their sharding.

        Runs on every step, so the common case (a jax array of the right shape and dtype, already placed as last
        time) costs a few attribute reads per argument; anything else takes the full check.
        `host_gradients="consistent"`: host gradients are the same in every process (the caller's promise) and
        are placed without jax's per-array cross-process check (runtime/host_gradients.py).
        """
        trusted = self.gradient_args if trusts_host_gradients(host_gradients) else frozenset()
        specs = self.contract.args
        if len(args) != len(specs):
            raise StepInputError(f"the step takes {len(specs)} arrays, got {len(args)}")
        out = list(args)
        accepted, shapes, dtypes, donated = self._accepted, self._shapes, self._dtypes, self._donated_flags
        if self._risky is None:
            shared = {id(accepted[i]) for i in self._donated_list if accepted[i] is not None}
            self._risky = [not d and id(s) in shared for d, s in zip(donated, accepted, strict=True)]
        risky, outputs = self._risky, _STEP_OUTPUTS
        exact = array_type()
        suspects = []  # arguments whose buffers may be another argument's: compared by address below
        for i, a in enumerate(args):
            if type(a) is exact:
                aval = a.aval
                if (aval.shape == shapes[i] and aval.dtype == dtypes[i] and not a.is_deleted()
                        and a.sharding is accepted[i]):
                    # the common case: what was accepted for this argument last time; a donated array a step
                    # returned and a non-donated one on a sharding no donated argument has need no more checks
                    if (id(a) not in outputs) if donated[i] else risky[i]:
                        suspects.append(i)
                    continue
            out[i] = self._check(i, a, i in trusted)
            if out[i] is a:  # the caller's own jax.Array, passed on as it is
                suspects.append(i)
        uses = Counter(map(id, out))  # a donated array passed twice would be read after XLA reused its buffer
        twice = [specs[i].name for i in self._donated_list if uses[id(out[i])] > 1]
        if twice:
            raise StepInputError(f"the same array is passed as a donated input and as another input: {twice}; "
                                 "pass a copy")
        if suspects:
            self._check_buffers(out, suspects)
        return out

    def _check_buffers(self, out: list[Any], suspects: list[int]) -> None:
        """A new jax.Array can be built over another's device buffers (`jax.make_array_from_single_device_arrays`
        over its shards, a no-copy `device_put`); XLA then reads a donated buffer it is overwriting and the
        process segfaults. Compares the buffer addresses of the suspects with those of every donated argument
        (of every argument, when a donated one is a suspect) of the same dtype and shard shape."""
        specs, donated, keys = self.contract.args, self._donated_flags, self._buffer_keys
        wanted = {keys[i] for i in suspects}
        pool = range(len(out)) if any(donated[i] for i in suspects) else self._donated_list
        candidates = sorted({*(i for i in pool if keys[i] in wanted), *suspects})
        owner: dict[int, int] = {}
        for i in candidates:
            a = out[i]
            if not isinstance(a, jax.Array):
                continue
            for pointer in buffer_pointers(a):
                j = owner.setdefault(pointer, i)
                if j != i and (donated[i] or donated[j]):
                    first, second = (j, i) if donated[j] else (i, j)
                    raise StepInputError(
                        f"{specs[second].name} shares a device buffer with the donated input {specs[first].name} "
                        f"(an array built over its shards?); XLA would overwrite it while reading it: pass a copy")

    def _check(self, i: int, a: Any, trusted: bool = False) -> Any:
        """The full check of argument `i`: the array to pass, or a StepInputError that names it.

        Placed as `jax.jit` would place them: host arrays (numpy, Python scalars) and single-device jax arrays
        on one of the mesh's devices (or uncommitted ones, e.g. `jnp.zeros` on the default device). Their copy is
        what is donated, so the caller's own value is never lost. Refused: a wrong shape or dtype, and a jax
        array on another mesh or sharded otherwise, which may be the only copy of its value. `trusted`: a host
        array (or an uncommitted one) the caller promises is the same in every process, placed unchecked.
        """
        spec, want, dtype = self.contract.args[i], self.in_shardings[i], self._dtypes[i]
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):  # a Python scalar, a list, an object
            if isinstance(a, (bool, int, float)) and not isinstance(a, bool) and not spec.shape:
                a = np.asarray(a, dtype)  # a Python number for a scalar input (the learning rate, the counter)
            else:
                raise StepInputError(f"{spec.name}: expected a {spec.dtype}{list(spec.shape)} array, got "
                                     f"{type(a).__name__}")
        if a.shape != spec.shape and tuple(a.shape) != spec.shape:
            raise StepInputError(f"{spec.name}: expected shape {spec.shape}, got {tuple(a.shape)}")
        if a.dtype != dtype:
            raise StepInputError(f"{spec.name}: expected dtype {spec.dtype}, got {np.dtype(a.dtype)}")
        if not isinstance(a, jax.Array):
            if trusted and not want.is_fully_addressable:
                return place_consistent(a, want, dtype)
            return jax.device_put(a, want)  # a host array: the device copy is new, donating it loses nothing
        if a.is_deleted():
            raise StepInputError(f"{spec.name}: the array was deleted (donated to an earlier call)")
        sharding = a.sharding
        if sharding is self._accepted[i] or sharding == want or sharding.is_equivalent_to(want, len(spec.shape)):
            if sharding is not self._accepted[i]:
                self._accepted[i] = sharding  # the next call with this sharding object takes the fast path
                self._risky = None
            return a
        if isinstance(sharding, SingleDeviceSharding):
            (device,) = sharding.device_set
            uncommitted = not getattr(a, "_committed", True)
            if trusted and uncommitted and not want.is_fully_addressable:  # this process's own copy of the value
                return place_consistent(a, want, dtype)
            if uncommitted or device in self._mesh_devices:
                # a donated one is copied first: device_put reuses the buffer of the device it is on (even with
                # may_alias=False), and donating that would delete the caller's array or overwrite a buffer
                # another argument (the same array passed twice) reads
                return jax.device_put(jax.numpy.array(a, copy=True) if spec.donated else a, want)
            raise StepInputError(f"{spec.name}: the array is on {device}, outside the step's mesh "
                                 f"{dict(self.contract.mesh_axes)}")
        if spec.donated:
            raise StepInputError(f"{spec.name}: expected sharding {want.spec} on the step's mesh, got {sharding}")
        return jax.device_put(a, want)

    def __call__(self, args: Sequence[Any], host_gradients: str = CHECKED) -> list[jax.Array]:
        outs = list(self._fn(*self.validate(args, host_gradients)))
        ids = self._output_ids
        _STEP_OUTPUTS.difference_update(ids)
        ids[:] = map(id, outs)
        _STEP_OUTPUTS.update(ids)
        self._last_outputs = outs
        return outs

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
