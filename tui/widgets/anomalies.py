"""The Anomaly feed: newest first, severity colours, step, metric, message (and recommendation when wide);
Enter shows an anomaly's details and moves the Metrics pane to its step. Counts per severity in the title."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.message import Message
from textual.widgets import DataTable, Static

from rlhf_tui.tui import keys
from rlhf_tui.tui.render import SEVERITY_SHORT, SEVERITY_STYLE, clean, fmt, severity_title, short
from rlhf_tui.tui.view import newest_first
from rlhf_tui.tui.widgets.common import Pane, SyncedTable
from rlhf_tui.tui.widgets.model import anomaly_key

MAX_ROWS = 300  # the feed shows the newest; the title counts all


def detector_description(detector: str | None) -> str:
    from rlhf_tui.analysis.detectors import REGISTRY

    record = REGISTRY.get(detector or "")
    return record.means if record is not None else ""


def anomaly_detail(a: dict) -> Text:
    """Every field of one anomaly episode, escaped."""
    sev = a.get("severity", "")
    text = Text()
    text.append(f" {sev} ", style=SEVERITY_STYLE.get(sev, ""))
    text.append(f" {clean(a.get('detector'), 40)} on {clean(a.get('metric'), 60)}", style="bold")
    first, last = a.get("first_step", a.get("step")), a.get("last_step")
    text.append(
        f"  steps {fmt(first)}–{fmt(last)}  peak {short(a.get('peak_value'))} @ {fmt(a.get('peak_step'))}"
        f"  flagged {fmt(a.get('count'))}×{'  ongoing' if a.get('ongoing') else ''}",
        style="dim",
    )
    text.append("\n" + clean(a.get("message"), 400))
    if a.get("recommendation"):
        text.append("\n→ " + clean(a.get("recommendation"), 400), style="italic")
    description = detector_description(a.get("detector"))
    if description:
        text.append(f"\n{a.get('detector')}: {description}", style="dim")
    return text


class AnomalyTable(SyncedTable):
    BINDINGS = keys.bindings("anomalies")
    user_moved = False  # the user picked a row since the last mute (m then unmutes nothing by surprise)

    def _moved(self) -> None:
        self.user_moved = True

    def action_cursor_up(self) -> None:
        self._moved()
        super().action_cursor_up()

    def action_cursor_down(self) -> None:
        self._moved()
        super().action_cursor_down()

    def action_page_up(self) -> None:
        self._moved()
        super().action_page_up()

    def action_page_down(self) -> None:
        self._moved()
        super().action_page_down()

    def action_scroll_top(self) -> None:
        self._moved()
        super().action_scroll_top()

    def action_scroll_bottom(self) -> None:
        self._moved()
        super().action_scroll_bottom()

    async def _on_click(self, event) -> None:
        self._moved()
        await super()._on_click(event)

    def action_close_detail(self) -> None:
        self.post_message(AnomaliesPane.Closed())


class AnomaliesPane(Pane):
    pane_name = "anomalies"

    class Selected(Message):
        """An anomaly was picked (Enter): show its step."""

        def __init__(self, anomaly: dict) -> None:
            super().__init__()
            self.anomaly = anomaly

    class Closed(Message):
        """Details closed (Esc)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.anomalies: list[dict] = []
        self.by_key: dict[str, dict] = {}
        self.selected: dict | None = None
        self.note = ""
        self.border_title = "Anomalies"

    def compose(self) -> ComposeResult:
        yield AnomalyTable(cursor_type="row", id="anomaly-table")
        yield Static("", classes="detail", id="anomaly-detail")

    @property
    def table(self) -> AnomalyTable:
        return self.query_one(AnomalyTable)

    def highlighted(self) -> dict | None:
        key = self.table.cursor_key
        return self.by_key.get(key) if key else None

    def focused_detector(self) -> str | None:
        """The detector of the highlighted anomaly when the feed has focus (for +/- and m)."""
        if not self.table.has_focus:
            return None
        a = self.highlighted()
        return a.get("detector") if a else None

    def show(self, report: dict) -> None:
        anomalies = newest_first(report.get("anomalies") or [])
        self.anomalies = anomalies
        shown = anomalies[:MAX_ROWS]
        width = self.size.width or 60
        wide, narrow = width >= 100, width < 60
        metric_w = 16 if width >= 70 else 10
        fixed = 6 + 4 + (0 if narrow else metric_w)
        ncols = 3 if narrow else 4
        rest = max(12, width - fixed - 2 * (ncols + (1 if wide else 0)) - 1)
        columns = [("step", "step", 6), ("sev", "sev", 4)]
        if not narrow:  # narrow panes: the message names the metric anyway
            columns.append(("metric", "metric", metric_w))
        if wide:
            columns += [("message", "message", rest * 3 // 5), ("rec", "recommendation", rest - rest * 3 // 5)]
        else:
            columns += [("message", "message", rest)]
        rows, sigs = [], []
        self.by_key = {}
        for a in shown:
            key = anomaly_key(a)
            if key in self.by_key:
                continue
            self.by_key[key] = a
            sev = a.get("severity", "")
            style = SEVERITY_STYLE.get(sev, "")
            cells = [Text(fmt(a.get("step")), justify="right"), Text(SEVERITY_SHORT.get(sev, sev), style=style)]
            if not narrow:
                cells.append(Text(clean(a.get("metric"), 60), style=style if sev in ("high", "critical") else ""))
            cells.append(Text(clean(a.get("message"), 300)))
            if wide:
                cells.append(Text(clean(a.get("recommendation"), 300), style="dim"))
            rows.append((key, cells))
            sigs.append((sev, a.get("message"), a.get("last_step"), a.get("count"), wide, narrow))
        self.table.sync(columns, rows, sigs)
        title = severity_title(anomalies, report.get("anomaly_counts"))
        muted = (report.get("thresholds") or {}).get("muted") or []
        if muted:
            title.append(f" · muted: {', '.join(clean(m, 30) for m in muted)}", style="dim")
        if self.note:
            title.append(f" · {self.note}", style="italic yellow")
        self.border_title = title
        if self.selected is not None:
            fresh = self.by_key.get(anomaly_key(self.selected))
            if fresh is not None:
                self.selected = fresh
                self.query_one("#anomaly-detail", Static).update(anomaly_detail(fresh))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        a = self.by_key.get(event.row_key.value or "")
        if a is None:
            return
        self.selected = a
        detail = self.query_one("#anomaly-detail", Static)
        detail.update(anomaly_detail(a))
        detail.add_class("-shown")
        self.post_message(self.Selected(a))

    def on_anomalies_pane_closed(self, event: AnomaliesPane.Closed) -> None:
        self.close_detail()

    def close_detail(self) -> None:
        self.selected = None
        self.query_one("#anomaly-detail", Static).remove_class("-shown")
