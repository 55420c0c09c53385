"""The live monitor: a Textual app that shows one or more sources (live runs or files).

The app only draws and handles keys. Data arrives on subscriber threads into a Store; a 10 Hz timer
redraws from a snapshot of the store when its version changed, so the screen never redraws faster than
~10 Hz however fast steps arrive.
"""
from __future__ import annotations

import numpy as np
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Footer, Sparkline, Static

from rlhf_tui.analysis.report import CANONICAL_ORDER, ordered_metrics
from rlhf_tui.analysis.store import Store
from rlhf_tui.tui.render import fmt

REFRESH_HZ = 10
CONNECTION_STYLE = {"live": "green", "ended": "cyan", "offline": "cyan", "connecting": "yellow",
                    "stalled": "yellow", "stale": "red", "unreachable": "red"}


class MetricRow(Static):
    """One metric: name, latest value and a sparkline of its history."""

    DEFAULT_CSS = """
    MetricRow { layout: horizontal; height: 1; }
    MetricRow .name { width: 24; }
    MetricRow .value { width: 12; text-align: right; padding-right: 1; }
    MetricRow Sparkline { width: 1fr; }
    """

    def __init__(self, metric: str, **kwargs):
        super().__init__(**kwargs)
        self.metric = metric

    def compose(self) -> ComposeResult:
        yield Static(self.metric, classes="name")
        yield Static("—", classes="value")
        yield Sparkline([], summary_function=max)

    def show(self, values: np.ndarray, latest: float | None) -> None:
        self.query_one(".value", Static).update(fmt(latest))
        finite = values[np.isfinite(values)]
        self.query_one(Sparkline).data = finite[-2000:].tolist()


class MonitorApp(App):
    TITLE = "rlhf-tui"
    BINDINGS = [Binding("q", "quit", "Quit", id="quit")]
    CSS = """
    #header { height: 1; background: $boost; padding: 0 1; }
    #metrics { height: 1fr; }
    """

    def __init__(self, sources: list[str], *, thresholds=None, snapshot_dir: str | None = None,
                 training_process=None, training_log: str | None = None, stores: list[Store] | None = None):
        super().__init__()
        self.sources = list(sources)
        self.thresholds = thresholds
        self.snapshot_dir = snapshot_dir
        self.training_process = training_process
        self.training_log = training_log
        self.stores: list[Store] = stores or []
        self.subscribers = []
        self._seen_version = -1
        self.load_errors: list[str] = []

    def compose(self) -> ComposeResult:
        yield Static("", id="header")
        yield VerticalScroll(id="metrics")
        yield Footer()

    def on_mount(self) -> None:
        if not self.stores:
            self.stores = [self._open(source) for source in self.sources]
        self.set_interval(1 / REFRESH_HZ, self.refresh_view)
        self.refresh_view()

    def _open(self, source: str) -> Store:
        from rlhf_tui.bridge.sources import SourceError, is_live, load_file_source
        from rlhf_tui.bridge.subscriber import Subscriber

        if is_live(source):
            sub = Subscriber(source).start()
            self.subscribers.append(sub)
            return sub.store
        try:
            return load_file_source(source)
        except SourceError as exc:
            store = Store()
            store.source, store.connection = source, "unreachable"
            self.load_errors.append(str(exc))
            return store

    @property
    def store(self) -> Store:
        return self.stores[0]

    def refresh_view(self) -> None:
        store = self.store
        if store.version == self._seen_version:
            return
        with store.lock:
            self._seen_version = store.version
            run = store.current_run
            header = self._header(store, run)
            names = [n for n in ordered_metrics(run.metric_names()) if n in CANONICAL_ORDER] if run else []
            series = {n: (run.values(n).copy(), run.latest(n)) for n in names}
        self.query_one("#header", Static).update(header)
        container = self.query_one("#metrics", VerticalScroll)
        existing = {row.metric: row for row in container.query(MetricRow)}
        for name in names:
            if name not in existing:
                row = MetricRow(name, id=f"metric-{names.index(name)}-{abs(hash(name)) % 10**8}")
                container.mount(row)
                existing[name] = row
        for name, row in existing.items():
            if name in series:
                if row.is_mounted and row.children:
                    row.show(*series[name])
                else:
                    self._seen_version = -1  # just mounted: fill it on the next tick

    def _header(self, store: Store, run) -> str:
        conn = store.connection
        style = CONNECTION_STYLE.get(conn, "white")
        if run is None:
            return f"[b]rlhf-tui[/b]  {store.source}  [{style}]{conn}[/]  waiting for data…"
        from rich.markup import escape

        step = run.last_step if run.last_step is not None else "—"
        return (f"[b]rlhf-tui[/b]  run [cyan]{escape(run.run_id)}[/]  {escape(run.trainer)}  step {step}  "
                f"[{style}]{conn}[/]  {escape(store.source)}")

    def on_unmount(self) -> None:
        for sub in self.subscribers:
            sub.stop(0.5)
