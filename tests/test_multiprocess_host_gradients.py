"""`host_gradients="consistent"`: numpy gradients placed without jax's per-array cross-process equality check
(`multihost_utils.assert_equal`, which `jax.device_put` runs for a host array on a sharding spanning every
process), in 2 processes x 4 CPU devices (gloo, loopback) and in one process.

In 2 processes: the consistent path's results are bitwise the checked path's and the single 8-device process's,
for `apply_gradients` and the functional step; the checked path calls the check once per gradient per step and
the consistent path never (counted through the real run); gradients that differ between processes are refused
by the checked path (jax's AssertionError, before anything is donated) and, as documented, not by the
consistent one, whose replicas then drift apart. In one process the option changes nothing.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multiprocess_lib as mpl  # noqa: E402
from mp_workers import host_gradient_scenarios as hgs  # noqa: E402
from mp_workers import scenarios  # noqa: E402

import shardopt  # noqa: E402

WORKER = str(mpl.WORKERS / "worker.py")
N_GRADIENTS = 4  # dense/kernel, proj/kernel, big/kernel, dense/bias: each sharding spans both processes
RUNS = ["keras_checked", "keras_consistent", "compiled_checked", "compiled_consistent", "inconsistent_checked",
        "inconsistent_consistent", "consistent_refuses_bad_gradients"]


load = mpl.load_result


def numbers(result):
    return {k: v for k, v in result.items() if k != hgs.CALLS}


def assert_bitwise(got, want):
    assert sorted(got) == sorted(want)
    bad = [k for k in want if not np.array_equal(got[k], want[k]) or got[k].dtype != want[k].dtype]
    assert not bad, f"{len(bad)}/{len(want)} arrays differ: {bad}"


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """One 2-process launch running every scenario."""
    tmp = tmp_path_factory.mktemp("mp-host-gradients")
    results = mpl.launch([WORKER, str(tmp), *RUNS], tmp, timeout_s=240)
    return tmp, results


@pytest.fixture(scope="module")
def one(mesh):
    return {name: hgs.SCENARIOS[name](mesh) for name in ["keras_checked", "compiled_checked"]}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_processes_exit_cleanly(two):
    assert [r.returncode for r in two[1]] == [0, 0], mpl.describe(two[1])


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["keras", "compiled"])
def test_consistent_is_bitwise_the_checked_path_and_one_process(two, one, kind):
    tmp, results = two
    want = numbers(one[f"{kind}_checked"])
    for pid in (0, 1):
        assert_bitwise(numbers(load(tmp, f"{kind}_checked", pid, results)), want)
        assert_bitwise(numbers(load(tmp, f"{kind}_consistent", pid, results)), want)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["keras", "compiled"])
def test_the_check_runs_per_gradient_per_step_unless_consistent(two, kind):
    """Counted through the real run, in the steps after the first: every gradient's sharding spans both
    processes, so the checked path calls assert_equal once per gradient per step; the consistent path, never."""
    tmp, results = two
    for pid in (0, 1):
        assert int(load(tmp, f"{kind}_checked", pid, results)[hgs.CALLS]) == (scenarios.STEPS - 1) * N_GRADIENTS
        assert int(load(tmp, f"{kind}_consistent", pid, results)[hgs.CALLS]) == 0


@pytest.mark.slow
@pytest.mark.multiprocess
def test_checked_path_refuses_gradients_that_differ_between_processes(two):
    tmp, results = two
    for pid in (0, 1):
        r = load(tmp, "inconsistent_checked", pid, results)
        assert int(r["raised"]) == 1 and int(r["not_the_same"]) == 1, r
        assert int(r["intact"]) == 1 and int(r["iterations"]) == 1, r  # nothing was donated or stepped


@pytest.mark.slow
@pytest.mark.multiprocess
def test_consistent_path_does_not_check_and_replicas_drift(two):
    """The documented cost of a broken promise: no error, and the replicated bias holds a different value in
    each process."""
    tmp, results = two
    r0, r1 = (load(tmp, "inconsistent_consistent", pid, results) for pid in (0, 1))
    for r in (r0, r1):
        assert int(r["raised"]) == 0 and int(r["iterations"]) == 2 and int(r[hgs.CALLS]) == 0, r
    assert not np.array_equal(r0["local/dense/bias"], r1["local/dense/bias"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_consistent_path_still_validates_before_donating(two):
    tmp, results = two
    for pid in (0, 1):
        r = load(tmp, "consistent_refuses_bad_gradients", pid, results)
        assert all(int(v) == 1 for v in r.values()), r


# --- one process: accepted and a no-op ------------------------------------------------------------------------

def test_one_process_consistent_is_a_no_op(mesh, one, monkeypatch):
    """Every sharding is addressable in one process: the same numbers, and the unchecked placement never runs."""
    from shardopt.runtime import executable

    placed = []
    real = executable.place_consistent
    monkeypatch.setattr(executable, "place_consistent", lambda *a: placed.append(1) or real(*a))
    for kind in ("keras", "compiled"):
        got = hgs.SCENARIOS[f"{kind}_consistent"](mesh)
        assert_bitwise(numbers(got), numbers(one[f"{kind}_checked"]))
        assert int(got[hgs.CALLS]) == 0 and int(one[f"{kind}_checked"][hgs.CALLS]) == 0
    assert placed == []


def test_unknown_host_gradients_mode_is_refused_before_the_step(mesh):
    v = shardopt.Variable(np.ones((4,), np.float32), name="w")
    opt = shardopt.Adam(1e-3, mesh=mesh)
    with pytest.raises(ValueError, match=r"host_gradients must be one of \('checked', 'consistent'\), got 'yes'"):
        opt.apply_gradients([(np.ones((4,), np.float32), v)], host_gradients="yes")
    assert not opt._built
    step = opt.compile({"w": shardopt.VariableSpec((4,), "float32")})
    p = step.place_params({"w": np.ones((4,), np.float32)})
    s = step.init(p)
    with pytest.raises(ValueError, match="host_gradients must be one of"):
        step(p, {"w": np.ones((4,), np.float32)}, s, host_gradients="trusted")
    assert not p["w"].is_deleted()
    p, s = step(p, {"w": np.ones((4,), np.float32)}, s, host_gradients="consistent")
    assert int(np.asarray(s["iterations"])) == 1
