"""Issue 4: the Adam step time of shardopt against optax, a flat fused jit step, torch's fused Adam and the roofline.

    /work/venv/bin/python benchmarks/bench_step.py [--sets small,gpt2,gpt2-mesh,big | --quick] [--steps 20]
        [--plot benchmarks/step_time.png] [--json out.json] [--no-memory] [--memory-budget-gb G]
        [--rows shardopt,from_optax,optax]

Each row is compiled (timed: "compile s" includes the first call) and then the rows of a set are timed
*interleaved*: each round runs one blocking step of every row, and a row's time is the median over `--steps`
rounds after 3 warmup rounds. Other processes' load then slows all rows alike, so the ratios, taken within
one run, hold up on a busy machine. (Rows that don't fit the memory budget together go in later batches.)
The roofline is 28 bytes/element (read param, grad, m, v; write param, m, v) over the bandwidth a probe
measures at the start of the run (a jitted, donated, in-place `x*a+b` over a 256 MB buffer).
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse
import gc
import importlib.util
import json
import resource
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np
import optax
from _common import (
    Case,
    JitCase,
    ParamSet,
    Row,
    bandwidth_probe,
    convention_args,
    environment,
    flat_adam,
    fmt,
    load_average,
    make_arrays,
    param_set,
    print_table,
    ratio,
    run_cases,
    short_error,
    small_set,
    temp_bytes,
    write_back,
    write_json,
)
from jax.sharding import NamedSharding, PartitionSpec

import shardopt

BYTES_PER_ELEMENT = 28  # Adam: read p, g, m, v and write p, m, v, float32
LR = 1e-3
SCALAR_TEMP_BYTES = 4096  # temp bytes up to this are scalars (the counter, bias corrections, the norm), not arrays


def block(x: Any) -> None:
    jax.block_until_ready(x)


# ----- shardopt ----------------------------------------------------------------------------------------------


class ShardoptApply(Case):
    """shardopt Adam through the user-facing `apply_gradients` (compile = frontend + passes + XLA + first call)."""

    pipeline: tuple[str, ...] | None = None  # --pipeline: the pass pipeline to compile with (None: the default)

    def __init__(self, ps: ParamSet, grads: list[jax.Array], clip: float | None, memory: bool, key: str, name: str):
        super().__init__()
        self.ps, self.grads, self.clip, self.memory = ps, grads, clip, memory
        self.key, self.name = key, name
        self.live_bytes = 3 * 4 * ps.device_elements()

    def setup(self) -> None:
        ps = self.ps
        self.opt = self.make_optimizer()
        if self.pipeline is not None:
            self.opt.pipeline = self.pipeline
        params = make_arrays(ps, "param")
        self.vars = [shardopt.Variable(p, name=n, layout=sh)
                     for p, n, sh in zip(params, ps.names, ps.shardings(), strict=True)]
        del params
        self.by_name = dict(zip(ps.names, self.vars, strict=True))
        self.grad_by_name = dict(zip(ps.names, self.grads, strict=True))
        t0 = time.perf_counter()
        self.program = self.opt.program_for(zip(self.grads, self.vars, strict=True))
        frontend_s = time.perf_counter() - t0
        self.exe = self.program.executable
        t0 = time.perf_counter()
        if self.memory:
            # `_fn` is the jitted executable call_unchecked runs; lowering it with the step's real arrays makes
            # the first call a cache hit (the public `lower()` takes abstract values and compiles once more).
            jitted = getattr(self.exe, "_fn", None)
            compiled = jitted.lower(*self.args()).compile() if jitted is not None else self.exe.lower().compile()
            self.temp_bytes = temp_bytes(compiled)
        self.step()
        xla_s = time.perf_counter() - t0
        self.compile_s = frontend_s + xla_s
        self.note = f"passes+lowering {frontend_s:.1f}s, XLA+first call {xla_s:.1f}s"
        self.extra.update(frontend_passes_s=frontend_s, xla_first_call_s=xla_s)

    def make_optimizer(self) -> Any:
        return shardopt.Adam(learning_rate=LR, mesh=self.ps.mesh, global_clipnorm=self.clip)

    def step(self) -> float:
        t0 = time.perf_counter()
        self.opt.apply_gradients(zip(self.grads, self.vars, strict=True))
        block(self.opt.iterations.value)
        return time.perf_counter() - t0

    def args(self) -> list[jax.Array]:
        """The flat arguments in the calling convention's order, as apply_gradients assembles them."""
        lr = jax.device_put(np.float32(LR), self.exe.in_shardings[-1])
        return convention_args(self.exe, self.opt, self.by_name, self.grad_by_name, lr)

    def write_back(self, outs: list[Any]) -> None:
        """A direct call's results back into the optimizer (what apply_gradients does itself)."""
        write_back(self.exe, self.opt, outs)

    def close(self) -> None:
        self.__dict__.pop("opt", None)
        self.__dict__.pop("vars", None)
        self.__dict__.pop("by_name", None)
        self.__dict__.pop("program", None)
        self.__dict__.pop("exe", None)


