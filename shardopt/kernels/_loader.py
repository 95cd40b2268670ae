"""Finding, loading and registering the compiled kernel library (built by `pip install`, see setup.py).

Loading never raises: a missing library, a library from another ABI, or a failed registration becomes a reason
string that `shardopt.kernels.available` reports, and the caller keeps its StableHLO path.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import jax

# Must equal kAbiVersion in cpu/kernels.cc: the operands and attributes the Python side passes.
ABI_VERSION = 5
LIBRARY_NAME = "libshardopt_kernels.dylib" if sys.platform == "darwin" else "libshardopt_kernels.so"
ENV_LIBRARY = "SHARDOPT_KERNELS_LIBRARY"  # a path overriding the installed library
ENV_DISABLE = "SHARDOPT_KERNELS"  # "0" turns the compiled kernels off

# FFI target name -> exported handler symbol.
TARGETS = {"shardopt_adam_update": "ShardoptAdamUpdate", "shardopt_adam_pack_update": "ShardoptAdamPackUpdate",
           "shardopt_sgd_update": "ShardoptSgdUpdate", "shardopt_sgd_pack_update": "ShardoptSgdPackUpdate",
           "shardopt_sumsq": "ShardoptSumsq"}
ISA_NAMES = {0: "baseline (no FMA)", 1: "avx2+fma"}


@dataclass
class Library:
    """The loaded library, or why there is none."""

    path: Path
    lib: ctypes.CDLL | None = None
    reason: str | None = None
    registered: set[str] = field(default_factory=set)

    @property
    def isa(self) -> str | None:
        return None if self.lib is None else ISA_NAMES.get(self.lib.ShardoptKernelsIsa(), "unknown")


_lock = threading.Lock()
_library: Library | None = None
# Targets registered with XLA in this process (registration cannot be undone; never register a name twice).
_registered_targets: dict[str, str] = {}


def library_path() -> Path:
    override = os.environ.get(ENV_LIBRARY)
    return Path(override) if override else Path(__file__).with_name(LIBRARY_NAME)


def _open(path: Path) -> Library:
    if os.environ.get(ENV_DISABLE, "1") == "0":
        return Library(path, reason=f"compiled kernels disabled by {ENV_DISABLE}=0")
    if not path.exists():
        return Library(path, reason=f"compiled kernel library not built ({path} missing: install shardopt with a "
                                    "C++ compiler present, e.g. `pip install -e .` with g++)")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return Library(path, reason=f"compiled kernel library {path} does not load: {e}")
    try:
        version = lib.ShardoptKernelsAbiVersion()
        for symbol in TARGETS.values():
            getattr(lib, symbol)
    except AttributeError as e:
        return Library(path, reason=f"{path} is not a shardopt kernel library ({e})")
    if version != ABI_VERSION:
        return Library(path, reason=f"{path} has kernel ABI {version}, this shardopt needs {ABI_VERSION}: "
                                    "reinstall shardopt to rebuild it")
    return Library(path, lib=lib)


def _register(library: Library) -> None:
    assert library.lib is not None
    for target, symbol in TARGETS.items():
        done = _registered_targets.get(target)
        if done is not None:
            if done != str(library.path):
                library.reason = (f"FFI target {target} is already registered from {done}; cannot register "
                                  f"{library.path} in the same process")
                library.lib = None
                return
            library.registered.add(target)
            continue
        try:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library.lib, symbol)), platform="cpu")
        except Exception as e:  # pragma: no cover - jaxlib refusing a registration
            library.reason = f"registering FFI target {target} failed: {type(e).__name__}: {e}"
            library.lib = None
            return
        _registered_targets[target] = str(library.path)
        library.registered.add(target)


def load() -> Library:
    """The process's library, loaded and registered on first use."""
    global _library
    with _lock:
        if _library is None:
            library = _open(library_path())
            if library.lib is not None:
                _register(library)
            _library = library
        return _library


def reset() -> None:
    """Forget the loaded library so the next `load` looks again (tests; registered targets stay registered)."""
    global _library
    with _lock:
        _library = None
