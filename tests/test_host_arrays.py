"""The functional step places host and single-device arrays as `jax.jit` would (issue 12, wall 6), and still
refuses, before donating anything, what has the wrong shape, dtype, mesh or sharding.

It used to refuse `np.ndarray`s and default-device arrays for replicated variables with "expected sharding
P(None,) on the step's mesh, got SingleDeviceSharding".
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt

rng = np.random.default_rng(1)
PARAMS = {"kernel": rng.normal(size=(8, 16)).astype(np.float32), "bias": rng.normal(size=(16,)).astype(np.float32)}
GRADS = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in PARAMS.items()} for _ in range(3)]


@pytest.fixture(scope="module")
def step(mesh):
    specs = {"kernel": shardopt.VariableSpec((8, 16), "float32", shardopt.Layout([shardopt.UNSHARDED, "model"], mesh)),
             "bias": shardopt.VariableSpec((16,), "float32")}
    return shardopt.Adam(1e-3, mesh=mesh).compile(specs)


def run(step, params, state, grads=GRADS):
    for g in grads:
        params, state = step(params, g, state)
    return jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, state)


@pytest.fixture(scope="module")
def reference(step):
    params = step.place_params(PARAMS)
    return run(step, params, step.init(params))


def assert_bitwise(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_host_arrays_are_placed(step, reference):
    state = {k: np.asarray(v) for k, v in step.init(step.place_params(PARAMS)).items()}
    host = {k: v.copy() for k, v in PARAMS.items()}
    kept = {k: v.copy() for k, v in state.items()}
    got = run(step, host, state)
    assert_bitwise(got, reference)
    assert_bitwise((host, state), (PARAMS, kept))  # donation consumed device copies, not the host memory


def test_default_device_arrays_are_placed(step, reference):
    params = {k: jnp.asarray(v) for k, v in PARAMS.items()}  # on the default device, uncommitted
    state = step.init(step.place_params(PARAMS))
    bias = jax.device_put(PARAMS["bias"], jax.devices()[3])  # committed, on one of the mesh's devices
    got = run(step, {**params, "bias": bias}, state, [{k: jnp.asarray(v) for k, v in g.items()} for g in GRADS])
    assert_bitwise(got, reference)
    assert not bias.is_deleted()  # the copy was donated, not the caller's array


def test_results_keep_the_step_layouts(step):
    params, state = step(dict(PARAMS), GRADS[0], step.init(step.place_params(PARAMS)))
    assert params["kernel"].sharding.spec == P(None, "model")
    assert params["bias"].sharding.is_fully_replicated and len(params["bias"].sharding.device_set) == 8


def _alive(tree):
    return all(not x.is_deleted() for x in jax.tree.leaves(tree) if isinstance(x, jax.Array))


@pytest.mark.parametrize("bad", ["shape", "dtype", "sharding", "mesh", "device"])
def test_refused_before_anything_is_donated(step, mesh, bad):
    params = step.place_params(PARAMS)
    state = step.init(params)
    if bad == "shape":
        state = {**state, "iterations": np.zeros((1,), np.asarray(state["iterations"]).dtype)}
        match = "iterations: expected shape"
    elif bad == "dtype":
        params = {**params, "bias": np.zeros((16,), np.float64)}
        match = "bias: expected dtype float32"
    elif bad == "sharding":  # the only copy of a donated value, sharded otherwise: jit would refuse it too
        params = {**params, "kernel": jax.device_put(PARAMS["kernel"], NamedSharding(mesh, P("batch", None)))}
        match = "kernel: expected sharding"
    elif bad == "mesh":
        other = jax.make_mesh((8,), ("x",))
        params = {**params, "kernel": jax.device_put(PARAMS["kernel"], NamedSharding(other, P()))}
        match = "kernel: expected sharding"
    else:
        small = jax.make_mesh((1, 4), ("batch", "model"), devices=jax.devices()[:4])
        specs = {"bias": shardopt.VariableSpec((16,), "float32")}
        step = shardopt.Adam(1e-3, mesh=small).compile(specs)
        state = step.init(step.place_params({"bias": PARAMS["bias"]}))
        params = {"bias": jax.device_put(PARAMS["bias"], jax.devices()[6])}
        with pytest.raises(shardopt.StepInputError, match="bias: the array is on .*outside the step's mesh"):
            step(params, {"bias": GRADS[0]["bias"]}, state)
        assert _alive(state)
        return
    with pytest.raises(shardopt.StepInputError, match=match):
        step(params, GRADS[0], state)
    assert _alive(params) and _alive(state)