class ShardoptLoop(ShardoptApply):
    """The loop a user runs: `apply_gradients`, then every variable's `.value` read (as a forward pass reads
    them). Its compile time is the first step with its first reads."""

    def step(self) -> float:
        t0 = time.perf_counter()
        self.opt.apply_gradients(zip(self.grads, self.vars, strict=True))
        block([v.value for v in self.vars])
        return time.perf_counter() - t0


class FromOptaxApply(ShardoptApply):
    """`shardopt.from_optax(optax.adam(...))` through `apply_gradients`: optax's update traced into shardopt's
    frontend and passes (the issue-9 target: within 1.1x of `shardopt.Adam`'s apply_gradients)."""

    def make_optimizer(self) -> Any:
        tx = optax.adam(LR, eps=1e-7)
        if self.clip:
            tx = optax.chain(optax.clip_by_global_norm(self.clip), tx)
        return shardopt.from_optax(tx, mesh=self.ps.mesh)


class ShardoptUnchecked(Case):
    """The same compiled step called directly (`CompiledStep.call_unchecked`) on the optimizer's arrays;
    assembling the arguments and writing the results back are not timed."""

    def __init__(self, owner: ShardoptApply, key: str, name: str):
        super().__init__()
        self.owner, self.key, self.name = owner, key, name

    def setup(self) -> None:
        self.temp_bytes = self.owner.temp_bytes
        self.note = "same executable as apply_gradients"

    def step(self) -> float:
        args = self.owner.args()
        t0 = time.perf_counter()
        outs = self.owner.exe.call_unchecked(args)
        block(outs[-1])
        t = time.perf_counter() - t0
        self.owner.write_back(outs)
        return t


# ----- baselines ---------------------------------------------------------------------------------------------


class OptaxCase(JitCase):
    def __init__(self, ps: ParamSet, grads: list[jax.Array], clip: bool, memory: bool, key: str, name: str):
        super().__init__()
        self.ps, self.grads, self.clip, self.memory, self.key, self.name = ps, grads, clip, memory, key, name
        self.live_bytes = 3 * 4 * ps.device_elements()

    def build(self) -> tuple[Any, tuple[Any, ...], tuple[Any, ...]]:
        ps = self.ps
        tx = optax.adam(LR, eps=1e-7)
        if self.clip:
            tx = optax.chain(optax.clip_by_global_norm(1.0), tx)
        replicated = NamedSharding(ps.mesh, PartitionSpec())
        params = make_arrays(ps, "param")
        state = tx.init(params)
        state = jax.tree.map(lambda x: jax.device_put(x, replicated) if x.ndim == 0 else x, state)
        state_shardings = jax.tree.map(lambda x: x.sharding, state)

        def step_fn(p: Any, s: Any, g: Any) -> Any:
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        jitted = jax.jit(step_fn, donate_argnums=(0, 1), out_shardings=(ps.shardings(), state_shardings))
        return jitted, (params, state), (self.grads,)


