"""`step.inspect()` / `Report`: pass statistics, the variable table, memory and cost analyses, collectives, every
stage's IR, diffs, and the self-contained HTML page (checked by parsing it)."""

import io
from html.parser import HTMLParser

import pytest

import shardopt
from shardopt.runtime.inspect import COLLECTIVES, OPTIMIZED_HLO, PARTITIONED_HLO, Report, fmt_layout


@pytest.fixture(scope="module")
def step(mesh):
    """Global-norm clipping over sharded variables gathers their partial sums (fixed-order-sums): something for the
    collectives table."""
    lay = shardopt.Layout
    specs = {"dense": {"kernel": shardopt.VariableSpec((16, 8), "float32", lay(["model", shardopt.UNSHARDED], mesh)),
                       "bias": shardopt.VariableSpec((8,), "float32")},
             "emb": shardopt.VariableSpec((32, 8), "float32", lay(["batch", "model"], mesh))}
    return shardopt.Adam(1e-3, global_clipnorm=1.0, mesh=mesh).compile(specs)


@pytest.fixture(scope="module")
def report(step):
    return Report(step)


def test_text_report_has_every_section(step, report):
    out = io.StringIO()
    returned = step.inspect(file=out)
    text = out.getvalue()
    assert isinstance(returned, Report)
    for heading in ("Pass pipeline", "Variables (bytes per device)", "Memory analysis", "Cost analysis",
                    "Collectives in the partitioned HLO", "Stages: frontend"):
        assert heading in text
    for name in step.pipeline:
        assert f"\n  {name} " in text
    assert "emb           32x8   float32  [batch, model]  m,v=[batch, model]" in text
    assert "mesh        batch=2, model=4  (8 cpu devices)" in text
    assert "global_clipnorm=1.0" in text


def test_pipeline_rows_carry_each_pass_statistics(step, report):
    rows = report.pipeline_rows()
    assert [r["name"] for r in rows] == ["frontend", *step.pipeline]
    assert rows == [{"name": s.name, "ops": rows[i]["ops"], "seconds": s.seconds, "stats": s.stats}
                    for i, s in enumerate(step.program.pipeline.stages)]
    assert all(isinstance(r["ops"], int) and r["ops"] > 0 for r in rows)
    cleanup = rows[[r["name"] for r in rows].index("cleanup")]
    assert cleanup["stats"]["ops_after"] <= cleanup["stats"]["ops_before"]


