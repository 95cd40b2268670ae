"""Issue 2: what `apply_gradients` costs on top of the compiled step, for GPT-2 small (148 tensors) on the 8-device
CPU mesh (2x4 'batch', 'model', Megatron layouts from model_zoo).

    /work/venv/bin/python benchmarks/bench_dispatch.py [--steps 30] [--profile-steps 20] [--always-profile]
        [--set gpt2-mesh|small|gpt2|big] [--json out.json]

The three ways of running the same compiled step are timed *interleaved* (one of each per round, every call
blocking until its results are ready), so a busy machine slows them alike:
  apply_gradients     the user-facing call: validates gradients, assembles args, validates and runs, writes back
  executable(args)    the validated call of the compiled step (`CompiledStep.__call__`) on assembled args
  call_unchecked      the compiled executable alone (`CompiledStep.call_unchecked`)
Target: apply_gradients / call_unchecked <= 1.10. The Python overhead is also measured without the step's math:
the time until each call *returns* (dispatch is asynchronous), after the previous step finished. When the
target is missed, cProfile shows where apply_gradients spends its time.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse
import cProfile
import pstats
import statistics
import time
from typing import Any

import jax
import numpy as np
from _common import (
    convention_args,
    environment,
    load_average,
    make_arrays,
    param_set,
    print_table,
    write_back,
    write_json,
)

import shardopt

LR = 1e-3
TARGET = 1.10


class Case:
    def __init__(self, key: str = "gpt2-mesh") -> None:
        self.ps = ps = param_set(key)
        self.opt = shardopt.Adam(learning_rate=LR, mesh=ps.mesh)
        params = make_arrays(ps, "param")
        self.vars = [shardopt.Variable(p, name=n, layout=sh)
                     for p, n, sh in zip(params, ps.names, ps.shardings(), strict=True)]
        del params
        self.grads = make_arrays(ps, "grad", seed=1)
        self.by_name = dict(zip(ps.names, self.vars, strict=True))
        self.grad_by_name = dict(zip(ps.names, self.grads, strict=True))
        t0 = time.perf_counter()
        self.apply()
        self.compile_s = time.perf_counter() - t0
        self.exe = self.opt.program_for(zip(self.grads, self.vars, strict=True)).executable
        self.lr = None

    def apply(self, wait: bool = True) -> None:
        self.opt.apply_gradients(zip(self.grads, self.vars, strict=True))
        if wait:
            jax.block_until_ready(self.opt.iterations.value)

    def args(self) -> list[Any]:
        """The flat arguments, assembled as apply_gradients does (convention order)."""
        if self.lr is None:
            self.lr = jax.device_put(np.float32(LR), self.exe.in_shardings[-1])
        return convention_args(self.exe, self.opt, self.by_name, self.grad_by_name, self.lr)

    def write_back(self, outs: list[Any]) -> None:
        """A direct call's results back into the optimizer (what apply_gradients does itself)."""
        write_back(self.exe, self.opt, outs)


def run(case: Case, steps: int, warmup: int = 3) -> dict[str, dict[str, list[float]]]:
    """Interleaved rounds; per way: 'step' (call + block) and 'return' (until the call returns) seconds."""
    ways = ("apply_gradients", "executable(args)", "call_unchecked")
    res: dict[str, dict[str, list[float]]] = {w: {"step": [], "return": []} for w in ways}
    for i in range(warmup + steps):
        for way in ways:
            jax.block_until_ready(case.opt.iterations.value)
            if way == "apply_gradients":
                t0 = time.perf_counter()
                case.apply(wait=False)
                t1 = time.perf_counter()
                jax.block_until_ready(case.opt.iterations.value)
                t2 = time.perf_counter()
            else:
                args = case.args()
                call = case.exe if way == "executable(args)" else case.exe.call_unchecked
                t0 = time.perf_counter()
                outs = call(args)
                t1 = time.perf_counter()
                jax.block_until_ready(outs[-1])
                t2 = time.perf_counter()
                case.write_back(outs)
            if i >= warmup:
                res[way]["step"].append(t2 - t0)
                res[way]["return"].append(t1 - t0)
    return res


def python_overhead(case: Case, reps: int) -> dict[str, float]:
    """apply_gradients with the compiled call replaced by a stub that validates the args (as `CompiledStep.__call__`
    does) and hands back the inputs as results: the Python work of one step with no XLA execution. Also times
    `validate` alone and the jitted call's own dispatch."""
    program = case.opt.program_for(zip(case.grads, case.vars, strict=True))  # the cached program apply_gradients runs
    real = program.executable
    conv = real.convention
    back = [conv.arg_index(r.name) for r in conv.results]

    class Stub:
        def __call__(self, args: list[Any]) -> list[Any]:
            args = real.validate(args)
            return [args[i] for i in back]

    def med(fn: Any) -> float:
        for _ in range(3):
            fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    jax.block_until_ready(case.opt.iterations.value)
    args = case.args()
    program.executable = Stub()
    try:
        stubbed = med(lambda: case.apply(wait=False))
    finally:
        program.executable = real
    validate = med(lambda: real.validate(args))
    assemble = med(case.args)
    return {"apply_gradients_stubbed": stubbed, "validate": validate, "rest": stubbed - validate,
            "args_assembly_in_benchmark": assemble}


