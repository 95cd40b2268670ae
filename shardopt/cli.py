"""The `shardopt` command (also `python -m shardopt`): compile an optimizer config to an artifact, smoke-run an
artifact, inspect one.

    shardopt compile --config adam.json --variables vars.json --mesh batch=2,model=4 -o adam.shardopt
    shardopt run adam.shardopt --steps 10
    shardopt inspect adam.shardopt [--stage NAME] [--diff A B] [--html report.html] [--manifest]

jax reads XLA_FLAGS when its first backend starts, so every command works out how many devices it needs (from
--mesh, or from the artifact's manifest, read with the standard library only) and asks the CPU client for that
many virtual devices *before* anything touches a jax backend. An XLA_FLAGS that already sets a device count is
left alone (then a mismatch is reported as an error).

`--config` takes a Keras optimizer config: `optimizer.get_config()` of tf-keras or Keras 3, or
`keras.optimizers.serialize(optimizer)` (`{"class_name": "Adam", "config": {...}}`); a learning rate may be a
serialized schedule dict. `--variables` is a JSON object, variable name -> spec::

    {"dense/kernel": {"shape": [16, 8], "dtype": "float32", "layout": [null, "model"]},
     "dense/bias": {"shape": [8]}}

(dtype defaults to float32, layout to replicated; a layout lists one mesh axis, a list of axes, or null per
dimension). Names split on "/" into nested dicts, so the params pytree is {"dense": {"kernel": ..., "bias": ...}}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

# Keras-3-only config keys shardopt accepts when they have their neutral value.
_NEUTRAL_KERAS3 = {"loss_scale_factor": (None,), "gradient_accumulation_steps": (None, 1)}
DEFAULT_OPTIMIZER = "Adam"


def parse_mesh(text: str) -> list[tuple[str, int]]:
    """'batch=2,model=4' -> [('batch', 2), ('model', 4)]."""
    axes = []
    for part in text.split(","):
        name, sep, size = part.strip().partition("=")
        if not sep or not name or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"--mesh: expected NAME=SIZE[,NAME=SIZE...], e.g. batch=2,model=4; got {text!r}")
        axes.append((name.strip(), int(size)))
    if len({n for n, _ in axes}) != len(axes):
        raise ValueError(f"--mesh: repeated axis name in {text!r}")
    return axes


# XLA:CPU runs a collective (all-reduce, ...) over the virtual devices of one process as a rendezvous of one
# thread per device. A thread that waits for the others logs "may be stuck" after
# xla_cpu_collective_call_warn_stuck_timeout_seconds (default 20) and aborts the process ("Termination timeout for
# `all reduce` ... of 40 seconds exceeded", SIGABRT) when they have still not all arrived
# xla_cpu_collective_call_terminate_timeout_seconds (default 40) later. On a loaded machine one device's thread can
# fall a minute behind without anything being wrong, so shardopt's CLI (and its tests) wait much longer; a real
# deadlock still ends, after an hour. xla_cpu_collective_timeout_seconds (default 30 min) bounds the other
# CPU collective implementations (gloo, MPI) and is raised to match.
COLLECTIVE_TIMEOUT_FLAGS = {
    "xla_cpu_collective_call_terminate_timeout_seconds": 3600,
    "xla_cpu_collective_timeout_seconds": 3600,
}


def with_collective_timeouts(flags: str) -> str:
    """`flags` (an XLA_FLAGS value) plus the generous CPU collective timeouts above, where it does not set them."""
    extra = [f"--{name}={value}" for name, value in COLLECTIVE_TIMEOUT_FLAGS.items() if name not in flags]
    return " ".join([flags, *extra]).strip()


def ensure_cpu_devices(count: int) -> None:
    """Asks XLA's CPU client for `count` virtual devices unless XLA_FLAGS already sets a count, and for the
    generous collective timeouts of `COLLECTIVE_TIMEOUT_FLAGS` unless XLA_FLAGS sets them.

    Must run before jax starts a backend (the first `jax.devices()`); it has no effect afterwards.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if count > 1 and "xla_force_host_platform_device_count" not in flags:
        flags = f"{flags} --xla_force_host_platform_device_count={count}"
    os.environ["XLA_FLAGS"] = with_collective_timeouts(flags)


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path}: not valid JSON: {e}") from None


