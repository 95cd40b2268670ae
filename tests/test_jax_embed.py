"""`step.as_jax_function()`: the compiled step inside the user's own jax.jit / fori_loop gives the standalone
step's results, with the user's donation, on the 2x4 mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import shardopt
from shardopt.runtime.jax_embed import JaxStepFunction

STEPS = 4


@pytest.fixture(scope="module")
def setup(mesh):
    specs = {"dense": {"kernel": shardopt.VariableSpec((16, 8), "float32",
                                                       shardopt.Layout([shardopt.UNSHARDED, "model"], mesh)),
                       "bias": shardopt.VariableSpec((8,), "float32")}}
    step = shardopt.Adam(1e-3, use_ema=True, mesh=mesh).compile(specs)
    rng = np.random.default_rng(0)
    p0 = {"dense": {"kernel": rng.normal(size=(16, 8)).astype(np.float32),
                    "bias": rng.normal(size=(8,)).astype(np.float32)}}
    grads = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), p0) for _ in range(STEPS)]
    p, s = step.place_params(p0), None
    s = step.init(p)
    for g in grads:
        p, s = step(p, g, s)
    reference = jax.tree.map(np.asarray, (p, s))
    return step, p0, grads, reference


def assert_same(got, want):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, want)


def test_is_a_jax_function(setup):
    step, p0, grads, _ = setup
    fn = step.as_jax_function()
    assert isinstance(fn, JaxStepFunction) and fn.step is step
    p = step.place_params(p0)
    text = jax.jit(fn).lower(p, grads[0], step.init(p)).as_text()
    assert "call @call_exported" in text  # inlined into the caller's program, not a separate dispatch


def test_inside_user_jit_with_donation(setup):
    step, p0, grads, reference = setup
    fn = step.as_jax_function()

    def train_step(params, grads, state):
        params, state = fn(params, grads, state)
        return params, state, jnp.sum(params["dense"]["kernel"])

    jitted = jax.jit(train_step, donate_argnums=(0, 2))
    p = step.place_params(p0)
    s = step.init(p)
    first = p["dense"]["kernel"]
    for g in grads:
        p, s, _ = jitted(p, g, s)
    assert first.is_deleted()  # the user's donation reached the step's buffers
    assert_same((p, s), reference)
    assert p["dense"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "model")


def test_inside_fori_loop(setup):
    step, p0, grads, reference = setup
    fn = step.as_jax_function()
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *grads)

    @jax.jit
    def loop(params, state, gs):
        def body(i, carry):
            return fn(carry[0], jax.tree.map(lambda x: x[i], gs), carry[1])
        return lax.fori_loop(0, STEPS, body, (params, state))

    p = step.place_params(p0)
    assert_same(loop(p, step.init(p), stacked), reference)


def test_errors_name_the_tensor(setup):
    step, p0, grads, _ = setup
    fn = step.as_jax_function()
    p = step.place_params(p0)
    s = step.init(p)
    bad = {"dense": {"kernel": grads[0]["dense"]["kernel"][:8], "bias": grads[0]["dense"]["bias"]}}
    with pytest.raises(shardopt.StepInputError, match="grad/dense/kernel: expected shape"):
        jax.jit(fn)(p, bad, s)
    with pytest.raises(shardopt.StepInputError, match="dtype"):
        jax.jit(fn)(p, jax.tree.map(lambda x: x.astype(np.float16), grads[0]), s)
    with pytest.raises(shardopt.StepInputError, match="do not match"):
        fn(p, {"dense": grads[0]["dense"]["kernel"]}, s)


def test_wrong_device_count_is_explained(setup):
    step, p0, grads, _ = setup
    host = jax.tree.map(jnp.asarray, (p0, grads[0]))  # single-device arrays: the jit runs on one device
    state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), step.init(step.place_params(p0)))
    fn = step.as_jax_function()
    with pytest.raises(shardopt.StepInputError, match="run the enclosing jax.jit on that mesh"):
        fn(host[0], host[1], state)  # eager: our message
    with pytest.raises(ValueError, match="exported for 8 devices|size of the mesh 8"):
        jax.jit(fn)(host[0], host[1], state)  # raised by jax when it lowers the enclosing jit


def test_params_on_an_explicit_mesh_keep_their_type(setup, mesh):
    # jax.make_mesh gives Explicit axes; the step is compiled on Auto axes. Results take the inputs' types, so
    # they can be a fori_loop carry and be mixed with the user's arrays.
    step, p0, grads, reference = setup
    fn = step.as_jax_function()
    p = {"dense": {"kernel": jax.device_put(p0["dense"]["kernel"], jax.NamedSharding(mesh, jax.P(None, "model"))),
                   "bias": jax.device_put(p0["dense"]["bias"], jax.NamedSharding(mesh, jax.P()))}}
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *grads)

    @jax.jit
    def loop(params, state, gs):
        def body(i, carry):
            new, state = fn(carry[0], jax.tree.map(lambda x: x[i], gs), carry[1])
            return new, state
        return lax.fori_loop(0, STEPS, body, (params, state))

    out = loop(p, step.init(p), stacked)
    assert_same(out, reference)
    assert out[0]["dense"]["kernel"].sharding.mesh.axis_types == mesh.axis_types
