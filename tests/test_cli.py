"""The `shardopt` command: compile (Keras configs), run (smoke run with a checksum), inspect; as `python -m
shardopt` and as the installed script, in fresh processes where it matters (device setup, no optimizer)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import shardopt
from shardopt import cli

TF_KERAS_CONFIG = {  # tf_keras.optimizers.serialize(Adam(ExponentialDecay(...), global_clipnorm=1.0))
    "module": "keras.optimizers", "class_name": "Adam", "registered_name": None,
    "config": {"name": "Adam", "weight_decay": None, "clipnorm": None, "global_clipnorm": 1.0, "clipvalue": None,
               "use_ema": False, "ema_momentum": 0.99, "ema_overwrite_frequency": None, "jit_compile": False,
               "is_legacy_optimizer": False, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-07, "amsgrad": False,
               "learning_rate": {"module": "keras.optimizers.schedules", "class_name": "ExponentialDecay",
                                 "config": {"initial_learning_rate": 0.001, "decay_steps": 100, "decay_rate": 0.9,
                                            "staircase": False, "name": None}, "registered_name": None}},
}
KERAS3_CONFIG = {"name": "adam", "learning_rate": 0.002, "weight_decay": None, "clipnorm": None,
                 "global_clipnorm": None, "clipvalue": None, "use_ema": True, "ema_momentum": 0.99,
                 "ema_overwrite_frequency": None, "loss_scale_factor": None, "gradient_accumulation_steps": None,
                 "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-07, "amsgrad": False}
VARIABLES = {"dense/kernel": {"shape": [16, 8], "dtype": "float32", "layout": [None, "model"]},
             "dense/bias": {"shape": [8]},
             "emb": {"shape": [32, 8], "layout": ["batch", "model"]}}


def shardopt_cmd(*args, env=None):
    return subprocess.run([sys.executable, "-m", "shardopt", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "tfk.json").write_text(json.dumps(TF_KERAS_CONFIG))
    (d / "k3.json").write_text(json.dumps(KERAS3_CONFIG))
    (d / "vars.json").write_text(json.dumps(VARIABLES))
    return d


@pytest.fixture(scope="module")
def artifact(files, mesh):
    """An artifact compiled by `main([...])` in this process (it already has 8 devices)."""
    out = files / "k3.shardopt"
    assert cli.main(["compile", "--config", files / "k3.json", "--variables", files / "vars.json",
                     "--mesh", "batch=2,model=4", "-o", out]) == 0
    return out


def test_parse_mesh_and_configs():
    assert cli.parse_mesh("batch=2, model=4") == [("batch", 2), ("model", 4)]
    for bad in ("batch", "batch=0", "batch=2,batch=2", "=2", "x=two"):
        with pytest.raises(ValueError, match="--mesh"):
            cli.parse_mesh(bad)
    name, cfg = cli.optimizer_config(TF_KERAS_CONFIG)
    assert name == "Adam" and cfg["global_clipnorm"] == 1.0 and isinstance(cfg["learning_rate"], dict)
    name, cfg = cli.optimizer_config(KERAS3_CONFIG)
    assert name == "Adam" and "loss_scale_factor" not in cfg and "gradient_accumulation_steps" not in cfg
    assert cli.optimizer_config({"class_name": "Custom>Adam", "config": {}})[0] == "Adam"
    with pytest.raises(ValueError, match="loss_scale_factor=128.0 is not supported"):
        cli.optimizer_config({**KERAS3_CONFIG, "loss_scale_factor": 128.0})
    with pytest.raises(ValueError, match="unknown optimizer class 'AdaBelief'; shardopt has \\['Adadelta'"):
        cli.optimizer_class("AdaBelief")
    assert cli.optimizer_class("adam") is shardopt.Adam


def test_variables_file_nests_names(mesh):
    specs = cli.variable_specs(VARIABLES, mesh)
    assert set(specs) == {"dense", "emb"} and set(specs["dense"]) == {"kernel", "bias"}
    assert specs["dense"]["kernel"].layout.sharding_specs == ("unsharded", "model")
    assert specs["dense"]["bias"].layout is None and str(specs["emb"].dtype) == "float32"
    with pytest.raises(ValueError, match="'a/b' nests under 'a', which is itself a variable"):
        cli.variable_specs({"a": [2], "a/b": [2]}, mesh)
    with pytest.raises(ValueError, match="needs a \"shape\" list"):
        cli.variable_specs({"a": {"dtype": "float32"}}, mesh)


def test_compile_subprocess_matches_in_process_compile(files, tmp_path, mesh):
    out = tmp_path / "tfk.shardopt"
    proc = shardopt_cmd("compile", "--config", files / "tfk.json", "--variables", files / "vars.json",
                        "--mesh", "batch=2,model=4", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "Adam, 3 variables (392 parameters), mesh batch=2,model=4" in proc.stdout
    loaded = shardopt.load(out)
    assert loaded.initial_learning_rate is None  # the schedule is compiled in
    assert loaded.optimizer_config["learning_rate"]["class_name"] == "ExponentialDecay"
    opt = shardopt.Adam.from_config({**TF_KERAS_CONFIG["config"], "mesh": mesh})
    here = opt.compile(cli.variable_specs(VARIABLES, mesh))
    assert cli.smoke_run(loaded, 3, seed=1)["sha256"] == cli.smoke_run(here, 3, seed=1)["sha256"]


def test_run_script_prints_times_and_a_reproducible_checksum(artifact):
    script = Path(sys.executable).with_name("shardopt")
    proc = subprocess.run([script, "run", artifact, "--steps", "4", "--seed", "3"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"loaded {artifact} in ") and "on 8 cpu devices" in lines[0]
    assert re.fullmatch(r"step 1: [\d.]+ ms \(first call: includes XLA compilation\)", lines[1])
    assert all(re.fullmatch(rf"step {i}: [\d.]+ ms", lines[i]) for i in (2, 3, 4))
    assert lines[5].startswith("steps 2-4: median ")
    digest = re.fullmatch(r"checksum: sha256=([0-9a-f]{64}) sum=(\S+)", lines[6])
    assert digest
    here = cli.smoke_run(shardopt.load(artifact), 4, seed=3)  # another process, the same bits
    assert digest.group(1) == here["sha256"] and float(digest.group(2)) == here["sum"]


def test_inspect_subprocess_stage(artifact):
    proc = shardopt_cmd("inspect", artifact, "--stage", "partitioned-hlo")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("HloModule") and "f32[16,2]" in proc.stdout


def test_wrong_device_count_is_a_clear_error(artifact):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = shardopt_cmd("run", artifact, "--steps", "1", env=env)
    assert proc.returncode == 1
    assert "shardopt run: error:" in proc.stderr
    assert "wrong device count: the artifact was compiled for mesh batch=2,model=4 (8 devices), this process has 4" \
        in proc.stderr


def test_inspect_in_process(artifact, tmp_path, capsys):
    assert cli.main(["inspect", str(artifact)]) == 0
    text = capsys.readouterr().out
    assert "Pass pipeline" in text and "Collectives in the partitioned HLO" in text and str(artifact) in text
    assert cli.main(["inspect", str(artifact), "--stage", "frontend"]) == 0
    assert capsys.readouterr().out.startswith("module @")
    assert cli.main(["inspect", str(artifact), "--diff", "propagate-layouts", "cleanup"]) == 0
    assert capsys.readouterr().out.startswith("--- propagate-layouts\n+++ cleanup")
    page = tmp_path / "r.html"
    assert cli.main(["inspect", str(artifact), "--html", str(page)]) == 0
    assert capsys.readouterr().out == f"wrote {page}\n"
    assert page.read_text().startswith("<!DOCTYPE html>") and 'id="variables-table"' in page.read_text()
    assert cli.main(["inspect", str(artifact), "--manifest"]) == 0
    assert json.loads(capsys.readouterr().out)["mesh"]["axes"] == [["batch", 2], ["model", 4]]


def test_errors_exit_1_with_a_message(artifact, files, tmp_path, capsys):
    assert cli.main(["inspect", str(artifact), "--stage", "nope"]) == 1
    assert "shardopt inspect: error: no stage 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.shardopt"
    bad.write_bytes(artifact.read_bytes()[:-100])
    assert cli.main(["run", str(bad), "--steps", "1"]) == 1
    assert "truncated" in capsys.readouterr().err
    assert cli.main(["run", str(tmp_path / "missing.shardopt")]) == 1
    assert "No such file" in capsys.readouterr().err
    (tmp_path / "lion.json").write_text(json.dumps({"class_name": "AdaBelief", "config": {}}))
    assert cli.main(["compile", "--config", str(tmp_path / "lion.json"), "--variables", str(files / "vars.json"),
                     "--mesh", "batch=2,model=4", "-o", str(tmp_path / "x.shardopt")]) == 1
    assert "unknown optimizer class 'AdaBelief'" in capsys.readouterr().err
    assert cli.main(["compile", "--config", str(files / "k3.json"), "--variables", str(files / "vars.json"),
                     "--mesh", "batch=4,model=4", "-o", str(tmp_path / "x.shardopt")]) == 1
    assert "needs 16 devices, this process has 8" in capsys.readouterr().err
    assert not (tmp_path / "x.shardopt").exists()
