"""Saves a compiled step to one `.shardopt` file and loads it back, in any process, without the optimizer.

`step.save(path)` writes (atomically, see `container.py` for the byte layout):

* a JSON manifest: the versions that built it (shardopt, jax, jaxlib, StableHLO and the portable target), the
  mesh's axis names and sizes, the platforms, every variable (name, shape, dtype, layout, slot layouts, bytes
  per device), the optimizer's class and `get_config()`, the pass pipeline with each pass's statistics, the
  calling convention, the params' pytree structure (as JSON, never pickled) and how slots start;
* payload `exported`: `jax.export.Exported.serialize()` of the optimized step (it carries the portable VHLO
  module, so a newer jax inside the StableHLO compatibility window still runs it);
* payloads `stage/<i>:<name>`: the IR after each stage (zlib), so `inspect --stage` works on a loaded step.

`read(path)` (behind `shardopt.load`) verifies the file, checks the mesh, device count and platform, and
deserializes the export and the step contract; `runtime/functional.py` rebuilds the `FunctionalStep` from them.
Nothing is re-lowered: XLA compiles the stored module on the first call, once (the mesh is rebuilt with the
axis types it was compiled for, so the step's results are typed like its inputs).
This module knows the file format, not the step object: it reads a step's attributes and returns plain data.
"""

from __future__ import annotations

import math
import os
import platform as _platform
import warnings
from dataclasses import dataclass
from typing import Any

import jax
import jaxlib
import numpy as np
from jax.sharding import AxisType, Mesh
from jaxlib.mlir.dialects import stablehlo as hlo

from shardopt import kernels
from shardopt.core.contract import SLOT, VARIABLE, StepContract, TensorSpec
from shardopt.core.errors import ArtifactError
from shardopt.core.records import Stage
from shardopt.runtime.container import read_container, write_container
from shardopt.runtime.executable import portable_target
from shardopt.runtime.manifest_json import jsonable, tree_from_json, tree_to_json

KIND = "optimizer-step"
EXPORTED = "exported"
PORTABLE = "exported-portable"
STAGE_PREFIX = "stage/"


@dataclass(frozen=True)
class Artifact:
    """Where a loaded step came from: the file, its verified manifest and the stages' IR."""

    path: str
    manifest: dict[str, Any]
    stages: tuple[Stage, ...]
    size: int


def versions() -> dict[str, str]:
    """The versions that matter for reading an artifact back, as written into (and compared with) manifests."""
    import shardopt

    return {
        "shardopt": shardopt.__version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.version.__version__,
        "stablehlo": str(hlo.get_current_version()),
        "stablehlo_target": str(portable_target()),
        "python": _platform.python_version(),
    }


# ----- what the manifest says about variables -----------------------------------------------------------------
def bytes_per_device(spec: TensorSpec, mesh_axes: dict[str, int]) -> int:
    """Bytes of one device's shard of `spec` under its layout (dims that do not divide round up)."""
    layout = list(spec.layout or ()) + [None] * (len(spec.shape) - len(spec.layout or ()))
    elems = 1
    for size, entry in zip(spec.shape, layout, strict=True):
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        elems *= math.ceil(size / math.prod(mesh_axes[a] for a in axes))
    return elems * np.dtype(spec.dtype).itemsize


def variables_table(contract: StepContract) -> list[dict[str, Any]]:
    """Per variable: name, shape, dtype, layout, slot layouts, where its slots live (its own buffers or a pack)
    and bytes per device (variable, slots)."""
    from shardopt.core.packing import member_layout

    axes = dict(contract.mesh_axes)
    slot_names = contract.slot_names()
    members = contract.member_of()
    rows = []
    for var in contract.args_with_role(VARIABLE):
        packed = members.get(var.name)
        layouts, nbytes = {}, 0
        for slot in (s for s in slot_names if s in contract.slots_of(var.name)):
            spec, _ = contract.slot_arg(var.name, slot)
            if packed is None:
                layouts[slot] = TensorSpec.to_json(spec)["layout"]
                nbytes += bytes_per_device(spec, axes)
            else:
                member = TensorSpec(spec.name, SLOT, var.shape, spec.dtype,
                                    layout=member_layout(spec.layout or (None,), len(var.shape)))
                layouts[slot] = TensorSpec.to_json(member)["layout"]
                nbytes += bytes_per_device(member, axes)
        rows.append({
            "name": var.name, "shape": list(var.shape), "dtype": var.dtype,
            "layout": TensorSpec.to_json(var)["layout"],
            "slots": layouts,
            "storage": "own buffers" if packed is None else packed[0].name,
            "bytes_per_device": bytes_per_device(var, axes),
            "slot_bytes_per_device": nbytes,
        })
    return rows


