"""What a compiled step is made of: `shardopt inspect` and `step.inspect()`.

The report has the pass pipeline with each pass's statistics, a per-variable table (shape, dtype, layout, slot
layouts, bytes per device), XLA's memory and cost analyses of the compiled executable, and the collectives in the
partitioned HLO. Any stage's IR can be printed, or two stages diffed. Stage names:

* ``frontend``: the StableHLO the frontend lowered (jax's trace, annotated with names, roles and shardings);
* ``<pass name>``: the StableHLO after that pass of the pipeline (``inline-calls``, ``propagate-layouts``, ...);
* ``optimized-hlo``: the pipeline's final module as XLA receives it (HLO text, global shapes, shardings as
  annotations) — before XLA's own optimizations and SPMD partitioning;
* ``partitioned-hlo``: XLA's compiled module: optimized, SPMD-partitioned into one device's program (per-device
  shapes, collectives, fusions). The memory/cost analyses and the collective count come from this one.

The first two come from the compiler (or from the artifact's saved IR); the HLO stages and the analyses compile
the step on the current mesh (the same compilation the first call does).
"""

from __future__ import annotations

import difflib
import math
import os
import sys
from functools import cached_property
from typing import IO, Any

from shardopt import ir as sir
from shardopt.core.records import Stage
from shardopt.runtime.artifact import state_bytes_per_device, step_stages, variables_table, versions
from shardopt.runtime.container import atomic_write
from shardopt.runtime.report_format import (
    COLLECTIVE_RE,
    COLLECTIVES,
    COST_FIELDS,
    FRONTEND,
    MEMORY_FIELDS,
    OPTIMIZED_HLO,
    PARTITIONED_HLO,
    Collective,
    fmt_bytes,
    fmt_layout,
    fmt_slot_layouts,
    fmt_stats,
    fmt_value,
    text_table,
)
from shardopt.runtime.report_html import render


def op_count(module_text: str) -> int | None:
    """Operations in a StableHLO module's text (None when it does not parse here)."""
    if not module_text:
        return None
    try:
        ctx = sir.make_ir_context()
        return sum(sir.op_counts(sir.parse(module_text, ctx)).values())
    except Exception:  # an IR this jaxlib cannot parse is still worth showing as text
        return None


