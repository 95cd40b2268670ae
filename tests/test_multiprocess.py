"""Multi-process mode: 2 processes x 4 CPU devices under `jax.distributed` (gloo, loopback) run the Keras-shaped
API, `compile()`, a loaded 8-device artifact and `as_jax_function` inside the user's jit on one global 2x4 mesh,
with variables split across the processes; every result is bitwise the single-process 8-device run's.

All of it runs on one xdist worker (group "multiprocess"); each launch is bounded and kills its children."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multiprocess_lib as mpl  # noqa: E402
from mp_workers import scenarios  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WORKER = str(mpl.WORKERS / "worker.py")
EXACT = ["keras", "compiled", "artifact", "in_user_jit"]


@pytest.fixture(scope="module")
def runs(mesh, tmp_path_factory):
    """The single-process references and one 2-process launch that runs every scenario."""
    tmp = tmp_path_factory.mktemp("mp")
    art = tmp / "adam8.shardopt"
    scenarios.compile_step(mesh).save(art)
    refs = {name: fn(mesh) for name, fn in scenarios.SCENARIOS.items() if name != "artifact"}
    refs["artifact"] = scenarios.artifact(mesh, str(art))
    names = [*EXACT, "keras_global_clipnorm"]
    results = mpl.launch([WORKER, str(tmp), *[f"{n}={art}" if n == "artifact" else n for n in names]], tmp)
    return tmp, refs, results


def load(tmp, name, pid, results):
    err = tmp / f"{name}.p{pid}.error.txt"
    if err.exists():
        pytest.fail(f"{name} raised in process {pid}:\n{err.read_text()}")
    f = tmp / f"{name}.p{pid}.npz"
    if not f.exists():
        pytest.fail(f"process {pid} saved no result for {name}\n{mpl.describe(results)}")
    with np.load(f) as z:
        return {k: z[k] for k in z.files}


def assert_bitwise(got, want):
    assert sorted(got) == sorted(want)
    bad = [k for k in want if not np.array_equal(got[k], want[k]) or got[k].dtype != want[k].dtype]
    if bad:
        k = bad[0]
        diff = np.max(np.abs(got[k].astype(np.float64) - want[k].astype(np.float64)))
        raise AssertionError(f"{len(bad)}/{len(want)} arrays differ, e.g. {k} by up to {diff:.3g}: {bad}")


def test_processes_exit_cleanly(runs):
    _, _, results = runs
    assert [r.returncode for r in results] == [0, 0], mpl.describe(results)


@pytest.mark.parametrize("name", EXACT)
def test_bitwise_equal_to_one_process(runs, name):
    tmp, refs, results = runs
    for pid in (0, 1):
        assert_bitwise(load(tmp, name, pid, results), refs[name])


@pytest.mark.xfail(strict=True, reason=(
    "global_clipnorm: the global norm's cross-process all-reduce (gloo) adds the per-device sums of squares in "
    "another order than XLA's in-process all-reduce, so the norm, and every clipped update, can differ by 1 ulp. "
    "Fix (clipping code): gather the per-device partial sums and add them in a fixed order."))
def test_global_clipnorm_bitwise_equal_to_one_process(runs):
    tmp, refs, results = runs
    for pid in (0, 1):
        assert_bitwise(load(tmp, "keras_global_clipnorm", pid, results), refs["keras_global_clipnorm"])
