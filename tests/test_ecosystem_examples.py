"""The ecosystem guides' examples (flax nnx / linen + optax, Keras 3 model.fit, orbax checkpoints) run, each in
a fresh process at small sizes."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run_example(name, *args):
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = ""  # each example asks for the devices it needs
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_flax_nnx_example():
    pytest.importorskip("flax")
    out = run_example("flax_nnx.py", "--steps", "20")
    assert "nnx.Optimizer, 20 steps" in out and "linen TrainState" in out


def test_keras3_fit_example():
    out = run_example("keras3_fit.py", "--epochs", "2")
    assert "model.fit with shardopt.keras.Adam: 10 steps" in out
    assert float(out.split("max |w - w(keras Adam)| = ")[1].split()[0]) <= 1e-6  # global_clipnorm: within 1e-7
    assert "loaded shardopt.keras.Adam at step 10" in out


def test_orbax_checkpoint_example():
    pytest.importorskip("orbax.checkpoint")
    out = run_example("orbax_checkpoint.py")
    assert "bitwise equal to the uninterrupted run: True" in out


@pytest.mark.tf
def test_tf_keras_fit_example():
    out = run_example("tf_keras_fit.py", "--epochs", "2")
    assert "model.fit with shardopt.tf_keras.Adam: 10 steps" in out
    assert float(out.split("max |w - w(tf-keras Adam)| = ")[1].split()[0]) <= 1e-6
    assert "loaded from .keras: Adam at step 10" in out and "restored from tf.train.Checkpoint at step 10" in out
