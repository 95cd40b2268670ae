"""The main job: compile an Adam step for GPT-2 small's 148 variables on an 8-device CPU mesh, run it, and
print what happened (compile time, step time, where the learning rate comes from, what each pass did and where
every variable and slot lives). Layouts are written as `shardopt inspect` writes them: one entry per dimension,
`-` for a dimension every device holds whole, a mesh axis name for one split over that axis.

    python examples/gpt2_adam.py [--steps 5] [--layers 12] [--learning-rate schedule|constant|callable]
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import shardopt  # noqa: E402
from shardopt.core.statistics import sentence  # noqa: E402
from shardopt.model_zoo import gpt2_small  # noqa: E402
from shardopt.runtime.report_format import fmt_layout  # noqa: E402


def random_arrays(specs: list, key: jax.Array, scale: float, shardings: list) -> list[jax.Array]:
    """Random arrays with the specs' shapes, made directly in their shardings (one compiled program)."""
    def make(k):
        return [scale * jax.random.normal(jax.random.fold_in(k, i), s.shape, s.dtype) for i, s in enumerate(specs)]
    return jax.jit(make, out_shardings=shardings)(key)


def layout_text(layout: shardopt.Layout) -> str:
    """A layout in inspect's notation: '[-, model]', or 'replicated' when no dimension is split."""
    return fmt_layout(list(layout.to_partition_spec()) or [None])


def learning_rate(kind: str):
    """The learning rate the job trains with: GPT-2's warmup + cosine schedule, a constant, or a callable."""
    if kind == "schedule":
        return shardopt.schedules.CosineDecay(0.0, decay_steps=1000, warmup_target=6e-4, warmup_steps=100)
    if kind == "constant":
        return 6e-4

    def peak_learning_rate() -> float:
        return 6e-4
    return peak_learning_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks (12 = GPT-2 small)")
    parser.add_argument("--learning-rate", choices=("schedule", "constant", "callable"), default="schedule")
    parser.add_argument("--d-model", type=int, default=768, help=argparse.SUPPRESS)  # small sizes for tests
    parser.add_argument("--vocab", type=int, default=50257, help=argparse.SUPPRESS)
    args = parser.parse_args()

    mesh = jax.make_mesh((2, 4), ("batch", "model"))
    specs = gpt2_small(mesh, n_layer=args.layers, d_model=args.d_model, vocab=args.vocab)
    key = jax.random.key(0)
    spec_list = list(specs.values())
    shardings = [spec.layout.to_named_sharding() for spec in spec_list]
    values = random_arrays(spec_list, key, 0.02, shardings)
    variables = [shardopt.Variable(value, name=spec.name, layout=spec.layout)
                 for spec, value in zip(spec_list, values, strict=True)]
    grads = random_arrays(spec_list, jax.random.fold_in(key, 1), 1e-3, shardings)
    n_params = sum(int(np.prod(v.shape)) for v in variables)
    small = (args.layers, args.d_model, args.vocab) == (12, 768, 50257)
    model = "GPT-2 small" if small else f"GPT-2 ({args.layers} blocks, d_model {args.d_model}, vocab {args.vocab})"
    print(f"{model}: {len(variables)} tensors, {n_params / 1e6:.1f}M parameters, mesh {dict(mesh.shape)} "
          f"on {jax.device_count()} {jax.default_backend().upper()} devices")

    opt = shardopt.Adam(learning_rate=learning_rate(args.learning_rate), global_clipnorm=1.0, use_ema=True,
                        ema_overwrite_frequency=100, mesh=mesh)
    pairs = list(zip(grads, variables, strict=True))

    t0 = time.perf_counter()
    opt.apply_gradients(pairs)
    jax.block_until_ready(variables[0].value)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        opt.apply_gradients(pairs)
        jax.block_until_ready([v.value for v in variables])
        times.append(time.perf_counter() - t0)

    program = opt.program_for(pairs)
    print(f"\nfirst step (lower + passes + compile + run): {first:.2f} s")
    print(f"steady step: median {statistics.median(times) * 1e3:.1f} ms over {len(times)} steps "
          f"(iterations = {int(opt.iterations.value)})")
    print(f"learning rate: {opt.learning_rate_source}; now {float(opt.learning_rate):.3g}")
    print("\nwhat each pass did:")
    for stage in program.pipeline.stages[1:]:
        print(f"  {stage.name:<18} {stage.seconds * 1e3:7.1f} ms  {sentence(stage.name, stage.stats)}")

    print("\npacked state (the m, v and average slots of small variables live in one buffer each per pack; the "
          "variables stay your own arrays):")
    pack_of = {}
    for group in opt.packs:
        pack_of.update({m.name: group.name for m in group.members})
        print(f"  {group.name}: {len(group.members)} variables, buffer {group.dtype}{list(group.shape)}, layout "
              f"{fmt_layout(list(group.layout) or [None])}")
    print(f"\n{'variable':<24} {'shape':<14} {'layout':<12} {'slots (m, v, average)':<22} {'MB/device':>9}  stored")
    for var in variables:
        shard = var.value.addressable_shards[0].data
        slot_layouts = {layout_text(opt.get_slot(var, s).layout) for s in ("m", "v", "average")}
        same = "same as variable" if slot_layouts == {layout_text(var.layout)} else ", ".join(sorted(slot_layouts))
        stored = f"slots in {pack_of[var.name]}" if var.name in pack_of else "own buffers"
        print(f"{var.name:<24} {str(var.shape):<14} {layout_text(var.layout):<12} {same:<22} "
              f"{shard.nbytes / 2**20:9.2f}  {stored}")
    checksum = float(jax.jit(lambda xs: sum(x.sum() for x in xs))([v.value for v in variables]))
    print(f"\nchecksum of all variables after {int(opt.iterations.value)} steps: {checksum:.6f}")


if __name__ == "__main__":
    main()
