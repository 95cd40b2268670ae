"""Checkpoints carry optimizer-level state (Nadam's `u_product`, `skip_nonfinite`'s count): without it a resumed
Nadam restarts its momentum product at 1 (stateful) or at 0 (functional) and the trajectory departs. Resume from
`state_dict` must be bitwise, for the Keras-shaped optimizer and for the functional step."""

import numpy as np

import shardopt

rng = np.random.default_rng(7)
SHAPES = {"w": (8, 4), "b": (4,)}
INIT = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
GRADS = [{n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()} for _ in range(8)]


def make(**kw):
    variables = [shardopt.Variable(INIT[n].copy(), name=n) for n in SHAPES]
    return variables, shardopt.Nadam(1e-2, skip_nonfinite=True, **kw)


def train(opt, variables, grads):
    for g in grads:
        opt.apply_gradients([(g[v.name], v) for v in variables])


def test_stateful_state_dict_has_optimizer_state_and_resumes_bitwise():
    variables, opt = make()
    train(opt, variables, GRADS[:4])
    saved = opt.state_dict()
    assert "u_product" in saved and "skipped_steps" in saved
    assert float(saved["u_product"]) != 1.0
    train(opt, variables, GRADS[4:])
    want = [np.asarray(v.value) for v in variables]

    resumed, opt2 = make()
    v_at = _trajectory_at(4)  # the variables as they were at the checkpoint
    for v in resumed:
        v.assign(v_at[v.name])
    opt2.load_state_dict(saved, var_list=resumed)
    train(opt2, resumed, GRADS[4:])
    for got, exp in zip(resumed, want, strict=True):
        np.testing.assert_array_equal(np.asarray(got.value), exp)


def _trajectory_at(steps):
    variables, opt = make()
    train(opt, variables, GRADS[:steps])
    return {v.name: np.asarray(v.value) for v in variables}


def test_functional_state_dict_has_optimizer_state_and_resumes_bitwise():
    step = shardopt.Nadam(1e-2).compile({n: shardopt.VariableSpec(s, np.float32) for n, s in SHAPES.items()})
    params = step.place_params(INIT)
    state = step.init(params)
    for g in GRADS[:4]:
        params, state = step(params, g, state)
    saved = step.state_dict(state)
    assert "u_product" in saved and float(saved["u_product"]) != 1.0
    at = {k: np.asarray(v) for k, v in params.items()}
    for g in GRADS[4:]:
        params, state = step(params, g, state)
    resumed_params = step.place_params(at)
    resumed = step.load_state_dict(saved)
    for g in GRADS[4:]:
        resumed_params, resumed = step(resumed_params, g, resumed)
    for n in SHAPES:
        np.testing.assert_array_equal(np.asarray(resumed_params[n]), np.asarray(params[n]))
