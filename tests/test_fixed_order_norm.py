"""The fixed summation order of a pack's sum of squares (passes/fixed_order_norm.py): the `shardopt_sumsq` kernel
against the order written out in numpy (baseline ISA: plain float32 multiply and add, which numpy reproduces
bit for bit), and the kernel path against the portable (StableHLO) path through the whole pipeline, for pack
sizes that take every branch of the order: no whole row, exactly one row, one row and a tail, several rows."""

import ml_dtypes  # noqa: F401  (numpy bfloat16)
import numpy as np
import pytest

import shardopt
from shardopt import kernels as sk
from shardopt.kernels import _loader
from shardopt.kernels.calls import SUMSQ_LANES, sumsq_width
from shardopt.passes.pipeline import DEFAULT_PIPELINE

OFF = tuple("lower-to-kernels{enabled=false}" if p == "lower-to-kernels" else p for p in DEFAULT_PIPELINE)


def bits(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def reference(xs: list[np.ndarray]) -> np.float32:
    """The order of kernels.cc SumsqImpl without FMA: lanes over rows of W, the tail, then halving."""
    x = np.concatenate([np.ravel(v).astype(np.float32) for v in xs])
    n = x.size
    w = sumsq_width(n)
    acc = np.zeros(w, np.float32)
    for b in range(0, n, w):
        row = x[b:b + w]
        acc[:row.size] = acc[:row.size] + row * row
    while w > 1:
        w //= 2
        acc = acc[:w] + acc[w:2 * w]
    return acc[0]


@pytest.fixture
def baseline():
    """The kernels' baseline ISA (no FMA) for one test."""
    lib = _loader.load().lib
    saved = lib.ShardoptKernelsIsa()
    lib.ShardoptKernelsSetIsa(0)
    yield
    lib.ShardoptKernelsSetIsa(saved)


def test_width():
    assert [sumsq_width(n) for n in (1, 2, 3, 333, 4096, 4097)] == [1, 2, 4, 512, 4096, 8192]
    assert sumsq_width(SUMSQ_LANES + 1) == sumsq_width(10**8) == SUMSQ_LANES == 1 << 16


@pytest.mark.parametrize("sizes", [(1,), (3, 4), (37, 200, 5), (2048, 2048), (50000, 50003), (3700,) * 60,
                                   (1 << 18,), (7 * 65536 + 12345,)], ids=lambda s: f"{sum(s)}")
@pytest.mark.parametrize("dtype", [np.float32, np.dtype("bfloat16")], ids=["float32", "bfloat16"])
def test_kernel_is_the_order_in_numpy(sizes, dtype, baseline):
    """Bitwise, including the threaded path (the larger sizes run on XLA's pool: lanes split over threads)."""
    import jax

    rng = np.random.default_rng(len(sizes))
    xs = [(rng.standard_normal(s) * 3).astype(dtype) for s in sizes]
    got = jax.jit(lambda *a: sk.sumsq(a))(*xs)
    np.testing.assert_array_equal(bits(np.float32(got)), bits(reference(xs)))


def test_refuses_mixed_dtypes():
    import jax.numpy as jnp

    with pytest.raises(ValueError, match="must all be float32 or all bfloat16"):
        sk.sumsq([jnp.ones(3, jnp.float32), jnp.ones(3, jnp.bfloat16)])


def run(dtype, sizes, pipeline, steps=3):
    rng = np.random.default_rng(1)
    vs = [shardopt.Variable(rng.standard_normal(n).astype(dtype), name=f"v{i}") for i, n in enumerate(sizes)]
    sizes = [v.shape for v in vs]
    opt = shardopt.Adam(learning_rate=1e-2, global_clipnorm=0.5)
    opt.pipeline = pipeline
    for _ in range(steps):
        opt.apply_gradients([(rng.standard_normal(n).astype(np.float32).astype(dtype), v)
                             for n, v in zip(sizes, vs, strict=True)])
    return [np.asarray(v.value) for v in vs], next(iter(opt._programs.values()))


# no whole row (W/2 < N < W), exactly one row (N = W), one row and a tail, two rows and a tail
SIZES = {"no_row": (37, 200, 5, 64, 27), "one_row": (2048, 2048), "row_and_tail": (50000, 50003),
         "rows_and_tail": (60000, 65000, 10000)}
# a pack beside variables in buffers of their own (each large one's norm its own shardopt_sumsq call)
LOOSE = {"pack_and_loose": ((300,), (500,), (100000,), (256, 1024)), "one_tensor": (((1 << 20) + 5,),)}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float32, np.dtype("bfloat16")], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("key", list(SIZES))
def test_kernel_path_equals_portable_path(key, dtype):
    """The clipped trajectory is bitwise the same on both paths: `shardopt_sumsq` on the kernel path, the while
    loop and halving in StableHLO on the portable one (XLA:CPU's FMA contraction included)."""
    with_kernel, program = run(dtype, SIZES[key], DEFAULT_PIPELINE)
    without, _ = run(dtype, SIZES[key], OFF)
    assert program.pipeline.stage("lower-to-kernels").stats["norms_lowered"] == 1
    for x, y in zip(with_kernel, without, strict=True):
        np.testing.assert_array_equal(bits(x), bits(y))


@pytest.mark.slow
@pytest.mark.parametrize("key", list(LOOSE))
def test_loose_gradients_equal_on_both_paths(key):
    """Large replicated gradients kept in buffers of their own: one `shardopt_sumsq` each on the kernel path, the
    same order in StableHLO on the portable path (lower-to-kernels decides alike with enabled=false)."""
    with_kernel, program = run(np.float32, LOOSE[key], DEFAULT_PIPELINE)
    without, off = run(np.float32, LOOSE[key], OFF)
    loose = sum(int(np.prod(s)) > 1 << 15 for s in LOOSE[key])
    stats = program.pipeline.stage("lower-to-kernels").stats
    assert stats["norms_fixed_order"] == loose and stats["kernels"]["shardopt_sumsq"] == loose + (key != "one_tensor")
    off_stats = off.pipeline.stage("lower-to-kernels").stats
    assert off_stats["norms_fixed_order"] == loose and "norms_lowered" not in off_stats
    assert "shardopt_sumsq" not in off.pipeline.stage("cleanup").text
    for x, y in zip(with_kernel, without, strict=True):
        np.testing.assert_array_equal(bits(x), bits(y))
