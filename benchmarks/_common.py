"""Shared helpers of the benchmarks: meshes, parameter sets, arrays, timing, the bandwidth probe and tables.

The scripts set `XLA_FLAGS=--xla_force_host_platform_device_count=8` themselves before jax is imported (the
8-device CPU mesh); one-device runs use a 1-device mesh of the first device.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import shardopt
from shardopt import model_zoo

DEVICE_FLAG = "--xla_force_host_platform_device_count=8"


def xla_flags_with_devices(current: str | None) -> str:
    """XLA_FLAGS with the 8-host-device flag added (kept as is when a device count is already set)."""
    current = current or ""
    if "xla_force_host_platform_device_count" in current:
        return current
    return f"{current} {DEVICE_FLAG}".strip()


# ----- meshes and parameter sets ---------------------------------------------------------------------------


def mesh_one() -> Mesh:
    """A 1-device mesh of the first device (Auto axes, as shardopt compiles for)."""
    return Mesh(np.array(jax.devices()[:1]), ("replica",), axis_types=(AxisType.Auto,))


def mesh_eight() -> Mesh:
    """The 2x4 ('batch', 'model') mesh of 8 CPU devices."""
    devs = jax.devices()
    if len(devs) < 8:
        raise RuntimeError(f"the 8-device mesh needs 8 devices, jax has {len(devs)} (XLA_FLAGS={DEVICE_FLAG})")
    return Mesh(np.array(devs[:8]).reshape(2, 4), ("batch", "model"), axis_types=(AxisType.Auto,) * 2)


@dataclass
class ParamSet:
    """Named tensors (shape, PartitionSpec) on a mesh."""

    key: str
    title: str
    mesh: Mesh
    names: list[str]
    shapes: list[tuple[int, ...]]
    specs: list[PartitionSpec]

    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def elements(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def shardings(self) -> list[NamedSharding]:
        return [NamedSharding(self.mesh, s) for s in self.specs]

    def device_elements(self) -> int:
        """Elements stored over all devices (a replicated tensor counts once per device): the work this host's
        memory system does for one elementwise pass."""
        total = 0
        for shape, sh in zip(self.shapes, self.shardings(), strict=True):
            total += int(np.prod(sh.shard_shape(shape))) * len(sh.device_set)
        return total

    def local_elements(self) -> int:
        """Elements one device holds (the largest shard set over devices)."""
        return int(sum(int(np.prod(sh.shard_shape(s))) for s, sh in zip(self.shapes, self.shardings(), strict=True)))

    def variable_specs(self) -> list[shardopt.VariableSpec]:
        return [shardopt.VariableSpec(s, "float32", NamedSharding(self.mesh, p), n)
                for n, s, p in zip(self.names, self.shapes, self.specs, strict=True)]


def _from_zoo(key: str, title: str, specs: dict[str, Any], mesh: Mesh) -> ParamSet:
    names, shapes, pspecs = [], [], []
    for name, vs in specs.items():
        names.append(name)
        shapes.append(tuple(vs.shape))
        pspecs.append(vs.layout.to_partition_spec() if vs.layout is not None else PartitionSpec())
    return ParamSet(key, title, mesh, names, shapes, pspecs)


def small_set(count: int = 2000, total: int = 7_400_000) -> ParamSet:
    size = total // count
    return _from_zoo(f"small{count}", f"{count} x f32[{size}] ({count * size / 1e6:.1f}M), 1 device",
                     model_zoo.many_small(count, size), mesh_one())


def param_set(key: str) -> ParamSet:
    if key == "small":
        ps = small_set(2000)
        ps.key = "small"
        return ps
    if key == "gpt2":
        return _from_zoo("gpt2", "GPT-2 small (148 tensors, 124M), 1 device", model_zoo.gpt2_small(None), mesh_one())
    if key == "gpt2-mesh":
        mesh = mesh_eight()
        return _from_zoo("gpt2-mesh", "GPT-2 small, 8-device mesh 2x4 (batch, model), Megatron layouts",
                         model_zoo.gpt2_small(mesh), mesh)
    if key == "big":
        n = 64 * 1024 * 1024
        return ParamSet("big", f"one f32[{n}] tensor (64M), 1 device", mesh_one(), ["w"], [(n,)], [PartitionSpec()])
    raise ValueError(f"unknown parameter set {key!r}; known: small, gpt2, gpt2-mesh, big")


# ----- arrays ----------------------------------------------------------------------------------------------

_fill_cache: dict[Any, Callable[..., jax.Array]] = {}


def _filler(shape: tuple[int, ...], sharding: NamedSharding, kind: str) -> Callable[..., jax.Array]:
    key = (shape, sharding, kind)
    fn = _fill_cache.get(key)
    if fn is None:
        if kind == "zeros":
            fn = jax.jit(lambda k: jnp.zeros(shape, jnp.float32), out_shardings=sharding)
        else:
            scale = 0.02 if kind == "param" else 1e-3
            fn = jax.jit(lambda k: scale * jax.random.normal(k, shape, jnp.float32), out_shardings=sharding)
        _fill_cache[key] = fn
    return fn


def make_arrays(ps: ParamSet, kind: str, seed: int = 0) -> list[jax.Array]:
    """Fresh device arrays (their own buffers, so they can be donated): kind 'param', 'grad' or 'zeros'."""
    key = jax.random.key(seed)
    out = []
    for i, (shape, sh) in enumerate(zip(ps.shapes, ps.shardings(), strict=True)):
        out.append(_filler(shape, sh, kind)(jax.random.fold_in(key, i)))
    jax.block_until_ready(out)
    return out


# ----- timing ----------------------------------------------------------------------------------------------


def time_steps(step: Callable[[], Any], steps: int, warmup: int = 3) -> list[float]:
    """Wall seconds of `steps` calls of `step` (which must block until its work is done), after `warmup`."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def median_ms(times: Sequence[float]) -> float:
    return statistics.median(times) * 1e3


