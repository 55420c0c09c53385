"""The `?` help screen: every key from `tui.keys` (after the user's remapping), grouped by where it works."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from rlhf_tui.tui import keys


def help_renderable(keymap: dict[str, str] | None, config_path: str | None = None) -> Group:
    """One small table per scope (main screen, panes, chart, editor, dialogs), keys as remapped."""
    parts = []
    tables: dict[str, Table] = {}
    for scope_title, key, kid, text in keys.help_rows(keymap):
        table = tables.get(scope_title)
        if table is None:
            table = Table(
                title=scope_title,
                title_justify="left",
                title_style="bold underline",
                box=None,
                pad_edge=False,
                show_header=False,
                expand=True,
            )
            table.add_column("key", style="bold cyan", no_wrap=True, width=14)
            table.add_column("what it does", ratio=1)
            table.add_column("id", style="dim", no_wrap=True, width=20)
            tables[scope_title] = table
            parts.append(table)
        table.add_row(key, text, kid)
    footer = Text("\nRemap keys by id in the [keys] table of ", style="dim")
    footer.append(config_path or "the config file", style="dim italic")
    footer.append(', e.g.  quit = "ctrl+q"  or  toggle_metrics = "f1".  Esc / q / ? closes this screen.', style="dim")
    parts.append(footer)
    return Group(*parts)


class HelpScreen(ModalScreen):
    BINDINGS = keys.bindings("dialog")
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 96; max-width: 100%; height: 90%; border: round $accent;
                                  background: $surface; padding: 0 1; }
    """

    def __init__(self, keymap: dict[str, str] | None = None, config_path: str | None = None) -> None:
        super().__init__()
        self.keymap = keymap or {}
        self.config_path = config_path

    def compose(self) -> ComposeResult:
        self.body = help_renderable(self.keymap, self.config_path)
        with VerticalScroll() as scroll:
            scroll.border_title = "rlhf-tui keys"
            yield Static(self.body, id="help-body")

    def plain_text(self, width: int = 94) -> str:
        """The help as plain text (tests, docs)."""
        import io

        from rich.console import Console

        console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
        console.print(self.body)
        return console.export_text()

    def action_close(self) -> None:
        self.dismiss()
