"""A compiled Adam step on a 2x4 ('batch', 'model') mesh, in 2 processes x 4 CPU devices (gloo, loopback) or in
one process with 8: host gradients (`--model host-grads`, the default) and GPT-2 small (`--model gpt2`).

    python benchmarks/bench_multiprocess.py                  # 2 processes x 4 CPU devices (gloo, loopback)
    python benchmarks/bench_multiprocess.py --processes 1    # the same in one process with 8 devices
    python benchmarks/bench_multiprocess.py --model gpt2 [--processes 1] [--steps 5] [--variants plain,...]

GPT-2 small (shardopt.model_zoo.gpt2_small: 148 float32 tensors, 124M parameters, Megatron layouts on 'model',
replicated on 'batch'): per variant, step time (median), the collectives in the partitioned HLO and the state
bytes per device. Variants: no clipping (no collectives at all), global_clipnorm with the default pipeline
(fixed-order-sums: the norm's per-device partial sums are all-gathered and added in one order, so 1 and 2
processes agree bitwise) and global_clipnorm without fixed-order-sums (XLA's all-reduce, whose order of addition
is gloo's or XLA's own), and the first two with `shard_state_over="batch"` (weight-update sharding: Adam's
slots sharded over 'batch' too, each device updates its shard and the new variable is all-gathered; state bytes
per device halve). Gradients are placed once (`make_array_from_callback`), so no host transfer is timed;
the variants share the params and gradients and their steps are interleaved, round by round.

Modes (functional step `step(params, grads, state)`, and the Keras-shaped `apply_gradients`):
  numpy-checked     numpy gradients (the default, `host_gradients="checked"`): the step's
            `jax.device_put(g, sharding)` runs `multihost_utils.assert_equal` per array when the sharding spans
            several processes (jax/_src/dispatch.py): an all-gather of the whole array across processes through
            gloo, every step, for every gradient
  numpy-consistent  numpy gradients with `host_gradients="consistent"` (the user's promise that every process
            holds the same values): each process places its own devices' slices, no cross-process check
  placed    jax arrays placed once before the loop (the upper bound: no host-to-device work per step)
  callback  per step `jax.make_array_from_callback(shape, sharding, lambda idx: g[idx])` by hand (what
            numpy-consistent does inside the step): each process copies only its devices' slices, no
            cross-process check. `jax.make_array_from_process_local_data` is the same for per-process data.

On 2 shared CPU cores the absolute numbers are small and noisy; the ratios are the point. The 8 "devices" are
virtual: XLA:CPU threads over the same 2 cores, and gloo's cross-process collectives go through loopback TCP,
so neither the compute (8 devices' work on 2 cores) nor the communication (no real interconnect) is what GPU or
TPU hosts would see; only the collective counts carry over unchanged.
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
        t = time.perf_counter()
        for i in range(5):
            one_step(i)
        # every process runs the same number of steps (process 0's estimate for `seconds`): a step whose
        # placement is a collective (numpy-checked) would otherwise wait for a peer that already moved on
        n = max(5, int(seconds / max((time.perf_counter() - t) / 5, 1e-6)))
        if args.processes > 1:
            from jax.experimental import multihost_utils
            n = int(multihost_utils.broadcast_one_to_all(np.int32(n)))
        times = []
        for i in range(n):
            t = time.perf_counter()
            one_step(i)
            times.append(time.perf_counter() - t)
        med = float(np.median(times))
        results[name] = {"steps": len(times), "median_ms": med * 1e3, "steps_per_s": 1.0 / med}

    # functional step
    p = step.place_params(host)
    s = step.init(p)
    state = {"p": p, "s": s}

    def run(grads, host_gradients="checked"):
        state["p"], state["s"] = step(state["p"], grads, state["s"], host_gradients=host_gradients)
        jax.block_until_ready(state["p"])

    placed = [step.place_params(g) for g in host_grads]
    timed("compile()/numpy-checked", lambda i: run(host_grads[i % 2]), args.seconds)
    timed("compile()/numpy-consistent", lambda i: run(host_grads[i % 2], "consistent"), args.seconds)
    timed("compile()/placed", lambda i: run(placed[i % 2]), args.seconds)
    timed("compile()/callback", lambda i: run({n: jax.make_array_from_callback(
        SHAPE, shard[n], lambda idx, g=host_grads[i % 2][n]: g[idx]) for n in lays}), args.seconds)

    # Keras-shaped API
    vars_ = {n: shardopt.Variable(host[n], name=n, **({"layout": lay} if lay is not None else {}))
             for n, lay in lays.items()}
    opt = shardopt.Adam(1e-3, mesh=mesh)

    def apply(grads, host_gradients="checked"):
        opt.apply_gradients([(grads[n], v) for n, v in vars_.items()], host_gradients=host_gradients)
        jax.block_until_ready(opt.iterations.value)

    # after build: a Variable made without a layout lives on one local device until the optimizer places it,
    # and a gradient committed there would need a cross-host transfer (jax on CPU refuses it)
    opt.build(list(vars_.values()))
    vshard = {n: v.value.sharding for n, v in vars_.items()}
    kplaced = [{n: jax.device_put(g[n], vshard[n]) for n in lays} for g in host_grads]
    timed("apply_gradients/numpy-checked", lambda i: apply(host_grads[i % 2]), args.seconds)
    timed("apply_gradients/numpy-consistent", lambda i: apply(host_grads[i % 2], "consistent"), args.seconds)
    timed("apply_gradients/placed", lambda i: apply(kplaced[i % 2]), args.seconds)
    timed("apply_gradients/callback", lambda i: apply({n: jax.make_array_from_callback(
        SHAPE, vshard[n], lambda idx, g=host_grads[i % 2][n]: g[idx]) for n in lays}), args.seconds)
    if args.processes > 1:
        jax.distributed.shutdown()
    return results


GPT2_VARIANTS = {"plain": {}, "global_clipnorm": {"global_clipnorm": 1.0},
                 "global_clipnorm/all-reduce": {"global_clipnorm": 1.0},
                 "plain/state-sharded": {"shard_state_over": "batch"},
                 "global_clipnorm/state-sharded": {"global_clipnorm": 1.0, "shard_state_over": "batch"}}


def _filled(shape, sharding, value):
    """A float32 array of `value` laid out on `sharding`, each process filling only its own devices' pieces."""
    import jax
    import numpy as np

    def piece(idx):
        return np.full(tuple(len(range(*sl.indices(n))) for sl, n in zip(idx, shape, strict=True)), value, np.float32)
    return jax.make_array_from_callback(shape, sharding, piece)


