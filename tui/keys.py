"""Every key binding of the monitor, declared once as data (id, key, action, description, scope).

The same table builds the Textual `BINDINGS` of each screen, the footer, the `?` help screen, the README's
keys table and the `[keys]` section of the config file (users remap by id, applied with `App.set_keymap`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from textual.binding import Binding

# Scopes: where a binding is active. `app` keys work on the main screen; the others on their own screen.
SCOPES = {
    "app": "Main screen",
    "metrics": "Metrics pane",
    "filter": "Metric filter",
    "anomalies": "Anomaly feed",
    "checkpoints": "Checkpoints pane",
    "chart": "Chart / overlay",
    "editor": "Threshold editor",
    "value": "Editor value entry",
    "completions": "Completions browser",
    "dialog": "Help screen",
}


@dataclass(frozen=True)
class Key:
    id: str  # stable name users remap in the config file's [keys] table
    key: str  # Textual key string(s), comma separated (e.g. "plus,equals_sign")
    action: str  # Textual action string
    description: str  # short text for the footer
    scope: str = "app"
    show: bool = False  # shown in the footer
    help: str = ""  # longer text for the help screen and the README

    def binding(self) -> Binding:
        return Binding(self.key, self.action, self.description, show=self.show, id=self.id)


KEYS: tuple[Key, ...] = (
    # -- main screen ---------------------------------------------------------------------------------
    Key("help", "question_mark", "app.help", "Help", show=True, help="show every key (this screen)"),
    Key("quit", "q", "app.quit", "Quit", show=True, help="quit (the training is not affected)"),
    Key(
        "pause",
        "p",
        "app.pause",
        "Pause",
        show=True,
        help="pause / follow: freeze the view (data keeps arriving) or return to following the newest step",
    ),
    Key(
        "snapshot",
        "s",
        "app.snapshot",
        "Snapshot",
        show=True,
        help="write the current view as a plain-text report (same as `rlhf-tui report`)",
    ),
    Key("screenshot", "S", "app.screenshot", "SVG", help="save an SVG screenshot of the screen"),
    Key(
        "filter",
        "slash",
        "app.filter",
        "Filter",
        show=True,
        help="filter metrics by regular expression (Enter keeps it, Esc clears it)",
    ),
    Key("thresholds", "t", "app.thresholds", "Thresholds", show=True, help="open the editor of every detector setting"),
    Key(
        "threshold_up",
        "plus,equals_sign",
        "app.threshold(1)",
        "Threshold +",
        help="raise the z-score threshold (or the focused anomaly's detector setting): fewer alarms",
    ),
    Key(
        "threshold_down",
        "minus",
        "app.threshold(-1)",
        "Threshold -",
        help="lower the z-score threshold (or the focused anomaly's detector setting): more alarms",
    ),
    Key("mute", "m", "app.mute", "Mute", help="mute / unmute the focused anomaly's detector (press again to undo)"),
    Key(
        "show_lows",
        "l",
        "app.toggle_lows",
        "Lows",
        help="show / hide the low-severity anomalies in the feed (hidden by default; their metrics are still marked)",
    ),
    Key(
        "overlay",
        "o",
        "app.overlay",
        "Overlay",
        help="chart the highlighted metric across every run (one line per source)",
    ),
    Key("toggle_metrics", "1", "app.toggle_pane('metrics')", "Metrics", help="show / hide the Metrics pane"),
    Key("toggle_anomalies", "2", "app.toggle_pane('anomalies')", "Anomalies", help="show / hide the Anomaly feed"),
    Key("toggle_system", "3", "app.toggle_pane('system')", "GPU", help="show / hide the GPU / system pane"),
    Key(
        "toggle_checkpoints",
        "4",
        "app.toggle_pane('checkpoints')",
        "Checkpoints",
        help="show / hide the Checkpoints pane",
    ),
    Key("toggle_rewards", "5", "app.toggle_pane('rewards')", "Rewards", help="show / hide the Rewards pane"),
    Key(
        "focus_next",
        "tab",
        "app.focus_next",
        "Next pane",
        help="move the focus to the next pane (shift+Tab: previous); arrows move inside it",
    ),
    Key(
        "completions",
        "c",
        "app.completions",
        "Completions",
        help="open the completions browser: every step's samples, their scores, total and advantage",
    ),
    Key("next_run", "right_square_bracket", "app.next_run(1)", "Next run", help="next run tab (several sources)"),
    Key("prev_run", "left_square_bracket", "app.next_run(-1)", "Prev run", help="previous run tab (several sources)"),
    # -- metrics pane (the table has focus) ------------------------------------------------------------
    Key(
        "open_chart",
        "enter",
        "select_cursor",
        "Chart",
        scope="metrics",
        help="open a larger chart of the highlighted metric (step axis, zoom)",
    ),
    Key(
        "follow",
        "escape",
        "follow",
        "Follow",
        scope="metrics",
        help="leave the step picked in the anomaly feed and follow the newest step",
    ),
    Key("filter_keep", "enter", "submit", "Keep", scope="filter", help="keep the filter and go back to the table"),
    Key("filter_clear", "escape", "clear_filter", "Clear", scope="filter", help="clear the filter"),
    # -- anomaly feed and checkpoints (their table has focus; Tab moves between panes) -----------------
    Key(
        "anomaly_details",
        "enter",
        "select_cursor",
        "Details",
        scope="anomalies",
        help="show the anomaly's details and move the Metrics pane to its step",
    ),
    Key(
        "anomaly_close",
        "escape",
        "close_detail",
        "Close",
        scope="anomalies",
        help="close the details and follow the newest step again",
    ),
    Key(
        "anomaly_follow",
        "end,f",
        "follow",
        "Follow",
        scope="anomalies",
        help="follow the feed again: the cursor on the newest anomaly, moving to each new one (a cursor key stops it)",
    ),
    Key(
        "checkpoint_details",
        "enter",
        "select_cursor",
        "Details",
        scope="checkpoints",
        help="show the checkpoint's issues and recommendations",
    ),
    Key("checkpoint_close", "escape", "close_detail", "Close", scope="checkpoints", help="close the details"),
    Key(
        "checkpoint_follow",
        "end,f",
        "follow",
        "Follow",
        scope="checkpoints",
        help="follow the newest checkpoint again (a cursor key stops it)",
    ),
    # -- chart screen ----------------------------------------------------------------------------------
    Key(
        "chart_zoom_in",
        "plus,equals_sign",
        "zoom(0.5)",
        "Zoom in",
        scope="chart",
        show=True,
        help="halve the step window",
    ),
    Key("chart_zoom_out", "minus", "zoom(2)", "Zoom out", scope="chart", show=True, help="double the step window"),
    Key("chart_left", "left", "pan(-1)", "Earlier", scope="chart", show=True, help="move the window earlier"),
    Key("chart_right", "right", "pan(1)", "Later", scope="chart", show=True, help="move the window later"),
    Key("chart_all", "a", "show_all", "All", scope="chart", show=True, help="show the whole history"),
    Key("chart_follow", "f", "follow", "Follow", scope="chart", show=True, help="keep the window on the newest steps"),
    Key("chart_next_metric", "down,n", "cycle(1)", "Next metric", scope="chart", help="chart the next metric"),
    Key("chart_prev_metric", "up,N", "cycle(-1)", "Prev metric", scope="chart", help="chart the previous metric"),
    Key("chart_close", "escape,q", "close", "Close", scope="chart", show=True, help="back to the panes"),
    # -- threshold editor --------------------------------------------------------------------------------
    Key(
        "editor_up",
        "plus,equals_sign",
        "adjust(1)",
        "Raise",
        scope="editor",
        show=True,
        help="raise the highlighted setting by its step",
    ),
    Key(
        "editor_down",
        "minus",
        "adjust(-1)",
        "Lower",
        scope="editor",
        show=True,
        help="lower the highlighted setting by its step",
    ),
    Key(
        "editor_edit",
        "enter",
        "edit",
        "Edit",
        scope="editor",
        show=True,
        help="type a value for the highlighted setting",
    ),
    Key(
        "editor_reset",
        "r",
        "reset",
        "Default",
        scope="editor",
        show=True,
        help="reset the highlighted setting to its default",
    ),
    Key("editor_mute", "m", "mute", "Mute", scope="editor", show=True, help="mute / unmute the highlighted detector"),
    Key("editor_close", "escape", "close", "Close", scope="editor", show=True, help="close the editor"),
    Key("value_apply", "enter", "submit", "Apply", scope="value", help="apply the typed value"),
    Key("value_cancel", "escape", "cancel", "Cancel", scope="value", help="cancel typing"),
    # -- completions browser -------------------------------------------------------------------------------
    Key("completions_prev", "left", "scrub(-1)", "Earlier", scope="completions", show=True, help="the previous step"),
    Key("completions_next", "right", "scrub(1)", "Later", scope="completions", show=True, help="the next step"),
    Key("completions_goto", "g", "goto", "Step", scope="completions", show=True, help="type a step number"),
    Key("completions_newest", "end,f", "newest", "Newest", scope="completions", help="follow the newest step"),
    Key(
        "completions_sort",
        "o",
        "cycle_sort",
        "Sort",
        scope="completions",
        show=True,
        help="sort by the total, each reward function, length, advantage (highest first)",
    ),
    Key(
        "completions_search",
        "slash",
        "search",
        "Search",
        scope="completions",
        show=True,
        help="search prompts and completions with a regular expression (empty clears)",
    ),
    Key("completions_open", "enter", "open", "Open", scope="completions", show=True, help="open the sample whole"),
    Key(
        "completions_close",
        "escape,q",
        "close",
        "Close",
        scope="completions",
        show=True,
        help="close the input, the open sample, then the browser",
    ),
    # -- dialogs -------------------------------------------------------------------------------------------
    Key(
        "dialog_close",
        "escape,q,question_mark",
        "close",
        "Close",
        scope="dialog",
        show=True,
        help="close the help screen",
    ),
)

KEY_IDS = frozenset(k.id for k in KEYS)
_NAMES = {
    "question_mark": "?",
    "slash": "/",
    "plus": "+",
    "minus": "-",
    "equals_sign": "=",
    "left_square_bracket": "[",
    "right_square_bracket": "]",
    "escape": "Esc",
    "enter": "Enter",
    "left": "←",
    "right": "→",
    "up": "↑",
    "down": "↓",
    "space": "Space",
    "tab": "Tab",
}


def bindings(scope: str) -> list[Binding]:
    """The Textual bindings of one scope (for a class's BINDINGS)."""
    return [k.binding() for k in KEYS if k.scope == scope]


def keys_for(scope: str) -> list[Key]:
    return [k for k in KEYS if k.scope == scope]


def display_key(key: str) -> str:
    """ "plus,equals_sign" → "+ / ="."""
    parts = []
    for part in key.split(","):
        part = part.strip()
        mods, _, base = part.rpartition("+") if part.count("+") and part != "+" else ("", "", part)
        shown = _NAMES.get(base, base)
        parts.append(f"{mods}+{shown}" if mods else shown)
    return " / ".join(parts)


def effective_key(k: Key, keymap: dict[str, str] | None = None) -> str:
    """The key string in force for a binding after the user's keymap."""
    return (keymap or {}).get(k.id) or k.key


def unknown_ids(keymap: dict[str, str]) -> list[str]:
    return sorted(set(keymap) - KEY_IDS)


def help_rows(keymap: dict[str, str] | None = None) -> Iterable[tuple[str, str, str, str]]:
    """(scope title, key shown, id, help) for every binding, in declaration order."""
    for k in KEYS:
        yield SCOPES[k.scope], display_key(effective_key(k, keymap)), k.id, k.help or k.description


def markdown_table() -> str:
    """The README's keys table (tests check the README holds exactly this)."""
    lines = ["| key | id | where | action |", "|---|---|---|---|"]
    for scope, key, kid, text in help_rows():
        shown = key.replace("|", "\\|")
        lines.append(f"| `{shown}` | `{kid}` | {scope} | {text} |")
    return "\n".join(lines)
