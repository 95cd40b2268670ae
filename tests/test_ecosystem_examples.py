"""The ecosystem guides' examples (docs/: flax nnx, optax + linen, Keras 3 model.fit, tf-keras model.fit, orbax
checkpoints) run, each in a fresh process at small sizes; every guide names its example and its example is run
here."""

import inspect
import os
import pathlib
import re
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


def relative_differences(out):
    """Every 'max relative difference X' the example printed (its run against optax's own)."""
    return [float(part.split(")")[0]) for part in out.split("max relative difference ")[1:]]


def test_flax_nnx_example():
    pytest.importorskip("flax")
    out = run_example("flax_nnx.py", "--steps", "20")
    assert "nnx.Optimizer, 20 steps" in out and "learning rate 1e-3 -> 3e-3 at step 10" in out
    diffs = relative_differences(out)
    assert len(diffs) == 2 and max(diffs) <= 5e-5  # the documented epsilon difference (tests/test_optax.py)


def test_optax_linen_example():
    pytest.importorskip("flax")
    out = run_example("optax_linen.py", "--steps", "20")
    for line in ("linen TrainState, 20 steps", "optax.chain(clip_by_global_norm, shardopt)",
                 "optax.MultiSteps(shardopt, every 2)", "inject_hyperparams, learning rate changed at steps [6, 13]",
                 "learning rate now 0.0003; compiled steps: 1"):
        assert line in out
    diffs = relative_differences(out)
    assert len(diffs) == 4 and max(diffs) <= 5e-5


def test_keras3_fit_example():
    out = run_example("keras3_fit.py", "--epochs", "2")
    assert "model.fit with shardopt.keras.Adam: 10 steps" in out
    assert float(out.split("max |w - w(keras Adam)| = ")[1].split()[0]) <= 1e-6  # global_clipnorm: within 1e-7
    assert "loaded shardopt.keras.Adam at step 10" in out


def test_orbax_checkpoint_example():
    pytest.importorskip("orbax.checkpoint")
    out = run_example("orbax_checkpoint.py")
    assert "resumed at step 5, trained to step 10: bitwise equal to the uninterrupted run: True" in out
    assert "functional step: saved ['iteration', 'learning_rate', 'm/dense/bias'" in out
    assert "resumed to step 10: bitwise equal to the uninterrupted run: True" in out


@pytest.mark.tf
def test_tf_keras_fit_example():
    out = run_example("tf_keras_fit.py", "--epochs", "2")
    assert "model.fit with shardopt.tf_keras.Adam: 10 steps" in out
    assert float(out.split("max |w - w(tf-keras Adam)| = ")[1].split()[0]) <= 1e-6
    assert "loaded from .keras: Adam at step 10" in out and "restored from tf.train.Checkpoint at step 10" in out


GUIDES = {"flax-nnx.md": "flax_nnx.py", "optax-linen.md": "optax_linen.py", "keras3.md": "keras3_fit.py",
          "tf-keras.md": "tf_keras_fit.py", "orbax.md": "orbax_checkpoint.py"}


@pytest.mark.parametrize("guide", sorted(GUIDES))
def test_each_guide_names_its_example_and_the_example_runs_here(guide):
    """One short guide per ecosystem (docs/), its code valid Python, its example run by a test of this file."""
    text = (EXAMPLES.parent / "docs" / guide).read_text()
    example = GUIDES[guide]
    assert f"examples/{example}" in text and (EXAMPLES / example).exists()
    test_name = re.search(r"tests/test_ecosystem_examples\.py::(\w+)", text).group(1)
    assert f'run_example("{example}"' in inspect.getsource(globals()[test_name])
    assert len(text) < 4000  # short
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        compile(block, guide, "exec")
    readme = (EXAMPLES.parent / "README.md").read_text()
    assert f"docs/{guide}" in readme


@pytest.mark.slow
def test_jax_training_loop_example():
    out = run_example("jax_training_loop.py", "--steps", "20")
    assert "[as_jax_function] 2x4 mesh" in out and "[as_optax]" in out and "[optax.adam]" in out
    difference = float(re.search(r"max relative loss difference ([0-9.e+-]+)", out).group(1))
    assert difference <= 1e-4, out


@pytest.mark.slow
@pytest.mark.tf
def test_tf_training_loop_example(tmp_path):
    pytest.importorskip("tensorflow")
    out = run_example("tf_training_loop.py", "--steps", "20", "--artifact", str(tmp_path / "adam.shardopt"))
    assert "shardopt: loss" in out and "after save/load: iterations" in out, out
    difference = float(re.search(r"max \|loss diff\| ([0-9.e+-]+)", out).group(1))
    assert difference <= 1e-4, out


@pytest.mark.slow
def test_artifact_roundtrip_example(tmp_path):
    out = run_example("artifact_roundtrip.py", "--layers", "1", "--out", str(tmp_path / "gpt2.shardopt"),
                      "--html", str(tmp_path / "report.html"))
    assert "bitwise identical: True" in out and "$ shardopt inspect" in out, out
    assert (tmp_path / "report.html").stat().st_size > 0
