"""The completions browser (`c`): every step's kept samples (analysis/samples.py) with their prompt, completion,
each reward function's score, the total and the advantage; scrub steps (←/→, `g` and a step number), sort (`o`:
total, each function, length, advantage), search with a regular expression (`/`), open one sample whole (Enter).
Truncated completions are marked `T`, non-finite rewards `!`. Completions are untrusted: the buffer spelled their
control characters out at ingest and they are drawn as `rich.text.Text` (markup shown, never interpreted)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Input, Static

from rlhf_tui.tui import keys
from rlhf_tui.tui.cells import clean, short

Source = Callable[[], tuple[Any, dict]]  # () -> (SampleBuffer | None, run args)


def _key(row: dict, sort: str) -> float:
    if sort == "length":
        value = row.get("length") if row.get("length") is not None else row.get("chars")
    elif sort in ("total", "advantage"):
        value = row.get(sort)
    else:
        value = (row.get("scores") or {}).get(sort)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


def browse_rows(rows: list[dict], sort: str = "total", pattern: re.Pattern | None = None) -> list[dict]:
    """The rows shown: those matching `pattern` (prompt or completion), highest `sort` first."""
    if pattern is not None:
        rows = [r for r in rows if pattern.search(r.get("completion", "")) or pattern.search(r.get("prompt", ""))]
    return sorted(rows, key=lambda r: _key(r, sort), reverse=True)


def sample_text(row: dict, step: int | None) -> Text:
    """One sample whole: its numbers, the prompt and the completion (literal text, newlines kept)."""
    out = Text()
    out.append(f"step {step} · #{row.get('index')} {row.get('label', '')}", style="bold")
    out.append(f"  total {short(row.get('total'))}  advantage {short(row.get('advantage'))}", style="bold")
    for name, value in (row.get("scores") or {}).items():
        out.append(f"  {clean(name, 40)} {short(value)}")
    if row.get("length") is not None:
        out.append(f"  {row['length']} tokens", style="dim")
    if row.get("truncated"):
        out.append("  truncated (reached max_completion_length)", style="bold yellow")
    if row.get("nonfinite"):
        out.append("  non-finite reward", style="bold red")
    out.append("\n\nprompt\n", style="dim underline")
    out.append(row.get("prompt", ""))
    out.append("\n\ncompletion\n", style="dim underline")
    out.append(row.get("completion", ""))
    return out


def key_line(keymap: dict | None = None) -> Text:
    """The browser's keys in force (the user's keymap applied), as the footer would show them, then help."""
    out = Text()
    shown = [k for k in keys.keys_for("completions") if k.show]
    for k in [*shown, *(k for k in keys.KEYS if k.id == "help")]:
        out.append(keys.display_key(keys.effective_key(k, keymap)), style="bold")
        out.append(f" {k.description}  ", style="dim")
    return out


class SampleTable(DataTable):
    """The samples table: ← / → scrub steps and End follows the newest (a row cursor has no columns to move
    through)."""

    def action_cursor_left(self) -> None:
        self.screen.action_scrub(-1)  # type: ignore[attr-defined]

    def action_cursor_right(self) -> None:
        self.screen.action_scrub(1)  # type: ignore[attr-defined]

    def action_scroll_end(self) -> None:
        self.screen.action_newest()  # type: ignore[attr-defined]


class CompletionsScreen(Screen):
    BINDINGS = keys.bindings("completions")
    DEFAULT_CSS = """
    CompletionsScreen #completions-head { height: auto; padding: 0 1; }
    CompletionsScreen DataTable { height: 1fr; }
    CompletionsScreen #completions-detail { display: none; height: 1fr; border: round $accent; padding: 0 1; }
    CompletionsScreen Input { display: none; }
    CompletionsScreen #completions-keys { dock: bottom; height: 1; background: $panel; padding: 0 1; }
    """

    def __init__(self, source: Source, lock: Any = None) -> None:
        super().__init__()
        self.source = source
        self.lock = lock
        self.step: int | None = None
        self.following = True  # move to each new step as it arrives (End / f); scrubbing stops it
        self._seen: Any = None  # the buffer's version last drawn
        self.sort = "total"
        self.pattern: re.Pattern | None = None
        self.asking: str | None = None  # "search" | "step" while the input is shown
        self.shown: list[dict] = []
        self.opened = False  # one sample shown whole instead of the table

    def compose(self) -> ComposeResult:
        yield Static(id="completions-head")
        yield Input(id="completions-input")
        yield SampleTable(id="completions-table", cursor_type="row", zebra_stripes=True)
        with VerticalScroll(id="completions-detail"):
            yield Static(id="completions-body")
        # A fixed line of this screen's keys, not a Footer: a Footer recomposes its keys at every focus change
        # (the search and step inputs), ~80 ms a key on a loaded 2-core machine (benchmarks/completions_browser.py).
        yield Static(id="completions-keys")

    def on_mount(self) -> None:
        self.set_interval(0.5, self._poll)
        self.query_one("#completions-keys", Static).update(
            key_line(getattr(getattr(self.app, "config", None), "keymap", None))
        )

    def on_screen_resume(self) -> None:
        """Shown (first or again: the app keeps one browser a tab): the newest rows, the table focused."""
        if not self.opened and self.asking is None:
            self.refresh_rows()
            self.query_one(DataTable).focus()

    def _poll(self) -> None:
        """Redraw when new samples arrived (a live run), keeping the cursor."""
        buffer, _ = self.source()
        version = getattr(buffer, "version", None)
        if self.is_current and version != self._seen and self.asking is None and not self.opened:
            table = self.query_one(DataTable)
            row = table.cursor_row
            self.refresh_rows()
            if row is not None and row < table.row_count:
                table.move_cursor(row=row)

    # -- data ------------------------------------------------------------------------------------------
    def _read(self) -> tuple[list[int], list[dict], list[str]]:
        def read():
            buffer, args = self.source()
            if buffer is None:
                return [], [], []
            self._seen = buffer.version
            steps = buffer.sample_steps()
            step = steps[-1] if steps and (self.following or self.step not in steps) else self.step
            rows = (
                buffer.rows(step, args.get("num_generations"), args.get("reward_weights")) if step is not None else []
            )
            names = [n for n in buffer.names if any(n in r["scores"] for r in rows)] if rows else list(buffer.names)
            return steps, rows, names

        if self.lock is None:
            return read()
        with self.lock:
            return read()

    def refresh_rows(self) -> None:
        steps, rows, names = self._read()
        if self.following or self.step not in steps:
            self.step = steps[-1] if steps else None
        if self.sort not in ("total", "length", "advantage", *names):
            self.sort = "total"
        self.shown = browse_rows(rows, self.sort, self.pattern)
        head = Text()
        if self.step is None:
            head.append("no sample completions yet (wrap the reward functions with monitor_rewards)", style="dim")
        else:
            where = steps.index(self.step) + 1
            head.append(f"step {self.step}", style="bold")
            if self.following:
                head.append(" (newest)", style="green")
            head.append(
                f"  ({where}/{len(steps)} steps with samples)  {len(self.shown)}/{len(rows)} samples", style="dim"
            )
            head.append(f"  sort: {clean(self.sort, 40)}", style="cyan")
            if self.pattern is not None:
                head.append("  search: ", style="dim")
                head.append(clean(self.pattern.pattern, 60), style="magenta")
        self.query_one("#completions-head", Static).update(head)
        table = self.query_one(DataTable)
        labels = ["#", "label", "total", *[clean(n, 14) for n in names], "adv", "len", "flags", "completion"]
        cells = [self._cells(row, names) for row in self.shown]
        table.clear(columns=True)
        # Widths set here, not measured by the table on its next idle: a busy terminal (a burst of keys, a loaded
        # machine) then never draws a frame of label-wide columns, and a key costs no re-measure of every cell.
        widths = [max([len(label), *(c[i].cell_len for c in cells)]) for i, label in enumerate(labels[:-1])]
        room = (self.size.width or self.app.size.width or 120) - sum(w + 2 for w in widths) - 4
        for label, width in zip(labels, [*widths, max(20, room)]):
            table.add_column(label, width=width)
        for row in cells:
            row[-1].truncate(max(20, room))  # the table draws no more of it: less text to lay out per frame
            table.add_row(*row)

    @staticmethod
    def _cells(row: dict, names: list[str]) -> list[Text]:
        flags = ("T" if row.get("truncated") else "") + ("!" if row.get("nonfinite") else "")
        length = row.get("length") if row.get("length") is not None else row.get("chars")
        scores = row.get("scores") or {}
        return [
            Text(str(row.get("index"))),
            Text(row.get("label", ""), style="dim"),
            Text(short(row.get("total")), style="bold"),
            *[Text(short(scores.get(n))) for n in names],
            Text(short(row.get("advantage"))),
            Text(str(length)),
            Text(flags, style="bold yellow" if flags else ""),
            Text(clean(row.get("completion"), 200)),
        ]

    # -- keys ------------------------------------------------------------------------------------------
    def action_scrub(self, direction: int) -> None:
        steps, _, _ = self._read()
        if steps:
            i = steps.index(self.step) if self.step in steps else len(steps) - 1
            self.step = steps[max(0, min(len(steps) - 1, i + direction))]
            self.following = self.step == steps[-1]
            self.refresh_rows()

    def action_newest(self) -> None:
        self.following = True
        self.refresh_rows()

    def action_cycle_sort(self) -> None:
        _, _, names = self._read()
        order = ["total", *names, "length", "advantage"]
        self.sort = order[(order.index(self.sort) + 1) % len(order)] if self.sort in order else "total"
        self.refresh_rows()

    def _ask(self, what: str, placeholder: str) -> None:
        self.asking = what
        box = self.query_one(Input)
        box.placeholder = placeholder
        box.value = ""
        box.display = True  # the widget's own style, not a class: a class change restyles the whole screen
        box.focus()

    def action_search(self) -> None:
        self._ask("search", "regular expression (prompt or completion); empty clears")

    def action_goto(self) -> None:
        self._ask("step", "step number")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        value, what = event.value.strip(), self.asking
        self._close_input()
        if what == "search":
            try:
                self.pattern = re.compile(value) if value else None
            except re.error as exc:
                self.notify(f"bad regular expression: {exc}", severity="error")
                return
        elif what == "step":
            steps, _, _ = self._read()
            if not value.lstrip("-").isdigit() or not steps:
                self.notify("type a step number", severity="warning")
                return
            wanted = int(value)
            self.step = min(steps, key=lambda s: (abs(s - wanted), s))  # the nearest step with samples
            self.following = self.step == steps[-1]
        self.refresh_rows()

    def _close_input(self) -> None:
        self.asking = None
        self.query_one(Input).display = False
        self.query_one(DataTable).focus()

    def action_open(self) -> None:
        table = self.query_one(DataTable)
        if not self.shown or table.cursor_row is None or table.cursor_row >= len(self.shown):
            return
        self.query_one("#completions-body", Static).update(sample_text(self.shown[table.cursor_row], self.step))
        self._show_detail(True)

    def _show_detail(self, opened: bool) -> None:
        self.opened = opened
        self.query_one("#completions-detail").display = opened
        self.query_one(DataTable).display = not opened

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open()

    def action_close(self) -> None:
        if self.asking is not None:
            self._close_input()
        elif self.opened:
            self._show_detail(False)
            self.query_one(DataTable).focus()
        else:
            self.dismiss()