def test_variables_memory_cost_and_collectives(report):
    var = {v["name"]: v for v in report.variables()}
    assert var["emb"]["bytes_per_device"] == (32 // 2) * (8 // 4) * 4
    assert var["emb"]["slot_bytes_per_device"] == 2 * var["emb"]["bytes_per_device"]
    assert var["dense/bias"]["slots"] == {"m": [None], "v": [None]}
    mem = report.memory()
    assert set(mem) >= {"argument", "output", "alias", "temp"} and mem["argument"] > 0 and mem["alias"] > 0
    cost = report.cost()
    assert cost["flops"] > 0 and cost["bytes accessed"] > 0
    counts = report.collective_counts()
    assert set(counts) == set(COLLECTIVES) and counts["all-gather"] >= 1 and counts["all-reduce"] == 0
    assert all(c.kind == "all-gather" and "all-gather(" in c.line for c in report.collectives())


def test_every_stage_prints_and_unknown_stages_are_listed(step, report):
    names = report.stage_names()
    assert names == ["frontend", *step.pipeline, OPTIMIZED_HLO, PARTITIONED_HLO]
    for name in names:
        out = io.StringIO()
        step.inspect(stage=name, file=out)
        assert len(out.getvalue()) > 100
    assert "stablehlo." in report.stage_text("frontend") and "sdy.mesh" in report.stage_text("cleanup")
    assert report.stage_text(OPTIMIZED_HLO).startswith("HloModule") and "f32[32,8]" in report.stage_text(OPTIMIZED_HLO)
    partitioned = report.stage_text(PARTITIONED_HLO)
    assert partitioned.startswith("HloModule") and "f32[16,2]" in partitioned  # emb's per-device shard
    with pytest.raises(ValueError, match="no stage 'nope'; stages: frontend, .*partitioned-hlo"):
        report.stage_text("nope")


def test_diff_between_stages(step, report):
    out = io.StringIO()
    step.inspect(diff=("frontend", "cleanup"), file=out)
    diff = out.getvalue()
    assert diff.startswith("--- frontend\n+++ cleanup\n@@")
    assert any(line.startswith("-") and not line.startswith("---") for line in diff.splitlines())
    assert report.diff("cleanup", "cleanup") == "(stages cleanup and cleanup are identical)"
    assert report.diff(OPTIMIZED_HLO, PARTITIONED_HLO).startswith("--- optimized-hlo")


class PageParser(HTMLParser):
    """Collects section ids, rows per table id (and each header row's cells, captions, bar labels), stage blocks
    and any external reference."""

    def __init__(self):
        super().__init__()
        self.sections, self.details, self.external = [], [], []
        self.rows: dict[str, list[list[str]]] = {}
        self.header_rows: dict[str, list[list[str]]] = {}  # table id -> rows inside <thead>
        self.row_headers: dict[str, list[str]] = {}  # table id -> <th scope="row"> texts
        self.captions: dict[str, str] = {}
        self.bars: list[dict[str, str]] = []  # attributes of each span.bar, with the text of the cell around it
        self._table = self._row = self._cell = None
        self._thead = False
        self._caption = None
        self._bar_cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id"))
        elif tag == "details":
            self.details.append(a.get("id"))
        elif tag == "table":
            self._table = a.get("id")
            self.rows[self._table] = []
            self.header_rows[self._table] = []
        elif tag == "thead":
            self._thead = True
        elif tag == "caption":
            self._caption = ""
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
            if tag == "th" and a.get("scope") == "row":
                self.row_headers.setdefault(self._table, []).append(None)
        elif tag == "span" and "bar" in (a.get("class") or "").split():
            self.bars.append(dict(a))
            self._bar_cell = self.bars[-1]
        for key in ("src", "href"):
            if key in a:
                self.external.append(a[key])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            if self.row_headers.get(self._table) and self.row_headers[self._table][-1] is None:
                self.row_headers[self._table][-1] = self._cell
            self._row.append(self._cell)
            if self._bar_cell is not None:
                self._bar_cell["cell"] = self._cell
                self._bar_cell = None
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows[self._table].append(self._row)
            if self._thead:
                self.header_rows[self._table].append(self._row)
            self._row = None
        elif tag == "thead":
            self._thead = False
        elif tag == "caption":
            self.captions[self._table] = self._caption
            self._caption = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._caption is not None:
            self._caption += data


def test_html_page_is_self_contained_and_complete(step, report, tmp_path):
    path = tmp_path / "report.html"
    out = io.StringIO()
    step.inspect(html=path, file=out)
    assert out.getvalue() == f"wrote {path}\n"
    page = PageParser()
    page.feed(path.read_text(encoding="utf-8"))
    assert page.sections == ["summary", "pipeline", "variables", "memory", "cost", "collectives", "stages", "diffs"]
    assert page.external == []  # one file: no scripts, styles or images from elsewhere
    pipeline = page.rows["pipeline-table"]
    assert pipeline[0] == ["stage", "ops", "time", "share of pass time"]
    assert [r[0] for r in pipeline[1:]] == ["frontend", *step.pipeline]
    variables = page.rows["variables-table"]
    assert [r[0] for r in variables[1:]] == [*step.names, "total"]
    emb = variables[1 + step.names.index("emb")]
    assert emb[1:5] == ["32x8", "float32", fmt_layout(["batch", "model"]), "m,v=[batch, model]"]
    assert {r[0] for r in page.rows["memory-table"][1:]} >= {"argument", "output", "alias", "temp"}
    assert "flops" in [r[0] for r in page.rows["cost-table"]]
    collectives = dict((r[0], r[1]) for r in page.rows["collectives-table"][1:])
    assert set(collectives) == set(COLLECTIVES) and int(collectives["all-gather"]) >= 1
    assert page.details[: len(report.stage_names())] == [f"stage-{n}" for n in report.stage_names()]
    assert [d for d in page.details if d.startswith("diff-")] == [f"diff-{n}" for n in step.pipeline]


def test_loaded_artifact_reports_the_same(step, report, tmp_path):
    path = tmp_path / "s.shardopt"
    step.save(path)
    loaded = Report(shardopt.load(path))
    assert loaded.pipeline_rows() == report.pipeline_rows()
    assert loaded.variables() == report.variables()
    assert loaded.memory() == report.memory() and loaded.collective_counts() == report.collective_counts()
    for name in ("frontend", "cleanup"):
        assert loaded.stage_text(name) == report.stage_text(name)
    assert loaded.summary()["artifact"].startswith(str(path))


def test_html_tables_bars_and_statistics_are_for_people(step, report):
    """issue 12: times on one line, no empty header row, labelled bars, statistics as tables (one per pass)."""
    page = PageParser()
    page.feed(report.to_html())
    stats_tables = [f"stats-{n}" for n in step.pipeline]
    assert list(page.rows) == ["summary-table", "pipeline-table", *stats_tables, "variables-table", "memory-table",
                               "cost-table", "collectives-table"]
    for table, header_rows in page.header_rows.items():  # one header row of named columns, or none at all
        assert len(header_rows) <= 1 and all(cell.strip() for row in header_rows for cell in row), table
    assert page.header_rows["summary-table"] == []  # its rows are headed by their names instead
    assert page.row_headers["summary-table"] == list(report.summary())
    passes = page.rows["pipeline-table"][2:]  # below the header and the frontend
    for row in passes:
        assert row[2].endswith("\u00a0ms") and " " not in row[2]  # number and unit held together
    assert len(page.bars) == len(step.pipeline)
    for bar, row in zip(page.bars, passes, strict=True):
        assert bar["role"] == "img" and bar["aria-label"] == bar["title"]
        assert bar["aria-label"].startswith(f"{row[0]}: ") and "% of the pass time" in bar["aria-label"]
        assert bar["cell"].endswith("%")  # the share is written beside the bar, not only drawn
    stages = {s.name: s for s in step.program.pipeline.stages}
    for name in step.pipeline:
        table = page.rows[f"stats-{name}"]
        assert page.captions[f"stats-{name}"] == name and table[0] == ["what", "value", "key"]
        keys = [k for r in table[1:] for k in r[2].split(", ")]
        assert sorted(keys) == sorted(stages[name].stats)  # every statistic, each under its words
    cleanup = page.rows["stats-cleanup"][1:]
    assert cleanup == [["operations", f"{stages['cleanup'].stats['ops_before']} -> "
                        f"{stages['cleanup'].stats['ops_after']}", "ops_before, ops_after"]]
    fuse = {r[2]: r for r in page.rows["stats-fuse-clipping"][1:]}
    assert fuse["sums_of_squares"][0] == "gradient norms (sums of squares)"
