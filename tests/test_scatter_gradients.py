"""`compile(specs, scatter_gradients=True)` with `shard_state_over`: the step takes each state-sharded variable's
gradient in its state's layout, so per-replica gradients reduce-scattered by the user (`jax.lax.psum_scatter`
inside `shard_map`) feed the sharded update directly. The compiled HLO of the user's jit then has a
reduce-scatter and no all-reduce, on CPU too, where XLA has no all-reduce + dynamic-slice -> reduce-scatter
rewrite (the reduced path keeps its all-reduce: pinned below), and the numbers are bitwise the reduced path's.
"""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import shardopt
from shardopt.optimizers.state_sharding import scattered_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multiprocess_lib as mpl  # noqa: E402
from mp_workers import scattered_jit as sj  # noqa: E402
from mp_workers.scattered_jit import count, run, specs  # noqa: E402


@pytest.fixture(scope="module")
def mesh():
    return sj.explicit_mesh()


def test_reduce_scatter_replaces_the_all_reduce_and_the_numbers_are_the_reduced_paths(mesh):
    reduced = shardopt.Adam(1e-2, mesh=mesh, shard_state_over="batch").compile(specs(mesh))
    scattered = shardopt.Adam(1e-2, mesh=mesh, shard_state_over="batch").compile(specs(mesh), scatter_gradients=True)
    assert scattered.contract.arg("grad/w").layout == ("batch", "model")  # the state's layout
    assert scattered.contract.arg("grad/b").layout == (("model", "batch"),)
    assert reduced.contract.arg("grad/w").layout == (None, "model")  # the variable's
    stats = {st.name: st.stats for st in scattered.program.pipeline.stages}
    assert stats["propagate-layouts"]["scattered_gradients"] == 2
    want, hlo_reduced = run(reduced, mesh, scatter=False)
    got, hlo = run(scattered, mesh, scatter=True)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    # the reduced path on CPU: the gradients' all-reduce (both in one, combined), then the shard's slice; no
    # rewrite to reduce-scatter
    assert count("all-reduce", hlo_reduced) >= 1 and count("reduce-scatter", hlo_reduced) == 0
    # scattered: one reduce-scatter per gradient, no all-reduce, and only the new variables are all-gathered
    assert count("reduce-scatter", hlo) == 2 and count("all-reduce", hlo) == 0
    assert count("all-gather", hlo) == count("all-gather", hlo_reduced) == 2


def test_global_clipnorm_over_scattered_gradients(mesh):
    """The norm's partial sums come from (model, batch) shards instead of model shards, so the order of the
    additions differs from the reduced path's (it measured bitwise equal here; asserted to 1e-6)."""
    kw = {"mesh": mesh, "shard_state_over": "batch", "global_clipnorm": 0.1}
    want, _ = run(shardopt.Adam(1e-2, **kw).compile(specs(mesh)), mesh, scatter=False)
    got, hlo = run(shardopt.Adam(1e-2, **kw).compile(specs(mesh), scatter_gradients=True), mesh, scatter=True)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    assert count("reduce-scatter", hlo) == 2 and count("all-reduce", hlo) == 0


def test_scatter_gradients_needs_state_sharding(mesh):
    with pytest.raises(ValueError, match="scatter_gradients=True needs shard_state_over"):
        shardopt.Adam(1e-2, mesh=mesh).compile(specs(mesh), scatter_gradients=True)


@pytest.mark.parametrize("pipeline, want", [
    (("inline-calls", "propagate-layouts", "cleanup"), ("inline-calls", "propagate-layouts{scatter-gradients=true}",
                                                         "cleanup")),
    (("propagate-layouts{shard-state-over=batch}",),
     ("propagate-layouts{shard-state-over=batch,scatter-gradients=true}",)),
])
def test_scattered_pipeline(pipeline, want):
    assert scattered_pipeline(pipeline) == want
    with pytest.raises(ValueError, match="needs propagate-layouts"):
        scattered_pipeline(("inline-calls",))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_reduce_scatter_through_gloo_bitwise_one_process(tmp_path):
    """2 processes x 4 devices: the reduce-scatter runs across the processes (gloo); the scattered and the reduced
    path give bitwise the single 8-device process's numbers, and the scattered program has no all-reduce."""
    results = mpl.launch([str(mpl.WORKERS / "worker.py"), str(tmp_path), "scattered_in_user_jit",
                          "reduced_in_user_jit"], tmp_path, timeout_s=180)
    assert [r.returncode for r in results] == [0, 0], mpl.describe(results)
    want = sj.reduced_in_user_jit()
    for pid in (0, 1):
        for name in ("scattered_in_user_jit", "reduced_in_user_jit"):
            err = tmp_path / f"{name}.p{pid}.error.txt"
            assert not err.exists(), err.read_text()
            with np.load(tmp_path / f"{name}.p{pid}.npz") as z:
                got = {k: z[k] for k in z.files}
            for k in want:
                if not k.startswith("collectives/"):
                    np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name} {k} p{pid}")
            if name == "scattered_in_user_jit":
                assert int(got["collectives/reduce-scatter"]) == 2 and int(got["collectives/all-reduce"]) == 0
