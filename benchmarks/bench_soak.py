"""Soak: thousands of steps with sparse gradients whose row count changes every step; prints resident memory and
how many programs were compiled, so a leak or a compile per row count shows as a growing column.

    /work/venv/bin/python benchmarks/bench_soak.py [--steps 5000] [--every 500] [--max-rows 300]

Rows are bucketed to powers of two (optimizers/gradients.py `row_bucket`), so the program count stays at the
number of buckets up to --max-rows (6 for 300: 8 ... 256 and 512) and RSS stays flat once they are compiled.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import shardopt


def rss_mb() -> float:
    """Resident set size of this process, from /proc (MB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--max-rows", type=int, default=300)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    mesh = jax.make_mesh((2, 4), ("batch", "model"))
    emb = shardopt.Variable(np.zeros((4096, 64), np.float32), name="emb",
                            layout=shardopt.Layout(["model", shardopt.UNSHARDED], mesh))
    dense = [shardopt.Variable(np.zeros((64, 64), np.float32), name=f"dense{i}") for i in range(8)]
    opt = shardopt.Adam(1e-3, mesh=mesh)
    dense_grads = [jnp.ones((64, 64), jnp.float32) * 1e-3 for _ in dense]
    print(f"{'step':>6} {'RSS MB':>8} {'programs':>8} {'step ms (median of window)':>28}")
    window: list[float] = []
    t_start = time.perf_counter()
    for step in range(1, args.steps + 1):
        rows = int(rng.integers(1, args.max_rows + 1))
        idx = jnp.asarray(rng.integers(0, 4096, size=rows).astype(np.int32))
        vals = jnp.asarray(rng.normal(size=(rows, 64)).astype(np.float32))
        t0 = time.perf_counter()
        opt.apply_gradients([(shardopt.IndexedSlices(vals, idx), emb), *zip(dense_grads, dense, strict=True)])
        jax.block_until_ready(opt.iterations.value)
        window.append(time.perf_counter() - t0)
        if step % args.every == 0 or step == 1:
            print(f"{step:>6} {rss_mb():>8.0f} {len(opt._programs):>8} {np.median(window) * 1e3:>28.2f}", flush=True)
            window = []
    print(f"{args.steps} steps in {time.perf_counter() - t_start:.0f} s; {len(opt._programs)} programs compiled; "
          f"finite: {bool(np.isfinite(emb.numpy()).all())}")


if __name__ == "__main__":
    main()
