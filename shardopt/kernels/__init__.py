"""Compiled one-pass update kernels, called from StableHLO as XLA FFI custom calls.

XLA:CPU compiles an Adam update into three loops per tensor (m, v, then the variable re-reading both): about
40 bytes moved per float32 element instead of the 28 a single pass needs. The kernels in `cpu/kernels.cc` do the
update of a whole packed group in one pass, in place (results alias the state operands), on XLA's intra-op
thread pool, taking the group's gradients as separate operands (no gather). They are built by `pip install`
when a C++ compiler is present (setup.py); a pass asks `available()` and keeps the StableHLO path, reporting
`reason()`, when they are not.

- `available(kernel, dtype, platform)` / `reason(...)`: whether a kernel can be called, and why not.
- `adam_call(...)` / `sgd_call(...)` (`*_pack_call` for a pack's variables in buffers of their own): a
  `KernelCall` (FFI target, attributes, operand order, aliases) for a pass that emits `stablehlo.custom_call`.
- `shardopt.kernels.stablehlo.custom_call(call, operands)`: that op built with jaxlib's MLIR bindings, attribute
  for attribute what `jax.ffi.ffi_call` lowers to.
- `adam_update(...)` / `sgd_update(...)` (and `*_pack_update`): jax functions on `jax.ffi.ffi_call` (tests,
  benchmarks, embedding).
- `sumsq_call()` / `sumsq(xs)`: the sum of squares of many gradient buffers in one pass, in the fixed order
  that `passes/fixed_order_norm.py` writes in StableHLO (a global clip norm reads each gradient once, in place).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from shardopt.kernels import _loader
from shardopt.kernels.calls import (
    KernelCall,
    adam_call,
    adam_pack_call,
    adam_pack_update,
    adam_update,
    clip_scale_operand,
    sgd_call,
    sgd_pack_call,
    sgd_pack_update,
    sgd_update,
    sumsq,
    sumsq_call,
)

KERNELS = {"adam": "shardopt_adam_update", "adam_pack": "shardopt_adam_pack_update", "sgd": "shardopt_sgd_update",
           "sgd_pack": "shardopt_sgd_pack_update", "sumsq": "shardopt_sumsq"}
PACK_SUFFIX = "_pack"  # "adam_pack": the kernel of a pack whose variables stay in buffers of their own
DTYPES = ("float32", "bfloat16")
PLATFORMS = ("cpu",)

__all__ = [
    "DTYPES", "KERNELS", "PACK_SUFFIX", "KernelCall", "PLATFORMS", "adam_call", "adam_pack_call", "adam_pack_update",
    "adam_update", "available", "clip_scale_operand",
    "info", "module_kernels", "reason", "sgd_call", "sgd_pack_call", "sgd_pack_update", "sgd_update", "sumsq",
    "sumsq_call", "target_reason",
]


def _dtype_name(dtype: Any) -> str:
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def reason(kernel: str, dtype: Any = "float32", platform: str = "cpu") -> str | None:
    """None when `kernel` can update variables of `dtype` on `platform`, else a sentence saying why not."""
    if kernel not in KERNELS:
        return f"no compiled kernel for {kernel!r} (kernels: {', '.join(sorted(KERNELS))})"
    name = _dtype_name(dtype)
    if name not in DTYPES:
        return f"compiled {kernel} kernel supports {' and '.join(DTYPES)} variables, not {name}"
    if platform.lower() not in PLATFORMS:
        return f"no compiled {kernel} kernel for platform {platform!r} (only {', '.join(PLATFORMS)})"
    library = _loader.load()
    if library.lib is None:
        return library.reason
    if KERNELS[kernel] not in library.registered:
        return f"FFI target {KERNELS[kernel]} is not registered"
    return None


def available(kernel: str, dtype: Any = "float32", platform: str = "cpu") -> bool:
    """Whether `kernel` ("adam", "sgd") exists for `dtype` variables on `platform` (loads the library once)."""
    return reason(kernel, dtype, platform) is None


def target_reason(target: str) -> str | None:
    """None when the FFI target `target` (a custom call a module makes) is registered in this process, else why
    not (artifacts check this before running a loaded step)."""
    if target not in KERNELS.values():
        return f"{target} is not one of shardopt's kernels ({', '.join(sorted(KERNELS.values()))})"
    library = _loader.load()
    if library.lib is None:
        return library.reason
    if target not in library.registered:
        return f"FFI target {target} is not registered"
    return None


_TARGET = re.compile(r'custom_call\s*@(shardopt_\w+)|call_target_name\s*=\s*"(shardopt_\w+)"')


def module_kernels(module_text: str) -> list[str]:
    """The shardopt kernel targets a StableHLO module's custom calls name, sorted."""
    return sorted({a or b for a, b in _TARGET.findall(module_text)})


def info() -> dict[str, Any]:
    """What is loaded, for statistics, inspect output and artifacts."""
    library = _loader.load()
    return {
        "library": str(library.path),
        "loaded": library.lib is not None,
        "reason": library.reason,
        "abi_version": _loader.ABI_VERSION,
        "isa": library.isa,
        "targets": sorted(library.registered),
    }
