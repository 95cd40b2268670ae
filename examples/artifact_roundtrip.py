"""Compile once, save one file, run it anywhere: an Adam step for GPT-2 small's 148 variables on an 8-device CPU
mesh is saved to a `.shardopt` artifact, loaded back (no re-lowering), checked bitwise against the original,
run again in a fresh process by the `shardopt` command, and inspected.

    python examples/artifact_roundtrip.py [--layers 12] [--out gpt2_adam.shardopt] [--html report.html]
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import shardopt  # noqa: E402
from shardopt.model_zoo import gpt2_small  # noqa: E402


def random_tree(step, key: jax.Array, scale: float, role: str = "") -> dict:
    """Random arrays for the step's variables (or gradients, role='grad/'), made in place by one program."""
    conv = step.convention
    specs = [conv.args[conv.arg_index(role + n)] for n in step.names]
    shardings = [step.executable.in_shardings[conv.arg_index(role + n)] for n in step.names]

    def make(k):
        return [scale * jax.random.normal(jax.random.fold_in(k, i), s.shape, s.dtype) for i, s in enumerate(specs)]

    return jax.tree_util.tree_unflatten(step.treedef, jax.jit(make, out_shardings=shardings)(key))


def one_step(step, key: jax.Array) -> tuple:
    params = random_tree(step, key, 0.02)
    state = step.init(params)
    grads = random_tree(step, jax.random.fold_in(key, 1), 1e-3, "grad/")
    t0 = time.perf_counter()
    params, state = step(params, grads, state)
    jax.block_until_ready(params)
    return params, state, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks (12 = GPT-2 small)")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "gpt2_adam.shardopt"))
    parser.add_argument("--html", help="also write the inspect report as an HTML page")
    args = parser.parse_args()

    mesh = jax.make_mesh((2, 4), ("batch", "model"))
    schedule = shardopt.schedules.CosineDecay(0.0, decay_steps=1000, warmup_target=6e-4, warmup_steps=100)
    opt = shardopt.Adam(learning_rate=schedule, global_clipnorm=1.0, use_ema=True, mesh=mesh)
    t0 = time.perf_counter()
    step = opt.compile(gpt2_small(mesh, n_layer=args.layers))
    compiled_s = time.perf_counter() - t0
    size = step.save(args.out)
    print(f"compiled {len(step.names)} variables in {compiled_s:.2f} s; saved {args.out} ({size / 2**20:.2f} MiB)")

    t0 = time.perf_counter()
    loaded = shardopt.load(args.out)  # what a fresh process does: no optimizer, no lowering, no passes
    print(f"loaded in {time.perf_counter() - t0:.2f} s (the first call compiles the stored module with XLA)")

    key = jax.random.key(0)
    want_params, want_state, t_orig = one_step(step, key)
    got_params, got_state, t_loaded = one_step(loaded, key)
    same = jax.jit(lambda a, b: jnp.all(jnp.stack([jnp.array_equal(x, y) for x, y in
                                                   zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                                                       strict=True)])))
    identical = bool(same((want_params, want_state), (got_params, got_state)))
    print(f"one step: original {t_orig:.2f} s, loaded {t_loaded:.2f} s (first calls); bitwise identical: {identical}")
    del want_params, want_state, got_params, got_state

    print(f"\n$ shardopt run {args.out} --steps 2   (a fresh process)")
    subprocess.run([sys.executable, "-m", "shardopt", "run", args.out, "--steps", "2"], check=True)

    print(f"\n$ shardopt inspect {args.out}")
    report = loaded.inspect()  # the same as `shardopt inspect`; the Report also renders HTML
    if args.html:
        report.write_html(args.html)
        print(f"wrote {args.html}")


if __name__ == "__main__":
    main()
