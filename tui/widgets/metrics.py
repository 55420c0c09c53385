"""The Metrics pane: one row per metric (canonical names first) with latest value, min…max, trend, the
z-score threshold band and a unicode sparkline bucketed to the pane's width; `/` filters by regex."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.message import Message
from textual.widgets import DataTable, Input

from rlhf_tui.tui import keys
from rlhf_tui.tui.cells import band_text, clean, fit, range_text, short
from rlhf_tui.tui.render import TREND_ARROWS
from rlhf_tui.tui.view import spark_lines, unit_suffix
from rlhf_tui.tui.widgets.common import Pane, SyncedTable
from rlhf_tui.tui.widgets.model import filter_metrics

MIN_SPARK = 8


class MetricsTable(SyncedTable):
    BINDINGS = keys.bindings("metrics")

    def action_follow(self) -> None:
        self.post_message(MetricsPane.Follow())


class FilterInput(Input):
    BINDINGS = keys.bindings("filter")

    def action_clear_filter(self) -> None:
        self.value = ""
        self.post_message(MetricsPane.FilterDone(keep=False))


class MetricsPane(Pane):
    """Receives a report dict (see widgets.model.view_report); never touches the store."""

    pane_name = "metrics"
    DEFAULT_CSS = """
    MetricsPane FilterInput { display: none; }
    MetricsPane FilterInput.-shown { display: block; }
    MetricsPane FilterInput.-invalid { color: $error; }
    """

    class ChartRequested(Message):
        def __init__(self, metric: str) -> None:
            super().__init__()
            self.metric = metric

    class Follow(Message):
        """Leave the step picked in the anomaly feed."""

    class FilterChanged(Message):
        """The filter text changed: the owner redraws."""

    class FilterDone(Message):
        def __init__(self, keep: bool) -> None:
            super().__init__()
            self.keep = keep

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pattern = ""
        self.pattern_error: str | None = None
        self.names: list[str] = []
        self.labels: list[str] = []  # the names as shown (with their unit), for the name column's width
        self.border_title = "Metrics"

    def compose(self) -> ComposeResult:
        yield FilterInput(
            placeholder="filter metrics: regular expression (Enter keep, Esc clear)", id="filter", compact=True
        )
        yield MetricsTable(cursor_type="row", zebra_stripes=False, id="metrics-table")

    @property
    def table(self) -> MetricsTable:
        return self.query_one(MetricsTable)

    # -- layout --------------------------------------------------------------------------------------
    def _name_width(self, names: list[str], width: int) -> int:
        longest = max((len(n) for n in names), default=8) + 1
        return max(8, min(longest, max(12, min(30, width // 4))))

    @staticmethod
    def _widths(width: int) -> dict[str, int]:
        wide = 2 if width >= 90 else 0
        return {"last": 8, "range": 13 + wide, "trend": 1, "band": 13 + wide}

    def spark_width(self, names: list[str] | None = None) -> int:
        width = self.size.width or 80
        fixed = (
            self._name_width(names or self.labels or self.names, width) + sum(self._widths(width).values()) + 2 * 6 + 1
        )
        return max(MIN_SPARK, width - fixed)

    # -- filter --------------------------------------------------------------------------------------
    def open_filter(self) -> None:
        box = self.query_one(FilterInput)
        box.add_class("-shown")
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.pattern = event.value
        _, self.pattern_error = filter_metrics([], self.pattern)
        self.query_one(FilterInput).set_class(self.pattern_error is not None, "-invalid")
        self.post_message(self.FilterChanged())

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.post_message(self.FilterDone(keep=True))

    def on_metrics_pane_filter_done(self, event: MetricsPane.FilterDone) -> None:
        box = self.query_one(FilterInput)
        if not event.keep:
            self.pattern, self.pattern_error = "", None
            box.remove_class("-invalid")
            self.post_message(self.FilterChanged())
        if not self.pattern:
            box.remove_class("-shown")
        self.table.focus()

    # -- data ----------------------------------------------------------------------------------------
    def highlighted(self) -> str | None:
        return self.table.cursor_key

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value:
            self.post_message(self.ChartRequested(event.row_key.value))

    def show(self, report: dict) -> None:
        metrics = report.get("metrics") or {}
        all_names = list(metrics)
        names, _ = filter_metrics(all_names, self.pattern)
        self.names = names
        width = self.size.width or 80
        self.labels = [n + unit_suffix(metrics[n]) for n in names]
        name_w = self._name_width(self.labels, width)
        at_step = report.get("at_step")
        widths = self._widths(width)
        columns = [
            ("metric", "metric", name_w),
            ("last", "last" if at_step is None else f"@{at_step}", widths["last"]),
            ("range", "min…max", widths["range"]),
            ("trend", "↕", 1),
            ("band", f"band z±{short(report.get('thresholds', {}).get('anomaly_threshold'))}", widths["band"]),
            ("history", "history", self.spark_width(self.labels)),
        ]
        space = max(1, (self.size.height or 10) - 2 - (1 if self.pattern else 0))
        height = 3 if len(names) * 3 <= space else 2 if len(names) * 2 <= space else 1
        rows, sigs = [], []
        for name in names:
            row = metrics[name]
            active = bool(row.get("active"))
            value = row.get("at") if at_step is not None else row.get("last")
            suffix = unit_suffix(row)  # " /tok" or " /seq": KL and entropy units differ between trainers
            label = ("● " if active else "") + fit(clean(name, 80), name_w - len(suffix) - (2 if active else 0))
            lines = spark_lines(row.get("buckets") or [], height)
            spark = Text("\n".join(lines), style="bold red" if active else "cyan", no_wrap=True, overflow="crop")
            marker = row.get("marker")
            if marker is not None:
                for line_no, line in enumerate(lines):
                    if 0 <= marker < len(line):
                        start = sum(len(x) + 1 for x in lines[:line_no]) + marker
                        spark.stylize("reverse bold", start, start + 1)
            name_cell = Text(label, style="bold red" if active else "italic" if row.get("derived") else "")
            name_cell.append(suffix, style="dim")
            name_cell.no_wrap, name_cell.overflow = True, "ellipsis"
            cells = [
                name_cell,
                Text(
                    short(value),
                    style="bold red" if row.get("out_of_band") else "",
                    justify="right",
                    no_wrap=True,
                    overflow="ellipsis",
                ),
                Text(range_text(row), style="dim", no_wrap=True, overflow="ellipsis"),
                Text(TREND_ARROWS.get(row.get("trend"), "?"), no_wrap=True),
                Text(band_text(row.get("band")), style="dim", no_wrap=True, overflow="ellipsis"),
                spark,
            ]
            rows.append((name, cells))
            sigs.append(
                (
                    label + suffix,
                    short(value),
                    range_text(row),
                    row.get("trend"),
                    band_text(row.get("band")),
                    tuple(lines),
                    marker,
                    active,
                    row.get("out_of_band"),
                    height,
                )
            )
        self.table.sync(columns, rows, sigs, height=height)
        self._update_title(len(names), len(all_names), at_step)

    def _update_title(self, shown: int, total: int, at_step: int | None) -> None:
        title = Text(f"Metrics {shown}/{total}" if shown != total else f"Metrics {total}", style="bold")
        if self.pattern:
            title.append(f" · /{clean(self.pattern, 30)}/", style="cyan")
            if self.pattern_error:
                title.append(" bad regex", style="bold red")
        if at_step is not None:
            title.append(" · ")
            title.append(f" at step {at_step} ", style="reverse")
            title.append(" Esc: follow", style="dim")
        self.border_title = title
