"""Compiling and running under `with jax.set_mesh(mesh):` on Explicit and Auto axes (issue 12, wall 2).

Under an Explicit-axes ambient mesh the lowering used to trace with that mesh's sharding types and pin fresh
results (zeros slots, the new bias) replicated: `PassError: conflicting layouts: result m/.../bias is pinned to
[{}] but the state it replaces has [{'model'}]`. Every entry point is exercised here, and compared with the
same step compiled without an ambient mesh.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt
from shardopt.runtime.jax_embed import specs_for

AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
rng = np.random.default_rng(3)
KERNEL = rng.normal(size=(8, 16)).astype(np.float32)
BIAS = rng.normal(size=(16,)).astype(np.float32)
GRADS = [(rng.normal(size=(8, 16)).astype(np.float32), rng.normal(size=(16,)).astype(np.float32))
         for _ in range(3)]


def make_mesh(kind):
    return jax.make_mesh((2, 4), ("batch", "model"), axis_types=(AXIS_TYPES[kind],) * 2)


def placed(mesh):
    return {"m": {"kernel": jax.device_put(KERNEL, NamedSharding(mesh, P(None, "model"))),
                  "bias": jax.device_put(BIAS, NamedSharding(mesh, P("model")))}}


def grads_tree(mesh, i):
    g = placed(mesh)
    return {"m": {"kernel": jax.device_put(GRADS[i][0], g["m"]["kernel"].sharding),
                  "bias": jax.device_put(GRADS[i][1], g["m"]["bias"].sharding)}}


def reference(mesh):
    """The functional step compiled and run with no ambient mesh."""
    params = placed(mesh)
    step = shardopt.Adam(1e-3, mesh=mesh).compile(specs_for(params, mesh))
    state = step.init(params)
    for i in range(3):
        params, state = step(params, grads_tree(mesh, i), state)
    return jax.tree.map(np.asarray, params)


def assert_bitwise(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("kind", ["explicit", "auto"])
def test_compile_under_set_mesh(kind):
    mesh = make_mesh(kind)
    want = reference(mesh)
    with jax.set_mesh(mesh):
        params = placed(mesh)
        step = shardopt.Adam(1e-3, mesh=mesh).compile(specs_for(params, mesh))
        state = step.init(params)
        for i in range(3):
            params, state = step(params, grads_tree(mesh, i), state)
        assert params["m"]["bias"].sharding.spec == P("model")
    assert_bitwise(params, want)


@pytest.mark.parametrize("kind", ["explicit", "auto"])
def test_apply_gradients_under_set_mesh(kind):
    mesh = make_mesh(kind)
    want = reference(mesh)
    with jax.set_mesh(mesh):
        k = shardopt.Variable(KERNEL, name="m/kernel", layout=shardopt.Layout([shardopt.UNSHARDED, "model"], mesh))
        b = shardopt.Variable(BIAS, name="m/bias", layout=shardopt.Layout(["model"], mesh))
        opt = shardopt.Adam(1e-3, mesh=mesh)
        for gk, gb in GRADS:
            opt.apply_gradients([(gk, k), (gb, b)])
        assert k.value.sharding.spec == P(None, "model")
        assert b.value.sharding.spec == P("model")
    assert_bitwise({"m": {"kernel": k.value, "bias": b.value}}, want)


@pytest.mark.parametrize("kind", ["explicit", "auto"])
def test_as_optax_under_set_mesh(kind):
    mesh = make_mesh(kind)
    want = reference(mesh)
    with jax.set_mesh(mesh):
        params = placed(mesh)
        tx = shardopt.as_optax(shardopt.Adam(1e-3))
        state = tx.init(params)

        @jax.jit
        def update(params, grads, state):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        for i in range(3):
            params, state = update(params, grads_tree(mesh, i), state)
        assert params["m"]["bias"].sharding.spec == P("model")
    np.testing.assert_allclose(np.asarray(params["m"]["kernel"]), want["m"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(params["m"]["bias"]), want["m"]["bias"], rtol=1e-6)


def test_optax_adam_works_under_explicit_set_mesh_too():
    """The baseline the issue compares with."""
    mesh = make_mesh("explicit")
    with jax.set_mesh(mesh):
        params = placed(mesh)
        tx = optax.adam(1e-3)
        state = tx.init(params)
        updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
        assert updates["m"]["bias"].sharding.spec == P("model")