def state_bytes_per_device(contract: StepContract) -> int:
    """Bytes of optimizer state (slots, gradient buffers, optimizer state, counter) one device holds."""
    axes = dict(contract.mesh_axes)
    return sum(bytes_per_device(s, axes) for s in contract.state)


def step_stages(step: Any) -> list[Stage]:
    """The pipeline's stages: from the compiler when compiled here, from the file when loaded."""
    if step.program is not None:
        return list(step.program.pipeline.stages)
    if step.artifact is not None:
        return list(step.artifact.stages)
    return []


def build_manifest(step: Any) -> dict[str, Any]:
    """The manifest of a `FunctionalStep` (read by attribute: this module does not import the step's class)."""
    conv = step.contract
    return {
        "kind": KIND,
        "versions": versions(),
        "platforms": list(step.executable.exported.platforms),
        "mesh": {"axes": [[n, s] for n, s in conv.mesh_axes], "device_count": math.prod(s for _, s in conv.mesh_axes),
                 "axis_types": [str(t).rsplit(".", 1)[-1] for t in step.mesh.axis_types]},
        "optimizer": {"class_name": step.optimizer_class, "config": jsonable(step.optimizer_config)},
        "pipeline": list(step.pipeline),
        "variables": variables_table(conv),
        "state_bytes_per_device": state_bytes_per_device(conv),
        "names": list(step.names),
        "tree": tree_to_json(step.treedef),
        "slots": list(step.slot_names),
        "slot_init": dict(step.slot_init),
        "initial_learning_rate": step.initial_learning_rate,
        "convention": conv.to_json(),
        # compiled kernels the optimized module calls (lower-to-kernels): a process loading the file needs them
        "kernels": kernels.module_kernels(step.executable.exported.mlir_module()),
    }


def check_kernels(manifest: dict[str, Any], where: str, portable: bool = False) -> bool:
    """Whether this process can run the compiled kernels the step calls. When it cannot: False if the file has
    the portable module to fall back to (`portable`), else an ArtifactError naming each missing kernel."""
    missing = [(t, kernels.target_reason(t)) for t in manifest.get("kernels", [])]
    missing = [(t, why) for t, why in missing if why is not None]
    if missing and portable:
        warnings.warn(f"{where}: running the portable module (no compiled kernels): "
                      + "; ".join(f"{t}: {why}" for t, why in missing), RuntimeWarning, stacklevel=3)
        return False
    if missing:
        listed = "; ".join(f"{t}: {why}" for t, why in missing)
        raise ArtifactError(f"{where}: the step calls compiled update kernels this process does not have ({listed}). "
                            f"Install shardopt with its kernels (a C++ compiler at pip install), or recompile the "
                            f"step with the pass `lower-to-kernels{{enabled=false}}` for a portable artifact")
    return True