def optimizer_config(doc: Any) -> tuple[str, dict[str, Any]]:
    """(class name, constructor config) from a Keras optimizer config or its serialized form."""
    if not isinstance(doc, dict):
        raise ValueError(f"--config: expected a JSON object (an optimizer's get_config()), got {type(doc).__name__}")
    if isinstance(doc.get("config"), dict) and "class_name" in doc:
        class_name, config = str(doc["class_name"]), dict(doc["config"])
    else:  # a bare get_config(): its `name` says the class ("AdamW" in tf-keras, "adamw" in Keras 3)
        config = dict(doc)
        class_name = DEFAULT_OPTIMIZER
        if isinstance(config.get("name"), str):
            from shardopt.optimizers import _classes

            known = _classes().get(config["name"].lower())
            class_name = known.__name__ if known is not None else DEFAULT_OPTIMIZER
    class_name = class_name.rsplit(">", 1)[-1].rsplit(".", 1)[-1]  # "Custom>Adam", "keras.optimizers.Adam"
    for key, neutral in _NEUTRAL_KERAS3.items():
        if key in config:
            value = config.pop(key)
            if value not in neutral:
                raise ValueError(f"--config: {key}={value!r} is not supported by shardopt (only {neutral})")
    return class_name, config


def optimizer_class(name: str) -> type:
    """The shardopt optimizer class called `name` (case-insensitive)."""
    from shardopt.optimizers import _classes

    known = _classes()
    if name.lower() not in known:
        have = sorted(c.__name__ for c in known.values())
        raise ValueError(f"--config: unknown optimizer class {name!r}; shardopt has {have}")
    return known[name.lower()]


def variable_specs(doc: Any, mesh: Any) -> dict[str, Any]:
    """The nested dict of VariableSpecs that `--variables` describes."""
    from shardopt.core.layout import UNSHARDED, Layout
    from shardopt.core.specs import VariableSpec

    if not isinstance(doc, dict) or not doc:
        raise ValueError("--variables: expected a non-empty JSON object of name -> {shape, dtype, layout}")
    tree: dict[str, Any] = {}
    for name, spec in doc.items():
        if isinstance(spec, list):
            spec = {"shape": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list):
            raise ValueError(f"--variables: {name!r} needs a \"shape\" list, got {spec!r}")
        layout = spec.get("layout")
        if layout is not None:
            layout = Layout([UNSHARDED if a is None else a for a in layout], mesh)
        leaf = VariableSpec(tuple(spec["shape"]), spec.get("dtype", "float32"), layout)
        # a tf-keras variable name (`dense/kernel:0`) is one flat name; other slashes nest
        *parents, last = [name] if re.search(r":\d+$", name) else name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--variables: {name!r} nests under {p!r}, which is itself a variable")
        if last in node:
            raise ValueError(f"--variables: {name!r} is both a variable and a prefix of another")
        node[last] = leaf
    return tree


def smoke_run(step: Any, steps: int, seed: int = 0) -> dict[str, Any]:
    """Runs `steps` steps on random params and gradients; returns step times and a checksum of the result.

    The same artifact, seed and step count give the same checksum on the same platform and mesh shape.
    """
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)
    conv = step.convention
    specs = [conv.args[conv.arg_index(n)] for n in step.names]
    grad_shardings = [step.executable.in_shardings[conv.arg_index(f"grad/{n}")] for n in step.names]

    def random_tree(scale: float) -> list[Any]:
        return [(rng.standard_normal(s.shape, dtype=np.float32) * scale).astype(np.dtype(s.dtype)) for s in specs]

    params = step.place_params(jax.tree_util.tree_unflatten(step.treedef, random_tree(1.0)))
    state = step.init(params)
    times = []
    for _ in range(steps):
        grads = jax.tree_util.tree_unflatten(step.treedef, [
            jax.device_put(g, sh) for g, sh in zip(random_tree(0.1), grad_shardings, strict=True)])
        t0 = time.perf_counter()
        params, state = step(params, grads, state)
        jax.block_until_ready((params, state))
        times.append(time.perf_counter() - t0)
    slots = step.slots(state)
    leaves = [*jax.tree_util.tree_leaves(params),
              *(x for s in step.slot_names for x in jax.tree_util.tree_leaves(slots[s])),
              state["iterations"]]
    digest = hashlib.sha256()
    total = 0.0
    for leaf in leaves:
        arr = np.asarray(leaf)
        digest.update(arr.tobytes())
        total += float(np.sum(arr, dtype=np.float64))
    return {"times": times, "sha256": digest.hexdigest(), "sum": total, "params": params, "state": state}


def _describe(step: Any) -> str:
    n_params = sum(math.prod(step.convention.args[step.convention.arg_index(n)].shape) for n in step.names)
    devs = step.mesh.devices
    mesh = ",".join(f"{n}={s}" for n, s in step.convention.mesh_axes)
    return (f"{step.optimizer_class or step.optimizer_config.get('name')}, {len(step.names)} variables "
            f"({n_params:,} parameters), mesh {mesh} on {devs.size} {devs.flat[0].platform} devices")


