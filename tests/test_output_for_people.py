"""Output for people (issue 12): pass statistics in words (core/statistics.py), where the learning rate comes
from (`opt.learning_rate_source`), and the README quick-start job's output (examples/gpt2_adam.py), which prints
layouts in inspect's one notation."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import shardopt
from shardopt.core.statistics import WORDS, describe, sentence

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def stages(mesh):
    """A step that gives every pass something to count: a replicated variable in buffers of its own (a kernel
    candidate), a sharded one, small packed ones and a global norm."""
    lay = shardopt.Layout
    specs = {"big": shardopt.VariableSpec((300, 256), "float32"),
             "w": shardopt.VariableSpec((64, 32), "float32", lay([shardopt.UNSHARDED, "model"], mesh)),
             "b": shardopt.VariableSpec((32,), "float32"), "g": shardopt.VariableSpec((32,), "float32")}
    step = shardopt.Adam(1e-3, global_clipnorm=1.0, mesh=mesh).compile(specs)
    return {s.name: s.stats for s in step.program.pipeline.stages[1:]}


def test_every_statistic_a_pass_reports_has_words(stages):
    assert set(stages) == set(WORDS) | {"cleanup"}
    for name, stats in stages.items():
        missing = set(stats) - set(WORDS.get(name, {})) - {"ops_before", "ops_after"}
        assert not missing, f"{name} reports {sorted(missing)}: describe them in shardopt/core/statistics.py"


def test_describe_and_sentence(stages):
    rows = describe("fuse-moments", stages["fuse-moments"])
    assert rows[0] == ("per-variable updates found", str(stages["fuse-moments"]["units"]), "units")
    assert ("operations", f"{stages['fuse-moments']['ops_before']} -> {stages['fuse-moments']['ops_after']}",
            "ops_before, ops_after") in rows
    assert sentence("cleanup", {"ops_before": 10, "ops_after": 4}) == "operations 10 -> 4"
    assert sentence("fuse-moments", {"units": 3, "groups": 0, "tensors_per_group": {"2": 1, "1": 1},
                                     "results_unfused": {}}) == (
        "3 per-variable updates found; fused updates (how many x variables each): 1 x 2, 1 x 1")
    assert sentence("a-new-pass", {"things_done": 2}) == "2 things done"  # unknown keys are still shown
    assert sentence("inline-calls", {"calls_inlined": 0}) == "nothing to do"


def test_learning_rate_source():
    assert shardopt.Adam(1e-3).learning_rate_source.startswith("constant 0.001 (a runtime input of the step")
    schedule = shardopt.schedules.ExponentialDecay(1e-2, 10, 0.5)
    assert shardopt.Adam(schedule).learning_rate_source == (
        "schedule ExponentialDecay(initial_learning_rate=0.01, decay_steps=10, decay_rate=0.5, staircase=False), "
        "compiled into the step and evaluated at `iterations`")

    def warmup_peak():
        return 3e-4

    opt = shardopt.Adam(warmup_peak)
    assert opt.learning_rate_source.startswith("callable warmup_peak, called once when set: 0.0003")
    opt.learning_rate = 0.5
    assert opt.learning_rate_source.startswith("constant 0.5")


def test_gpt2_example_output():
    """The quick-start job, at a small size: where the learning rate comes from, one line of words per pass,
    and every layout (variables, slots, packs) in the `[-, model]` / `replicated` notation of inspect."""
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    result = subprocess.run([sys.executable, str(EXAMPLES / "gpt2_adam.py"), "--steps", "1", "--layers", "1",
                             "--d-model", "64", "--vocab", "1000"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.startswith("GPT-2 (1 blocks, d_model 64, vocab 1000): 16 tensors")
    assert re.search(r"^learning rate: schedule CosineDecay\(initial_learning_rate=0, decay_steps=1000, .*"
                     r"warmup_target=0.0006, warmup_steps=100\), compiled into the step .*; now 6e-06$", out, re.M)
    section = out.split("what each pass did:\n")[1].split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in section] == list(shardopt.Adam().pipeline)
    assert "function calls inlined into the step" in section[0] and "operations" in section[-1]
    assert not re.search(r"\w=\d", "\n".join(section))  # words, not key=value
    assert "'unsharded'" not in out and "None" not in out  # one notation, not Layout's and PartitionSpec's
    table = out.split("MB/device  stored\n")[1].split("\n\n")[0].splitlines()
    layouts = dict(re.match(r"(\S+)\s+\([\d, ]+\)\s+(\[[^]]*\]|replicated)\s", line).groups() for line in table)
    assert len(layouts) == 16 and layouts["wte"] == "[-, model]" and layouts["h0/attn/c_proj/w"] == "[model, -]"
    assert layouts["h0/ln_1/g"] == "replicated" and layouts["h0/attn/c_attn/b"] == "[model]"
    assert re.search(r"@pack\d/float32: \d+ variables, buffer float32\[\d+, \d+\], layout \[model, -\]", out)
    assert "slots (m, v, average)" in out and "same as variable" in out


def test_learning_rate_source_matches_what_the_step_does(mesh):
    """The words are true: a constant is a runtime input (changing it does not recompile), a schedule is not."""
    var = shardopt.Variable(np.ones(4, np.float32), name="x")
    opt = shardopt.Adam(1e-3)
    opt.apply_gradients([(jax.numpy.ones(4), var)])
    programs = len(opt._programs) + len(opt._fast_programs)
    opt.learning_rate = 0.5
    opt.apply_gradients([(jax.numpy.ones(4), var)])
    assert len(opt._programs) + len(opt._fast_programs) == programs
    step = shardopt.Adam(shardopt.schedules.ExponentialDecay(1e-2, 10, 0.5)).compile(
        {"x": shardopt.VariableSpec((4,), "float32")})
    assert not step.has_learning_rate_input
