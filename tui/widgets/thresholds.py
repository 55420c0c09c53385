"""The threshold editor (`t`): every detector setting with its value, default and meaning, plus every detector
with its mute state. Each change is applied at once by the app (history re-evaluated, config file saved)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Input, Static

from rlhf_tui.analysis.thresholds import THRESHOLD_FIELDS
from rlhf_tui.tui import keys
from rlhf_tui.tui.cells import clean, short
from rlhf_tui.tui.config import parse_value, step_setting, toggle_mute

DETECTOR_PREFIX = "detector:"


def _detectors() -> dict[str, str]:
    from rlhf_tui.analysis.detectors import REGISTRY

    return {name: record.means for name, record in REGISTRY.items()}


def _value_text(value) -> str:
    if isinstance(value, float):
        return short(value)
    return str(value)


class ValueInput(Input):
    BINDINGS = keys.bindings("value")

    def action_cancel(self) -> None:
        self.screen.cancel_edit()


class ThresholdEditor(ModalScreen):
    BINDINGS = keys.bindings("editor")
    DEFAULT_CSS = """
    ThresholdEditor { align: center middle; }
    ThresholdEditor > Vertical { width: 110; max-width: 100%; height: 92%; border: round $accent;
                                 background: $surface; }
    ThresholdEditor DataTable { height: 1fr; overflow-x: hidden; }
    ThresholdEditor #editor-status { height: auto; padding: 0 1; background: $boost; }
    ThresholdEditor ValueInput { display: none; }
    ThresholdEditor ValueInput.-shown { display: block; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.editing: str | None = None

    def compose(self) -> ComposeResult:
        with Vertical() as box:
            box.border_title = "Detector settings (saved to your config file on every change)"
            yield Static("", id="editor-status")
            yield DataTable(cursor_type="row", id="editor-table")
            yield ValueInput(id="editor-input")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("setting", key="name", width=26)
        table.add_column("value", key="value", width=10)
        table.add_column("default", key="default", width=9)
        table.add_column("meaning", key="help")
        self.refresh_rows()
        table.focus()

    @property
    def thresholds(self):
        return self.app.thresholds

    def refresh_rows(self) -> None:
        table = self.query_one(DataTable)
        th = self.thresholds
        keep = table.cursor_row
        table.clear()
        for spec in THRESHOLD_FIELDS:
            if spec["name"] == "muted":
                continue
            value = getattr(th, spec["name"])
            changed = value != spec["default"]
            table.add_row(
                Text(spec["name"], style="bold yellow" if changed else ""),
                Text(_value_text(value), style="bold yellow" if changed else "", justify="right"),
                Text(_value_text(spec["default"]), style="dim", justify="right"),
                Text(spec.get("help", ""), style="dim"),
                key=spec["name"],
            )
        for name, description in _detectors().items():
            muted = th.is_muted(name)
            table.add_row(
                Text(f"{DETECTOR_PREFIX} {name}", style="dim strike" if muted else "cyan"),
                Text("muted" if muted else "active", style="bold red" if muted else "green"),
                Text("active", style="dim"),
                Text(clean(description, 200), style="dim"),
                key=f"{DETECTOR_PREFIX}{name}",
            )
        if table.row_count:
            table.move_cursor(row=min(max(keep, 0), table.row_count - 1), animate=False)
        muted = ", ".join(th.muted) or "none"
        self.query_one("#editor-status", Static).update(
            Text.assemble(
                ("+/-", "bold cyan"),
                " change · ",
                ("Enter", "bold cyan"),
                " type a value · ",
                ("r", "bold cyan"),
                " default · ",
                ("m", "bold cyan"),
                " mute detector · ",
                ("Esc", "bold cyan"),
                " close    ",
                (f"muted: {muted}", "dim"),
            )
        )

    def _current(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def _apply(self, new, message: str) -> None:
        self.app.apply_thresholds(new, message)
        self.refresh_rows()

    def action_adjust(self, direction: int) -> None:
        name = self._current()
        if not name or name.startswith(DETECTOR_PREFIX):
            return
        old = getattr(self.thresholds, name)
        try:
            new = step_setting(self.thresholds, name, direction)
        except ValueError as exc:
            self.notify(str(exc), severity="error")
            return
        if getattr(new, name) != old:
            self._apply(new, f"{name} {_value_text(old)} → {_value_text(getattr(new, name))}")

    def action_reset(self) -> None:
        name = self._current()
        if not name or name.startswith(DETECTOR_PREFIX):
            return
        default = next(s["default"] for s in THRESHOLD_FIELDS if s["name"] == name)
        old = getattr(self.thresholds, name)
        if old != default:
            self._apply(
                self.thresholds.replace(**{name: default}),
                f"{name} {_value_text(old)} → default {_value_text(default)}",
            )

    def action_mute(self) -> None:
        name = self._current()
        if not name or not name.startswith(DETECTOR_PREFIX):
            self.notify("m mutes a detector: move to a 'detector:' row", severity="warning")
            return
        detector = name[len(DETECTOR_PREFIX) :]
        new = toggle_mute(self.thresholds, detector)
        self._apply(new, f"{detector} {'muted' if new.is_muted(detector) else 'unmuted'}")

    def action_edit(self) -> None:
        name = self._current()
        if not name:
            return
        if name.startswith(DETECTOR_PREFIX):
            self.action_mute()
            return
        self.editing = name
        box = self.query_one(ValueInput)
        box.value = str(getattr(self.thresholds, name))
        box.placeholder = f"new value for {name} (Enter apply, Esc cancel)"
        box.add_class("-shown")
        box.focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_edit()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        name = self.editing
        if name is None:
            return
        old = getattr(self.thresholds, name)
        try:
            new = self.thresholds.replace(**{name: parse_value(name, event.value)})
        except ValueError as exc:
            self.notify(str(exc).splitlines()[0], severity="error")
            return
        self.cancel_edit()
        if getattr(new, name) != old:
            self._apply(new, f"{name} {_value_text(old)} → {_value_text(getattr(new, name))}")

    def cancel_edit(self) -> None:
        self.editing = None
        box = self.query_one(ValueInput)
        box.remove_class("-shown")
        self.query_one(DataTable).focus()

    def action_close(self) -> None:
        self.dismiss()
