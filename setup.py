"""Builds the optional compiled update kernels (shardopt/kernels/cpu) as a plain shared library.

Everything else is in pyproject.toml. The library is loaded with ctypes and registered with XLA's FFI at run
time (shardopt/kernels/_loader.py); it is not a Python extension module and links against nothing but the C++
runtime. It compiles against the FFI headers that jaxlib ships (`jax.ffi.include_dir()`, here found through
`jaxlib`, a build requirement). When there is no C++ compiler, no jaxlib headers, or the build fails, the
install still succeeds: a warning is printed and shardopt keeps its StableHLO update path
(`shardopt.kernels.available()` then says why). Set SHARDOPT_BUILD_KERNELS=0 to skip the build.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = "shardopt.kernels.libshardopt_kernels"


def _warn(why: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nWARNING: shardopt's compiled update kernels were not built: {why}\n"
          f"shardopt works without them (StableHLO update path).\n{bar}\n", file=sys.stderr, flush=True)


def _ffi_include_dir() -> str:
    import jaxlib  # the build requirement; jax.ffi.include_dir() is this path

    base = os.path.dirname(os.path.abspath(jaxlib.__file__)) if jaxlib.__file__ else list(jaxlib.__path__)[0]
    include = os.path.join(base, "include")
    if not os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
        raise FileNotFoundError(f"no xla/ffi/api/ffi.h under {include}")
    return include


class BuildKernels(build_ext):
    """build_ext that names the library libshardopt_kernels.so and never fails the install."""

    def get_ext_filename(self, fullname: str) -> str:
        # distutils passes the last component of the name (or, from some callers, the full dotted name).
        if fullname in (KERNELS, KERNELS.rsplit(".", 1)[1]):
            suffix = ".dylib" if sys.platform == "darwin" else ".so"
            return os.path.join(*fullname.split(".")) + suffix
        return super().get_ext_filename(fullname)

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # not a Python module: no PyInit_ symbol to export

    def run(self) -> None:
        if os.environ.get("SHARDOPT_BUILD_KERNELS", "1") == "0":
            _warn("SHARDOPT_BUILD_KERNELS=0")
            return
        try:
            super().run()
        except Exception as e:  # compiler missing or failing: the install goes on without kernels
            _warn(f"{type(e).__name__}: {e}")

    def build_extension(self, ext: Extension) -> None:
        try:
            # -isystem: the headers' own warnings are not ours to read at every install.
            ext.extra_compile_args = ["-isystem", _ffi_include_dir(), *ext.extra_compile_args]
        except Exception as e:
            _warn(f"jaxlib's FFI headers not found ({type(e).__name__}: {e})")
            return
        try:
            super().build_extension(ext)
        except Exception as e:
            _warn(f"{type(e).__name__}: {e}")


kernels = Extension(
    KERNELS,
    sources=["shardopt/kernels/cpu/kernels.cc"],
    depends=["shardopt/kernels/cpu/update_loops.inc", "shardopt/kernels/cpu/parallel.inc",
             "shardopt/kernels/cpu/operands.inc"],
    language="c++",
    # -ffp-contract=off: the source writes every fused multiply-add XLA:CPU would make (update_loops.inc);
    # -fno-math-errno lets std::sqrt vectorize (2x); the AVX2+FMA loops are chosen at run time by a CPU check,
    # so the library runs on any x86-64 (measured: as fast as -march=native, benchmarks/README.md).
    extra_compile_args=["-std=c++17", "-O3", "-fno-math-errno", "-ffp-contract=off", "-fvisibility=hidden",
                        "-fPIC", "-DNDEBUG", "-g0"],
    extra_link_args=["-g0"],
    optional=True,
)

setup(ext_modules=[kernels], cmdclass={"build_ext": BuildKernels})
