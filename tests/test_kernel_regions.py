"""Kernels on sharded variables (passes/kernel_regions.py): on the 2x4 (batch, model) mesh, `lower-to-kernels`
wraps each kernel call in an `sdy.manual_computation` over both axes, so every device updates its own shards in
place. Bitwise equal to the StableHLO path (`lower-to-kernels{enabled=false}`) over several steps for loose and
packed variables sharded on dim 0, dim 1, over both axes and replicated; the compiled HLO has the custom calls on
local shapes and no all-gather or copy of the state."""

import re

import ml_dtypes  # noqa: F401  (numpy bfloat16)
import numpy as np
import pytest
from fusion_testlib import COLLECTIVE, filecheck

import shardopt
from shardopt import Layout
from shardopt import kernels as sk
from shardopt.passes.pipeline import DEFAULT_PIPELINE

PASS = "lower-to-kernels"
OFF = tuple("lower-to-kernels{enabled=false}" if p == PASS else p for p in DEFAULT_PIPELINE)
U = shardopt.UNSHARDED
# name -> (shape, layout); with pack_max_elements=300 the first four stay loose, "d", "e", "f" form a pack of rows
# sharded on dim 0 over "model" ([4, N/4]) and "r0", "r1" a flat replicated pack.
VARIABLES = {
    "a": ((64, 8), ["model", U]),
    "b": ((16, 48), [U, "model"]),
    "c": ((40, 24), [U, U]),
    "g": ((32, 10), [("batch", "model"), U]),
    "d": ((32, 6), ["model", U]),
    "e": ((8,), ["model"]),
    "f": ((12, 2), ["model", U]),
    "r0": ((5,), [U]),
    "r1": ((7, 3), [U, U]),
}
CONFIGS = {
    "plain": {},
    "amsgrad": {"amsgrad": True},
    "weight_decay": {"weight_decay": 0.05},
    "global_clipnorm": {"global_clipnorm": 0.5},
}
needs_kernels = pytest.mark.skipif(not sk.available("adam"), reason=f"no compiled kernels: {sk.reason('adam')}")


def bits(x):
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def run(mesh, options, pipeline, dtype=np.float32, steps=3, pack_max_elements=300):
    rng = np.random.default_rng(5)
    vs = {n: shardopt.Variable(rng.standard_normal(s).astype(dtype), name=n, layout=Layout(lay, mesh))
          for n, (s, lay) in VARIABLES.items()}
    opt = shardopt.Adam(**{"learning_rate": 1e-2, "mesh": mesh, **options})
    opt.pack_max_elements = pack_max_elements
    opt.pipeline = pipeline
    for _ in range(steps):
        opt.apply_gradients([((rng.standard_normal(v.shape) * 2).astype(np.float32).astype(dtype), v)
                             for v in vs.values()])
    out = [np.asarray(v.value) for v in vs.values()]
    out += [np.asarray(opt.get_slot(v, s).value) for v in vs.values() for s in opt.slot_names()]
    return out, next(iter(opt._programs.values()))


@needs_kernels
@pytest.mark.parametrize("key", list(CONFIGS))
def test_bitwise_equal_to_the_stablehlo_path_on_the_mesh(mesh, key):
    on, program = run(mesh, CONFIGS[key], DEFAULT_PIPELINE)
    off, off_program = run(mesh, CONFIGS[key], OFF)
    stats = program.pipeline.stage(PASS).stats
    assert stats["left"] == {} and stats["lowered"] == stats["per_device"] == 6, stats
    assert stats["packs_lowered"] == 2 and stats["pack_members"] == 5, stats
    assert off_program.pipeline.stage(PASS).stats["lowered"] == 0
    for x, y in zip(on, off, strict=True):
        np.testing.assert_array_equal(bits(x), bits(y))