def _probe(sharding: Any, n: int, steps: int) -> float:
    x = jax.device_put(jnp.ones((n,), jnp.float32), sharding) + 0
    f = jax.jit(lambda x, a, b: x * a + b, donate_argnums=0, out_shardings=sharding)
    a, b = jnp.float32(0.999), jnp.float32(1e-3)
    state = {"x": x}
    del x

    def step() -> None:
        state["x"] = f(state["x"], a, b)
        state["x"].block_until_ready()

    t = statistics.median(time_steps(step, steps, warmup=2))
    del state["x"]
    return t


def bandwidth_probe(steps: int = 20, mbytes: int = 256) -> dict[str, float]:
    """A jitted, donated, in-place `x*a+b` over a `mbytes` MB float32 buffer; bytes = read + write.

    Run twice: on one device (XLA:CPU runs such a loop on one thread) and split over all devices (every core
    busy). The larger bandwidth is the machine's and sets the roofline."""
    n = mbytes * 1024 * 1024 // 4
    devs = jax.devices()
    one = _probe(jax.sharding.SingleDeviceSharding(devs[0]), n, steps)
    out = {"one_device_gbps": 2 * n * 4 / one / 1e9, "one_device_ms": one * 1e3, "mbytes": float(mbytes)}
    if len(devs) > 1:
        mesh = Mesh(np.array(devs), ("all",), axis_types=(AxisType.Auto,))
        every = _probe(NamedSharding(mesh, PartitionSpec("all")), n, steps)
        out.update(all_devices_gbps=2 * n * 4 / every / 1e9, all_devices_ms=every * 1e3)
    out["gbps"] = max(out["one_device_gbps"], out.get("all_devices_gbps", 0.0))
    return out


