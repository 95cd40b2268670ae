"""`skip_nonfinite=True` (like optax's apply_if_finite): a step whose gradients are not all finite changes no
variable or slot and does not advance `iterations`; `skipped_steps` counts it. Packed slots still fuse."""

import jax.numpy as jnp
import numpy as np
import pytest

import shardopt


def _vars(mesh):
    return [shardopt.Variable(np.full(6, 1.0 + i, np.float32), name=f"v{i}") for i in range(3)] + [
        shardopt.Variable(np.ones((8, 4), np.float32), name="rows",
                          layout=shardopt.Layout(["model", shardopt.UNSHARDED], mesh))]


def _grads(variables, step, bad=False):
    out = [jnp.full(v.shape, 0.1 * (step + 1), jnp.float32) for v in variables]
    if bad:
        out[1] = out[1].at[2].set(jnp.nan)
    return out


@pytest.mark.parametrize("packed", [True, False])
def test_nonfinite_steps_are_skipped_and_counted(mesh, packed):
    variables, reference = _vars(mesh), _vars(mesh)
    opt = shardopt.Adam(0.01, mesh=mesh, skip_nonfinite=True, amsgrad=True, use_ema=True)
    ref = shardopt.Adam(0.01, mesh=mesh, amsgrad=True, use_ema=True)
    if not packed:
        opt.pack_max_elements = ref.pack_max_elements = 0
    for step in range(4):
        opt.apply_gradients(zip(_grads(variables, step), variables, strict=True))
        ref.apply_gradients(zip(_grads(reference, step), reference, strict=True))
        if step == 1:
            before = [v.numpy() for v in variables] + [s.numpy() for s in opt.variables]
            opt.apply_gradients(zip(_grads(variables, step, bad=True), variables, strict=True))
            after = [v.numpy() for v in variables] + [s.numpy() for s in opt.variables]
            for x, y in zip(before, after, strict=True):
                np.testing.assert_array_equal(x, y)  # nothing changed, the counter included
    assert opt.skipped_steps == 1 and int(opt.iterations.value) == 4
    for v, r in zip(variables, reference, strict=True):
        np.testing.assert_array_equal(v.numpy(), r.numpy())
    if packed:
        (program, *_), = opt._fast_programs.values()
        assert program.pipeline.stage("fuse-moments").stats["groups"] >= 1


def test_without_the_guard_nan_spreads(mesh):
    variables = _vars(mesh)
    opt = shardopt.Adam(0.01, mesh=mesh)
    opt.apply_gradients(zip(_grads(variables, 0, bad=True), variables, strict=True))
    assert np.isnan(variables[1].numpy()).any() and opt.skipped_steps == 0


def test_functional_step_carries_the_count(mesh):
    step = shardopt.Adam(0.01, mesh=mesh, skip_nonfinite=True).compile(
        {"a": shardopt.VariableSpec((4,), "float32"), "b": shardopt.VariableSpec((4,), "float32")})
    params = step.place_params({"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)})
    state = step.init(params)
    assert float(state["skipped_steps"]) == 0
    params, state = step(params, {"a": jnp.full(4, jnp.inf), "b": jnp.ones(4)}, state)
    assert float(state["skipped_steps"]) == 1 and int(state["iterations"]) == 0
    np.testing.assert_array_equal(np.asarray(params["a"]), 1.0)
    assert shardopt.Adam(skip_nonfinite=True).get_config()["skip_nonfinite"] is True
    assert "skip_nonfinite" not in shardopt.Adam().get_config()
    with pytest.raises(TypeError, match="skip_nonfinite"):
        shardopt.Adam(skip_nonfinite="yes")
