"""`fixed-order-sums`: FileCheck of IR in/out, the same values before and after (reference interpreter and a
compiled sharded step), and what the compiled HLO holds: no all-reduce left in a norm, one all-gather of the
partial sums per sharding pattern. That 1 and 2 processes then agree bitwise is tests/test_multiprocess.py's."""

import functools

import jax
import numpy as np
import pytest
from fusion_testlib import (
    FRONT,
    adam,
    build,
    chunks,
    collectives,
    filecheck,
    interpret,
    normal_inputs,
    random_inputs,
    run,
)

import shardopt
from shardopt import UNSHARDED, IndexedSlices, Layout
from shardopt.passes.pipeline import DEFAULT_PIPELINE, REGISTRY, run_pipeline

PASS = "fixed-order-sums"


def test_registered_and_in_default_pipeline():
    assert PASS in REGISTRY
    order = DEFAULT_PIPELINE.index
    assert order("fuse-clipping") < order(PASS) < order("cleanup")  # it rewrites fuse-clipping's partial sums too


def test_filecheck():
    rc, err, stats = filecheck(PASS)
    assert rc == 0, err
    assert stats[0] == {"reductions": 4, "rewritten": 3, "gathers": 2, "partials_gathered": 10,
                        "left": {"not across devices": 1}, "ops_moved": 0}
    assert stats[1]["rewritten"] == 2 and stats[1]["gathers"] == 2 and stats[1]["partials_gathered"] == 4 + 8
    assert stats[2]["rewritten"] == 0 and stats[2]["left"] == {"init not +0.0": 1, "not across devices": 1}


def test_interpreter_on_filecheck_inputs():
    """Reference interpreter before/after on the FileCheck inputs: the sums agree within 1e-6 relative."""
    for k, chunk in enumerate(chunks(PASS)):
        after = run_pipeline(chunk, [PASS]).final_text
        inputs = normal_inputs(chunk, seed=k)
        for x, y in zip(interpret(chunk, inputs), interpret(after, inputs), strict=True):
            np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-9)


def _variables(mesh):
    """Every layout kind on the 2x4 mesh, two of each so fuse-clipping batches some norms, and a sparse one."""
    def var(name, shape, layout):
        return shardopt.Variable(np.ones(shape, np.float32), name=name,
                                 layout=None if layout is None else Layout(layout, mesh))
    return [var("k0", (8, 16), [UNSHARDED, "model"]), var("k1", (8, 16), [UNSHARDED, "model"]),
            var("p0", (16, 4), ["model", UNSHARDED]), var("p1", (16, 4), ["model", UNSHARDED]),
            var("b0", (8,), None), var("e0", (8, 8), ["batch", "model"]), var("e1", (8, 8), ["batch", "model"]),
            var("emb", (12, 4), [UNSHARDED, "model"])]


def _grads(variables):
    rng = np.random.default_rng(1)
    return [(IndexedSlices(rng.normal(size=(5, 4)).astype(np.float32), np.array([0, 3, 3, 7, 11], np.int32)), v)
            if v.name == "emb" else (rng.normal(size=v.shape).astype(np.float32), v) for v in variables]


CLIPS = {"global": dict(global_clipnorm=1.0), "per_tensor": dict(clipnorm=0.5)}
WITHOUT = tuple(p for p in DEFAULT_PIPELINE if p != PASS)


@functools.cache
def _built(key: str) -> tuple:
    """Per clipping mode, on the 2x4 mesh: the pass's statistics and the default pipeline without and with it."""
    mesh = jax.make_mesh((2, 4), ("batch", "model"))
    program = adam(mesh, packed=False, **CLIPS[key]).program_for(_grads(_variables(mesh)))
    stats = run_pipeline(program.lowered.module_text, DEFAULT_PIPELINE).stage(PASS).stats
    return stats, build(program, WITHOUT, "cleanup", mesh), build(program, DEFAULT_PIPELINE, "cleanup", mesh)


@pytest.mark.parametrize("key", list(CLIPS))
def test_same_results_and_no_all_reduce(key):
    """Only the order in which the shards' partial sums are added changes (1e-6 relative); the all-reduces of the
    norms become all-gathers, one per sharding pattern of the partials (XLA splits a 2-D gather into one per
    axis)."""
    stats, before, after = _built(key)
    assert set(collectives(before.hlo)) == {"all-reduce"}
    found = collectives(after.hlo)
    assert set(found) == {"all-gather"}, found
    # k*, p* (fuse-clipping's batched partials) and e*: rewritten; b0 and emb's replicated rows: local already
    assert stats["rewritten"] == 6 and stats["left"] == {"not across devices": stats["reductions"] - 6}, stats
    assert stats["gathers"] == 2 and found["all-gather"] <= 3, (stats, found)  # {model} and {batch}x{model}
    inputs = random_inputs(before)
    for x, y, spec in zip(run(before, inputs), run(after, inputs), before.step.convention.results, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-9, err_msg=spec.name)


def test_unsharded_step_is_untouched():
    """One device, or replicated variables: nothing crosses devices, so the pass leaves the module as it is."""
    mesh = jax.make_mesh((2, 4), ("batch", "model"))
    v = [shardopt.Variable(np.ones((8, 4), np.float32), name=f"r{i}") for i in range(3)]
    program = adam(mesh, global_clipnorm=1.0).program_for([(np.ones((8, 4), np.float32), x) for x in v])
    result = run_pipeline(program.lowered.module_text, (*FRONT, PASS))
    assert result.stage(PASS).stats["rewritten"] == 0
    assert result.stage(PASS).text == result.stage("propagate-layouts").text
