"""One float32 Adam step over one large tensor: XLA's jnp update vs the compiled FFI kernel vs torch fused.

    PYTHONPATH=. python benchmarks/bench_kernel.py [--sizes 16 64] [--steps 7]

Rows, all in one process and interleaved round by round (the machine is shared):
- `xla jit`: shardopt's update formulation (frontend/adam.py) under `jax.jit`, p/m/v donated;
- `ffi kernel (isa)`: `shardopt.kernels.adam_update` in a donated jit, with its AVX2+FMA loops and with the
  baseline (no FMA) loops that CPUs without AVX2+FMA get;
- `torch fused`: `torch.optim.Adam(fused=True)`, only when torch is importable;
- `roofline`: 28 bytes per element (read p, m, v, g; write p, m, v) at the copy bandwidth measured in the same
  run: a large `np.copyto` on one thread and on as many threads as XLA's pool (the larger counts).
Times are medians in ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from shardopt import kernels
from shardopt.kernels import _loader
from shardopt.optimizers.adam import Adam

LR, T = np.float32(1e-3), np.int32(3)


def copy_gbps(nbytes: int, threads: int, reps: int = 5) -> float:
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]

    def one(a: int, b: int) -> None:
        np.copyto(dst[a:b], src[a:b])

    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        if threads == 1:
            np.copyto(dst, src)
        else:
            ts = [threading.Thread(target=one, args=ab) for ab in bounds]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[1:]) / 1e9


class JaxRow:
    def __init__(self, name: str, n: int, use_kernel: bool, isa: int | None = None):
        self.name, self.isa = name, isa
        opt = Adam(learning_rate=float(LR))
        rng = np.random.default_rng(0)
        self.state = [jnp.asarray((0.02 * rng.standard_normal(n)).astype(np.float32)), jnp.zeros(n), jnp.zeros(n)]
        self.grads = [jnp.asarray((1e-3 * rng.standard_normal(n)).astype(np.float32))]

        def xla(state, grads, lr, t):
            p, m, v = state
            alpha, eps = opt._alpha_eps(lr, t, jnp.float32)
            new_p, new = opt.update_dense(p, grads[0], {"m": m, "v": v}, lr, t)
            return [new_p, new["m"], new["v"]]

        def ffi(state, grads, lr, t):
            alpha, eps = opt._alpha_eps(lr, t, jnp.float32)
            return list(kernels.adam_update(*state, grads, alpha=alpha, eps=eps, beta_1=opt.beta_1,
                                            beta_2=opt.beta_2))

        self.fn = jax.jit(ffi if use_kernel else xla, donate_argnums=(0,))

    def step(self) -> float:
        lib = _loader.load().lib
        if self.isa is not None:
            lib.ShardoptKernelsSetIsa(self.isa)
        t0 = time.perf_counter()
        self.state = self.fn(self.state, self.grads, LR, T)
        jax.block_until_ready(self.state)
        return time.perf_counter() - t0


class TorchRow:
    name = "torch Adam(fused=True)"

    def __init__(self, n: int):
        import torch

        self.torch = torch
        p = torch.nn.Parameter(0.02 * torch.randn(n))
        p.grad = 1e-3 * torch.randn(n)
        self.opt = torch.optim.Adam([p], lr=1e-3, eps=1e-7, fused=True)

    def step(self) -> float:
        t0 = time.perf_counter()
        self.opt.step()
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 64], help="tensor sizes in Mi elements")
    ap.add_argument("--steps", type=int, default=7)
    args = ap.parse_args()
    if not kernels.available("adam", "float32"):
        raise SystemExit(f"kernel unavailable: {kernels.reason('adam', 'float32')}")
    lib = _loader.load().lib
    saved_isa = lib.ShardoptKernelsIsa()
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, kernels {kernels.info()}")
    threads = max(2, os.cpu_count() or 1)
    gbps_1 = copy_gbps(512 << 20, 1)
    gbps_n = copy_gbps(512 << 20, threads)
    gbps = max(gbps_1, gbps_n)
    print(f"np.copyto bandwidth (512 MB, read+write): 1 thread {gbps_1:.1f} GB/s, {threads} threads {gbps_n:.1f} GB/s")
    for mi in args.sizes:
        n = mi << 20
        rows: list = [JaxRow("xla jit (jnp update, donated)", n, False),
                      JaxRow("ffi kernel avx2+fma (donated)", n, True, isa=1)]
        if lib.ShardoptKernelsIsaSupported(1):
            rows.append(JaxRow("ffi kernel baseline isa (donated)", n, True, isa=0))
        try:
            rows.append(TorchRow(n))
        except ImportError:
            print("torch not importable: no torch row")
        times: dict[str, list[float]] = {r.name: [] for r in rows}
        for r in rows:  # warm-up (compile)
            r.step()
            r.step()
        for _ in range(args.steps):
            for r in rows:
                times[r.name].append(r.step())
        lib.ShardoptKernelsSetIsa(saved_isa)
        roof = 28 * n / (gbps * 1e9) * 1e3
        print(f"\n{mi}M float32 elements (median of {args.steps}, ms; x roofline {roof:.1f} ms at {gbps:.1f} GB/s)")
        for name, ts in times.items():
            ms = statistics.median(ts) * 1e3
            print(f"  {name:38s} {ms:8.1f} ms  {ms / roof:5.2f}x roofline  {28 * n / (ms * 1e-3) / 1e9:5.1f} GB/s")
        print(f"  {'roofline (28 B/element)':38s} {roof:8.1f} ms")
        del rows


if __name__ == "__main__":
    main()
