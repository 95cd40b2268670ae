"""The one place shardopt touches private jax APIs (pinned to jax/jaxlib 0.10.2; tests/test_compat_jax.py
pins their behaviour so an upgrade fails loudly here instead of deep inside the pipeline)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax._src.interpreters import mlir as _jax_mlir
from jax._src.lib import _jax as _jaxlib_ext
from jax._src.lib import xla_client as _xla_client
from jaxlib.mlir import ir

PINNED_JAX = "0.10.2"


def make_ir_context() -> ir.Context:
    """An MLIR context with func, stablehlo, chlo, mhlo and sdy registered and loaded."""
    return _jax_mlir.make_ir_context()


def module_to_bytecode(module: ir.Module) -> bytes:
    return _jax_mlir.module_to_bytecode(module)


def serialize_portable(module: ir.Module, target_version: str) -> bytes:
    """VHLO bytes as `jax.export` writes them (keeps sdy; does not modify `module`)."""
    return _jaxlib_ext.mlir.serialize_portable_artifact(module, target_version, True)


def exported_with_module(exported: jax.export.Exported, module_bytes: bytes,
                         in_shardings: tuple[Any, ...], out_shardings: tuple[Any, ...]) -> jax.export.Exported:
    """`exported` with its module swapped for ours and the boundary shardings our passes chose.

    The VJP is dropped: the swapped module is an optimizer step, nothing differentiates through it.
    """
    return dataclasses.replace(
        exported,
        mlir_module_serialized=module_bytes,
        _in_named_shardings=tuple(in_shardings),
        _out_named_shardings=tuple(out_shardings),
        _get_vjp=None,
    )


def exported_fields(exported: jax.export.Exported) -> dict[str, Any]:
    """The private fields shardopt relies on, for the pinning test and for `inspect`."""
    return {
        "in_named_shardings": exported._in_named_shardings,
        "out_named_shardings": exported._out_named_shardings,
        "has_named_shardings": exported._has_named_shardings,
    }


def hlo_sharding_from_proto(proto: Any) -> Any:
    return _xla_client.HloSharding.from_proto(proto)


def inline_func_call(callee: ir.Operation, operands: list[ir.Value]) -> list[ir.Value]:
    """Clones `callee`'s body at the current insertion point (jaxlib registers no func inliner)."""
    from jaxlib.mlir._mlir_libs import _jax_mlir_ext

    return list(_jax_mlir_ext.inlined_func_call(callee, operands))


def distributed_client() -> Any:
    """The `DistributedRuntimeClient` of `jax.distributed.initialize` (None before it / after shutdown).

    Its key-value store (`key_value_set(key, value, allow_overwrite)`, `key_value_dir_get(prefix)`,
    `blocking_key_value_get(key, timeout_in_ms)`) is what shardopt.distributed's watchdog beats through.
    """
    from jax._src import distributed as _jax_distributed

    return _jax_distributed.global_state.client


def connect_distributed_client(coordinator_address: str, num_processes: int, process_id: int, *,
                               initialization_timeout: int, heartbeat_timeout: int, shutdown_timeout: int) -> None:
    """What `jax.distributed.initialize` does in a process, except that no process starts the coordination
    service: it runs elsewhere (`start_distributed_service` in a process of its own), so the death of any
    training process leaves the service, and the survivors' connection to it, intact."""
    from jax._src import distributed as _jax_distributed
    from jax._src.lib import _jax

    state = _jax_distributed.global_state
    if state.client is not None:
        raise RuntimeError("jax.distributed is already initialized in this process")
    state.coordinator_address = coordinator_address
    state.process_id = process_id
    state.num_processes = num_processes
    state.client = _jax.get_distributed_runtime_client(
        coordinator_address, process_id, init_timeout=initialization_timeout, use_compression=True,
        heartbeat_timeout=heartbeat_timeout, shutdown_timeout=shutdown_timeout)
    state.client.connect()
    state.initialize_preemption_sync_manager()


def start_distributed_service(bind_address: str, num_processes: int, *, heartbeat_timeout: int,
                              shutdown_timeout: int, recoverable: bool = True) -> Any:
    """jax's coordination service (what process 0 of `jax.distributed.initialize` hosts), started on its own.
    Keep the returned object alive; `.shutdown()` stops it."""
    from jax._src.lib import _jax

    return _jax.get_distributed_runtime_service(bind_address, num_processes, heartbeat_timeout=heartbeat_timeout,
                                                shutdown_timeout=shutdown_timeout, recoverable=recoverable)
