"""The Rewards pane: stability, consistency, variance, mean, a score distribution (sparkline histogram), drift
and the latest sample completions with their scores (escaped: no markup or control sequences)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from rlhf_tui.tui.render import rewards_lines
from rlhf_tui.tui.widgets.common import Pane


class RewardsPane(Pane):
    pane_name = "rewards"
    DEFAULT_CSS = """
    RewardsPane VerticalScroll { height: 1fr; scrollbar-size-vertical: 1; }
    RewardsPane .body { height: auto; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.border_title = "Rewards"
        self._last: str | None = None

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static("no reward batches yet", classes="body", id="rewards-body")

    def show(self, report: dict) -> None:
        rewards = report.get("rewards") or {}
        width = self.size.width or 60
        body = (
            rewards_lines(report, width=width - 2, samples=3)
            if rewards.get("batches")
            else Text("no reward batches yet (wrap reward functions with monitor_rewards)", style="dim")
        )
        if body.plain != self._last:
            self._last = body.plain
            self.query_one("#rewards-body", Static).update(body)
        title = Text("Rewards", style="bold")
        mean = (rewards.get("reliability_metrics") or {}).get("mean_reward")
        if rewards.get("batches"):
            title.append(f" · {rewards.get('batches')} batches", style="dim")
        if mean is not None:
            title.append(f" · mean {mean:.3g}", style="dim")
        self.border_title = title