def profile(case: Case, steps: int, top: int = 15) -> list[list[str]]:
    """cProfile of `steps` apply_gradients calls (not blocking): the functions with the most own time."""
    prof = cProfile.Profile()
    for _ in range(steps):
        jax.block_until_ready(case.opt.iterations.value)
        prof.enable()
        case.apply(wait=False)
        prof.disable()
    jax.block_until_ready(case.opt.iterations.value)
    stats = pstats.Stats(prof)
    rows = []
    entries = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # tottime
    for (file, line, name), (_, nc, tt, ct, _) in entries[:top]:
        where = f"{os.path.basename(file)}:{line}" if line else file
        rows.append([f"{name} ({where})", f"{nc / steps:.0f}", f"{tt / steps * 1e6:.0f}", f"{ct / steps * 1e6:.0f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="gpt2-mesh", help="parameter set (as bench_step.py): gpt2-mesh (the issue's), "
                    "small, gpt2 or big")
    ap.add_argument("--steps", type=int, default=30, help="interleaved timed rounds (after 3 warmup rounds)")
    ap.add_argument("--profile-steps", type=int, default=20, help="apply_gradients calls under cProfile")
    ap.add_argument("--always-profile", action="store_true", help="profile even when the target is met")
    ap.add_argument("--overhead-reps", type=int, default=50, help="stubbed apply_gradients calls")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    env = environment()
    print("environment:", env)
    case = Case(args.set)
    print(f"{case.ps.title}: {case.ps.count} tensors, {case.ps.elements / 1e6:.1f}M params, "
          f"{len(case.exe.convention.args)} step arguments, {len(case.exe.convention.results)} results; "
          f"first apply_gradients (compile) {case.compile_s:.1f} s")
    program = case.opt.program_for(zip(case.grads, case.vars, strict=True))
    stages = ", ".join(f"{st.name} {st.seconds:.1f}s" for st in program.pipeline.stages if st.name != "frontend")
    print(f"  of which shardopt passes: {stages}")
    res = run(case, args.steps)
    med = {w: {k: statistics.median(v) for k, v in d.items()} for w, d in res.items()}
    base = med["call_unchecked"]
    table = []
    for w, m in med.items():
        table.append([w, f"{m['step'] * 1e3:.2f}", f"{m['step'] / base['step']:.3f}", f"{m['return'] * 1e3:.2f}"])
    print(f"\n### dispatch: {case.ps.title}; {args.steps} interleaved rounds, load avg {load_average()}\n")
    print_table(["call", "median step ms", "x call_unchecked", "median ms until the call returns"], table)
    r = med["apply_gradients"]["step"] / base["step"]
    paired = statistics.median(a - b for a, b in zip(res["apply_gradients"]["step"], res["call_unchecked"]["step"],
                                                     strict=True))
    verdict = "MET" if r <= TARGET else "NOT MET"
    print(f"\napply_gradients / call_unchecked = {r:.3f} measured directly (target <= {TARGET:.2f}: {verdict})")
    diff = med["apply_gradients"]["step"] - base["step"]
    print(f"difference of the step medians {diff * 1e6:+.0f} µs; median of the paired (same round) differences "
          f"{paired * 1e6:+.0f} µs")
    ov = python_overhead(case, args.overhead_reps)
    implied = (base["step"] + ov["apply_gradients_stubbed"]) / base["step"]
    print(f"\nPython work of one apply_gradients, XLA call stubbed out (median of {args.overhead_reps}):\n")
    print_table(["part", "µs per step", "% of a call_unchecked step"], [
        [name, f"{ov[key] * 1e6:.0f}", f"{ov[key] / base['step'] * 100:.1f}"]
        for name, key in (("apply_gradients, call stubbed (total Python overhead)", "apply_gradients_stubbed"),
                          ("  CompiledStep.validate", "validate"),
                          ("  gradient checks, program lookup, arg assembly, write-back", "rest"))])
    verdict2 = "MET" if implied <= TARGET else "NOT MET"
    print(f"\nimplied ratio (call_unchecked step + Python overhead) / call_unchecked step = {implied:.3f} "
          f"(target <= {TARGET:.2f}: {verdict2})")
    prof_rows = None
    if r > TARGET or implied > TARGET or args.always_profile:
        prof_rows = profile(case, args.profile_steps)
        print(f"\ncProfile of apply_gradients ({args.profile_steps} calls, not blocking), top functions by own time"
              " (per call; profiling inflates the times):\n")
        print_table(["function", "calls/step", "own µs/step", "cumulative µs/step"], prof_rows)
    if args.json:
        write_json(args.json, {"environment": env, "medians_s": med, "ratio": r, "overhead_paired_s": paired,
                               "python_overhead_s": ov, "implied_ratio": implied, "profile": prof_rows,
                               "samples_s": res})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
