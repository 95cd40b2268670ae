"""Pins the private TensorFlow path shardopt.compat.tf_private relies on (XlaCallModule via tf2xla)."""

import pytest

pytestmark = pytest.mark.tf


def test_pinned_tensorflow_version():
    tf = pytest.importorskip("tensorflow")
    from shardopt.compat.tf_private import PINNED_TF

    assert tf.__version__ == PINNED_TF


def test_xla_call_module_path_exists():
    pytest.importorskip("tensorflow")
    from tensorflow.compiler.tf2xla.python import xla as tfxla

    assert callable(tfxla.call_module)
    assert callable(tfxla.call_module_maximum_supported_version)


def test_version_window_covers_jax_export():
    pytest.importorskip("tensorflow")
    import jax

    from shardopt.compat.tf_private import call_module_maximum_supported_version

    assert call_module_maximum_supported_version() >= jax.export.maximum_supported_calling_convention_version


def test_call_module_runs_an_exported_function():
    tf = pytest.importorskip("tensorflow")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from shardopt.compat.tf_private import call_module

    exported = jax.export.export(jax.jit(lambda x, y: (x * 2 + y, jnp.sum(x))))(
        jax.ShapeDtypeStruct((3,), jnp.float32), jax.ShapeDtypeStruct((3,), jnp.float32))
    out = call_module([tf.constant([1.0, 2.0, 3.0]), tf.ones(3)], exported)
    np.testing.assert_array_equal(out[0].numpy(), [3.0, 5.0, 7.0])
    assert float(out[1].numpy()) == 6.0
