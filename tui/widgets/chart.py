"""A larger chart of one metric (Enter on a metric) or of one metric across runs (o): braille line chart with a
step axis, the z-score band, zoom and pan. Each dot column shows the min…max of the steps it covers, so spikes
survive downsampling of long histories."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from rich.text import Text
from textual.app import ComposeResult
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Footer, Static

from rlhf_tui.tui import keys
from rlhf_tui.tui.cells import clean, short

COLORS = ("cyan", "magenta", "yellow", "green", "bright_blue", "red", "bright_white")
_BITS = np.array([[0x01, 0x08], [0x02, 0x10], [0x04, 0x20], [0x40, 0x80]], dtype=np.uint16)  # [row][col]


def render_chart(
    series: list[dict],
    width: int,
    height: int,
    *,
    x_range: tuple[float, float] | None = None,
    band: tuple[float, float] | None = None,
    marker: int | None = None,
) -> Text:
    """series: [{"label", "steps", "values", "color"?}] → a Text `height` lines tall with axes."""
    label_w = 9
    plot_w, plot_h = max(4, width - label_w - 1), max(2, height - 1)
    dots_w, dots_h = plot_w * 2, plot_h * 4
    visible = []
    lo_x = hi_x = None
    for s in series:
        steps, values = np.asarray(s["steps"], dtype=np.float64), np.asarray(s["values"], dtype=np.float64)
        if steps.size:
            lo_x = steps[0] if lo_x is None else min(lo_x, steps[0])
            hi_x = steps[-1] if hi_x is None else max(hi_x, steps[-1])
        visible.append((s, steps, values))
    if x_range is not None:
        lo_x, hi_x = x_range
    if lo_x is None or hi_x is None:
        return Text("no data yet", style="dim")
    if hi_x <= lo_x:
        hi_x = lo_x + 1
    ys = []
    clipped = []
    for s, steps, values in visible:
        i0, i1 = np.searchsorted(steps, lo_x, "left"), np.searchsorted(steps, hi_x, "right")
        st, va = steps[i0:i1], values[i0:i1]
        clipped.append((s, st, va))
        if va.size:
            ys.append((float(va.min()), float(va.max())))
    if not ys:
        return Text("no data in this window", style="dim")
    lo_y, hi_y = min(y[0] for y in ys), max(y[1] for y in ys)
    if band is not None and all(math.isfinite(b) for b in band):
        lo_y, hi_y = min(lo_y, band[0]), max(hi_y, band[1])
    if hi_y - lo_y <= 1e-12 * max(1.0, abs(hi_y)):
        lo_y, hi_y = lo_y - 0.5 * max(abs(lo_y), 1e-6), hi_y + 0.5 * max(abs(hi_y), 1e-6)
    pad = (hi_y - lo_y) * 0.04
    lo_y, hi_y = lo_y - pad, hi_y + pad

    bits = np.zeros((plot_h, plot_w), dtype=np.uint16)
    color = np.full((plot_h, plot_w), -1, dtype=np.int16)

    def to_row(v: np.ndarray) -> np.ndarray:
        return np.clip(((hi_y - v) / (hi_y - lo_y) * (dots_h - 1)).round().astype(int), 0, dots_h - 1)

    def put(xd: np.ndarray, yd: np.ndarray, c: int) -> None:
        cy, cx = yd // 4, xd // 2
        np.bitwise_or.at(bits, (cy, cx), _BITS[yd % 4, xd % 2])
        if c >= 0:
            color[cy, cx] = c

    if band is not None and all(math.isfinite(b) for b in band):
        xs = np.arange(0, dots_w, 3)
        for level in band:
            put(xs, np.full(xs.size, to_row(np.array([level]))[0]), -2)
    if marker is not None and lo_x <= marker <= hi_x:
        xd = int(round((marker - lo_x) / (hi_x - lo_x) * (dots_w - 1)))
        yd = np.arange(0, dots_h, 2)
        put(np.full(yd.size, xd), yd, -3)
    for index, (_s, st, va) in enumerate(clipped):
        if not va.size:
            continue
        c = index % len(COLORS)
        xd = np.clip(((st - lo_x) / (hi_x - lo_x) * (dots_w - 1)).round().astype(int), 0, dots_w - 1)
        yd = to_row(va)
        top = np.full(dots_w, dots_h, dtype=int)
        bottom = np.full(dots_w, -1, dtype=int)
        np.minimum.at(top, xd, yd)
        np.maximum.at(bottom, xd, yd)
        last = np.full(dots_w, -1, dtype=int)
        last[xd] = yd  # the last point of each column (steps are sorted)
        cols = np.flatnonzero(bottom >= 0)
        prev = None
        px, py = [], []
        for x in cols.tolist():
            t, b = top[x], bottom[x]
            if prev is not None:  # join to the previous column so the line is continuous
                t, b = min(t, prev), max(b, prev)
            rows = np.arange(t, b + 1)
            px.append(np.full(rows.size, x))
            py.append(rows)
            prev = last[x]
        if px:
            put(np.concatenate(px), np.concatenate(py), c)

    styles = {-2: "dim yellow", -3: "dim white", -1: ""}
    text = Text(no_wrap=True, overflow="crop")
    labels = {0: short(hi_y - pad), plot_h - 1: short(lo_y + pad), (plot_h - 1) // 2: short((hi_y + lo_y) / 2)}
    for r in range(plot_h):
        text.append(f"{labels.get(r, ''):>{label_w}}┤" if r in labels else " " * label_w + "│", style="dim")
        run_start, run_style, chars = 0, None, []
        for cidx in range(plot_w):
            b = int(bits[r, cidx])
            chars.append(chr(0x2800 + b) if b else " ")
            ci = int(color[r, cidx])
            style = COLORS[ci] if ci >= 0 else styles.get(ci, "")
            if run_style is None:
                run_style = style
            elif style != run_style:
                text.append("".join(chars[run_start:cidx]), style=run_style)
                run_start, run_style = cidx, style
        text.append("".join(chars[run_start:]), style=run_style or "")
        text.append("\n")
    axis = " " * label_w + "└" + "─" * plot_w
    text.append(axis[: label_w + 1 + plot_w] + "\n", style="dim")
    left, right, mid = f"{lo_x:.0f}", f"{hi_x:.0f}", f"{(lo_x + hi_x) / 2:.0f}"
    line = [" "] * (label_w + 1 + plot_w)
    for pos, s in (
        (label_w + 1, left),
        (label_w + 1 + plot_w // 2 - len(mid) // 2, mid),
        (label_w + 1 + plot_w - len(right), right),
    ):
        for i, ch in enumerate(s):
            if 0 <= pos + i < len(line):
                line[pos + i] = ch
    text.append("".join(line) + "  step", style="dim")
    return text


class BrailleChart(Widget):
    DEFAULT_CSS = "BrailleChart { height: 1fr; width: 1fr; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.series: list[dict] = []
        self.x_range: tuple[float, float] | None = None
        self.band: tuple[float, float] | None = None
        self.marker: int | None = None

    def set_data(self, series, x_range=None, band=None, marker=None) -> None:
        self.series, self.x_range, self.band, self.marker = series, x_range, band, marker
        self.refresh()

    def render(self) -> Text:
        w, h = self.size.width, self.size.height
        if w < 15 or h < 4:
            return Text("terminal too small for a chart", style="dim")
        return render_chart(self.series, w, h - 1, x_range=self.x_range, band=self.band, marker=self.marker)


class ChartScreen(Screen):
    """A full-screen chart. `provider(metric)` returns {"series": [...], "band", "metrics": [...], "version",
    "marker"} from the store(s); the screen polls it twice a second and redraws only when the version changed."""

    BINDINGS = keys.bindings("chart")
    DEFAULT_CSS = """
    ChartScreen { background: $surface; }
    ChartScreen #chart-title { height: auto; padding: 0 1; background: $boost; }
    ChartScreen BrailleChart { padding: 0 1; }
    ChartScreen #chart-legend { height: auto; padding: 0 1; }
    """

    def __init__(self, metric: str, provider: Callable[[str], dict], *, overlay: bool = False) -> None:
        super().__init__()
        self.metric = metric
        self.provider = provider
        self.overlay = overlay
        self.window: float | None = None  # steps shown (None: all)
        self.end: float | None = None  # right edge (None: follow the newest step)
        self._version = None
        self._data: dict = {}

    def compose(self) -> ComposeResult:
        yield Static("", id="chart-title")
        yield BrailleChart(id="chart")
        yield Static("", id="chart-legend")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.reload(force=True)
        self.set_interval(0.5, self.reload)

    # -- data ------------------------------------------------------------------------------------------
    def reload(self, force: bool = False) -> None:
        data = self.provider(self.metric)
        if not force and data.get("version") == self._version:
            return
        self._version = data.get("version")
        self._data = data
        self.redraw()

    def _span(self) -> tuple[float, float] | None:
        lo = hi = None
        for s in self._data.get("series", []):
            st = s["steps"]
            if len(st):
                lo = st[0] if lo is None else min(lo, st[0])
                hi = st[-1] if hi is None else max(hi, st[-1])
        return None if lo is None else (float(lo), float(hi))

    def x_range(self) -> tuple[float, float] | None:
        span = self._span()
        if span is None or (self.window is None and self.end is None):
            return None
        window = self.window if self.window is not None else span[1] - span[0]
        end = self.end if self.end is not None else span[1]
        end = min(max(end, span[0] + window), max(span[1], span[0] + window))
        return (end - window, end)

    def redraw(self) -> None:
        data = self._data
        x_range = self.x_range()
        self.query_one(BrailleChart).set_data(data.get("series", []), x_range, data.get("band"), data.get("marker"))
        title = Text()
        title.append("Overlay: " if self.overlay else "Chart: ", style="bold")
        title.append(clean(self.metric, 80), style="bold cyan")
        unit = next((s.get("unit") for s in data.get("series", []) if s.get("unit")), None)
        if unit:
            title.append(f" ({unit})", style="cyan")
        left_out = data.get("left_out") or []
        if left_out:  # an overlay never mixes per-token and per-sequence values
            title.append(f"  {len(left_out)} run(s) left out: other unit", style="bold yellow")
        if x_range is None:
            title.append("  whole history", style="dim")
        else:
            title.append(f"  steps {x_range[0]:.0f}–{x_range[1]:.0f}", style="dim")
        title.append("  following newest" if self.end is None else "  (f: follow)", style="dim")
        band = data.get("band")
        if band:
            title.append(f"  band {short(band[0])}…{short(band[1])}", style="yellow")
        self.query_one("#chart-title", Static).update(title)
        legend = Text()
        for i, s in enumerate(data.get("series", [])):
            values = s["values"]
            legend.append("━━ ", style=COLORS[i % len(COLORS)])
            legend.append(
                f"{clean(s.get('label'), 60)}  last {short(float(values[-1])) if len(values) else '—'}"
                f"  ({len(values)} points)   "
            )
        for s in data.get("left_out") or []:
            legend.append(f"left out: {clean(s.get('label'), 60)} ({s.get('unit')}: not comparable)   ", style="yellow")
        if not data.get("series"):
            legend.append("no data for this metric", style="dim")
        self.query_one("#chart-legend", Static).update(legend)

    # -- keys --------------------------------------------------------------------------------------------
    def action_zoom(self, factor: float) -> None:
        span = self._span()
        if span is None:
            return
        full = max(span[1] - span[0], 1.0)
        window = (self.window if self.window is not None else full) * float(factor)
        self.window = None if window >= full and self.end is None else max(4.0, min(window, full))
        self.redraw()

    def action_pan(self, direction: int) -> None:
        span = self._span()
        if span is None:
            return
        window = self.window if self.window is not None else span[1] - span[0]
        end = (self.end if self.end is not None else span[1]) + direction * max(1.0, window / 4)
        self.end = None if end >= span[1] else max(end, span[0] + window)
        if self.window is None:
            self.window = window
        self.redraw()

    def action_show_all(self) -> None:
        self.window = self.end = None
        self.redraw()

    def action_follow(self) -> None:
        self.end = None
        self.redraw()

    def action_cycle(self, direction: int) -> None:
        names = self._data.get("metrics") or []
        if not names:
            return
        i = names.index(self.metric) if self.metric in names else -1
        self.metric = names[(i + direction) % len(names)]
        self.reload(force=True)

    def action_close(self) -> None:
        self.dismiss()
