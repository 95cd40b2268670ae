"""Issue 10: the SGD step through the compiled kernels (`lower-to-kernels`) against the StableHLO path and
`jax.jit(optax.sgd)`.

    PYTHONPATH=. /work/venv/bin/python benchmarks/bench_sgd.py [--sets small,big] [--momentum 0.9,0] [--steps 20]

For each set and momentum, rows timed interleaved round by round (medians after 3 warmup rounds, as in
bench_step.py, so other processes' load slows all rows alike and the ratios within one table hold):
- `shardopt SGD`: `shardopt.SGD(momentum=...)` through `apply_gradients`, default pipeline (loose variables
  become `shardopt_sgd_update` calls, flat packs one `shardopt_sgd_pack_update` call);
- `shardopt SGD, kernels off`: the same with `lower-to-kernels{enabled=false}` (the StableHLO path);
- `jax.jit(optax.sgd)`: params and optax's state donated (at momentum 0 optax keeps no trace, tf-keras's SGD
  still keeps and writes its `m` slot: the shardopt rows move 20 B/element at any momentum);
- the roofline: 20 bytes/element (read p, m, g; write p, m) at the bandwidth probed at the start of the run.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse
from typing import Any

import jax
import optax
from _common import (
    JitCase,
    ParamSet,
    Row,
    bandwidth_probe,
    fmt,
    load_average,
    make_arrays,
    param_set,
    print_table,
    ratio,
    run_cases,
)
from bench_step import ShardoptApply
from jax.sharding import NamedSharding, PartitionSpec

import shardopt
from shardopt import kernels
from shardopt.passes.pipeline import DEFAULT_PIPELINE

BYTES_PER_ELEMENT = 20  # SGD with its m slot: read p, m, g; write p, m (float32)
LR = 1e-2
OFF = tuple("lower-to-kernels{enabled=false}" if p == "lower-to-kernels" else p for p in DEFAULT_PIPELINE)


class ShardoptSgd(ShardoptApply):
    """shardopt.SGD through `apply_gradients` with one pipeline."""

    def __init__(self, ps: ParamSet, grads: list[jax.Array], momentum: float, pipeline: tuple[str, ...] | None,
                 memory: bool, key: str, name: str):
        super().__init__(ps, grads, None, memory, key, name)
        self.momentum, self.pipeline = momentum, pipeline
        self.live_bytes = 2 * 4 * ps.device_elements()

    def make_optimizer(self) -> Any:
        return shardopt.SGD(learning_rate=LR, momentum=self.momentum, mesh=self.ps.mesh)

    def setup(self) -> None:
        super().setup()
        stats = self.program.pipeline.stage("lower-to-kernels").stats
        self.note += f"; kernels {stats['kernels'] or 'none'}"


class OptaxSgd(JitCase):
    """`jax.jit(optax.sgd(lr, momentum))`, params and state donated."""

    def __init__(self, ps: ParamSet, grads: list[jax.Array], momentum: float, memory: bool, key: str, name: str):
        super().__init__()
        self.ps, self.grads, self.momentum, self.memory, self.key, self.name = ps, grads, momentum, memory, key, name
        self.live_bytes = (2 if momentum else 1) * 4 * ps.device_elements()

    def build(self) -> tuple[Any, tuple[Any, ...], tuple[Any, ...]]:
        tx = optax.sgd(LR, momentum=self.momentum or None)
        params = make_arrays(self.ps, "param")
        state = tx.init(params)
        replicated = NamedSharding(self.ps.mesh, PartitionSpec())
        state = jax.tree.map(lambda x: jax.device_put(x, replicated) if x.ndim == 0 else x, state)
        state_shardings = jax.tree.map(lambda x: x.sharding, state)

        def step_fn(p: Any, s: Any, g: Any) -> Any:
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        jitted = jax.jit(step_fn, donate_argnums=(0, 1), out_shardings=(self.ps.shardings(), state_shardings))
        return jitted, (params, state), (self.grads,)


def run_set(ps: ParamSet, momentum: float, steps: int, memory: bool, gbps: float) -> dict[str, Row]:
    print(f"\n## {ps.key}, momentum {momentum}: {ps.title}", flush=True)
    grads = make_arrays(ps, "grad", seed=1)
    groups = [[ShardoptSgd(ps, grads, momentum, None, memory, "kernel", f"shardopt SGD(momentum={momentum})")],
              [ShardoptSgd(ps, grads, momentum, OFF, memory, "off", "shardopt SGD, kernels off (StableHLO)")],
              [OptaxSgd(ps, grads, momentum, memory, "optax", f"jax.jit(optax.sgd(momentum={momentum or None}))")]]
    rows = run_cases(groups, steps, log=lambda m: print(m, flush=True))
    del grads, groups
    jax.clear_caches()
    roof_ms = BYTES_PER_ELEMENT * ps.device_elements() / (gbps * 1e9) * 1e3
    rows["roofline"] = Row(f"roofline: {BYTES_PER_ELEMENT} B/element / {gbps:.1f} GB/s", roof_ms)
    base = rows["optax"].ms
    table = [[r.name, "ERROR" if r.error else fmt(r.ms), fmt(ratio(r.ms, base)), fmt(ratio(r.ms, roof_ms)),
              fmt(r.compile_s, ".1f"), "—" if r.temp_bytes is None else f"{r.temp_bytes:,}", r.error or r.note]
             for r in rows.values()]
    print(f"\n### {ps.key}, SGD momentum {momentum}: {ps.count} tensors, {ps.elements / 1e6:.1f}M params, median of "
          f"{steps} interleaved steps, load avg {load_average()}\n")
    print_table(["row", "median ms", "x optax", "x roofline", "compile s", "XLA temp bytes", "note"], table)
    print(f"\nkernel / kernels off: {fmt(ratio(rows['kernel'].ms, rows['off'].ms))}x; kernel / optax: "
          f"{fmt(ratio(rows['kernel'].ms, base))}x", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="small,big", help="comma-separated parameter sets (benchmarks/_common.py)")
    ap.add_argument("--momentum", default="0.9,0", help="comma-separated momentum values")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per row (after 3 warmup steps)")
    ap.add_argument("--no-memory", action="store_true", help="skip memory_analysis (temp bytes)")
    args = ap.parse_args()
    info = kernels.info()
    print(f"jax {jax.__version__}, kernels loaded={info['loaded']} isa={info['isa']} "
          f"({info['reason'] or info['library']}), load avg {load_average()}")
    bw = bandwidth_probe()
    print(f"bandwidth probe: one device {bw['one_device_gbps']:.1f} GB/s; roofline uses {bw['gbps']:.1f} GB/s")
    for key in [k.strip() for k in args.sets.split(",") if k.strip()]:
        ps = param_set(key)
        for momentum in [float(m) for m in args.momentum.split(",") if m.strip()]:
            run_set(ps, momentum, args.steps, not args.no_memory, bw["gbps"])
    print(f"\nload average at the end {load_average()}")


if __name__ == "__main__":
    main()
