"""`fuse-clipping`: FileCheck of IR in/out, the step before and after the pass computes the same values, and what
the compiled HLO gains (one kernel per batched reduction, fewer bytes, nothing materialised, no new collectives)."""

import functools
import re

import jax
import numpy as np
import pytest
from fusion_testlib import (
    FRONT,
    adam,
    build,
    bytes_per_element,
    chunks,
    collectives,
    entry,
    filecheck,
    interpret,
    loop_kernels,
    normal_inputs,
    one_device_mesh,
    random_inputs,
    run,
)

import shardopt
from shardopt import UNSHARDED, IndexedSlices, Layout
from shardopt.passes.pipeline import DEFAULT_PIPELINE, REGISTRY, run_pipeline

PASS = "fuse-clipping"


def test_registered_and_in_default_pipeline():
    assert PASS in REGISTRY
    order = DEFAULT_PIPELINE.index
    assert order("propagate-layouts") < order(PASS) < order("cleanup")


def test_filecheck():
    rc, err, stats = filecheck(PASS)
    assert rc == 0, err
    assert stats[0]["tensors_per_group"] == {"1": 1, "2": 1} and stats[0]["norm_trees_collapsed"] == 1
    assert stats[0]["unbatched"] == {"strided": 1}
    assert stats[1]["batched_reductions"] == 1 and stats[1]["norm_trees_collapsed"] == 0
    assert stats[2]["batched_reductions"] == 0
    assert stats[2]["unbatched"] == {"strided": 1, "no unsharded dimension": 1}
    assert stats[3]["packed_gradient_norms"] == 1 and stats[3]["norm_tree_leaves"] == 3
    # optax's `x*x + 0*0`: the squares are found, two batched, the tree (with its +0.0 leaf) collapsed
    assert stats[4]["sums_of_squares"] == 3 and stats[4]["tensors_per_group"] == {"1": 1, "2": 1}
    assert stats[4]["norm_trees_collapsed"] == 1 and stats[4]["norm_tree_leaves"] == 4
    # a square computed from the other's norm: found, same group key but a deeper norm, so never batched with it
    assert stats[5]["sums_of_squares"] == 2 and stats[5]["batched_reductions"] == 0, stats[5]
    # the packed gradient again, its members marked by lower-to-kernels: summed in the fixed order
    assert stats[6]["packed_gradient_norms"] == 1 and stats[6]["norm_tree_leaves"] == 3, stats[6]


def test_filecheck_max_operands():
    """max-operands=1: one reduction per gradient, so no variadic reduce."""
    rc, err, stats = filecheck(PASS, "fuse-clipping{max-operands=1}", prefixes=("ONE",))
    assert rc == 0, err
    assert [s["batched_reductions"] for s in stats] == [0, 0, 0, 0, 0, 0, 0], stats
    assert stats[0]["tensors_per_group"] == {"1": 3}, stats


def _mesh_variables(mesh, dtype=np.float32):
    """Every layout kind on the 2x4 mesh, two of each so that groups form, plus a sparse embedding."""
    def var(name, shape, layout):
        return shardopt.Variable(np.ones(shape, dtype), name=name,
                                 layout=None if layout is None else Layout(layout, mesh))
    return [
        var("k0", (8, 16), [UNSHARDED, "model"]), var("k1", (8, 16), [UNSHARDED, "model"]),
        var("p0", (16, 4), ["model", UNSHARDED]), var("p1", (16, 4), ["model", UNSHARDED]),
        var("b0", (8,), None), var("b1", (8,), None),
        var("e0", (8, 8), ["batch", "model"]), var("e1", (8, 8), ["batch", "model"]),
        var("emb", (12, 4), [UNSHARDED, "model"]),
    ]


