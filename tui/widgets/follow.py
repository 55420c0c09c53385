"""A newest-first table that follows like `tail -f`: the Anomaly feed and the Checkpoints pane.

While it follows, the cursor sits on the top row (the newest) and moves to each new row as it arrives. A cursor
key or a click stops following: the cursor then stays on its row, and `unseen` counts the rows that arrived
above it since (the pane shows "n new ↑"). The follow key (End / f), or moving back to the top row, follows
again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from rich.text import Text

from rlhf_tui.tui.widgets.common import Columns, Rows, SyncedTable


class FollowingTable(SyncedTable):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.following = True
        self.unseen = 0  # rows above the cursor that arrived after it stopped following
        self._known: set[str] = set()  # row keys present when it stopped following
        self.on_follow_change: Callable[[], None] | None = None  # the pane redraws its title

    # -- rows ------------------------------------------------------------------------------------------------
    def sync(self, columns: Columns, rows: Rows, signature: Sequence[Any] | None = None, height: int = 1) -> bool:
        rebuilt = super().sync(columns, rows, signature, height)
        if self.following:
            if self.row_count and (rebuilt or self.cursor_row != 0):
                self.move_cursor(row=0, animate=False, scroll=False)
                self.scroll_to(y=0, animate=False, immediate=True)
        else:
            self._count_unseen()
        return rebuilt

    def mark_seen(self, keys: Iterable[str]) -> None:
        """Rows that are not news (the pane showed rows it had hidden, e.g. a filter): not counted as new."""
        self._known.update(keys)
        self._count_unseen()

    def _count_unseen(self) -> None:
        keys = self._keys or ()
        self.unseen = sum(1 for key in keys[: max(self.cursor_row, 0)] if key not in self._known)

    # -- following -------------------------------------------------------------------------------------------
    def _set_following(self, following: bool) -> None:
        changed = following != self.following
        self.following = following
        if following:
            self._known, self.unseen = set(), 0
        elif changed:
            self._known = set(self._keys or ())
            self._count_unseen()
        if self.on_follow_change is not None:
            self.on_follow_change()

    def stop_following(self) -> None:
        """Keep the cursor on its row as new rows arrive (the user picked it)."""
        self._set_following(False)

    def action_follow(self) -> None:
        """End / f: back to the newest row, and follow."""
        self._set_following(True)
        if self.row_count:
            self.move_cursor(row=0, animate=False, scroll=False)
            self.scroll_to(y=0, animate=False, immediate=True)

    def _after_move(self) -> None:
        """After a cursor key or click: following while on the top row, else pinned to the row."""
        self._set_following(self.cursor_row <= 0)

    def action_cursor_up(self) -> None:
        super().action_cursor_up()
        self._after_move()

    def action_cursor_down(self) -> None:
        super().action_cursor_down()
        self._after_move()

    def action_page_up(self) -> None:
        super().action_page_up()
        self._after_move()

    def action_page_down(self) -> None:
        super().action_page_down()
        self._after_move()

    def action_scroll_top(self) -> None:
        super().action_scroll_top()
        self._after_move()

    def action_scroll_bottom(self) -> None:
        super().action_scroll_bottom()
        self._after_move()

    async def _on_click(self, event) -> None:
        await super()._on_click(event)
        self._after_move()


def follow_hint(table: FollowingTable) -> Text:
    """The title's hint while a table does not follow: "3 new ↑ f" (empty when nothing new arrived)."""
    if table.following or not table.unseen:
        return Text("")
    return Text(f" {table.unseen} new ↑ f ", style="bold black on yellow")
