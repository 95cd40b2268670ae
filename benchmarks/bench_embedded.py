"""Ten Adam updates of 2000 small tensors (7.4M params, one device), or GPT-2 small, inside ONE `jax.jit`
(`lax.fori_loop`): optax embedded vs shardopt embedded (`as_jax_function()` and `as_optax`), and the same
updates as standalone calls (`jax.jit(optax.adam)` with donation vs the FunctionalStep).

    /work/venv/bin/python benchmarks/bench_embedded.py [--set small|gpt2] [--tensors 2000] [--updates 10]
                                                       [--steps 20] [--json out.json]

Rows (median wall time of one call = `--updates` updates, params and state donated; the rows are timed interleaved,
one call of each per round, so a busy machine slows them alike):
  optax embedded              jax.jit(fori_loop(optax.adam update + apply_updates))
  shardopt embedded           jax.jit(fori_loop(step.as_jax_function()))  (the pass-optimized module inlined)
  shardopt as_optax embedded  jax.jit(fori_loop(as_optax(Adam) update + apply_updates))
  optax, N standalone calls   jax.jit(optax update + apply_updates, donated) called N times from Python
  shardopt, N standalone calls the FunctionalStep called N times from Python (validated, donated)
  flat fused, embedded        fori_loop over a hand-written Adam on one flat buffer per quantity: the floor
Targets (the contract issue): embedded <= 0.5x optax embedded (both shardopt rows), standalone <= 0.4x optax
standalone, on 2000 small tensors; GPT-2 small no slower than optax.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse
import time
from typing import Any

import jax
import numpy as np
import optax
from _common import (
    Case,
    JitCase,
    ParamSet,
    environment,
    flat_adam,
    fmt,
    load_average,
    make_arrays,
    param_set,
    print_table,
    ratio,
    run_cases,
    small_set,
    write_json,
)
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

import shardopt

LR = 1e-3
TARGET = 0.5
PIPELINE: tuple[str, ...] | None = None  # --pipeline (None: shardopt's default)


def optax_loop(tx: Any, ps: ParamSet, grads: list[jax.Array], updates: int) -> tuple[Any, tuple, tuple]:
    """`updates` steps of an optax transformation in one donated jit (the loop every embedded optax row times)."""
    params = make_arrays(ps, "param")
    state = tx.init(params)

    def loop(p: Any, s: Any, g: Any) -> Any:
        def body(_: Any, c: Any) -> Any:
            u, s2 = tx.update(g, c[1], c[0])
            return optax.apply_updates(c[0], u), s2

        return lax.fori_loop(0, updates, body, (p, s))

    return jax.jit(loop, donate_argnums=(0, 1)), (params, state), (grads,)


class OptaxEmbedded(JitCase):
    key, name = "optax", "optax embedded"

    def __init__(self, ps: ParamSet, grads: list[jax.Array], updates: int):
        super().__init__()
        self.ps, self.grads, self.updates = ps, grads, updates

    def build(self) -> tuple[Any, tuple[Any, ...], tuple[Any, ...]]:
        tx = optax.adam(LR, eps=1e-7)
        return optax_loop(tx, self.ps, self.grads, self.updates)


class ShardoptEmbedded(JitCase):
    key, name = "shardopt", "shardopt embedded (as_jax_function)"

    def __init__(self, ps: ParamSet, grads: list[jax.Array], updates: int, shared: dict[str, Any]):
        super().__init__()
        self.ps, self.grads, self.updates, self.shared = ps, grads, updates, shared

    def build(self) -> tuple[Any, tuple[Any, ...], tuple[Any, ...]]:
        t0 = time.perf_counter()
        opt = shardopt.Adam(learning_rate=LR)
        if PIPELINE is not None:
            opt.pipeline = PIPELINE
        step = opt.compile(self.ps.variable_specs())
        frontend_s = time.perf_counter() - t0
        self.shared["step"] = step
        self.extra["frontend_passes_s"] = frontend_s
        self.note = f"shardopt compile (passes+lowering) {frontend_s:.1f}s + XLA of the loop"
        if not hasattr(step, "as_jax_function"):
            raise RuntimeError("FunctionalStep.as_jax_function() is not available in this shardopt")
        fn = step.as_jax_function()
        params = step.place_params(make_arrays(self.ps, "param"))
        state = step.init(params)

        def loop(p: Any, s: Any, g: Any) -> Any:
            return lax.fori_loop(0, self.updates, lambda _, c: fn(c[0], g, c[1]), (p, s))

        return jax.jit(loop, donate_argnums=(0, 1)), (params, state), (self.grads,)

    def setup(self) -> None:
        super().setup()
        self.compile_s = (self.compile_s or 0.0) + self.extra["frontend_passes_s"]


class ShardoptOptax(JitCase):
    key, name = "as_optax", "shardopt as_optax embedded"

    def __init__(self, ps: ParamSet, grads: list[jax.Array], updates: int):
        super().__init__()
        self.ps, self.grads, self.updates = ps, grads, updates

    def build(self) -> tuple[Any, tuple[Any, ...], tuple[Any, ...]]:
        opt = shardopt.Adam(learning_rate=LR)
        if PIPELINE is not None:
            opt.pipeline = PIPELINE
        tx = shardopt.as_optax(opt)
        return optax_loop(tx, self.ps, self.grads, self.updates)


class OptaxStandalone(Case):
    """`jax.jit(optax.adam update + apply_updates)` with params and state donated, called N times."""

    key = "optax_standalone"

    def __init__(self, ps: ParamSet, grads: list[jax.Array], updates: int):
        super().__init__()
        self.ps, self.grads, self.updates = ps, grads, updates
        self.name = f"optax, {updates} standalone jit calls"

    def setup(self) -> None:
        tx = optax.adam(LR, eps=1e-7)

        def one(p: Any, s: Any, g: Any) -> Any:
            u, s2 = tx.update(g, s, p)
            return optax.apply_updates(p, u), s2

        self.fn = jax.jit(one, donate_argnums=(0, 1))
        params = make_arrays(self.ps, "param")
        self.carry = (params, tx.init(params))
        t0 = time.perf_counter()
        self.step()
        self.compile_s = time.perf_counter() - t0

    def step(self) -> float:
        t0 = time.perf_counter()
        p, s = self.carry
        for _ in range(self.updates):
            p, s = self.fn(p, s, self.grads)
        self.carry = (p, s)
        jax.block_until_ready(p)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.__dict__.pop("carry", None)


class ShardoptEager(Case):
    """The FunctionalStep called N times from Python (each call donates and validates): not embedded."""

    key = "eager"

    def __init__(self, ps: ParamSet, grads: list[jax.Array], updates: int, shared: dict[str, Any]):
        super().__init__()
        self.ps, self.grads, self.updates, self.shared = ps, grads, updates, shared
        self.name = f"shardopt, {updates} standalone FunctionalStep calls"

    def setup(self) -> None:
        step = self.shared.get("step")
        if step is None:
            raise RuntimeError("needs the compiled step of the embedded row")
        self.fstep = step
        params = step.place_params(make_arrays(self.ps, "param"))
        self.carry = (params, step.init(params))
        t0 = time.perf_counter()
        self.step()
        self.compile_s = time.perf_counter() - t0
        self.note = "FunctionalStep.__call__ x N (shares the embedded row's shardopt compile)"

    def step(self) -> float:
        t0 = time.perf_counter()
        p, s = self.carry
        for _ in range(self.updates):
            p, s = self.fstep(p, self.grads, s)
        self.carry = (p, s)
        jax.block_until_ready(s["iterations"])
        return time.perf_counter() - t0

    def close(self) -> None:
        self.__dict__.pop("carry", None)


class FlatEmbedded(JitCase):
    key, name = "flat", "flat fused buffer, embedded"

    def __init__(self, ps: ParamSet, updates: int):
        super().__init__()
        self.ps, self.updates = ps, updates

    def build(self) -> tuple[Any, tuple[Any, ...], tuple[Any, ...]]:
        flat = ParamSet("flat", "flat", self.ps.mesh, ["flat"], [(self.ps.elements,)], [PartitionSpec()])
        p, = make_arrays(flat, "param")
        g, = make_arrays(flat, "grad", seed=1)
        m, = make_arrays(flat, "zeros")
        v, = make_arrays(flat, "zeros")
        t = jax.device_put(np.int32(0), NamedSharding(self.ps.mesh, PartitionSpec()))

        def one(c: Any, g: jax.Array) -> Any:
            return flat_adam(*c, g, LR)

        def loop(p: Any, m: Any, v: Any, t: Any, g: jax.Array) -> Any:
            return lax.fori_loop(0, self.updates, lambda _, c: one(c, g), (p, m, v, t))

        return jax.jit(loop, donate_argnums=(0, 1, 2, 3)), (p, m, v, t), (g,)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="small", choices=["small", "gpt2"])
    ap.add_argument("--tensors", type=int, default=2000)
    ap.add_argument("--updates", type=int, default=10, help="Adam updates inside one jitted call")
    ap.add_argument("--steps", type=int, default=20, help="timed calls per row (after 3 warmup calls)")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager FunctionalStep reference row")
    ap.add_argument("--pipeline", default=None, help="comma-separated pass pipeline (default: shardopt's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    global PIPELINE
    if args.pipeline:
        PIPELINE = tuple(p.strip() for p in args.pipeline.split(",") if p.strip())
    env = environment()
    if PIPELINE is not None:
        env["pipeline"] = ",".join(PIPELINE)
    print("environment:", env)
    ps = small_set(args.tensors) if args.set == "small" else param_set("gpt2")
    print(f"## embedded: {args.updates} Adam updates of {ps.title} in one jax.jit (lax.fori_loop)", flush=True)
    grads = make_arrays(ps, "grad", seed=1)
    shared: dict[str, Any] = {}
    groups: list[list[Case]] = [[OptaxEmbedded(ps, grads, args.updates)],
                                [ShardoptEmbedded(ps, grads, args.updates, shared)],
                                [ShardoptOptax(ps, grads, args.updates)]]
    if not args.no_eager:
        groups[1].append(ShardoptEager(ps, grads, args.updates, shared))
        groups.append([OptaxStandalone(ps, grads, args.updates)])
    groups.append([FlatEmbedded(ps, args.updates)])
    rows = run_cases(groups, args.steps, log=lambda m: print(m, flush=True))
    base = rows["optax"].ms
    table = [[r.name, "ERROR" if r.error else fmt(r.ms), fmt(ratio(r.ms, base)),
              fmt(None if r.ms is None else r.ms / args.updates), fmt(r.compile_s, ".1f"),
              "—" if r.temp_bytes is None else f"{r.temp_bytes:,}", r.error or r.note] for r in rows.values()]
    print(f"\n### embedded: {args.updates} updates x {ps.count} tensors ({ps.elements / 1e6:.1f}M params), "
          f"median of {args.steps} interleaved calls, load avg {load_average()}\n")
    print_table(["row", f"ms per call ({args.updates} updates)", "x optax embedded", "ms per update", "compile s",
                 "XLA temp bytes", "note"], table)
    r = ratio(rows["shardopt"].ms, base)
    target = TARGET if args.set == "small" else 1.0
    checks = [("shardopt embedded / optax embedded", r, target),
              ("as_optax embedded / optax embedded", ratio(rows["as_optax"].ms, base), target)]
    if "eager" in rows and "optax_standalone" in rows:
        checks.append(("FunctionalStep standalone / optax standalone",
                       ratio(rows["eager"].ms, rows["optax_standalone"].ms), 0.4 if args.set == "small" else 1.0))
    print()
    for label, value, want in checks:
        if value is not None:
            print(f"{label} = {value:.2f} (target <= {want}: {'MET' if value <= want else 'NOT MET'})")
    if args.json:
        write_json(args.json, {"environment": env, "updates": args.updates, "tensors": ps.count, "rows": rows,
                               "ratio": r})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
