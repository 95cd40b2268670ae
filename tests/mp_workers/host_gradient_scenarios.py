"""Scenarios for `host_gradients="checked" | "consistent"` (tests/test_multiprocess_host_gradients.py), run by
tests/mp_workers/worker.py in 2 processes x 4 devices and by the pytest process on 8 devices (the reference).

Each counts the calls of `jax.experimental.multihost_utils.assert_equal` -- the cross-process equality check
`jax.device_put` runs for a host array placed on a sharding that spans every process -- while it runs, and
reports the count as "calls/assert_equal" (not part of the numbers compared bitwise).
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np

import shardopt

try:  # imported from the tests (tests/ on sys.path) or by worker.py (tests/mp_workers/ on sys.path)
    from mp_workers import scenarios
except ImportError:
    import scenarios

CALLS = "calls/assert_equal"


@contextlib.contextmanager
def counting_assert_equal():
    """Counts the calls of jax's cross-process check (jax/_src/dispatch.py calls it as
    `multihost_utils.assert_equal`, looked up on the module at each call) while the block runs."""
    from jax.experimental import multihost_utils

    real, calls = multihost_utils.assert_equal, [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    multihost_utils.assert_equal = counted
    try:
        yield calls
    finally:
        multihost_utils.assert_equal = real


def _checks_after_the_first(step, grads) -> int:
    """Runs `step(g)` for each gradient set; returns the checks counted in all but the first step, which also
    builds the optimizer's state and places its one-off inputs (once each: the learning rate, the counter, a
    variable made without a layout), so the count is what every later step pays."""
    step(grads[0])
    with counting_assert_equal() as calls:
        for g in grads[1:]:
            step(g)
    return calls[0]


def _keras(mesh, host_gradients):
    init, grads = scenarios._host_data({n: s for n, (s, _) in scenarios.layouts(mesh).items()}, scenarios.STEPS,
                                       seed=11)
    vars_, opt = scenarios._keras_make(mesh, init)
    calls = _checks_after_the_first(lambda g: opt.apply_gradients([(g[n], v) for n, v in vars_.items()],
                                                                   host_gradients=host_gradients), grads)
    return {**scenarios._keras_out(vars_, opt), CALLS: np.asarray(calls)}


def keras_checked(mesh):
    """The `keras` scenario (numpy gradients), counting the checks."""
    return _keras(mesh, "checked")


def keras_consistent(mesh):
    return _keras(mesh, "consistent")


def _compiled(mesh, host_gradients):
    step = scenarios.compile_step(mesh)
    p0, grads = scenarios._tree_data(step, seed=5)
    p = step.place_params(p0)
    s = step.init(p)
    carry = {"p": p, "s": s}

    def one(g):
        carry["p"], carry["s"] = step(carry["p"], g, carry["s"], host_gradients=host_gradients)
    calls = _checks_after_the_first(one, grads)
    return {**scenarios._flat((carry["p"], carry["s"])), CALLS: np.asarray(calls)}


def compiled_checked(mesh):
    """The `compiled` scenario (numpy gradients to the functional step), counting the checks."""
    return _compiled(mesh, "checked")


def compiled_consistent(mesh):
    return _compiled(mesh, "consistent")


def _local(x) -> np.ndarray:
    """This process's own copy of a replicated value (the first addressable shard)."""
    return np.asarray(x.addressable_data(0))


def inconsistent(mesh, host_gradients):
    """Gradients that differ between the processes (seeded by the process index). "raised" records whether the
    step raised jax's AssertionError ("... is not the same on each process"); "intact" whether every variable
    and slot is still alive and unchanged afterwards (validation runs before the step donates anything);
    "local/..." is this process's copy of the replicated bias after the call, so the test can see the replicas
    drift apart when the promise is broken and nothing checks it."""
    init, _ = scenarios._host_data({n: s for n, (s, _) in scenarios.layouts(mesh).items()}, 1, seed=11)
    _, grads = scenarios._host_data({n: s for n, (s, _) in scenarios.layouts(mesh).items()}, 1,
                                    seed=100 + jax.process_index())
    vars_, opt = scenarios._keras_make(mesh, init)
    opt.apply_gradients([(np.zeros_like(init[n]), v) for n, v in vars_.items()])  # builds and compiles
    before = {n: v.gather() for n, v in vars_.items()}
    raised, message = 0, ""
    with counting_assert_equal() as calls:
        try:
            opt.apply_gradients([(grads[0][n], v) for n, v in vars_.items()], host_gradients=host_gradients)
        except AssertionError as e:
            raised, message = 1, str(e)
    intact = raised and all(np.array_equal(v.gather(), before[n]) for n, v in vars_.items())
    return {"raised": np.asarray(raised), "not_the_same": np.asarray("not the same on each process" in message),
            "intact": np.asarray(bool(intact)), "iterations": np.asarray(int(_local(opt.iterations.value))),
            "local/dense/bias": _local(vars_["dense/bias"].value), CALLS: np.asarray(calls[0])}


def inconsistent_checked(mesh):
    return inconsistent(mesh, "checked")


def inconsistent_consistent(mesh):
    return inconsistent(mesh, "consistent")


def consistent_refuses_bad_gradients(mesh):
    """Unchecked across processes is not unvalidated: a gradient of the wrong dtype or shape is refused, naming it,
    before the step donates anything (params and state stay alive)."""
    step = scenarios.compile_step(mesh)
    p0, grads = scenarios._tree_data(step, seed=5, steps=1)
    p = step.place_params(p0)
    s = step.init(p)
    out = {}
    for what, bad in (("dtype", lambda g: g.astype(np.float64)), ("shape", lambda g: g[:1])):
        g = jax.tree.map(lambda x: x, grads[0])
        g["proj"] = bad(g["proj"])
        try:
            step(p, g, s, host_gradients="consistent")
            out[f"refused/{what}"] = np.asarray(0)
        except shardopt.StepInputError as e:
            out[f"refused/{what}"] = np.asarray(int(str(e).startswith("grad/proj: expected " + what)))
        out[f"alive/{what}"] = np.asarray(int(not any(x.is_deleted() for x in jax.tree.leaves((p, s)))))
    return out


SCENARIOS = {f.__name__: f for f in (keras_checked, keras_consistent, compiled_checked, compiled_consistent,
                                     inconsistent_checked, inconsistent_consistent, consistent_refuses_bad_gradients)}

__all__ = ["CALLS", "SCENARIOS", "counting_assert_equal"]
