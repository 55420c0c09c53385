"""The Checkpoints pane: newest first and following like the feed (tui/widgets/follow.py); step, health score
(coloured), issue count, drift vs the previous checkpoint, size, path; Enter on a row shows its issues and
recommendations."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from rlhf_tui.tui import keys
from rlhf_tui.tui.cells import clean, fit_left, fmt, short
from rlhf_tui.tui.render import health_style, health_text
from rlhf_tui.tui.widgets.common import Pane
from rlhf_tui.tui.widgets.follow import FollowingTable, follow_hint


def checkpoint_detail(c: dict) -> Text:
    text = Text()
    text.append(f"checkpoint @ step {fmt(c.get('step'))}  ", style="bold")
    text.append("health ")
    text.append_text(health_text(c))
    text.append(f"  drift {short(c.get('drift'))}  size {short(c.get('file_size_mb'))} MB", style="dim")
    text.append("\n" + clean(c.get("path"), 300), style="dim")
    issues = c.get("issues") or []
    recs = c.get("recommendations") or []
    if not issues:
        text.append("\nno issues", style="green")
    for issue in issues[:8]:
        text.append("\n• " + clean(issue, 300), style="yellow")
    for rec in recs[:6]:
        text.append("\n→ " + clean(rec, 300), style="italic")
    return text


class CheckpointTable(FollowingTable):
    BINDINGS = keys.bindings("checkpoints")

    def action_close_detail(self) -> None:
        pane = next((a for a in self.ancestors if isinstance(a, CheckpointsPane)), None)
        if pane is not None:
            pane.close_detail()


class CheckpointsPane(Pane):
    pane_name = "checkpoints"
    DEFAULT_CSS = """
    CheckpointsPane { height: auto; max-height: 12; min-height: 4; }
    CheckpointsPane DataTable { height: auto; max-height: 9; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.checkpoints: list[dict] = []
        self.selected_step: int | None = None
        self._title = Text("Checkpoints", style="bold")
        self.border_title = "Checkpoints"

    def compose(self) -> ComposeResult:
        yield CheckpointTable(cursor_type="row", id="checkpoint-table")
        yield Static("", classes="detail", id="checkpoint-detail")

    def on_mount(self) -> None:
        self.table.on_follow_change = self._draw_title

    @property
    def table(self) -> CheckpointTable:
        return self.query_one(CheckpointTable)

    def show(self, report: dict) -> None:
        ckpts = list(reversed(report.get("checkpoints") or []))  # newest first
        self.checkpoints = ckpts
        width = self.size.width or 60
        path_w = width - (5 + 6 + 3 + 7 + 5) - 2 * 6 - 1
        columns = [
            ("step", "step", 5),
            ("health", "health", 6),
            ("issues", "iss", 3),
            ("drift", "drift", 7),
            ("size", "MB", 5),
        ]
        show_path = path_w >= 10  # narrow panes: the path is in the details (Enter)
        if show_path:
            columns.append(("path", "path", path_w))
        rows, sigs = [], []
        for c in ckpts:
            key = str(c.get("step"))
            n_issues = len(c.get("issues") or [])
            cells = [
                Text(fmt(c.get("step")), justify="right"),
                health_text(c),
                Text(str(n_issues), style="yellow" if n_issues else "dim", justify="right"),
                Text(short(c.get("drift")), justify="right"),
                Text(short(c.get("file_size_mb")), justify="right"),
            ]
            if show_path:
                cells.append(Text(fit_left(clean(c.get("path"), 400), path_w), style="dim", no_wrap=True))
            rows.append((key, cells))
            sigs.append(
                (c.get("health_score"), c.get("status"), n_issues, c.get("drift"), c.get("file_size_mb"), c.get("path"))
            )
        self.table.sync(columns, rows, sigs)
        title = Text(f"Checkpoints {len(ckpts)}", style="bold")
        if ckpts:
            title.append(" · latest health ")
            health = ckpts[0].get("health_score")
            title.append(
                short(health) if health is not None else (clean(ckpts[0].get("status"), 12) or "pending"),
                style=health_style(health),
            )
        self._title = title
        self._draw_title()
        if self.selected_step is not None:
            c = next((c for c in ckpts if c.get("step") == self.selected_step), None)
            if c is not None:
                self.query_one("#checkpoint-detail", Static).update(checkpoint_detail(c))

    def _draw_title(self) -> None:
        """The title with the "n new ↑" hint after the count (a narrow pane cuts the end, not the hint)."""
        head = len(f"Checkpoints {len(self.checkpoints)}")
        title = self._title[:head]
        title.append_text(follow_hint(self.table))
        title.append_text(self._title[head:])
        self.border_title = title

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        c = next((c for c in self.checkpoints if str(c.get("step")) == event.row_key.value), None)
        if c is None:
            return
        self.selected_step = c.get("step")
        self.table.stop_following()
        detail = self.query_one("#checkpoint-detail", Static)
        detail.update(checkpoint_detail(c))
        detail.add_class("-shown")

    def close_detail(self) -> None:
        self.selected_step = None
        self.query_one("#checkpoint-detail", Static).remove_class("-shown")
