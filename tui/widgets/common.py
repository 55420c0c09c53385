"""Shared pieces of the panes: the pane frame (titled top border) and a batched DataTable update."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from textual.containers import Vertical
from textual.widgets import DataTable


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
    """

    pane_name = ""

    def show(self, report: dict) -> None:  # pragma: no cover - every pane overrides it
        raise NotImplementedError


def sync_table(
    table: DataTable,
    columns: Sequence[tuple[str, str, int | None]],
    rows: Sequence[tuple[str, Sequence[Any]]],
    signature: Sequence[Any] | None = None,
    height: int = 1,
) -> bool:
    """Bring `table` to `columns` (key, label, width) and `rows` (key, cells) with as little work as possible:
    columns rebuilt only when their spec changed, rows rebuilt only when the row keys changed (cursor kept on
    the same key), otherwise only changed cells updated (no width recalculation: textual#6457).
    `signature`: per row, a cheap value that says whether the row changed (default: the cells).
    Returns True when rows were rebuilt."""
    spec = tuple(columns)
    state = getattr(table, "_rlhf_sync", None)
    if state is None:
        state = {"columns": None, "keys": None, "sig": {}}
        table._rlhf_sync = state
    rebuilt = False
    spec = spec + ((("__height__", "", height),) if height != 1 else ())
    if state["columns"] != spec:
        table.clear(columns=True)
        for key, label, width in spec:
            if key != "__height__":
                table.add_column(label, key=key, width=width)
        state.update(columns=spec, keys=None, sig={})
    keys = tuple(key for key, _ in rows)
    sigs = list(signature) if signature is not None else [tuple(str(c) for c in cells) for _, cells in rows]
    if state["keys"] != keys:
        cursor_key = None
        if table.row_count and 0 <= table.cursor_row < table.row_count:
            try:
                cursor_key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            except Exception:
                cursor_key = None
        old_row = table.cursor_row
        table.clear()
        for key, cells in rows:
            table.add_row(*cells, key=key, height=height)
        if keys:
            target = keys.index(cursor_key) if cursor_key in keys else min(max(old_row, 0), len(keys) - 1)
            table.move_cursor(row=target, animate=False, scroll=False)
        state.update(keys=keys, sig=dict(zip(keys, sigs)))
        rebuilt = True
    else:
        col_keys = [key for key, _, _ in spec if key != "__height__"]
        for (key, cells), sig in zip(rows, sigs):
            if state["sig"].get(key) == sig:
                continue
            for col, cell in zip(col_keys, cells):
                table.update_cell(key, col, cell)
            state["sig"][key] = sig
    return rebuilt


def cursor_key(table: DataTable) -> str | None:
    """The key of the highlighted row (None when empty)."""
    if not table.row_count:
        return None
    try:
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
    except Exception:
        return None