class Report:
    """Everything `inspect` shows about one step; the analyses compile the step on first use."""

    def __init__(self, step: Any):  # a runtime.functional.FunctionalStep
        self.step = step
        self.stages: dict[str, Stage] = {}
        for st in step_stages(step):
            key, n = st.name, 2
            while key in self.stages:
                key, n = f"{st.name}#{n}", n + 1
            self.stages[key] = st

    # ----- stages ---------------------------------------------------------------------------------------------
    @cached_property
    def lowered(self) -> Any:
        return self.step.executable.lower()

    @cached_property
    def compiled(self) -> Any:
        return self.lowered.compile()

    def stage_names(self) -> list[str]:
        return [*self.stages, OPTIMIZED_HLO, PARTITIONED_HLO]

    def stage_text(self, name: str) -> str:
        """The IR of stage `name` (see the module docstring for what each name means)."""
        if name == OPTIMIZED_HLO:
            return self.lowered.as_text(dialect="hlo")
        if name == PARTITIONED_HLO:
            return self.compiled.as_text()
        if name not in self.stages:
            raise ValueError(f"no stage {name!r}; stages: {', '.join(self.stage_names())}")
        text = self.stages[name].text
        if not text:
            raise ValueError(f"stage {name!r}'s IR was not saved in the artifact (saved with stages=False)")
        return text

    def diff(self, a: str, b: str, context: int = 3) -> str:
        """A unified diff from stage `a`'s IR to stage `b`'s."""
        lines = list(difflib.unified_diff(self.stage_text(a).splitlines(), self.stage_text(b).splitlines(),
                                          fromfile=a, tofile=b, lineterm="", n=context))
        return "\n".join(lines) if lines else f"(stages {a} and {b} are identical)"

    # ----- tables ---------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, str]:
        step, conv = self.step, self.step.contract
        devs = self.step.mesh.devices
        n_params = sum(math.prod(a["shape"]) for a in self.variables())
        cfg = {k: v for k, v in step.optimizer_config.items() if v is not None and k not in ("name",)}
        built = step.artifact.manifest["versions"] if step.artifact is not None else versions()
        now = versions()
        out = {
            "optimizer": f"{step.optimizer_class or step.optimizer_config.get('name', '?')}  "
                         + " ".join(f"{k}={fmt_value(v)}" for k, v in cfg.items()),
            "variables": f"{len(step.names)} ({n_params:,} parameters); slots: {', '.join(step.slot_names) or '-'}",
            "mesh": ", ".join(f"{n}={s}" for n, s in conv.mesh_axes)
                    + f"  ({devs.size} {devs.flat[0].platform} devices)",
            "pipeline": " -> ".join(step.pipeline) or "(none)",
            "state": f"{fmt_bytes(state_bytes_per_device(conv))} per device in {len(conv.state)} buffers"
                     + (f" ({len(conv.packs)} packs: "
                        + ", ".join(f"{p.name} {len(p.members)} variables" for p in conv.packs) + ")"
                        if conv.packs else "")
                     + _sharded_state(conv),
            "built with": " · ".join(f"{k} {built.get(k, '?')}" for k in ("shardopt", "jax", "jaxlib", "stablehlo"))
                          + f" (portable target {built.get('stablehlo_target', '?')})",
        }
        if any(built.get(k) != now.get(k) for k in ("shardopt", "jax", "jaxlib")):
            out["running with"] = " · ".join(f"{k} {now[k]}" for k in ("shardopt", "jax", "jaxlib", "stablehlo"))
        if step.artifact is not None:
            out["artifact"] = f"{step.artifact.path}  ({step.artifact.size:,} bytes)"
        return out

    def pipeline_rows(self) -> list[dict[str, Any]]:
        """Per stage: name, op count, pass time (s) and the pass's statistics."""
        return [{"name": key, "ops": op_count(st.text), "seconds": st.seconds, "stats": dict(st.stats)}
                for key, st in self.stages.items()]

    def variables(self) -> list[dict[str, Any]]:
        return variables_table(self.step.contract)

    def memory(self) -> dict[str, int]:
        """XLA's memory analysis of the compiled step (bytes, per device)."""
        stats = self.compiled.memory_analysis()
        if stats is None:
            return {}
        return {f: int(getattr(stats, f"{f}_size_in_bytes", 0) or 0) for f in MEMORY_FIELDS}

    def cost(self) -> dict[str, float]:
        """XLA's cost analysis of the compiled step (per device)."""
        cost = self.compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else {}
        return {f: float(cost[f]) for f in COST_FIELDS if cost and f in cost}

    def collectives(self) -> list[Collective]:
        out = []
        for line in self.stage_text(PARTITIONED_HLO).splitlines():
            m = COLLECTIVE_RE.search(line)
            if m:
                out.append(Collective(m.group(2), m.group(1), line.strip()))
        return out

    def collective_counts(self) -> dict[str, int]:
        found = self.collectives()
        return {k: sum(c.kind == k for c in found) for k in COLLECTIVES}

    # ----- output ---------------------------------------------------------------------------------------------
    def to_text(self) -> str:
        parts = ["shardopt step"]
        summ = self.summary()
        width = max(len(k) for k in summ)
        parts += [f"  {k.ljust(width)}  {v}" for k, v in summ.items()]

        rows = [[r["name"], "-" if r["ops"] is None else str(r["ops"]),
                 "-" if r["name"] == FRONTEND else f"{r['seconds'] * 1e3:.2f} ms", fmt_stats(r["stats"])]
                for r in self.pipeline_rows()]
        parts += ["", "Pass pipeline", _indent(text_table(["stage", "ops", "time", "statistics"], rows, (1, 2)))]

        var_rows, tot_v, tot_s = [], 0, 0
        for v in self.variables():
            tot_v += v["bytes_per_device"]
            tot_s += v["slot_bytes_per_device"]
            var_rows.append([v["name"], "x".join(map(str, v["shape"])) or "scalar", v["dtype"], fmt_layout(v["layout"]),
                             fmt_slot_layouts(v["slots"]), fmt_bytes(v["bytes_per_device"]),
                             fmt_bytes(v["slot_bytes_per_device"])])
        var_rows.append(["total", "", "", "", "", fmt_bytes(tot_v), fmt_bytes(tot_s)])
        parts += ["", "Variables (bytes per device)", _indent(text_table(
            ["name", "shape", "dtype", "layout", "slot layouts", "variable", "slots"], var_rows, (5, 6)))]

        mem = self.memory()
        parts += ["", "Memory analysis (compiled, per device)"]
        parts += [f"  {k.ljust(14)} {fmt_bytes(v).rjust(10)}  ({v:,} bytes)" for k, v in mem.items()] or ["  n/a"]
        parts += ["", "Cost analysis (compiled, per device)"]
        parts += [f"  {k.ljust(16)} {v:,.0f}" for k, v in self.cost().items()] or ["  n/a"]

        found = self.collectives()
        counts = self.collective_counts()
        parts += ["", f"Collectives in the partitioned HLO: {len(found)}"]
        parts += ["  " + ", ".join(f"{k} {n}" for k, n in counts.items())]
        parts += [f"    {_clip(c.line, 160)}" for c in found[:20]]
        if len(found) > 20:
            parts.append(f"    ... and {len(found) - 20} more (see --stage {PARTITIONED_HLO})")

        parts += ["", "Stages: " + ", ".join(self.stage_names()),
                  "  (--stage NAME prints one stage's IR, --diff A B compares two, --html FILE writes a page)"]
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.to_text()

    def to_html(self) -> str:
        return render(self)

    def write_html(self, path: str | os.PathLike[str]) -> None:
        atomic_write(path, [self.to_html().encode("utf-8")])


