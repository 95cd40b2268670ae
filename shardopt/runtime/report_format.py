"""Names and plain-text formatting shared by the inspect report and its HTML page (neither imports the other's
page logic)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

FRONTEND = "frontend"
OPTIMIZED_HLO = "optimized-hlo"
PARTITIONED_HLO = "partitioned-hlo"
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
COLLECTIVE_RE = re.compile(r"=\s*(.+?)\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
MEMORY_FIELDS = ("argument", "output", "alias", "temp", "generated_code")
COST_FIELDS = ("flops", "transcendentals", "bytes accessed")


@dataclass(frozen=True)
class Collective:
    """One collective instruction of the partitioned HLO."""

    kind: str
    result: str
    line: str


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_layout(layout: Any) -> str:
    """A layout from the convention's JSON: None -> 'open', [None, 'model'] -> '[-, model]'."""
    if layout is None:
        return "open"
    if not any(layout):
        return "replicated"
    return "[" + ", ".join("-" if a is None else a if isinstance(a, str) else "(" + ",".join(a) + ")"
                           for a in layout) + "]"


def fmt_slot_layouts(slots: dict[str, Any]) -> str:
    """Slots grouped by layout: 'm,v,average=[-, model]'."""
    groups: dict[str, list[str]] = {}
    for name, lay in slots.items():
        groups.setdefault(fmt_layout(lay), []).append(name)
    return "; ".join(f"{','.join(names)}={lay}" for lay, names in groups.items()) or "-"


def fmt_value(value: Any) -> str:
    """A config value, short: floats to 7 significant digits, a serialized schedule as Name(k=v, ...)."""
    if isinstance(value, float):
        text = f"{value:.7g}"
        return text if any(c in text for c in ".einf") else text + ".0"
    if isinstance(value, dict) and "class_name" in value and isinstance(value.get("config"), dict):
        args = ", ".join(f"{k}={fmt_value(v)}" for k, v in value["config"].items() if k != "name" and v is not None)
        return f"{value['class_name']}({args})"
    return str(value)


def fmt_stats(stats: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in stats.items())


def text_table(headers: list[str], rows: list[list[str]], right: tuple[int, ...] = ()) -> str:
    """Rows aligned in columns (`right` = indices of right-aligned columns)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])