def save(step: Any, path: str | os.PathLike[str], *, stages: bool = True) -> int:
    """Writes `step` to `path` atomically (temp file + rename); returns the file size in bytes.

    `stages=False` leaves out the per-stage IR (smaller file; `inspect --stage` then has only the compiled HLO).
    """
    manifest = build_manifest(step)
    payloads: dict[str, tuple[bytes, str]] = {EXPORTED: (bytes(step.executable.exported.serialize()), "raw")}
    if step.executable.portable is not None:  # the same step without compiled kernels, to fall back to
        payloads[PORTABLE] = (bytes(step.executable.portable.exported.serialize()), "raw")
    manifest["stages"] = []
    for i, st in enumerate(step_stages(step)):
        entry: dict[str, Any] = {"name": st.name, "spec": st.spec, "stats": jsonable(st.stats),
                                 "seconds": float(st.seconds)}
        if stages and st.text:
            entry["payload"] = f"{STAGE_PREFIX}{i}:{st.name}"
            payloads[entry["payload"]] = (st.text.encode("utf-8"), "zlib")
        manifest["stages"].append(entry)
    return write_container(path, manifest, payloads)


# ----- loading ------------------------------------------------------------------------------------------------
def _fmt_axes(axes: Any) -> str:
    return ",".join(f"{n}={s}" for n, s in axes)


def _platform_devices(platforms: list[str], where: str) -> list[Any]:
    """This process's devices of the first platform the artifact was compiled for (CPU artifacts also load on a
    GPU machine, on its CPU devices)."""
    default = jax.default_backend()
    for p in sorted(platforms, key=lambda p: p != default):
        try:
            return list(jax.devices(p))
        except RuntimeError:
            continue
    raise ArtifactError(f"{where}: wrong platform: the artifact was compiled for {platforms}, this process has "
                        f"none of them (default backend: {default})")


def resolve_mesh(manifest: dict[str, Any], mesh: Mesh | None, where: str) -> Mesh:
    """The given mesh if it has the manifest's axes, or one built from all of this process's devices."""
    want = [(str(n), int(s)) for n, s in manifest["mesh"]["axes"]]
    need = math.prod(s for _, s in want)
    platforms = [str(p).lower() for p in manifest["platforms"]]
    if mesh is None:
        devices = _platform_devices(platforms, where)
        if len(devices) != need:
            raise ArtifactError(
                f"{where}: wrong device count: the artifact was compiled for mesh {_fmt_axes(want)} ({need} devices), "
                f"this process has {len(devices)} {devices[0].platform} device(s); pass mesh= or, on CPU, set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={need} before jax starts")
        types = manifest["mesh"].get("axis_types") or ["Auto"] * len(want)
        try:
            axis_types = tuple(getattr(AxisType, str(t)) for t in types)
        except AttributeError:
            raise ArtifactError(f"{where}: unknown mesh axis types {types}") from None
        mesh = jax.make_mesh([s for _, s in want], [n for n, _ in want], axis_types=axis_types, devices=devices)
    have = [(str(n), int(s)) for n, s in zip(mesh.axis_names, mesh.devices.shape, strict=True)]
    if have != want:
        raise ArtifactError(f"{where}: wrong mesh: the artifact was compiled for mesh {_fmt_axes(want)}, got "
                            f"{_fmt_axes(have)}")
    plat = mesh.devices.flat[0].platform.lower()
    if plat not in platforms:
        raise ArtifactError(f"{where}: wrong platform: the artifact was compiled for {platforms}, the mesh's devices "
                            f"are {plat}")
    return mesh


def _check_consistent(manifest: dict[str, Any], conv: StepContract, exported: Any, where: str) -> None:
    """The manifest, the calling convention and the export must describe the same step."""
    problems = []
    if [list(a) for a in conv.mesh_axes] != [[n, s] for n, s in manifest["mesh"]["axes"]]:
        problems.append(f"convention mesh {conv.mesh_axes} vs manifest mesh {manifest['mesh']['axes']}")
    if exported.nr_devices != manifest["mesh"]["device_count"]:
        problems.append(f"export for {exported.nr_devices} devices vs mesh of {manifest['mesh']['device_count']}")
    if len(exported.in_avals) != len(conv.args):
        problems.append(f"export takes {len(exported.in_avals)} arguments, the convention {len(conv.args)}")
    for aval, spec in zip(exported.in_avals, conv.args, strict=False):
        if tuple(aval.shape) != spec.shape or np.dtype(aval.dtype) != np.dtype(spec.dtype):
            exported = f"{np.dtype(aval.dtype)}{list(aval.shape)}"
            problems.append(f"{spec.name}: export {exported} vs convention {spec.dtype}{list(spec.shape)}")
    var_names = [a.name for a in conv.args if a.role == VARIABLE]
    if list(manifest["names"]) != var_names:
        problems.append(f"variables {manifest['names']} vs convention {var_names}")
    if [v["name"] for v in manifest["variables"]] != var_names:
        problems.append("the variable table does not list the convention's variables")
    if problems:
        raise ArtifactError(f"{where}: inconsistent artifact: " + "; ".join(problems))


