"""Test setup: 8 virtual CPU devices and Keras on JAX, fixed before jax or keras is imported."""

import os

from shardopt.cli import with_collective_timeouts  # standard library only: jax is not imported yet

# 8 virtual devices, and collective timeouts that a loaded CI machine cannot hit (see COLLECTIVE_TIMEOUT_FLAGS).
os.environ["XLA_FLAGS"] = with_collective_timeouts(
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mesh():
    """The 2x4 ('batch', 'model') mesh of the issue's examples, over the 8 CPU devices."""
    return jax.make_mesh((2, 4), ("batch", "model"))


@pytest.fixture(scope="session")
def mesh8():
    """A 1-D mesh of all 8 devices."""
    return jax.make_mesh((8,), ("x",))


def pytest_collection_modifyitems(config, items):
    """All TensorFlow tests share one xdist worker (with --dist loadgroup), so TF is imported once per run; the
    multi-process tests share another, so their launches never overlap (each starts 2 processes)."""
    for item in items:
        if item.get_closest_marker("tf") is not None:
            item.add_marker(pytest.mark.xdist_group("tf"))
        if item.get_closest_marker("multiprocess") is not None:
            item.add_marker(pytest.mark.xdist_group("multiprocess"))
