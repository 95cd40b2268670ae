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
from shardopt.passes.pipeline import DEFAULT_PIPELINE, run_pipeline

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
    "everything": {"amsgrad": True, "weight_decay": 0.05, "global_clipnorm": 0.5},
}
CLIPPED = ("global_clipnorm", "everything")  # packed: the norm is summed differently (a few ulp, below)
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
@pytest.mark.parametrize("key,packed,dtype", [(k, True, "float32") for k in CONFIGS if k not in CLIPPED] +
                         [(k, False, "float32") for k in CLIPPED] + [("plain", True, "bfloat16")])
def test_bitwise_equal_to_the_stablehlo_path_on_the_mesh(mesh, key, packed, dtype):
    dt = np.dtype(dtype)
    on, program = run(mesh, CONFIGS[key], DEFAULT_PIPELINE, dt, pack_max_elements=300 if packed else 0)
    off, off_program = run(mesh, CONFIGS[key], OFF, dt, pack_max_elements=300 if packed else 0)
    stats = program.pipeline.stage(PASS).stats
    calls = 6 if packed else len(VARIABLES)
    assert stats["left"] == {} and stats["lowered"] == stats["per_device"] == calls, stats
    assert (stats.get("packs_lowered", 0), stats.get("pack_members", 0)) == ((2, 5) if packed else (0, 0)), stats
    assert off_program.pipeline.stage(PASS).stats["lowered"] == 0
    for x, y in zip(on, off, strict=True):
        np.testing.assert_array_equal(bits(x), bits(y))


@needs_kernels
def test_packs_with_global_clipnorm_within_a_few_ulp(mesh):
    """As on one device (tests/test_pack_kernel.py): the StableHLO path takes the norm over each pack's gathered
    gradient (fuse-clipping), the kernel path adds the members' sums, so the scale may differ in its last bits."""
    on, program = run(mesh, CONFIGS["global_clipnorm"], DEFAULT_PIPELINE)
    off, _ = run(mesh, CONFIGS["global_clipnorm"], OFF)
    stats = program.pipeline.stage(PASS).stats
    assert stats["per_device"] == 6 and stats["scales_folded"] == 6, stats
    for x, y in zip(on, off, strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-7)


def _entry(program):
    hlo = program.executable.lower().compile().as_text()
    return hlo[hlo.index("ENTRY"):]


@needs_kernels
@pytest.mark.parametrize("key", ["plain", "global_clipnorm"])
def test_compiled_hlo_calls_the_kernels_on_local_shards_and_gathers_no_state(mesh, key):
    """Every state and gradient operand of every kernel call is the device's parameter itself (its local shard);
    no collective or copy touches a parameter. With global_clipnorm the only collectives gather the norm's
    per-device partial sums (fixed-order-sums), computed before the regions."""
    _, program = run(mesh, CONFIGS[key], DEFAULT_PIPELINE, steps=1)
    entry = _entry(program)
    params = set(re.findall(r"(%\S+) = \S+ parameter\(", entry))
    calls = re.findall(r"= \(([^)]*)\) custom-call\((.*?)\), custom_call_target=\"(\w+)\"", entry)
    assert sorted(c[2] for c in calls) == ["shardopt_adam_pack_update"] * 2 + ["shardopt_adam_update"] * 4, calls
    local = {r.split(", ")[0].split("{")[0] for r, _, _ in calls}  # the first state buffer's local shape
    # a [{"model"},{}] 64x8, b [{},{"model"}] 16x48, c replicated, g [{"batch","model"},{}] 32x10, row pack [4,56]
    # (rows of d, e, f: 48 + 2 + 6), flat pack [26]
    assert local == {"f32[16,8]", "f32[16,12]", "f32[40,24]", "f32[4,10]", "f32[1,56]", "f32[26]"}, local
    for _, operands, _ in calls:
        tensors = [o for o in re.sub(r"/\*index=\d+\*/", "", operands).split(", ")]
        assert len([o for o in tensors if o in params]) >= 3, operands  # state and gradients straight from params
    for line in entry.splitlines():  # (the counter and the learning rate are copied: scalars)
        if (COLLECTIVE.search(line) or " copy(" in line) and not re.search(r"= [fs]32\[\] ", line):
            assert not set(re.findall(r"%[\w.\-]+", line.split("=", 1)[1])) & params, line
    collectives = [line for line in entry.splitlines() if COLLECTIVE.search(line)]
    if key == "plain":
        assert not collectives, collectives
    else:
        assert collectives and all(" all-gather(" in line for line in collectives), collectives
    assert not [line for line in entry.splitlines() if " copy(" in line and not re.search(r"= [fs]32\[\] ", line)]


def test_filecheck_manual_region():
    """tests/filecheck/lower-to-kernels.mlir: a sharded variable and a pack of rows in a manual computation, a
    shape the mesh does not divide left as StableHLO."""
    rc, err, stats = filecheck(PASS, "lower-to-kernels{assume-available=true}")
    assert rc == 0, err
    assert [s["per_device"] for s in stats] == [0, 0, 1, 1, 0, 0, 0, 0, 0], stats


@needs_kernels
def test_state_sharded_over_more_axes_stays_stablehlo_and_is_counted(mesh):
    """`shard_state_over`: slots sharded beyond their variable are not a per-device kernel update (the kernel
    would need the variable's shard of the slots); the frontend leaves those updates to XLA and the pass counts
    them. Bitwise as the StableHLO path throughout."""
    on, program = run(mesh, {"shard_state_over": "batch"}, DEFAULT_PIPELINE, pack_max_elements=0)
    off, _ = run(mesh, {"shard_state_over": "batch"}, OFF, pack_max_elements=0)
    stats = program.pipeline.stage(PASS).stats
    sharded = program.pipeline.stage("propagate-layouts").stats["state_sharded"]
    assert sharded > 0 and stats["state_sharded_unmarked"] == sharded, (stats, sharded)
    assert stats["lowered"] == stats["per_device"] == len(VARIABLES) - sharded, stats
    for x, y in zip(on, off, strict=True):
        np.testing.assert_array_equal(bits(x), bits(y))


@needs_kernels
def test_propagate_layouts_leaves_a_per_device_kernel_update_alone(mesh):
    """propagate-layouts{shard-state-over=batch} after lowering: the slots a manual region updates keep the
    variable's layout (`state_kernel`), as for a whole-tensor call."""
    _, program = run(mesh, {}, DEFAULT_PIPELINE, steps=1, pack_max_elements=0)
    result = run_pipeline(program.lowered.module_text,
                          ("inline-calls", PASS, "propagate-layouts{shard-state-over=batch}"))
    assert result.stage(PASS).stats["per_device"] == len(VARIABLES)
    stats = result.stage("propagate-layouts").stats  # (the others: not divisible, or already over "batch")
    assert stats["state_kernel"] >= 5 and stats["state_sharded"] == 0, stats
