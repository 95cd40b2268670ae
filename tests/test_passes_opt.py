"""`python -m shardopt.opt`: reads MLIR (file or stdin), runs a pipeline with `run_pipeline`, prints the IR,
splits on `// -----`, reports statistics as JSON on stderr and fails with a status and a message."""

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

from shardopt.opt import main, split_input
from shardopt.passes import registry
from shardopt.passes.base import ModulePass
from shardopt.passes.registry import register

ROOT = Path(__file__).resolve().parent.parent
FILECHECK_DIR = ROOT / "tests" / "filecheck"
CLEANUP = FILECHECK_DIR / "cleanup.mlir"
INLINE = FILECHECK_DIR / "inline-calls.mlir"
NO_MESH = """module @no_mesh {
  func.func public @main(%arg0: tensor<4xf32> {shardopt.name = "w", shardopt.role = "variable"}) -> tensor<4xf32> {
    return %arg0 : tensor<4xf32>
  }
}
"""


def test_file_in_ir_out(capsys):
    assert main(["-p", "cleanup", str(CLEANUP)]) == 0
    out, err = capsys.readouterr()
    assert "module @dead_ops" in out and "@unused" not in out and "exponential" not in out
    assert "CHECK" not in out and err == ""  # printed from the IR: no comments


def test_stdin_and_empty_pipeline(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(CLEANUP.read_text()))
    assert main([]) == 0  # no pipeline: parse and print again
    out = capsys.readouterr().out
    assert "@unused" in out and "exponential" in out and "CHECK" not in out
    monkeypatch.setattr(sys, "stdin", io.StringIO(CLEANUP.read_text()))
    assert main(["--pass-pipeline", "builtin.module(cleanup)", "-"]) == 0
    assert "@unused" not in capsys.readouterr().out


def test_split_input_file_and_stats(capsys):
    assert main(["-p", "inline-calls,cleanup", str(INLINE), "--split-input-file", "--stats"]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n// -----\n") == 1 and len(split_input(out)) == 2
    assert "call @" not in out and "@outer" not in out  # inlined, then symbol-dce
    stats = json.loads(err)
    assert [c["chunk"] for c in stats] == [0, 1]
    assert [[p["pass"] for p in c["passes"]] for c in stats] == [["inline-calls", "cleanup"]] * 2
    assert [c["passes"][0]["stats"]["calls_inlined"] for c in stats] == [1, 5]


def test_without_split_the_file_is_one_module(capsys):
    """Without --split-input-file the two modules of the file parse as one module holding both; inline-calls
    finds no top-level callee there and says so."""
    assert main(["-p", "cleanup", str(INLINE)]) == 0
    out = capsys.readouterr().out
    assert len(split_input(out)) == 1 and "module @one_call" in out and "module @nested_calls" in out
    assert main(["-p", "inline-calls", str(INLINE)]) == 1
    assert f"{INLINE}: error: PassError: func.call @helper: no func.func @helper" in capsys.readouterr().err


def test_spec_in_stats(capsys):
    chunk = FILECHECK_DIR / "fuse-moments.mlir"
    assert main(["-p", "fuse-moments{unpacked=true max-group=1}", str(chunk), "--split-input-file", "--stats"]) == 0
    stats = json.loads(capsys.readouterr().err)
    assert {c["passes"][0]["spec"] for c in stats} == {"fuse-moments{max-group=1 unpacked=true}"}
    assert {c["passes"][0]["pass"] for c in stats} == {"fuse-moments"}


def test_output_file(tmp_path, capsys):
    target = tmp_path / "out.mlir"
    assert main(["-p", "cleanup", str(CLEANUP), "-o", str(target)]) == 0
    assert capsys.readouterr().out == ""
    assert "module @dead_ops" in target.read_text()


def test_failing_chunk_reports_and_the_others_still_print(tmp_path, capsys):
    path = tmp_path / "three.mlir"
    good = split_input((FILECHECK_DIR / "propagate-layouts.mlir").read_text())[0]  # its first chunk
    path.write_text(NO_MESH + "// -----\n" + good + "\n// -----\nthis is not MLIR\n")
    assert main(["-p", "propagate-layouts", str(path), "--split-input-file"]) == 1
    out, err = capsys.readouterr()
    assert f"{path} (chunk 0): error: PassError: module has no `sdy.mesh @mesh`" in err
    assert f"{path} (chunk 2): error: MLIRError" in err and "(chunk 1)" not in err
    assert "module @slots_follow_variables" in out and len(split_input(out)) == 3


@dataclass(frozen=True)
class Boom(ModulePass):
    """A pass with a bug."""

    NAME: ClassVar[str] = "boom"

    def run(self, module: Any) -> dict[str, Any]:
        raise RuntimeError("a bug in the pass")


def test_unexpected_exception_shows_a_traceback(capsys):
    """An exception that is not a PassError or an MLIR diagnostic is a bug: the traceback comes with the error."""
    saved = dict(registry._PASSES)
    try:
        register(Boom)
        assert main(["-p", "cleanup,boom", str(CLEANUP)]) == 1
    finally:
        registry._PASSES.clear()
        registry._PASSES.update(saved)
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and f"{CLEANUP}: error: RuntimeError: a bug in the pass" in err


def test_bad_pipeline_and_missing_file(capsys):
    assert main(["-p", "fuse-moments{unpacked=perhaps}", str(CLEANUP)]) == 2
    assert "error: pass 'fuse-moments': option 'unpacked' takes true or false" in capsys.readouterr().err
    assert main(["-p", "nope", str(CLEANUP)]) == 2
    assert "unknown pass 'nope'" in capsys.readouterr().err
    assert main(["-p", "cleanup", "/nonexistent/x.mlir"]) == 2
    assert "No such file" in capsys.readouterr().err


def test_list_passes(capsys):
    assert main(["--list-passes"]) == 0
    out = capsys.readouterr().out
    for name in ("inline-calls:", "propagate-layouts:", "fuse-moments:", "fuse-clipping:", "cleanup:"):
        assert name in out
    assert "  unpacked=false (bool): " in out and "  max-operands=16 (int): " in out


def test_deprecated_alias_warns(capsys):
    with pytest.warns(DeprecationWarning, match="use 'fuse-moments{unpacked=true}'"):
        assert main(["-p", "fuse-moments-unpacked", str(FILECHECK_DIR / "fuse-moments.mlir"),
                     "--split-input-file"]) == 0


def test_as_a_module_through_stdin():
    """The real command line: `python -m shardopt.opt`, input on stdin, IR on stdout, stats and the deprecation
    warning on stderr."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "shardopt.opt", "-p", "fuse-moments-unpacked", "--stats",
                           "--split-input-file"], input=(FILECHECK_DIR / "fuse-moments.mlir").read_text(),
                          capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert len(split_input(proc.stdout)) == 3 and "tensor<14xf32>" in proc.stdout
    assert "DeprecationWarning: pass name 'fuse-moments-unpacked' is deprecated" in proc.stderr
    stats = json.loads(proc.stderr[proc.stderr.index("\n[") + 1:])
    assert [c["passes"][0]["stats"]["groups"] for c in stats] == [1, 2, 1]