def temp_bytes(compiled: Any) -> int | None:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def load_average() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def shardopt_source() -> dict[str, Any]:
    """The shardopt commit and uncommitted changes these numbers were taken with, and the default pass pipeline."""
    import subprocess

    from shardopt.passes.pipeline import DEFAULT_PIPELINE

    out: dict[str, Any] = {"pipeline": ",".join(DEFAULT_PIPELINE)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(shardopt.__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "shardopt"], capture_output=True,
                               text=True, timeout=10).stdout.split("\n")
        out["shardopt_commit"] = head or None
        out["shardopt_uncommitted"] = sorted(line[3:] for line in dirty if line.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


def environment() -> dict[str, Any]:
    import optax

    env = {"jax": jax.__version__, "optax": optax.__version__, "devices": len(jax.devices()),
           "cpus": os.cpu_count(), "python": platform.python_version(), "load_average_1_5_15": load_average()}
    env.update(shardopt_source())
    try:
        from importlib.metadata import version

        env["torch"] = version("torch")  # not imported here: torch runs in its own process
    except Exception:  # noqa: BLE001 - not installed
        env["torch"] = None
    return env


# ----- tables ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    ms: float | None = None
    compile_s: float | None = None
    temp_bytes: int | None = None
    error: str | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], file: Any = None) -> None:
    """A GitHub-markdown table (pastes into the README as is)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    print(line, file=file)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=file)
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |", file=file)


# ----- interleaved timing of rows --------------------------------------------------------------------------


class Case:
    """One row of a table. `setup()` compiles and runs the first step (filling compile_s, temp_bytes, note),
    `step()` runs one step, blocking, and returns the seconds of its timed part, `close()` drops its arrays.
    `live_bytes` is what it holds on the host while alive (used to decide which rows can be interleaved)."""

    key = ""
    name = ""
    live_bytes = 0
    isolated = False  # timed after the others, interleaved only with other isolated rows

    def __init__(self) -> None:
        self.compile_s: float | None = None
        self.temp_bytes: int | None = None
        self.note = ""
        self.extra: dict[str, Any] = {}

    def setup(self) -> None:
        pass

    def step(self) -> float:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JitCase(Case):
    """A jitted, donated step `carry = fn(*carry, *extra)`, compiled by `lower(args).compile()` (which the jitted
    function's next call reuses), so the temp bytes cost no second compile."""

    memory = True

    def build(self) -> tuple[Any, tuple[Any, ...], tuple[Any, ...]]:
        """(jitted fn, carry, extra args)."""
        raise NotImplementedError

    def setup(self) -> None:
        t0 = time.perf_counter()
        self.jitted, carry, self.extra_args = self.build()
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled = self.jitted.lower(*carry, *self.extra_args).compile()
        if self.memory:
            self.temp_bytes = temp_bytes(compiled)
        del compiled
        self.carry = carry
        self.step()
        self.compile_s = time.perf_counter() - t0
        self.extra["build_s"] = build_s

    def step(self) -> float:
        t0 = time.perf_counter()
        self.carry = self.jitted(*self.carry, *self.extra_args)
        jax.block_until_ready(jax.tree.leaves(self.carry)[-1])
        return time.perf_counter() - t0

    def close(self) -> None:
        self.__dict__.pop("carry", None)
        self.__dict__.pop("extra_args", None)
        self.__dict__.pop("jitted", None)


def memory_budget_bytes(default_gb: float = 6.0) -> int:
    """60% of the memory the kernel reports available, at most `default_gb` (which is also the fallback)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return min(int(line.split()[1]) * 1024 * 6 // 10, int(default_gb * 2**30))
    except OSError:
        pass
    return int(default_gb * 2**30)


def run_cases(groups: Sequence[Sequence[Case]], steps: int, warmup: int = 3, budget: int | None = None,
              log: Callable[[str], None] = print) -> dict[str, Row]:
    """Sets up the rows and times them *interleaved*: every round runs one step of each live row (starting from a
    different row each round), so load from other processes slows all rows alike and the ratios stay meaningful on
    a busy machine.

    Rows of one group (e.g. apply_gradients and call_unchecked of the same optimizer) are always alive together;
    groups are packed into batches that fit `budget` bytes and the batches run one after the other. A row that
    fails is reported with its error and the others go on."""
    import gc
    import traceback

    budget = memory_budget_bytes() if budget is None else budget
    batches: list[list[Sequence[Case]]] = []
    used = budget + 1
    prev_isolated = False
    for g in sorted(groups, key=lambda g: any(c.isolated for c in g)):
        size = sum(c.live_bytes for c in g)
        isolated = any(c.isolated for c in g)
        if used + size > budget or not batches or isolated != prev_isolated:
            batches.append([])
            used = 0
        batches[-1].append(g)
        used += size
        prev_isolated = isolated
    rows: dict[str, Row] = {}
    for batch in batches:
        live: list[Case] = []
        for g in batch:
            for c in g:
                log(f"  ... setting up: {c.name}")
                t0 = time.perf_counter()
                try:
                    c.setup()
                    live.append(c)
                    rows[c.key] = Row(c.name, None, c.compile_s, c.temp_bytes, note=c.note, extra=c.extra)
                except Exception as e:  # noqa: BLE001 - a failing row is reported in the table
                    traceback.print_exc()
                    rows[c.key] = Row(c.name, error=short_error(e))
                    c.close()
                log(f"      {time.perf_counter() - t0:.1f} s")
        names = ", ".join(c.name for c in live)
        log(f"  ... timing {warmup} + {steps} interleaved rounds of: {names}")
        if any(c.isolated for c in live):
            time.sleep(1.0)  # lets the JAX runtime's worker threads go idle first
        times: dict[str, list[float]] = {c.key: [] for c in live}
        for i in range(warmup + steps):
            order = live[i % len(live):] + live[: i % len(live)] if live else []  # rotate: no row always goes first
            for c in order:
                try:
                    t = c.step()
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    rows[c.key].error = short_error(e)
                    live.remove(c)
                    c.close()
                    continue
                if i >= warmup:
                    times[c.key].append(t)
        for c in live:
            rows[c.key].ms = median_ms(times[c.key])
            rows[c.key].extra["samples_ms"] = [round(t * 1e3, 3) for t in times[c.key]]
            c.close()
        live.clear()
        gc.collect()
    return rows


def short_error(e: BaseException, limit: int = 90) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def write_json(path: str, payload: dict[str, Any]) -> None:
    def default(o: Any) -> Any:
        if isinstance(o, Row):
            return asdict(o)
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        return str(o)

    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=default)


def convention_args(exe: Any, opt: Any, by_name: dict[str, Any], grad_by_name: dict[str, Any],
                    lr_array: Any) -> list[Any]:
    """The optimizer's arrays in a compiled step's calling-convention order, as `apply_gradients` assembles them."""
    from shardopt.core.contract import COUNTER, GRADIENT, GRADIENT_BUFFER, HYPERPARAMETER, SLOT, VARIABLE

    out: list[Any] = []
    for spec in exe.contract.args:
        if spec.role in (VARIABLE, SLOT, GRADIENT_BUFFER):
            out.append(opt.state_holder(spec.name).value)  # a variable, a slot, or a packed buffer
        elif spec.role == GRADIENT:
            out.append(grad_by_name[spec.owner])
        elif spec.role == COUNTER:
            out.append(opt.iterations.value)
        elif spec.role == HYPERPARAMETER:
            out.append(lr_array)
        else:
            raise NotImplementedError(f"argument role {spec.role}")
    return out


def write_back(exe: Any, opt: Any, outs: list[Any]) -> None:
    """A direct call's results into the optimizer, as `apply_gradients` stores them (its donated arrays are gone)."""
    from shardopt.core.contract import COUNTER, GRADIENT_BUFFER, SLOT, VARIABLE

    for spec, value in zip(exe.contract.results, outs, strict=True):
        if spec.role in (VARIABLE, SLOT, GRADIENT_BUFFER):
            opt.state_holder(spec.name)._set(value)  # a variable, a slot, or a packed buffer
        elif spec.role == COUNTER:
            opt.iterations._set(value)


def flat_adam(p: jax.Array, m: jax.Array, v: jax.Array, t: jax.Array, g: jax.Array, lr: float,
              b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7) -> tuple[jax.Array, ...]:
    """Keras-form Adam over flat buffers: the hand-written fused step the benchmarks compare against."""
    t = t + 1
    tf = t.astype(jnp.float32)
    alpha = lr * jnp.sqrt(1 - b2 ** tf) / (1 - b1 ** tf)
    m = m + (g - m) * (1 - b1)
    v = v + (g * g - v) * (1 - b2)
    return p - (m * alpha) / (jnp.sqrt(v) + eps), m, v, t