def _grads(variables, dtype=np.float32):
    rng = np.random.default_rng(1)
    out = []
    for v in variables:
        if v.name == "emb":
            out.append((IndexedSlices(rng.normal(size=(5, 4)).astype(dtype), np.array([0, 3, 3, 7, 11], np.int32)), v))
        else:
            out.append((rng.normal(size=v.shape).astype(dtype), v))
    return out


def test_interpreter_on_filecheck_inputs():
    """Reference interpreter before/after on the FileCheck inputs: sums agree within 1e-6 relative."""
    for k, chunk in enumerate(chunks(PASS)):
        after = run_pipeline(chunk, [PASS]).final_text
        inputs = normal_inputs(chunk, seed=k)
        for x, y in zip(interpret(chunk, inputs), interpret(after, inputs), strict=True):
            np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-9)


CLIPS = {"global": dict(global_clipnorm=1.0), "per_tensor": dict(clipnorm=0.5)}


@functools.cache
def _built(key: str) -> tuple:
    """Per clipping mode: the step before (after propagate-layouts) and after fuse-clipping on the 2x4 mesh."""
    mesh = jax.make_mesh((2, 4), ("batch", "model"))
    program = adam(mesh, packed=False, **CLIPS[key]).program_for(_grads(_mesh_variables(mesh)))
    names = (*FRONT, PASS)
    stats = run_pipeline(program.lowered.module_text, names).stage(PASS).stats
    return stats, build(program, names, "propagate-layouts", mesh), build(program, names, PASS, mesh)


@pytest.fixture
def built():
    """Compiled once per clipping mode and test process, on first use (xdist workers build only theirs)."""
    return _built


@pytest.mark.parametrize("key", list(CLIPS))
def test_same_results_before_and_after(built, key):
    """Elementwise math is untouched; only the order in which squares are summed changes (1e-6 relative)."""
    stats, before, after = built(key)
    assert stats["batched_reductions"] == 2, stats  # the [model, {}] pair and the replicated pair
    assert stats["unbatched"] == {"strided": 2, "no unsharded dimension": 2}, stats
    inputs = random_inputs(before)
    for x, y, spec in zip(run(before, inputs), run(after, inputs), before.step.convention.results, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-9, err_msg=spec.name)


@pytest.mark.parametrize("key", list(CLIPS))
def test_no_new_collectives_on_mesh(built, key):
    _, before, after = built(key)
    assert collectives(after.hlo) == collectives(before.hlo)
    assert set(collectives(after.hlo)) == {"all-reduce"}


def test_same_results_bfloat16(mesh):
    """Half-precision gradients are squared and summed in float32 (the frontend converts them first)."""
    variables = _mesh_variables(mesh, np.dtype("bfloat16"))[:6]
    program = adam(mesh, packed=False, global_clipnorm=1.0).program_for(_grads(variables, np.dtype("bfloat16")))
    names = (*FRONT, PASS)
    before = build(program, names, "propagate-layouts", mesh)
    after = build(program, names, PASS, mesh)
    inputs = random_inputs(before, seed=3)
    for x, y in zip(run(before, inputs), run(after, inputs), strict=True):
        # one bfloat16 ulp at most: a float32 norm differing in its last bits can round a result the other way
        np.testing.assert_allclose(y.astype(np.float32), x.astype(np.float32), rtol=2 ** -7)


def _tuple_arity(line: str) -> int:
    """How many results a kernel line returns (1 for an array)."""
    head = line.split(" fusion(", 1)[0].split(" = ", 1)[1]
    return len(re.findall(r"[a-z0-9]+\[[0-9,]*\]", head)) if head.startswith("(") else 1