class FlatCase(JitCase):
    """Hand-written fused Adam over one flat buffer per quantity (params, m, v, grads), state kept flat.
    On a mesh the buffer is split over the mesh's last axis, sized to hold the same elements per device."""

    def __init__(self, ps: ParamSet, memory: bool, key: str, name: str):
        super().__init__()
        self.ps, self.memory, self.key, self.name = ps, memory, key, name
        self.live_bytes = 4 * 4 * ps.device_elements()

    def build(self) -> tuple[Any, tuple[Any, ...], tuple[Any, ...]]:
        mesh = self.ps.mesh
        axis = mesh.axis_names[-1]
        axis_size, ndev = mesh.shape[axis], mesh.devices.size
        if ndev == 1:
            length, spec = self.ps.elements, PartitionSpec()
        else:
            per_copy = -(-self.ps.device_elements() * axis_size // ndev)
            length, spec = -(-per_copy // axis_size) * axis_size, PartitionSpec(axis)
        sharding = NamedSharding(mesh, spec)
        self.note = f"flat f32[{length}] {spec}"
        flat = ParamSet("flat", "flat", mesh, ["flat"], [(length,)], [spec])
        p, = make_arrays(flat, "param")
        g, = make_arrays(flat, "grad", seed=1)
        m, = make_arrays(flat, "zeros")
        v, = make_arrays(flat, "zeros")
        t = jax.device_put(np.int32(0), NamedSharding(mesh, PartitionSpec()))
        def step_fn(p: jax.Array, m: jax.Array, v: jax.Array, t: jax.Array, g: jax.Array) -> Any:
            return flat_adam(p, m, v, t, g, LR)

        out_sh = (sharding, sharding, sharding, NamedSharding(mesh, PartitionSpec()))
        jitted = jax.jit(step_fn, donate_argnums=(0, 1, 2, 3), out_shardings=out_sh)
        return jitted, (p, m, v, t), (g,)


class NoopCase(JitCase):
    """A jitted donated identity over the same per-tensor params/m/v (returned) and grads (read): the floor
    of a per-tensor call with this many arguments and results."""

    def __init__(self, ps: ParamSet, grads: list[jax.Array], memory: bool, key: str, name: str):
        super().__init__()
        self.ps, self.grads, self.memory, self.key, self.name = ps, grads, memory, key, name
        self.live_bytes = 3 * 4 * ps.device_elements()

    def build(self) -> tuple[Any, tuple[Any, ...], tuple[Any, ...]]:
        carry = (make_arrays(self.ps, "param"), make_arrays(self.ps, "zeros"), make_arrays(self.ps, "zeros"))
        jitted = jax.jit(lambda p, m, v, g: (p, m, v), donate_argnums=(0, 1, 2))
        return jitted, carry, (self.grads,)


class TorchCase(Case):
    """torch.optim.Adam(fused=True) over the set's full shapes (one device, default CPU threads) in a worker
    process (_torch_step.py): inside this process JAX's runtime threads compete with torch's OpenMP threads.
    It is timed in a batch of its own, after the JAX rows."""

    def __init__(self, ps: ParamSet, key: str, name: str, threads: int | None = None):
        super().__init__()
        self.ps, self.key, self.name, self.threads = ps, key, name, threads
        self.live_bytes = 4 * 4 * ps.elements
        # Interleaved with JAX steps it ran 5-20x slower (its OpenMP threads meet the JAX runtime's spinning ones).
        self.isolated = True

    def setup(self) -> None:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_torch_step.py")
        self.proc = subprocess.Popen([sys.executable, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        t0 = time.perf_counter()
        self.proc.stdin.write(json.dumps({"shapes": [list(s) for s in self.ps.shapes], "threads": self.threads}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read().strip().splitlines()
            raise RuntimeError(err[-1] if err else "the torch worker died")
        info = json.loads(line)
        self.compile_s = None
        self.note = f"torch {info['torch']}, {info['threads']} threads, one device, own process"
        self.extra.update(first_step_s=info["first_step_s"], setup_s=time.perf_counter() - t0)

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the torch worker died")
        return float(line)

    def close(self) -> None:
        proc = self.__dict__.pop("proc", None)
        if proc is not None:
            try:
                proc.stdin.write("quit\n")
                proc.stdin.close()
                proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()


def torch_available() -> bool:
    """torch is importable (BENCH_NO_TORCH=1 pretends it is not, to check the tables without it)."""
    return os.environ.get("BENCH_NO_TORCH") != "1" and importlib.util.find_spec("torch") is not None


# ----- one set ---------------------------------------------------------------------------------------------


def set_groups(ps: ParamSet, grads: list[jax.Array], memory: bool, with_clip: bool = True,
               with_extras: bool = True) -> list[list[Case]]:
    so = ShardoptApply(ps, grads, None, memory, "shardopt", "shardopt apply_gradients")
    groups: list[list[Case]] = [[so, ShardoptUnchecked(so, "shardopt_unchecked",
                                                       "shardopt compiled module alone (call_unchecked)")],
                                [ShardoptLoop(ps, grads, None, False, "shardopt_loop",
                                              "shardopt training loop (apply_gradients + read every value)")]]
    groups.append([FromOptaxApply(ps, grads, None, memory, "from_optax",
                                  "shardopt.from_optax(optax.adam) (apply_gradients)")])
    if with_clip:
        clip = ShardoptApply(ps, grads, 1.0, memory, "shardopt_clip", "shardopt, global_clipnorm=1.0 (apply_gradients)")
        groups.append([clip, ShardoptUnchecked(clip, "shardopt_clip_unchecked",
                                               "shardopt, global_clipnorm=1.0, compiled module alone")])
    groups.append([OptaxCase(ps, grads, False, memory, "optax", "jax.jit(optax.adam), donated")])
    if with_clip:
        groups.append([OptaxCase(ps, grads, True, memory, "optax_clip", "optax clip_by_global_norm(1.0) + adam")])
    groups.append([FlatCase(ps, memory, "flat", "hand-written fused jit, one flat buffer")])
    if with_extras:
        groups.append([NoopCase(ps, grads, memory, "noop", "jitted donated no-op (same p/m/v/grads)")])
        if torch_available():
            groups.append([TorchCase(ps, "torch", "torch Adam(fused=True)")])
            groups.append([TorchCase(ps, "torch1", "torch Adam(fused=True), 1 thread", threads=1)])
    if ROWS:  # --rows: only the groups with a selected row (a row that times another's executable comes along)
        groups = [g for g in groups if any(c.key in ROWS for c in g)]
    return groups


ROWS: set[str] = set()  # --rows (empty: every row)
ROW_ORDER = ["shardopt", "shardopt_loop", "shardopt_unchecked", "from_optax", "shardopt_clip",
             "shardopt_clip_unchecked", "optax", "optax_clip", "flat",
             "noop", "torch", "torch1"]


def run_set(ps: ParamSet, steps: int, memory: bool, bw: dict[str, float], budget: int | None) -> dict[str, Any]:
    print(f"\n## {ps.key}: {ps.title}", flush=True)
    grads = make_arrays(ps, "grad", seed=1)
    groups = set_groups(ps, grads, memory)
    results = run_cases(groups, steps, budget=budget, log=lambda m: print(m, flush=True))
    del grads, groups
    jax.clear_caches()  # the compiled 2000-tensor programs and their lowerings hold gigabytes
    gc.collect()
    results = {k: results[k] for k in ROW_ORDER if k in results}
    if "torch" not in results:
        results["torch"] = Row("torch Adam(fused=True)", note="skipped: " + (
            "not selected (--rows)" if ROWS and torch_available() else "torch is not installed"))
    roof_ms = BYTES_PER_ELEMENT * ps.device_elements() / (bw["gbps"] * 1e9) * 1e3
    results["roofline"] = Row(f"roofline: {BYTES_PER_ELEMENT} B/element / {bw['gbps']:.1f} GB/s", roof_ms,
                              note=f"{ps.device_elements() / 1e6:.1f}M elements over all devices")
    base = results["optax"].ms if "optax" in results else None
    tch = results["torch"].ms
    headers = ["row", "median ms", "x optax", "x torch fused", "x roofline", "compile s", "XLA temp bytes", "note"]
    table = []
    for r in results.values():
        table.append([r.name, "ERROR" if r.error else fmt(r.ms), fmt(ratio(r.ms, base)), fmt(ratio(r.ms, tch)),
                      fmt(ratio(r.ms, roof_ms), ".1f"), fmt(r.compile_s, ".1f"),
                      "—" if r.temp_bytes is None else f"{r.temp_bytes:,}", r.error or r.note])
    print(f"\n### {ps.key}: {ps.title}; {ps.count} tensors, {ps.elements / 1e6:.1f}M params, median of {steps} "
          f"interleaved steps, load avg {load_average()}\n")
    print_table(headers, table)
    plain = results.get("shardopt", Row("shardopt"))
    fo = results.get("from_optax")
    r_fo = ratio(fo.ms, plain.ms) if fo is not None else None
    if r_fo is not None:
        print(f"\nfrom_optax target (shardopt.from_optax(optax.adam) <= 1.1x shardopt.Adam, apply_gradients): "
              f"{r_fo:.2f}x ({fmt(fo.ms)} vs {fmt(plain.ms)} ms; first step {fmt(fo.compile_s, '.1f')} vs "
              f"{fmt(plain.compile_s, '.1f')} s) -> {'MET' if r_fo <= 1.1 else 'NOT MET'}")
    clip = results.get("shardopt_clip", Row("shardopt_clip"))
    r = ratio(clip.ms, plain.ms)
    if r is not None:
        # beyond the unclipped step's temp: a pack kernel call's result tuple is a temp of one 8-byte pointer per
        # result (16,016 bytes for 2000 members), the same with and without clipping
        mem_ok = clip.temp_bytes is not None and clip.temp_bytes - (plain.temp_bytes or 0) <= SCALAR_TEMP_BYTES
        ok = r <= 1.15 and mem_ok
        grad_bytes = 4 * ps.device_elements()
        kind = ("scalars only beyond the unclipped step's" if mem_ok else
                f"not zero: {100 * (clip.temp_bytes or 0) / grad_bytes:.3g}% of the {grad_bytes:,} gradient bytes")
        print(f"\nclip target (shardopt+global_clipnorm <= 1.15x shardopt, no XLA temp buffers): {r:.2f}x; "
              f"{fmt(clip.temp_bytes, ',')} temp bytes ({kind}; the unclipped step has {fmt(plain.temp_bytes, ',')})"
              f" -> {'MET' if ok else 'NOT MET'}")
    clip_u, plain_u = results.get("shardopt_clip_unchecked"), results.get("shardopt_unchecked")
    r_u = ratio(clip_u.ms, plain_u.ms) if clip_u is not None and plain_u is not None else None
    if r_u is not None:  # the compiled modules alone: no per-call argument checks in either
        print(f"clip target, compiled modules alone (call_unchecked): {r_u:.2f}x ({fmt(clip_u.ms)} vs "
              f"{fmt(plain_u.ms)} ms) -> {'MET' if r_u <= 1.15 else 'NOT MET'}")
    loop, opt_row = results.get("shardopt_loop"), results.get("optax")
    r_loop = ratio(loop.ms, opt_row.ms) if loop is not None and opt_row is not None else None
    if r_loop is not None:
        first = ratio(loop.compile_s, opt_row.compile_s)
        print(f"training loop (apply_gradients + read every value) / jax.jit(optax.adam): {r_loop:.2f}x; first step "
              f"with its first reads {fmt(loop.compile_s, '.1f')} s vs optax's first step "
              f"{fmt(opt_row.compile_s, '.1f')} s = {fmt(first)}x")
    return {"title": ps.title, "tensors": ps.count, "params": ps.elements, "device_elements": ps.device_elements(),
            "rows": results}


# ----- sweep over tensor count -------------------------------------------------------------------------------


def sweep(counts: list[int], steps: int, path: str, known: dict[int, dict[str, float]],
          budget: int | None) -> dict[int, dict[str, float]]:
    """Step time vs tensor count at a constant 7.4M parameters for shardopt, optax and the flat jit."""
    out: dict[int, dict[str, float]] = {}
    for count in counts:
        if count in known:
            out[count] = known[count]
            continue
        ps = small_set(count)
        print(f"\n## sweep: {ps.title}", flush=True)
        grads = make_arrays(ps, "grad", seed=1)
        groups = set_groups(ps, grads, memory=False, with_clip=False, with_extras=False)
        rows = run_cases(groups, steps, budget=budget, log=lambda m: print(m, flush=True))
        out[count] = {k: r.ms for k, r in rows.items() if r.ms is not None}
        del grads, groups
        jax.clear_caches()
        gc.collect()
    plot(out, path)
    return out


def plot(data: dict[int, dict[str, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"shardopt": "shardopt apply_gradients", "shardopt_unchecked": "shardopt call_unchecked",
              "optax": "jax.jit(optax.adam)", "flat": "fused jit, flat buffer"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    counts = sorted(data)
    for key, label in labels.items():
        xs = [c for c in counts if key in data[c]]
        if xs:
            ax.plot(xs, [data[c][key] for c in xs], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tensors (7.4M float32 parameters in total)")
    ax.set_ylabel("median step time (ms)")
    ax.set_title("Adam step time vs tensor count (1 CPU device)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


def text_plot(data: dict[int, dict[str, float]], width: int = 60) -> str:
    """The sweep as a bar chart in text (for the README, next to the PNG `--plot` writes); bars are linear in ms."""
    labels = {"shardopt": "shardopt apply_gradients", "shardopt_unchecked": "shardopt call_unchecked",
              "optax": "jax.jit(optax.adam)", "flat": "fused jit, flat buffer"}
    top = max(v for row in data.values() for k, v in row.items() if k in labels and v)
    lines = [f"median step time (bar = {top / width:.2f} ms per #); 7.4M float32 parameters, 1 CPU device"]
    for count in sorted(data):
        lines.append(f"{count} tensors")
        for key, label in labels.items():
            ms = data[count].get(key)
            if ms:
                lines.append(f"  {label:<25} {'#' * max(1, round(ms / top * width))} {ms:.1f} ms")
    return "\n".join(lines)


# ----- main --------------------------------------------------------------------------------------------------


def child_args(args: argparse.Namespace) -> list[str]:
    out = ["--steps", str(args.steps)]
    if args.no_memory:
        out.append("--no-memory")
    if args.pipeline:
        out += ["--pipeline", args.pipeline]
    if args.memory_budget_gb is not None:
        out += ["--memory-budget-gb", str(args.memory_budget_gb)]
    if args.rows:
        out += ["--rows", args.rows]
    return out


def run_child(key: str, args: argparse.Namespace, bw: dict[str, float]) -> dict[str, Any] | None:
    """One set in a child process (its tables print straight through); returns its results."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "set.json")
        cmd = [sys.executable, "-u", os.path.abspath(__file__), "--child-set", key, "--child-out", out,
               "--child-bandwidth", json.dumps(bw), *child_args(args)]
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not os.path.exists(out):
            print(f"\n## {key}: the set's process failed (exit status {proc.returncode})", flush=True)
            return None
        with open(out) as f:
            return json.load(f)


def child_main(args: argparse.Namespace) -> None:
    if args.pipeline:
        ShardoptApply.pipeline = tuple(p.strip() for p in args.pipeline.split(",") if p.strip())
    budget = None if args.memory_budget_gb is None else int(args.memory_budget_gb * 2**30)
    bw = json.loads(args.child_bandwidth)
    result = run_set(param_set(args.child_set), args.steps, not args.no_memory, bw, budget)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"({args.child_set}: peak RSS of its process {peak:.1f} GB)", flush=True)
    result["peak_rss_gb"] = peak
    write_json(args.child_out, result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="small,gpt2,gpt2-mesh,big", help="comma-separated: small,gpt2,gpt2-mesh,big")
    ap.add_argument("--quick", action="store_true", help="--sets gpt2,gpt2-mesh,big (skips the 2000-tensor set, "
                    "whose shardopt compiles dominate the default run)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per row (after 3 warmup steps)")
    ap.add_argument("--plot", default=None, help="write a PNG of step time vs tensor count (runs a sweep)")
    ap.add_argument("--sweep", default="10,100,500,2000", help="tensor counts of the --plot sweep")
    ap.add_argument("--json", default=None, help="write all results as JSON")
    ap.add_argument("--no-memory", action="store_true", help="skip memory_analysis (temp bytes)")
    ap.add_argument("--pipeline", default=None, help="comma-separated pass pipeline for the shardopt rows "
                    "(default: shardopt's DEFAULT_PIPELINE)")
    ap.add_argument("--memory-budget-gb", type=float, default=None,
                    help="host memory the interleaved rows may hold at once "
                    "(default: 60%% of MemAvailable, at most 6 GB)")
    ap.add_argument("--in-process", action="store_true",
                    help="run every set in this process (default: one child process per set, so each set starts "
                    "with the memory the previous one used given back)")
    ap.add_argument("--rows", default=None, help="comma-separated row keys to run (default: all): "
                    + ",".join(ROW_ORDER))
    ap.add_argument("--child-set", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-bandwidth", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    ROWS.update(r.strip() for r in (args.rows or "").split(",") if r.strip())
    t_start = time.perf_counter()
    if args.child_set:
        child_main(args)
        return
    if args.pipeline:
        ShardoptApply.pipeline = tuple(p.strip() for p in args.pipeline.split(",") if p.strip())
    env = environment()
    if args.pipeline:
        env["pipeline"] = ",".join(ShardoptApply.pipeline)
    print("environment:", env)
    bw = bandwidth_probe()
    print(f"bandwidth probe (x*a+b, {bw['mbytes']:.0f} MB read + written): one device "
          f"{bw['one_device_gbps']:.1f} GB/s, all {len(jax.devices())} devices "
          f"{fmt(bw.get('all_devices_gbps'), '.1f')} GB/s; roofline uses {bw['gbps']:.1f} GB/s")
    budget = None if args.memory_budget_gb is None else int(args.memory_budget_gb * 2**30)
    sets: dict[str, Any] = {}
    set_keys = "gpt2,gpt2-mesh,big" if args.quick else args.sets
    for key in [k.strip() for k in set_keys.split(",") if k.strip()]:
        if args.in_process:
            try:
                ps = param_set(key)
            except Exception as e:  # noqa: BLE001
                print(f"\n## {key}: cannot build the set: {short_error(e)}")
                continue
            sets[key] = run_set(ps, args.steps, not args.no_memory, bw, budget)
            gc.collect()
        else:
            result = run_child(key, args, bw)
            if result is not None:
                sets[key] = result
    sweep_data = None
    if args.plot:
        known: dict[int, dict[str, float]] = {}
        if "small" in sets:
            rows = sets["small"]["rows"]
            ms = {k: (r.ms if isinstance(r, Row) else r.get("ms")) for k, r in rows.items()}
            known[2000] = {k: ms[k] for k in ("shardopt", "shardopt_unchecked", "optax", "flat") if ms.get(k)}
        counts = [int(c) for c in args.sweep.split(",")]
        sweep_data = sweep(counts, args.steps, args.plot, known, budget)
        print("\nsweep (median ms):")
        print_table(["tensors", "shardopt", "shardopt call_unchecked", "optax", "flat jit"],
                    [[str(c), *(fmt(sweep_data[c].get(k)) for k in ("shardopt", "shardopt_unchecked", "optax",
                                                                      "flat"))] for c in sorted(sweep_data)])
        print("\n```\n" + text_plot(sweep_data) + "\n```")
    total = time.perf_counter() - t_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\ntotal {total:.0f} s; peak RSS {peak:.1f} GB; load average at the end {load_average()}")
    if args.json:
        write_json(args.json, {"environment": env, "bandwidth": bw, "steps": args.steps, "sets": sets,
                               "sweep": sweep_data, "total_s": total})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
