"""Host gradients in a multi-process job: steps/s of a compiled Adam step on a 2x4 ('batch', 'model') mesh
when the gradients come as numpy arrays, as jax arrays placed once, or are placed per step without jax's
cross-process check.

    python benchmarks/bench_multiprocess.py                  # 2 processes x 4 CPU devices (gloo, loopback)
    python benchmarks/bench_multiprocess.py --processes 1    # the same in one process with 8 devices

Modes (functional step `step(params, grads, state)`, and the Keras-shaped `apply_gradients`):
  numpy     numpy gradients: the step's `jax.device_put(g, sharding)` runs `multihost_utils.assert_equal` per
            array when the sharding spans several processes (jax/_src/dispatch.py): an all-gather of the whole
            array across processes through gloo, every step, for every gradient
  placed    jax arrays placed once before the loop (the upper bound: no host-to-device work per step)
  callback  per step `jax.make_array_from_callback(shape, sharding, lambda idx: g[idx])`: each process copies
            only its devices' slices, no cross-process check (the host arrays must already agree: user's
            promise). `jax.make_array_from_process_local_data` is the same for per-process (data-parallel) data.

On 2 shared CPU cores the absolute numbers are small and noisy; the ratios are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_VARS = 16
SHAPE = (256, 64)
WARMUP = 3


def layouts(mesh):
    import shardopt
    lay, U = shardopt.Layout, shardopt.UNSHARDED
    cycle = [lay([U, "model"], mesh), lay(["batch", U], mesh), lay(["batch", "model"], mesh), None]
    return {f"layer{i}/kernel": cycle[i % len(cycle)] for i in range(N_VARS)}


def worker(args) -> dict:
    import jax
    import numpy as np

    import shardopt
    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        coord = os.environ["BENCH_COORDINATOR"]
        jax.distributed.initialize(coord, args.processes, int(os.environ["BENCH_PROCESS_ID"]),
                                   coordinator_bind_address=coord, initialization_timeout=60)
    mesh = jax.make_mesh((2, 4), ("batch", "model"))
    lays = layouts(mesh)
    rng = np.random.default_rng(0)
    host = {n: rng.standard_normal(SHAPE).astype(np.float32) for n in lays}
    host_grads = [{n: rng.standard_normal(SHAPE).astype(np.float32) for n in lays} for _ in range(2)]
    specs = {n: shardopt.VariableSpec(SHAPE, "float32", lay) for n, lay in lays.items()}
    step = shardopt.Adam(1e-3, mesh=mesh).compile(specs)
    shard = {n: step._sharding(n) for n in lays}  # the gradient's sharding = its variable's
    results = {}

    def timed(name, one_step, seconds):
        for i in range(WARMUP):
            one_step(i)
        times, t_end, i = [], time.perf_counter() + seconds, 0
        while time.perf_counter() < t_end or len(times) < 5:
            t = time.perf_counter()
            one_step(i)
            times.append(time.perf_counter() - t)
            i += 1
        med = float(np.median(times))
        results[name] = {"steps": len(times), "median_ms": med * 1e3, "steps_per_s": 1.0 / med}

    # functional step
    p = step.place_params(host)
    s = step.init(p)
    state = {"p": p, "s": s}

    def run(grads):
        state["p"], state["s"] = step(state["p"], grads, state["s"])
        jax.block_until_ready(state["p"])

    placed = [step.place_params(g) for g in host_grads]
    timed("compile()/numpy", lambda i: run(host_grads[i % 2]), args.seconds)
    timed("compile()/placed", lambda i: run(placed[i % 2]), args.seconds)
    timed("compile()/callback", lambda i: run({n: jax.make_array_from_callback(
        SHAPE, shard[n], lambda idx, g=host_grads[i % 2][n]: g[idx]) for n in lays}), args.seconds)

    # Keras-shaped API
    vars_ = {n: shardopt.Variable(host[n], name=n, **({"layout": lay} if lay is not None else {}))
             for n, lay in lays.items()}
    opt = shardopt.Adam(1e-3, mesh=mesh)

    def apply(grads):
        opt.apply_gradients([(grads[n], v) for n, v in vars_.items()])
        jax.block_until_ready(opt.iterations.value)

    # after build: a Variable made without a layout lives on one local device until the optimizer places it,
    # and a gradient committed there would need a cross-host transfer (jax on CPU refuses it)
    opt.build(list(vars_.values()))
    vshard = {n: v.value.sharding for n, v in vars_.items()}
    kplaced = [{n: jax.device_put(g[n], vshard[n]) for n in lays} for g in host_grads]
    timed("apply_gradients/numpy", lambda i: apply(host_grads[i % 2]), args.seconds)
    timed("apply_gradients/placed", lambda i: apply(kplaced[i % 2]), args.seconds)
    timed("apply_gradients/callback", lambda i: apply({n: jax.make_array_from_callback(
        SHAPE, vshard[n], lambda idx, g=host_grads[i % 2][n]: g[idx]) for n in lays}), args.seconds)
    if args.processes > 1:
        jax.distributed.shutdown()
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args) -> list[dict]:
    """Starts the worker processes (each with its own device count and a deadline) and collects their JSON."""
    coord = f"127.0.0.1:{free_port()}"
    devices = 8 // args.processes
    procs, errs = [], []
    try:
        for pid in range(args.processes):
            env = dict(os.environ)
            flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
            env.update(XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
                       JAX_PLATFORMS="cpu", BENCH_COORDINATOR=coord, BENCH_PROCESS_ID=str(pid),
                       PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                                env.get("PYTHONPATH")])))
            errs.append(tempfile.TemporaryFile("w+"))
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--processes", str(args.processes),
                                           "--seconds", str(args.seconds)], env=env, stdout=subprocess.PIPE,
                                          stderr=errs[-1], start_new_session=True, text=True))
        deadline = time.monotonic() + args.timeout
        outs = []
        for p, err in zip(procs, errs, strict=True):
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if p.returncode != 0:
                err.seek(0)
                raise SystemExit(f"a worker failed with exit code {p.returncode}:\n{err.read()[-3000:]}")
            outs.append(json.loads(out.strip().splitlines()[-1]))
        return outs
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        for err in errs:
            err.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=2, choices=[1, 2])
    ap.add_argument("--seconds", type=float, default=2.0, help="measuring time per mode")
    ap.add_argument("--timeout", type=float, default=300.0, help="kill the workers after this many seconds")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    outs = launch(args)
    print(f"{args.processes} process(es) x {8 // args.processes} CPU devices, {N_VARS} float32{list(SHAPE)} "
          f"variables on a 2x4 mesh; median per step (the slowest process)")
    print(f"{'mode':28s} {'ms/step':>9s} {'steps/s':>9s}")
    for name in outs[0]:
        ms = max(o[name]["median_ms"] for o in outs)
        print(f"{name:28s} {ms:9.2f} {1e3 / ms:9.1f}")


if __name__ == "__main__":
    main()
