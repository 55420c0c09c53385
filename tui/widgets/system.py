"""The GPU / system pane: a memory gauge per device (grouped per rank when several report), peak, utilisation,
process RSS; "no GPU" stated plainly on CPU-only runs."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Static

from rlhf_tui.tui.render import system_lines
from rlhf_tui.tui.widgets.common import Pane


class SystemPane(Pane):
    pane_name = "system"
    DEFAULT_CSS = """
    SystemPane { height: auto; max-height: 12; }
    SystemPane .body { height: auto; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.border_title = "GPU / system"
        self._last: str | None = None

    def compose(self) -> ComposeResult:
        yield Static("no system samples yet", classes="body", id="system-body")

    def show(self, report: dict) -> None:
        width = self.size.width or 60
        lines = system_lines(report, gauge_width=max(6, min(24, width - 44)))
        if lines.plain != self._last:
            self._last = lines.plain
            self.query_one("#system-body", Static).update(lines)
        ranks = (report.get("system") or {}).get("ranks") or []
        gpus = sum(len(r.get("gpus") or []) for r in ranks)
        title = Text("GPU / system", style="bold")
        if ranks:
            title.append(
                f" · {len(ranks)} rank{'s' if len(ranks) != 1 else ''}, {gpus} GPU{'s' if gpus != 1 else ''}",
                style="dim",
            )
        self.border_title = title
