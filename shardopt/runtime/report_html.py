"""`shardopt inspect --html`: the inspect report as one self-contained HTML page (inline CSS, no scripts, no
external resources), for people who would rather look than read.

Sections (each a `<section id=...>`, tables with ids for tests and scrapers): `summary`, `pipeline` (each
stage's ops and time with a labelled bar of its share of the pass time, then one table per pass, `stats-<pass>`,
of its statistics in words), `variables`, `memory`, `cost`, `collectives`, `stages` (every stage's IR in a
collapsible block with id `stage-<name>`) and `diffs` (what each pass changed, coloured). Every table has one
header row of named columns, except the summary, whose rows are headed by their names.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from html import escape
from typing import Any

from shardopt.core.statistics import describe
from shardopt.runtime.report_format import COLLECTIVES, PARTITIONED_HLO, fmt_bytes, fmt_layout, fmt_slot_layouts

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
caption { text-align: left; font-weight: 600; padding: .2em 0; }
table.stats { display: inline-table; margin-right: 1.5em; }
tr.total td { font-weight: bold; background: #fafafa; }
pre { background: #f8f8f8; border: 1px solid #e4e4e4; padding: .6em; overflow: auto; max-height: 40em;
      font: 12px/1.35 ui-monospace, monospace; }
details { margin: .4em 0; } summary { cursor: pointer; font-weight: 600; }
.add { background: #e6ffec; display: block; } .del { background: #ffebe9; display: block; }
.hunk { color: #6f42c1; display: block; } .muted { color: #777; }
.bar { background: #4a90d9; height: .8em; display: inline-block; vertical-align: middle; margin-right: .4em; }
td.share { white-space: nowrap; min-width: 260px; }
"""