def test_compiled_kernels_bytes_and_temp():
    """48 replicated f32[1024] tensors, global norm, one device: 3 groups of 16 -> 3 reduction kernels (one per
    group, 16 partial sums each) instead of a multiply, reduce-window and reduce kernel per tensor. Bytes per
    element fall to Adam's per-tensor 40 plus one read of the gradient for the norm; x*x and the clipped
    gradients are never materialised (no temp buffers)."""
    mesh = one_device_mesh()
    count, size = 48, 1024
    variables = [shardopt.Variable(np.ones(size, np.float32), name=f"t{i}") for i in range(count)]
    program = adam(mesh, packed=False, global_clipnorm=1.0).program_for(
        [(np.ones(size, np.float32), v) for v in variables])
    before = build(program, (*FRONT, "cleanup"), "cleanup", mesh)
    after = build(program, (*FRONT, PASS, "cleanup"), "cleanup", mesh)
    batched = [k for k in loop_kernels(after.hlo) if _tuple_arity(k) > 1]
    assert [_tuple_arity(k) for k in batched] == [16, 16, 16]
    assert all("reduce" in k.split(" = ")[0] for k in batched)
    assert len(loop_kernels(after.hlo)) < len(loop_kernels(before.hlo)) - count
    elements = count * size
    assert bytes_per_element(after, elements) <= 44.1 < bytes_per_element(before, elements)
    assert after.exe.memory_analysis().temp_size_in_bytes < 0.02 * elements * 4
    assert "reduce-window" not in entry(after.hlo)


KERNELS_OFF = tuple("lower-to-kernels{enabled=false}" if p == "lower-to-kernels" else p for p in DEFAULT_PIPELINE)


@pytest.mark.parametrize("pipeline", [KERNELS_OFF, DEFAULT_PIPELINE], ids=["stablehlo", "pack-kernel"])
def test_global_norm_over_packed_gradient_compiled(pipeline):
    """Packed state (the default for small variables). On the StableHLO path fuse-moments packs the 48 gradients
    for its chain and the global norm is summed over that packed gradient in the fixed order of
    fixed_order_norm.py; with the pack kernel the same order is one `shardopt_sumsq` call reading the members'
    gradient buffers in place: no gather, no temporary, scalars only between the two calls."""
    mesh = one_device_mesh()
    count, size = 48, 1024
    built = {}
    for clip in (None, 1.0):
        variables = [shardopt.Variable(np.ones(size, np.float32), name=f"t{i}") for i in range(count)]
        opt = adam(mesh, global_clipnorm=clip)
        opt.pipeline = pipeline
        program = opt.program_for([(np.ones(size, np.float32), v) for v in variables])
        built[clip] = (program, build(program, pipeline, "cleanup", mesh))
    program, clipped = built[1.0]
    _, unclipped = built[None]
    elements = count * size
    extra = bytes_per_element(clipped, elements) - bytes_per_element(unclipped, elements)
    assert unclipped.exe.memory_analysis().temp_size_in_bytes <= 1024  # scalars only
    temp = clipped.exe.memory_analysis().temp_size_in_bytes
    if pipeline == KERNELS_OFF:
        assert temp <= (1 << 16) * 4 * 1.1  # the 2^16 lanes of the fixed order, whatever the pack's size
        assert program.pipeline.stage(PASS).stats["packed_gradient_norms"] == 1
        # 49,152 elements take 65,536 lanes and no whole row: the padded tail is squared and halved in XLA
        # (4 bytes per element read, the rest the lanes' padding and halving); a large pack's rows are read
        # once by the while loop, which cost analysis counts once, not per row
        assert 4 <= extra <= 16, extra
    else:
        assert temp <= 1024  # scalars only
        stats = program.pipeline.stage("lower-to-kernels").stats
        assert stats["packs_lowered"] == 1 and stats["norms_lowered"] == 1, stats
        assert program.pipeline.stage(PASS).stats["packed_gradient_norms"] == 0
        text = entry(clipped.hlo)
        calls = [line for line in text.splitlines() if 'custom_call_target="shardopt_sumsq"' in line]
        assert len(calls) == 1 and calls[0].count("f32[1024]") == count, calls  # every gradient, read in place
        assert "concatenate" not in text and "reduce(" not in text, text
