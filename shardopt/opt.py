"""`python -m shardopt.opt`: shardopt's passes on MLIR text, like `mlir-opt` / `xdsl-opt`.

    python -m shardopt.opt -p 'inline-calls,fuse-moments{unpacked=true},cleanup' step.mlir
    python -m shardopt.opt -p fuse-clipping --split-input-file tests/filecheck/fuse-clipping.mlir | filecheck ...
    python -m shardopt.opt --list-passes

Reads a module (a file, or stdin for `-` or no file), runs the pipeline with the compiler's own runner
(`run_pipeline`) and prints the resulting IR. An empty pipeline (the default) parses and prints the module again.
`--split-input-file` runs every chunk between `// -----` lines on its own and separates the outputs the same
way; a chunk that fails reports its error on stderr (with a traceback when it is not a PassError or an MLIR
diagnostic), the other chunks still run, and the exit status is 1, as with mlir-opt. `--stats` writes every
pass's statistics to stderr as one JSON document: a list with one entry per chunk.

Pipeline syntax: shardopt/passes/spec.py; the passes and their options: `--list-passes`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
import warnings
from typing import Any, TextIO

from jaxlib.mlir import ir

from shardopt import ir as sir
from shardopt.passes.base import ModulePass, PassError, format_value
from shardopt.passes.pipeline import build_pipeline, run_pipeline
from shardopt.passes.registry import pass_class, pass_names

SPLIT_MARKER = "// -----"
_SPLIT = re.compile(r"^// -----[ \t]*$\n?", re.MULTILINE)


def split_input(text: str) -> list[str]:
    """The chunks of `text` between `// -----` lines (mlir-opt's --split-input-file)."""
    return _SPLIT.split(text)


def process(text: str, passes: tuple[ModulePass, ...]) -> tuple[str, list[dict[str, Any]]]:
    """The IR after `passes` on module `text`, and each pass's statistics."""
    if not passes:
        ctx = sir.make_ir_context()
        module = sir.parse(text, ctx)
        with ctx:
            return module.operation.get_asm(enable_debug_info=False), []
    result = run_pipeline(text, passes, keep_ir=False)
    stats = [{"pass": s.name, "spec": s.spec, "seconds": s.seconds, "stats": s.stats} for s in result.stages[1:]]
    return result.final_text, stats


def list_passes(out: TextIO) -> None:
    """Every registered pass with its first docstring line and its options (imports every pass module)."""
    for name in pass_names():
        cls = pass_class(name)
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"{name}: {doc[0] if doc else ''}", file=out)
        for o in cls.options():
            print(f"  {o.name}={format_value(o.default)} ({o.type.__name__}): {o.help}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardopt.opt", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", nargs="?", default="-", help="MLIR file (default: stdin, also '-')")
    parser.add_argument("-p", "--passes", "--pass-pipeline", dest="pipeline", default="",
                        help="textual pipeline, e.g. 'inline-calls,fuse-moments{unpacked=true},cleanup'")
    parser.add_argument("--split-input-file", action="store_true",
                        help=f"run each chunk between '{SPLIT_MARKER}' lines separately")
    parser.add_argument("--stats", action="store_true", help="write the passes' statistics to stderr as JSON")
    parser.add_argument("-o", "--output", default="-", help="output file (default: stdout)")
    parser.add_argument("--list-passes", action="store_true", help="list the registered passes and their options")
    args = parser.parse_args(argv)

    if args.list_passes:
        list_passes(sys.stdout)
        return 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", DeprecationWarning)  # a CLI user should see deprecated pass names
            passes = build_pipeline(args.pipeline)
    except PassError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = "<stdin>" if args.input == "-" else args.input
    try:
        if args.input == "-":
            text = sys.stdin.read()
        else:
            with open(args.input, encoding="utf-8") as f:
                text = f.read()
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    chunks = split_input(text) if args.split_input_file else [text]
    outputs: list[str] = []
    all_stats: list[dict[str, Any]] = []
    failed = False
    for k, chunk in enumerate(chunks):
        try:
            out, stats = process(chunk, passes)
        except Exception as e:  # reported per chunk; the other chunks still run
            label = f"{where} (chunk {k})" if args.split_input_file else where
            if not isinstance(e, (PassError, ir.MLIRError)):  # not a diagnosed error: a bug, show where
                traceback.print_exc(file=sys.stderr)
            print(f"{label}: error: {type(e).__name__}: {e}", file=sys.stderr)
            failed = True
            outputs.append("")
            all_stats.append({"chunk": k, "error": str(e)})
            continue
        outputs.append(out.rstrip("\n") + "\n")
        all_stats.append({"chunk": k, "passes": stats})
    text_out = f"{SPLIT_MARKER}\n".join(outputs)
    if args.output == "-":
        sys.stdout.write(text_out)
    else:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text_out)
    if args.stats:
        json.dump(all_stats, sys.stderr, indent=1, default=str)
        sys.stderr.write("\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