@dataclass(frozen=True)
class LoadedStep:
    """What an artifact file holds, verified: enough to rebuild the functional step without its optimizer."""

    exported: Any
    contract: StepContract
    mesh: Mesh
    treedef: Any
    names: tuple[str, ...]
    slot_names: tuple[str, ...]
    slot_init: dict[str, str]
    initial_learning_rate: float | None
    optimizer_config: dict[str, Any]
    pipeline: tuple[str, ...]
    optimizer_class: str | None
    artifact: Artifact
    portable: Any = None  # the portable module's export, when the step calls kernels this process can run


def _exported(payloads: dict[str, bytes], name: str, where: str) -> Any:
    if name not in payloads:
        raise ArtifactError(f"{where}: the {name!r} payload is missing")
    try:
        return jax.export.deserialize(bytearray(payloads[name]))
    except Exception as e:  # jax raises struct/flatbuffer/version errors of many types
        raise ArtifactError(f"{where}: payload {name!r} is not a jax.export serialization this jax "
                            f"{jax.__version__} can read: {type(e).__name__}: {e}") from None


def read(path: str | os.PathLike[str], mesh: Mesh | None = None) -> LoadedStep:
    """Reads and verifies an artifact for `mesh` (default: all devices, the saved shape and axis types)."""
    where = os.fspath(path)
    manifest, payloads = read_container(path)
    try:
        if manifest.get("kind") != KIND:
            raise ArtifactError(f"{where}: not an optimizer-step artifact (kind {manifest.get('kind')!r})")
        mesh = resolve_mesh(manifest, mesh, where)
        with_kernels = check_kernels(manifest, where, portable=PORTABLE in payloads)
        try:
            conv = StepContract.from_json(manifest["convention"])
        except ValueError as e:
            raise ArtifactError(f"{where}: {e}: recompile the step with this shardopt") from None
        exported = _exported(payloads, EXPORTED if with_kernels else PORTABLE, where)
        portable = _exported(payloads, PORTABLE, where) if with_kernels and PORTABLE in payloads else None
        _check_consistent(manifest, conv, exported, where)
        names = tuple(manifest["names"])
        treedef = tree_from_json(manifest["tree"], len(names))
        stages = tuple(Stage(s["name"], payloads[s["payload"]].decode("utf-8") if "payload" in s else "",
                             dict(s.get("stats", {})), float(s.get("seconds", 0.0)), str(s.get("spec", "")))
                       for s in manifest.get("stages", []))
        return LoadedStep(
            exported=exported, contract=conv, mesh=mesh, treedef=treedef, names=names,
            slot_names=tuple(manifest["slots"]), slot_init=dict(manifest["slot_init"]),
            initial_learning_rate=manifest["initial_learning_rate"],
            optimizer_config=dict(manifest["optimizer"]["config"]), pipeline=tuple(manifest["pipeline"]),
            optimizer_class=manifest["optimizer"].get("class_name"),
            artifact=Artifact(where, manifest, stages, os.path.getsize(path)), portable=portable)
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{where}: malformed manifest: {type(e).__name__}: {e}") from None


__all__ = ["Artifact", "ArtifactError", "LoadedStep", "build_manifest", "bytes_per_device", "read", "save",
           "state_bytes_per_device", "step_stages", "tree_from_json", "tree_to_json", "variables_table", "versions"]
