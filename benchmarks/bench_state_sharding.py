"""Weight-update sharding on GPT-2 small, 2x4 ('batch', 'model') mesh, one process with 8 CPU devices: Adam with
and without `shard_state_over="batch"` (Xu et al. 2020; the compiler-side ZeRO-1/2).

    PYTHONPATH=. python benchmarks/bench_state_sharding.py [--steps 5] [--json out.json]

Rows: `replicated` (the default: slots follow the Megatron layouts, replicated on 'batch', small variables
packed), `replicated, unpacked` (`pack_max_elements = 0`: sharded-state variables leave their packs, so this row
separates what packing does from what sharding does), `sharded over batch` (all 148 variables) and `sharded,
large only` (the 50 tensors above 65,536 elements, asked per variable; the 98 vectors stay packed). Per row:
optimizer state bytes per device from the step contract (exact; what `inspect` and the manifest report), XLA's
argument bytes per device, the collectives in the partitioned HLO, the compile time and the median step time of
the functional step (`params, state = step(params, grads, state)`, gradients already placed, interleaved
rounds).

Honest about the machine: 8 virtual CPU devices share however many cores there are (2 here), so a collective is
a memcpy between threads and the per-device work is serialised onto the cores. The state memory is exact; the
step time is not a prediction for GPUs/TPUs, where each replica's Adam work and memory traffic halves and the
all-gather runs over the interconnect.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shardopt.cli import with_collective_timeouts  # standard library only: jax is not imported yet

# 8 virtual devices, and collective timeouts 8 devices on 2 loaded cores cannot hit (see the README's scale section)
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["XLA_FLAGS"] = with_collective_timeouts(os.environ["XLA_FLAGS"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _common import load_average, make_arrays, median_ms, param_set, print_table, write_json  # noqa: E402

import shardopt  # noqa: E402
from shardopt import model_zoo  # noqa: E402
from shardopt.runtime.artifact import state_bytes_per_device, variables_table  # noqa: E402
from shardopt.runtime.inspect import Report  # noqa: E402

ROWS = (("replicated", None, None), ("replicated, unpacked", None, 0), ("sharded over batch", "batch", None),
        ("sharded, large only", "large", None))
LARGE = 1 << 16  # elements: the 50 matrices and embeddings; the 98 vectors stay packed and replicated


def request(mode, specs):
    """The `shard_state_over` of a row: "large" asks per variable for the tensors above LARGE elements."""
    if mode != "large":
        return mode
    return {n: "batch" for n, s in specs.items() if int(np.prod(s.shape)) > LARGE}


def build(ps, shard_state_over, pack_max_elements):
    """The compiled functional step of one row, its placed params, state and gradients, and its static facts."""
    specs = model_zoo.gpt2_small(ps.mesh)
    opt = shardopt.Adam(1e-3, mesh=ps.mesh, shard_state_over=request(shard_state_over, specs))
    if pack_max_elements is not None:
        opt.pack_max_elements = pack_max_elements
    t0 = time.perf_counter()
    step = opt.compile(specs)
    compile_s = time.perf_counter() - t0
    names = list(step.names)
    params = dict(zip(ps.names, make_arrays(ps, "param", seed=1), strict=True))
    grads = dict(zip(ps.names, make_arrays(ps, "grad", seed=2), strict=True))
    params = step.place_params({n: params[n] for n in names})
    grads = {n: grads[n] for n in names}
    state = step.init(params)
    report = Report(step)
    mem = report.memory()
    facts = {
        "state_bytes_per_device": state_bytes_per_device(step.contract),
        "slot_bytes_per_device": sum(r["slot_bytes_per_device"] for r in variables_table(step.contract)),
        "argument_bytes_per_device": mem.get("argument"),
        "temp_bytes_per_device": mem.get("temp"),
        "collectives": report.collective_counts(),
        "compile_s": compile_s,
        "state_buffers": len(step.contract.state),
        "packs": len(step.contract.packs),
    }
    return {"step": step, "params": params, "state": state, "grads": grads, "facts": facts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    load_before = load_average()
    ps = param_set("gpt2-mesh")
    rows = {name: build(ps, sso, pack) for name, sso, pack in ROWS}

    def one(row):
        row["params"], row["state"] = row["step"](row["params"], row["grads"], row["state"])
        jax.block_until_ready(row["params"])

    for _ in range(args.warmup):
        for row in rows.values():
            one(row)
    times = {name: [] for name in rows}
    for k in range(args.steps):  # interleaved, starting from another row each round: load hits every row alike
        order = list(rows)[k % len(rows):] + list(rows)[:k % len(rows)]
        for name in order:
            t0 = time.perf_counter()
            one(rows[name])
            times[name].append(time.perf_counter() - t0)
    load_after = load_average()

    base = rows["replicated"]["facts"]
    table = []
    for name, row in rows.items():
        f = row["facts"]
        c = f["collectives"]
        table.append([name, f"{f['state_bytes_per_device'] / 2**20:.1f} MiB",
                      f"{base['state_bytes_per_device'] / f['state_bytes_per_device']:.2f}x",
                      f"{(f['argument_bytes_per_device'] or 0) / 2**20:.1f} MiB",
                      f"{c['all-gather']}/{c['all-reduce']}/{c['reduce-scatter']}/{c['collective-permute']}",
                      f"{f['compile_s']:.1f} s", f"{median_ms(times[name]):.1f} ms"])
    print(f"GPT-2 small, Adam, {ps.title}; {args.steps} interleaved steps after {args.warmup} warm-up; "
          f"load {load_before} -> {load_after}; {os.cpu_count()} CPU cores for 8 virtual devices")
    print_table(["row", "state/device", "less", "arguments/device", "AG/AR/RS/CP", "compile", "median step"], table)
    if args.json:
        write_json(args.json, {"load_before": load_before, "load_after": load_after, "steps": args.steps,
                               "rows": {n: {**r["facts"], "median_ms": median_ms(times[n]),
                                            "times_s": times[n]} for n, r in rows.items()}})


if __name__ == "__main__":
    main()
