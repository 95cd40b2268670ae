"""`compile(specs, scatter_gradients=True)` with `shard_state_over`: the step takes each state-sharded variable's
gradient in its state's layout, so per-replica gradients reduce-scattered by the user (`jax.lax.psum_scatter`
inside `shard_map`) feed the sharded update directly. The compiled HLO of the user's jit then has a
reduce-scatter and no all-reduce, on CPU too, where XLA has no all-reduce + dynamic-slice -> reduce-scatter
rewrite (the reduced path keeps its all-reduce: pinned below), and the numbers are bitwise the reduced path's.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt
from shardopt.optimizers.state_sharding import scattered_pipeline

U = shardopt.UNSHARDED
W0 = np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32) * 0.1
B0 = np.random.default_rng(1).standard_normal((64,)).astype(np.float32) * 0.1
X = np.random.default_rng(2).standard_normal((16, 128)).astype(np.float32)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("batch", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)


def specs(mesh):
    return {"w": shardopt.VariableSpec((128, 64), "float32", shardopt.Layout([U, "model"], mesh)),
            "b": shardopt.VariableSpec((64,), "float32", shardopt.Layout(["model"], mesh))}


def local_grads(p, x):
    """Per-replica gradients of the local batch (inside shard_map): not yet summed over 'batch'."""
    p = jax.tree.map(lambda a: jax.lax.pcast(a, ("batch",), to="varying"), p)
    return jax.grad(lambda p: jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2))(p)


def train_step(step, mesh, scatter):
    fn = step.as_jax_function()
    pspec = {"w": P(None, "model"), "b": P("model")}
    if scatter:  # reduced and scattered over 'batch' in one collective, laid out like the state
        gspec = {k: step.executable.in_shardings[step.contract.arg_index(f"grad/{k}")].spec for k in pspec}

        def grads(p, x):
            return {k: jax.lax.psum_scatter(g, "batch", scatter_dimension=0, tiled=True)
                    for k, g in local_grads(p, x).items()}
    else:
        gspec = pspec

        def grads(p, x):
            return jax.lax.psum(local_grads(p, x), "batch")

    def train(params, state, x):
        g = jax.shard_map(grads, mesh=mesh, in_specs=(pspec, P("batch", None)), out_specs=gspec)(params, x)
        return fn(params, g, state)
    return jax.jit(train, donate_argnums=(0, 1))


def run(step, mesh, scatter, steps=3):
    train = train_step(step, mesh, scatter)
    params = step.place_params({"w": W0, "b": B0})
    state = step.init(params)
    x = jax.device_put(X, NamedSharding(mesh, P("batch", None)))
    hlo = train.lower(params, state, x).compile().as_text()
    for _ in range(steps):
        params, state = train(params, state, x)
    return jax.tree.map(np.asarray, (params, step.state_dict(state))), hlo


def count(kind, text):
    """Ops of `kind` in compiled HLO (a combined all-reduce of a tuple counts once)."""
    return len(re.findall(rf"\s{kind}(-start)?\(", text))


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
