"""Shared pieces of the panes: the pane frame (titled top border, an error line when drawing fails) and a table
that updates its rows in place (str cells shown as plain text: a DataTable parses str cells as markup)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual.containers import Vertical
from textual.widgets import DataTable, Static

Columns = Sequence[tuple[str, str, int | None]]  # a SyncedTable's columns: (key, label, width)
Rows = Sequence[tuple[str, Sequence[Any]]]  # its rows: (key, cells)


class Pane(Vertical):
    """A titled pane. Subclasses implement `show(report)` with plain data (a report dict)."""

    DEFAULT_CSS = """
    Pane {
        height: 1fr;
        border: none;
        border-top: solid $primary-darken-1;
        border-title-align: left;
        border-title-color: $text;
        padding: 0;
    }
    Pane:focus-within { border-top: solid $accent; }
    Pane DataTable { height: 1fr; scrollbar-size-vertical: 1; overflow-x: hidden; }
    Pane .detail { height: auto; max-height: 8; padding: 0 1; background: $boost; display: none; }
    Pane .detail.-shown { display: block; }
    Pane .body { height: 1fr; padding: 0 1; }
    Pane .pane-error { height: auto; padding: 0 1; color: $error; text-style: bold; }
    """

    pane_name = ""
    error: str | None = None  # why the last draw failed (None when it worked)

    def show(self, report: dict) -> None:  # pragma: no cover - every pane overrides it
        raise NotImplementedError

    def safe_show(self, report: dict) -> None:
        """`show`, and when it raises (a bug of ours, or data no ingest check foresaw) an error line at the top of
        the pane instead of a blank or half-drawn pane; the line goes at the next draw that works."""
        try:
            self.show(report)
        except Exception as exc:
            from rlhf_tui.tui.cells import clean

            self.error = f"⚠ {self.pane_name or 'pane'} could not be drawn: {type(exc).__name__}: {clean(exc, 160)}"
            line = self.query(".pane-error")
            if line:
                line.first(Static).update(Text(self.error))
            else:
                self.mount(Static(Text(self.error), classes="pane-error"), before=0)
            return
        if self.error is not None:
            self.error = None
            self.query(".pane-error").remove()


class SyncedTable(DataTable):
    """A DataTable that keeps its own row keys and per-row signatures, so a pane hands it whole rows on every
    redraw and only what changed is touched: columns rebuilt only when their spec changed, rows rebuilt only
    when the row keys changed (cursor kept on the same key), otherwise only changed cells updated in place (no
    width recalculation: textual#6457)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._spec: tuple | None = None
        self._keys: tuple | None = None
        self._signatures: dict[str, Any] = {}

    @property
    def cursor_key(self) -> str | None:
        """The key of the highlighted row (None when empty)."""
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:
            return None

    def sync(self, columns: Columns, rows: Rows, signature: Sequence[Any] | None = None, height: int = 1) -> bool:
        """Bring the table to `columns` (key, label, width) and `rows` (key, cells), each `height` lines tall.
        `signature`: per row, a cheap value that says whether the row changed (default: the cells).
        Returns True when rows were rebuilt."""
        spec = (tuple(columns), height)
        if self._spec != spec:
            self.clear(columns=True)
            for key, label, width in columns:
                self.add_column(label, key=key, width=width)
            self._spec, self._keys, self._signatures = spec, None, {}
        keys = tuple(key for key, _ in rows)
        sigs = list(signature) if signature is not None else [tuple(str(c) for c in cells) for _, cells in rows]
        if self._keys != keys:
            self._rebuild(rows, keys, height)
            self._keys, self._signatures = keys, dict(zip(keys, sigs))
            return True
        col_keys = [key for key, _, _ in columns]
        for (key, cells), sig in zip(rows, sigs):
            if self._signatures.get(key) == sig:
                continue
            for col, cell in zip(col_keys, cells):
                self.update_cell(key, col, _plain(cell))
            self._signatures[key] = sig
        return False

    def _rebuild(self, rows: Rows, keys: tuple, height: int) -> None:
        kept, old_row = self.cursor_key, self.cursor_row
        self.clear()
        for key, cells in rows:
            self.add_row(*map(_plain, cells), key=key, height=height)
        if keys:
            target = keys.index(kept) if kept in keys else min(max(old_row, 0), len(keys) - 1)
            self.move_cursor(row=target, animate=False, scroll=False)


def _plain(cell: Any) -> Any:
    return Text(cell) if isinstance(cell, str) else cell
