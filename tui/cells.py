"""How one value is written in a report cell: untrusted text made one safe line, numbers in a few characters,
ranges and bands, clipped names, a memory gauge, and `PlainTable`, the Rich table whose str cells are never markup.

The primitives under the report's sections (tui/render.py) and the monitor's panes (tui/widgets/), so a number
reads the same everywhere.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from rich.table import Table
from rich.text import Text

from rlhf_tui.analysis.safe_text import safe_text


def clean(value: Any, limit: int = 200) -> str:
    """Untrusted text made safe to show: control/escape sequences removed (analysis/safe_text.py), one line,
    clipped."""
    text = safe_text(str(value if value is not None else ""), one_line=True)
    return text[:limit] + ("…" if len(text) > limit else "")


def _number(value: float, exponent: str) -> str:
    """A float with 4 significant digits, in `exponent` format when it is tiny or huge; NaN / ±Inf spelled out."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Inf" if value > 0 else "-Inf"
    magnitude = abs(value)
    if magnitude != 0 and (magnitude < 1e-3 or magnitude >= 1e5):
        return format(value, exponent)
    return f"{value:.4g}"


class PlainTable(Table):
    """A Rich table whose str title, headers and cells are plain text: Rich parses a str as markup there, so a
    metric name like `[/]` would raise (and `[link=…]` would make a link)."""

    def __init__(self, *headers: Any, title: Any = None, **kwargs: Any) -> None:
        super().__init__(*headers, title=Text(title) if isinstance(title, str) else title, **kwargs)

    def add_column(self, header: Any = "", *args: Any, **kwargs: Any) -> None:
        super().add_column(Text(header) if isinstance(header, str) else header, *args, **kwargs)

    def add_row(self, *cells: Any, **kwargs: Any) -> None:
        super().add_row(*(Text(c) if isinstance(c, str) else c for c in cells), **kwargs)


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    return _number(value, ".3e") if isinstance(value, float) else str(value)


def short(value: Any) -> str:
    """A number in at most ~8 characters (for narrow columns)."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return _number(float(value), ".2e").replace("e-0", "e-").replace("e+0", "e")


def compact(value: Any) -> str:
    """A number in 3 significant digits (for ranges and bands)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return short(value)
    value = float(value)
    if not math.isfinite(value):
        return short(value)
    magnitude = abs(value)
    if magnitude != 0 and (magnitude < 1e-3 or magnitude >= 1e5):
        return f"{value:.1e}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")
    return f"{value:.3g}"


def band_text(band: Any) -> str:
    if not band or len(band) != 2:
        return "—"
    return f"{compact(band[0])}…{compact(band[1])}"


def range_text(row: dict) -> str:
    if row.get("min") is None and row.get("max") is None:
        return "—"
    return f"{compact(row.get('min'))}…{compact(row.get('max'))}"


def when(wall: float | None) -> str:
    return datetime.fromtimestamp(wall).strftime("%H:%M:%S") if wall else "?"


def fit_left(text: str, width: int) -> str:
    """Clip to `width` keeping the end (paths: the checkpoint folder is the informative part)."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1 :]


def fit(text: str, width: int) -> str:
    """Clip to `width` keeping the start and the end (metric names differ at both)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def gauge(fraction: float | None, width: int = 16) -> Text:
    """A memory gauge: filled blocks coloured by how close to full."""
    if fraction is None or not math.isfinite(fraction):
        return Text("░" * width, style="dim")
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(round(fraction * width))
    style = "green" if fraction < 0.75 else "yellow" if fraction < 0.9 else "bold red"
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"))


def percent(value: Any) -> str:
    return f"{100 * value:.0f}%" if isinstance(value, (int, float)) and math.isfinite(value) else "—"