def cmd_compile(args: argparse.Namespace) -> int:
    axes = parse_mesh(args.mesh)
    need = math.prod(s for _, s in axes)
    ensure_cpu_devices(need)
    class_name, config = optimizer_config(_read_json(args.config, "--config"))
    var_doc = _read_json(args.variables, "--variables")
    import jax

    devices = jax.devices()
    if len(devices) < need:
        raise ValueError(f"--mesh {args.mesh} needs {need} devices, this process has {len(devices)} "
                         f"{devices[0].platform} device(s) (try --platform cpu for virtual CPU devices)")
    mesh = jax.make_mesh([s for _, s in axes], [n for n, _ in axes], devices=devices[:need])
    cls = optimizer_class(args.optimizer or class_name)
    opt = cls.from_config({**config, "mesh": mesh})
    if args.pipeline is not None:
        opt.pipeline = tuple(p for p in args.pipeline.split(",") if p)
    t0 = time.perf_counter()
    step = opt.compile(variable_specs(var_doc, mesh))
    size = step.save(args.output)
    print(f"compiled {_describe(step)} in {time.perf_counter() - t0:.2f} s")
    print(f"pipeline: {' -> '.join(step.pipeline) or '(none)'}")
    print(f"wrote {args.output} ({size:,} bytes)")
    return 0


def _load(path: str) -> Any:
    from shardopt.runtime.container import read_manifest

    ensure_cpu_devices(int(read_manifest(path)["mesh"]["device_count"]))
    from shardopt.runtime.functional import load

    return load(path)


def cmd_run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ValueError("--steps must be at least 1")
    t0 = time.perf_counter()
    step = _load(args.artifact)
    print(f"loaded {args.artifact} in {time.perf_counter() - t0:.2f} s: {_describe(step)}")
    result = smoke_run(step, args.steps, args.seed)
    times = result["times"]
    for i, t in enumerate(times, 1):
        if i <= 10 or i == len(times):
            note = " (first call: includes XLA compilation)" if i == 1 else ""
            print(f"step {i}: {t * 1e3:.3f} ms{note}")
        elif i == 11:
            print("...")
    if len(times) > 1:
        rest = times[1:]
        print(f"steps 2-{len(times)}: median {statistics.median(rest) * 1e3:.3f} ms, min {min(rest) * 1e3:.3f} ms")
    print(f"checksum: sha256={result['sha256']} sum={result['sum']!r}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.manifest:
        from shardopt.runtime.container import read_manifest

        print(json.dumps(read_manifest(args.artifact), indent=2, sort_keys=True))
        return 0
    step = _load(args.artifact)
    from shardopt.runtime.inspect import inspect

    inspect(step, stage=args.stage, diff=tuple(args.diff) if args.diff else None, html=args.html)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from shardopt import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--platform", help="jax platform to use (sets JAX_PLATFORMS), e.g. cpu")
    parser = argparse.ArgumentParser(prog="shardopt", description="Compile, run and inspect shardopt optimizer "
                                     "steps (.shardopt artifacts).")
    parser.add_argument("--version", action="version", version=f"shardopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", parents=[common], help="compile a Keras optimizer config to an artifact")
    c.add_argument("--config", required=True, help="JSON: the optimizer's get_config() or serialize() output")
    c.add_argument("--variables", required=True, help="JSON: {name: {shape, dtype, layout}}")
    c.add_argument("--mesh", required=True, help="mesh axes, e.g. batch=2,model=4")
    c.add_argument("-o", "--output", required=True, help="the artifact to write (e.g. adam.shardopt)")
    c.add_argument("--optimizer", help="optimizer class when the config does not name one (default Adam)")
    c.add_argument("--pipeline", help="comma-separated pass names (default: the standard pipeline)")
    c.set_defaults(handler=cmd_compile)

    r = sub.add_parser("run", parents=[common], help="smoke-run an artifact on random data")
    r.add_argument("artifact")
    r.add_argument("--steps", type=int, default=10)
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(handler=cmd_run)

    i = sub.add_parser("inspect", parents=[common], help="report on an artifact: passes, variables, memory, "
                       "cost, collectives, IR")
    i.add_argument("artifact")
    i.add_argument("--stage", help="print this stage's IR: frontend, a pass name, optimized-hlo, partitioned-hlo")
    i.add_argument("--diff", nargs=2, metavar=("A", "B"), help="print a diff from stage A's IR to stage B's")
    i.add_argument("--html", metavar="FILE", help="write the whole report as one self-contained HTML page")
    i.add_argument("--manifest", action="store_true", help="print the artifact's JSON manifest and exit")
    i.set_defaults(handler=cmd_inspect)
    return parser


def main(argv: Sequence[str | os.PathLike[str]] | None = None) -> int:
    """Entry point of the `shardopt` command; returns the exit status (0 ok, 1 error, 2 usage)."""
    args = build_parser().parse_args(None if argv is None else [os.fspath(a) for a in argv])
    if args.platform:
        os.environ["JAX_PLATFORMS"] = args.platform
    try:
        return int(args.handler(args))
    except BrokenPipeError:  # `shardopt inspect ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, KeyError, OSError) as e:  # ArtifactError and StepInputError are ValueErrors
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"shardopt {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