def _table(table_id: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], num: Sequence[int] = (),
           total: bool = False) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        tr = ' class="total"' if total and i == len(rows) - 1 else ""
        cells = "".join(f'<td class="num">{escape(str(c))}</td>' if j in num else f"<td>{escape(str(c))}</td>"
                        for j, c in enumerate(row))
        body.append(f"<tr{tr}>{cells}</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _row_table(table_id: str, rows: Sequence[tuple[str, Any]]) -> str:
    """A two-column table whose rows are headed by their names (no header row of empty cells)."""
    body = "".join(f'<tr><th scope="row">{escape(k)}</th><td>{escape(str(v))}</td></tr>' for k, v in rows)
    return f'<table id="{table_id}"><tbody>{body}</tbody></table>'


def _ms(seconds: float) -> str:
    """A time that never wraps: the number and its unit joined by a no-break space."""
    return f"{seconds * 1e3:.2f}\u00a0ms"


def _pipeline(rows: list[dict[str, Any]]) -> str:
    """Stages with ops, time and a labelled bar of each pass's share of the pass time; then a statistics table
    per pass, in words (the pass's own key beside each, for scripts and searches)."""
    passes = rows[1:]
    total = sum(r["seconds"] for r in passes) or 1.0
    slowest = max((r["seconds"] for r in passes), default=0.0) or 1.0
    body = []
    for i, r in enumerate(rows):
        ops = "-" if r["ops"] is None else str(r["ops"])
        if i == 0:  # the frontend is lowered, not a pass: no pass time
            time, share = "-", '<td class="share muted">lowered by jax (not a pass)</td>'
        else:
            label = f"{r['name']}: {r['seconds'] * 1e3:.2f} ms, {100 * r['seconds'] / total:.0f}% of the pass time"
            time = _ms(r["seconds"])
            share = (f'<td class="share"><span class="bar" role="img" aria-label="{escape(label)}" '
                     f'title="{escape(label)}" style="width:{200 * r["seconds"] / slowest:.0f}px"></span>'
                     f'{100 * r["seconds"] / total:.0f}%</td>')
        body.append(f'<tr><td>{escape(r["name"])}</td><td class="num">{ops}</td><td class="num">{time}</td>'
                    f"{share}</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("stage", "ops", "time", "share of pass time"))
    out = [f'<table id="pipeline-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>',
           "<h3>Statistics</h3>"]
    for r in passes:
        stats = describe(r["name"], r["stats"])
        if not stats:
            out.append(f'<p class="muted" id="stats-{escape(r["name"])}">{escape(r["name"])}: no statistics</p>')
            continue
        body = "".join(f'<tr><td>{escape(words)}</td><td{_NUM if _numeric(value) else ""}>{escape(value)}</td>'
                       f'<td class="muted">{escape(key)}</td></tr>' for words, value, key in stats)
        out.append(f'<table id="stats-{escape(r["name"])}" class="stats"><caption>{escape(r["name"])}</caption>'
                   f"<thead><tr><th>what</th><th>value</th><th>key</th></tr></thead><tbody>{body}</tbody></table>")
    return "".join(out)


_NUM = ' class="num"'


def _numeric(text: str) -> bool:
    """A count or an 'a -> b' pair: right-aligned; anything else (reasons, breakdowns) reads as text."""
    return all(part.strip().isdigit() for part in text.split("->"))


def _diff_html(a_name: str, a: str, b_name: str, b: str) -> str:
    lines = list(difflib.unified_diff(a.splitlines(), b.splitlines(), fromfile=a_name, tofile=b_name,
                                      lineterm="", n=2))
    if not lines:
        return '<p class="muted">no change</p>'
    out = []
    for line in lines:
        cls = ("add" if line.startswith("+") else "del" if line.startswith("-")
               else "hunk" if line.startswith("@@") else "")
        out.append(f'<span class="{cls}">{escape(line)}</span>' if cls else escape(line) + "\n")
    return "<pre>" + "".join(out) + "</pre>"


def render(report: Any) -> str:
    """The whole page of an `inspect.Report`, as a string."""

    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>shardopt inspect</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>shardopt step report</h1>"]

    summ = report.summary()
    parts.append('<section id="summary"><h2>Summary</h2>' + _row_table("summary-table", list(summ.items()))
                 + "</section>")
    parts.append('<section id="pipeline"><h2>Pass pipeline</h2>' + _pipeline(report.pipeline_rows()) + "</section>")

    vrows, tv, ts = [], 0, 0
    for v in report.variables():
        tv += v["bytes_per_device"]
        ts += v["slot_bytes_per_device"]
        vrows.append([v["name"], "x".join(map(str, v["shape"])) or "scalar", v["dtype"], fmt_layout(v["layout"]),
                      fmt_slot_layouts(v["slots"]), fmt_bytes(v["bytes_per_device"]),
                      fmt_bytes(v["slot_bytes_per_device"])])
    vrows.append(["total", "", "", "", "", fmt_bytes(tv), fmt_bytes(ts)])
    parts.append('<section id="variables"><h2>Variables (bytes per device)</h2>'
                 + _table("variables-table", ["name", "shape", "dtype", "layout", "slot layouts", "variable",
                                              "slots"], vrows, num=(5, 6), total=True) + "</section>")

    mem = report.memory()
    parts.append('<section id="memory"><h2>Memory analysis (compiled, per device)</h2>'
                 + _table("memory-table", ["kind", "size", "bytes"],
                          [[k, fmt_bytes(v), f"{v:,}"] for k, v in mem.items()], num=(1, 2)) + "</section>")
    parts.append('<section id="cost"><h2>Cost analysis (compiled, per device)</h2>'
                 + _table("cost-table", ["metric", "value"], [[k, f"{v:,.0f}"] for k, v in report.cost().items()],
                          num=(1,)) + "</section>")

    found = report.collectives()
    counts = report.collective_counts()
    parts.append('<section id="collectives"><h2>Collectives in the partitioned HLO</h2>'
                 + _table("collectives-table", ["collective", "count"], [[k, counts[k]] for k in COLLECTIVES],
                          num=(1,))
                 + ("<pre>" + "\n".join(escape(c.line) for c in found) + "</pre>" if found
                    else '<p class="muted">none: every device works on its own shards</p>') + "</section>")

    parts.append('<section id="stages"><h2>Stages</h2>')
    texts: dict[str, str] = {}
    for name in report.stage_names():
        try:
            texts[name] = report.stage_text(name)
        except ValueError as e:
            texts[name] = ""
            parts.append(f'<p class="muted" id="stage-{escape(name)}">{escape(str(e))}</p>')
            continue
        open_attr = " open" if name == PARTITIONED_HLO and len(texts[name]) < 20000 else ""
        n_lines = texts[name].count("\n") + 1
        parts.append(f'<details id="stage-{escape(name)}"{open_attr}><summary>{escape(name)} '
                     f'<span class="muted">({n_lines} lines)</span></summary><pre>{escape(texts[name])}</pre>'
                     "</details>")
    parts.append("</section>")

    parts.append('<section id="diffs"><h2>What each pass changed</h2>')
    names = list(report.stages)
    for a, b in zip(names, names[1:], strict=False):
        if texts.get(a) and texts.get(b):
            parts.append(f'<details id="diff-{escape(b)}"><summary>{escape(a)} &rarr; {escape(b)}</summary>'
                         f"{_diff_html(a, texts[a], b, texts[b])}</details>")
    parts.append("</section></body></html>")
    return "\n".join(parts)


__all__ = ["render"]