def gpt2_worker(args) -> dict:
    """GPT-2 small's Adam step per variant: median step time, collectives in the partitioned HLO, state bytes."""
    import jax
    import numpy as np

    import shardopt
    from shardopt.model_zoo import gpt2_small
    from shardopt.passes.pipeline import DEFAULT_PIPELINE
    from shardopt.runtime.artifact import state_bytes_per_device
    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        coord = os.environ["BENCH_COORDINATOR"]
        jax.distributed.initialize(coord, args.processes, int(os.environ["BENCH_PROCESS_ID"]),
                                   coordinator_bind_address=coord, initialization_timeout=60)
    mesh = jax.make_mesh((2, 4), ("batch", "model"))
    specs = gpt2_small(mesh)
    steps, states, results = {}, {}, {}
    for name in args.variants.split(","):
        kwargs = GPT2_VARIANTS[name]
        opt = shardopt.Adam(1e-4, mesh=mesh, **kwargs)
        if name.endswith("/all-reduce"):
            opt.pipeline = tuple(p for p in DEFAULT_PIPELINE if p != "fixed-order-sums")
        t = time.perf_counter()
        steps[name] = step = opt.compile(specs)
        compile_s = time.perf_counter() - t
        hlo = step.executable.lower().compile().as_text()
        found = {}
        for c in re.findall(r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(",
                            hlo):
            found[c] = found.get(c, 0) + 1
        results[name] = {"compile_s": compile_s, "collectives": found,
                         "state_bytes_per_device": state_bytes_per_device(step.contract)}
    # every variant has the same params and gradients (specs, layouts): one copy of each, passed from variant
    # to variant (the step donates its params), and the variants' steps interleaved, so load drifts hit all alike
    first = next(iter(steps.values()))  # sharded state or not, the variables keep their layouts
    params = jax.tree_util.tree_unflatten(first.treedef, [_filled(specs[n].shape, first._sharding(n), 0.02)
                                                          for n in first.names])
    grads = jax.tree_util.tree_unflatten(first.treedef, [_filled(specs[n].shape, first._sharding(n), 1e-3)
                                                         for n in first.names])
    for name, step in steps.items():
        states[name] = step.init(params)
    times = {name: [] for name in steps}
    for i in range(2 + args.steps):  # two warm-up rounds
        for name, step in steps.items():
            t = time.perf_counter()
            params, states[name] = step(params, grads, states[name])
            jax.block_until_ready(params)
            if i >= 2:
                times[name].append(time.perf_counter() - t)
    for name in steps:
        results[name].update(median_ms=float(np.median(times[name])) * 1e3, steps=len(times[name]))
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
                                           "--seconds", str(args.seconds), "--model", args.model,
                                           "--steps", str(args.steps), "--variants", args.variants], env=env,
                                          stdout=subprocess.PIPE, stderr=errs[-1], start_new_session=True, text=True))
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
    ap.add_argument("--timeout", type=float, default=900.0, help="kill the workers after this many seconds")
    ap.add_argument("--model", choices=["host-grads", "gpt2"], default="host-grads")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per GPT-2 variant (after two warm-up rounds)")
    ap.add_argument("--variants", default=",".join(GPT2_VARIANTS), help="comma-separated GPT-2 variants, of: "
                    + ", ".join(GPT2_VARIANTS))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(gpt2_worker(args) if args.model == "gpt2" else worker(args)), flush=True)
        return
    load_before = os.getloadavg()[0]
    outs = launch(args)
    if args.model == "gpt2":
        print(f"load average {load_before:.1f} before")
        print(f"GPT-2 small (124M float32 parameters, Megatron layouts), Adam, {args.processes} process(es) x "
              f"{8 // args.processes} CPU devices on a 2x4 mesh; median of {args.steps} steps (the slowest process)")
        print(f"load average {os.getloadavg()[0]:.1f} after; {os.cpu_count()} CPU cores for 8 virtual devices")
        print(f"{'variant':30s} {'ms/step':>9s} {'compile s':>9s} {'state/device':>13s} {'less':>6s}  "
              "collectives (partitioned HLO)")
        for name in outs[0]:
            ms = max(o[name]["median_ms"] for o in outs)
            r = outs[0][name]
            base = outs[0].get(name.split("/")[0], r)  # the same clipping without state sharding
            less = base["state_bytes_per_device"] / r["state_bytes_per_device"]
            coll = ", ".join(f"{k} x{v}" for k, v in sorted(r["collectives"].items())) or "none"
            print(f"{name:30s} {ms:9.1f} {r['compile_s']:9.1f} {r['state_bytes_per_device'] / 2**20:9.1f} MiB "
                  f"{less:5.2f}x  {coll}")
        return
    print(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{args.processes} process(es) x {8 // args.processes} CPU devices, {N_VARS} float32{list(SHAPE)} "
          f"variables on a 2x4 mesh; median per step (the slowest process)")
    print(f"{'mode':34s} {'ms/step':>9s} {'steps/s':>9s}")
    for name in outs[0]:
        ms = max(o[name]["median_ms"] for o in outs)
        print(f"{name:34s} {ms:9.2f} {1e3 / ms:9.1f}")


if __name__ == "__main__":
    main()
