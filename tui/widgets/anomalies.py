"""The Anomaly feed: newest first and following like `tail -f` (tui/widgets/follow.py), severity colours, step,
metric, message (and recommendation when wide); medium and worse by default (`l` shows the lows); the highlighted
episode's whole message and recommendation on a line below; Enter shows its details and moves the Metrics pane
to its step. Counts per severity and the "n new ↑" hint in the title."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.message import Message
from textual.widgets import DataTable, Static

from rlhf_tui.tui import keys
from rlhf_tui.tui.cells import clean, fmt, short
from rlhf_tui.tui.render import SEVERITY_SHORT, SEVERITY_STYLE, severity_title
from rlhf_tui.tui.view import newest_first
from rlhf_tui.tui.widgets.common import Pane
from rlhf_tui.tui.widgets.follow import FollowingTable, follow_hint
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


def anomaly_peek(a: dict) -> Text:
    """One episode's message and recommendation in full (wrapped to the pane's width)."""
    sev = a.get("severity", "")
    text = Text(clean(a.get("message"), 300), style="bold" if sev in ("high", "critical") else "")
    if a.get("recommendation"):
        text.append(" → " + clean(a.get("recommendation"), 300), style="italic dim")
    return text


class AnomalyTable(FollowingTable):
    BINDINGS = keys.bindings("anomalies")
    user_moved = False  # the user picked a row since the last mute (m then unmutes nothing by surprise)

    def _after_move(self) -> None:
        self.user_moved = True
        super()._after_move()

    def action_close_detail(self) -> None:
        self.post_message(AnomaliesPane.Closed())


class AnomaliesPane(Pane):
    pane_name = "anomalies"
    DEFAULT_CSS = """
    AnomaliesPane DataTable { min-height: 2; }
    AnomaliesPane #anomaly-peek { height: auto; max-height: 8; padding: 0 1; background: $boost; }
    AnomaliesPane #anomaly-peek.-empty { display: none; }
    """

    class Selected(Message):
        """An anomaly was picked (Enter): show its step."""

        def __init__(self, anomaly: dict) -> None:
            super().__init__()
            self.anomaly = anomaly

    class Closed(Message):
        """Details closed (Esc)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.anomalies: list[dict] = []  # the rows shown, newest first (lows only when `show_lows`)
        self.by_key: dict[str, dict] = {}
        self.selected: dict | None = None
        self.note = ""
        self.show_lows = False
        self._report: dict | None = None
        self._title = Text("Anomalies", style="bold")
        self.border_title = "Anomalies"

    def compose(self) -> ComposeResult:
        yield AnomalyTable(cursor_type="row", id="anomaly-table")
        yield Static("", classes="-empty", id="anomaly-peek")
        yield Static("", classes="detail", id="anomaly-detail")

    def on_mount(self) -> None:
        self.table.on_follow_change = self._draw_title

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

    def toggle_lows(self) -> bool:
        """Show / hide the low-severity episodes (the Metrics pane marks them either way); returns the new state."""
        self.show_lows = not self.show_lows
        if self._report is not None:
            self.show(self._report)
            if self.show_lows:  # lows shown again are not news
                self.table.mark_seen(anomaly_key(a) for a in self.anomalies if a.get("severity") == "low")
            self._draw_title()
        return self.show_lows

    def show(self, report: dict) -> None:
        self._report = report
        everything = newest_first(report.get("anomalies") or [])
        self.anomalies = everything if self.show_lows else [a for a in everything if a.get("severity") != "low"]
        shown = self.anomalies[:MAX_ROWS]
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
        self.table.show_header = not narrow  # narrow panes: every line for rows and the highlighted text
        self.table.sync(columns, rows, sigs)
        title = severity_title(everything, report.get("anomaly_counts"))
        if not self.show_lows and title.plain.endswith(" low"):
            title.append(" hidden" if narrow else " hidden (l: show)", style="dim")
        muted = (report.get("thresholds") or {}).get("muted") or []
        if muted:
            title.append(f" · muted: {', '.join(clean(m, 30) for m in muted)}", style="dim")
        if self.note:
            title.append(f" · {self.note}", style="italic yellow")
        self._title = title
        self._draw_title()
        self._draw_peek()
        if self.selected is not None:
            fresh = self.by_key.get(anomaly_key(self.selected))
            if fresh is not None:
                self.selected = fresh
                self.query_one("#anomaly-detail", Static).update(anomaly_detail(fresh))

    def _draw_title(self) -> None:
        """The title with the "n new ↑" hint first (a narrow pane cuts the end of the title, not the hint)."""
        name = len("Anomalies")
        title = self._title[:name]
        title.append_text(follow_hint(self.table))
        title.append_text(self._title[name:])
        self.border_title = title

    def _draw_peek(self) -> None:
        """The highlighted episode's whole message and recommendation (hidden while the details are open)."""
        peek = self.query_one("#anomaly-peek", Static)
        a = self.highlighted()
        peek.set_class(a is None or self.selected is not None, "-empty")
        if a is not None:
            peek.update(anomaly_peek(a))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        self._draw_peek()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        a = self.by_key.get(event.row_key.value or "")
        if a is None:
            return
        self.selected = a
        self.table.stop_following()  # the cursor stays on the picked anomaly as new ones arrive
        detail = self.query_one("#anomaly-detail", Static)
        detail.update(anomaly_detail(a))
        detail.add_class("-shown")
        self._draw_peek()
        table = self.table  # the details take room: keep the picked row on screen
        self.call_after_refresh(lambda: table.move_cursor(row=table.cursor_row, animate=False))
        self.post_message(self.Selected(a))

    def on_anomalies_pane_closed(self, event: AnomaliesPane.Closed) -> None:
        self.close_detail()

    def close_detail(self) -> None:
        self.selected = None
        self.query_one("#anomaly-detail", Static).remove_class("-shown")
        self._draw_peek()
