"""A small lit: every `// RUN:` line of tests/filecheck/*.mlir runs through bash (with pipefail, as lit does) and
must exit 0. `%s` is the file, `python` this interpreter, and the interpreter's bin directory (with `filecheck`)
comes first on PATH. Also: every registered pass has a file, and every file's checks fail on its unchanged
input (and option runs on the default's output), so a pass that does nothing cannot pass its FileCheck test."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from shardopt.opt import SPLIT_MARKER, process, split_input
from shardopt.passes.registry import build_pipeline, pass_names

ROOT = Path(__file__).resolve().parent.parent
FILECHECK_DIR = ROOT / "tests" / "filecheck"
BIN = Path(sys.executable).parent
RUN = re.compile(r"^//\s*RUN:\s*(.*?)\s*$", re.MULTILINE)
PYTHON = re.compile(r"(?<![\w./-])python(?![\w./-])")


def run_lines(path: Path) -> list[str]:
    return RUN.findall(path.read_text())


def substitute(command: str, path: Path) -> str:
    """lit's substitutions: `python` -> this interpreter, `%s` -> the file."""
    return PYTHON.sub(shlex.quote(sys.executable), command).replace("%s", shlex.quote(str(path)))


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


FILES = sorted(FILECHECK_DIR.glob("*.mlir"))
CASES = [pytest.param(path, line, id=f"{path.stem}:{i}") for path in FILES for i, line in enumerate(run_lines(path))]


@pytest.mark.parametrize("path, line", CASES)
def test_run_line(path: Path, line: str):
    command = substitute(line, path)
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=ROOT, env=environment(), text=True,
                          capture_output=True, timeout=600, check=False)
    assert proc.returncode == 0, (f"RUN: {line}\n$ {command}\nexit {proc.returncode}\n--- stderr ---\n{proc.stderr}"
                                  f"\n--- stdout (tail) ---\n{proc.stdout[-3000:]}")


def test_every_file_has_run_lines_and_every_pass_a_file():
    assert FILES
    for path in FILES:
        assert run_lines(path), f"{path.name} has no RUN line"
    assert sorted(p.stem for p in FILES) == pass_names()


def _command_args(line: str, tool: str) -> list[str]:
    """The arguments of `tool` (`filecheck`, or the `shardopt.opt` module) in a RUN line."""
    for stage in (shlex.split(s) for s in line.split("|")):
        if stage and stage[0] == tool:
            return stage[1:]
        if tool == "shardopt.opt" and stage[:3] == ["python", "-m", "shardopt.opt"]:
            return stage[3:]
    raise AssertionError(f"no {tool} in RUN line {line!r}")


def _pipeline_of(line: str) -> str:
    args = _command_args(line, "shardopt.opt")
    for flag in ("-p", "--passes", "--pass-pipeline"):
        if flag in args:
            return args[args.index(flag) + 1]
    return ""


@pytest.mark.parametrize("path, line", CASES)
def test_checks_need_the_pass(path: Path, line: str):
    """The first RUN line's checks fail on the input printed back unchanged (a pass that does nothing fails its
    test); every further RUN line's checks fail on the first one's output (each option run checks what the
    option changes)."""
    first = run_lines(path)[0]
    baseline = "" if line == first else _pipeline_of(first)
    passes = build_pipeline(baseline)
    output = f"{SPLIT_MARKER}\n".join(process(chunk, passes)[0] + "\n" for chunk in split_input(path.read_text()))
    args = [a.replace("%s", str(path)) for a in _command_args(line, "filecheck")]
    proc = subprocess.run([str(BIN / "filecheck"), *args], input=output, text=True, capture_output=True,
                          check=False)
    what = "the unchanged input" if line == first else f"the output of `-p {baseline}`"
    assert proc.returncode != 0, f"{path.name}: the checks of `{line}` also pass on {what}"
