"""The functional step names what is wrong with its inputs: a Python number where a scalar goes is placed, an
object or a missing state key is a StepInputError naming the argument (issue 13), and nothing is donated."""

import jax.numpy as jnp
import numpy as np
import pytest

import shardopt


@pytest.fixture(scope="module")
def step(mesh):
    return shardopt.Adam(1e-3, mesh=mesh).compile({"w": shardopt.VariableSpec((4,), "float32"),
                                                   "b": shardopt.VariableSpec((4,), "float32")})


def test_python_number_learning_rate_is_placed(step):
    params = step.place_params({"w": np.ones(4, np.float32), "b": np.ones(4, np.float32)})
    state = step.init(params)
    state["learning_rate"] = 0.01
    params, state = step(params, {"w": jnp.ones(4), "b": jnp.ones(4)}, state)
    np.testing.assert_allclose(np.asarray(params["w"]), 1 - 0.01, rtol=1e-5)


@pytest.mark.parametrize("key, value, match", [
    ("learning_rate", "0.01", "learning_rate: expected a float32"),
    ("learning_rate", object(), "learning_rate: expected a float32"),
    ("iterations", "3", "iterations: expected a int32"),
])
def test_bad_state_values_are_named(step, key, value, match):
    params = step.place_params({"w": np.ones(4, np.float32), "b": np.ones(4, np.float32)})
    state = step.init(params)
    state[key] = value
    with pytest.raises(shardopt.StepInputError, match=match):
        step(params, {"w": jnp.ones(4), "b": jnp.ones(4)}, state)
    assert not params["w"].is_deleted()


def test_missing_state_key_is_named(step):
    params = step.place_params({"w": np.ones(4, np.float32), "b": np.ones(4, np.float32)})
    state = step.init(params)
    del state["iterations"]
    with pytest.raises(shardopt.StepInputError, match=r"state is missing \['iterations'\]"):
        step(params, {"w": jnp.ones(4), "b": jnp.ones(4)}, state)