def _sharded_state(contract: Any) -> str:
    """`; slots of N variables sharded over AXES as well` when the step shards state beyond the variables'
    layouts (`shard_state_over`), else ''."""
    axes: set[str] = set()
    count = 0
    for var in contract.args_with_role("variable"):
        if not var.shard_state_over or contract.member_of().get(var.name) is not None:
            continue
        spec, _ = contract.slot_arg(var.name, contract.slot_names()[0]) if contract.slot_names() else (None, None)
        if spec is not None and spec.layout != var.layout:
            count += 1
            axes.update(var.shard_state_over)
    return f"; slots of {count} variables sharded over {'x'.join(sorted(axes))} as well" if count else ""


def _indent(text: str, by: str = "  ") -> str:
    return "\n".join(by + line for line in text.splitlines())


def _clip(line: str, n: int) -> str:
    return line if len(line) <= n else line[: n - 3] + "..."


def inspect(step: Any, stage: str | None = None, diff: tuple[str, str] | None = None,
            html: str | os.PathLike[str] | None = None, file: IO[str] | None = None) -> Report:
    """Prints the report (or `stage`'s IR, or the diff of two stages) and writes `html` if given."""
    out = file or sys.stdout
    report = Report(step)
    if stage is not None:
        print(report.stage_text(stage), file=out)
    if diff is not None:
        print(report.diff(*diff), file=out)
    if html is not None:
        report.write_html(html)
        print(f"wrote {os.fspath(html)}", file=out)
    if stage is None and diff is None and html is None:
        print(report.to_text(), file=out)
    return report


__all__ = ["COLLECTIVES", "FRONTEND", "OPTIMIZED_HLO", "PARTITIONED_HLO", "Report", "fmt_layout", "inspect"]
