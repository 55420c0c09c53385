"""One source's view: a header line and the five panes, drawn from a `RunModel`.

`tick()` is called by the app's 10 Hz timer. The model says whether a detection pass or a redraw is due; this
widget runs them in worker threads (the report is built under the store lock, with a bounded wait while paused,
never blocking the screen) and draws the results on the screen's thread.
"""

from __future__ import annotations

import time

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Static

from rlhf_tui.analysis.store import Store
from rlhf_tui.tui.cells import clean, short
from rlhf_tui.tui.render import CONNECTION, connection_text, header_text, run_title
from rlhf_tui.tui.run_model import LOCK_WAIT, BuildResult, DetectResult, RunModel, header_info
from rlhf_tui.tui.widgets.anomalies import AnomaliesPane
from rlhf_tui.tui.widgets.checkpoints import CheckpointsPane
from rlhf_tui.tui.widgets.metrics import MetricsPane
from rlhf_tui.tui.widgets.rewards import RewardsPane
from rlhf_tui.tui.widgets.system import SystemPane

PANES = ("metrics", "anomalies", "system", "checkpoints", "rewards")


class RunHeader(Static):
    DEFAULT_CSS = "RunHeader { height: 1; background: $boost; padding: 0 1; }"


class RunView(Vertical):
    DEFAULT_CSS = """
    RunView { height: 1fr; }
    RunView #panes { height: 1fr; }
    RunView #side { height: 1fr; }
    RunView .column { width: 1fr; }
    RunView #all-hidden { height: 1fr; content-align: center middle; color: $text-muted; display: none; }
    """

    def __init__(self, store: Store, label: str, thresholds=None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model = RunModel(store, label, thresholds)
        self._header_key = None

    # What the app, the tests and the benchmarks read: the model's public state.
    store = property(lambda self: self.model.store)
    label = property(lambda self: self.model.label)
    report = property(lambda self: self.model.report)
    anomalies = property(lambda self: self.model.anomalies)
    anomaly_counts = property(lambda self: self.model.anomaly_counts)
    at_step = property(lambda self: self.model.at_step)
    detect_count = property(lambda self: self.model.detect_count)
    build_count = property(lambda self: self.model.build_count)
    detecting = property(lambda self: self.model.detecting)
    busy = property(lambda self: self.model.busy)

    def compose(self) -> ComposeResult:
        yield RunHeader("", id="run-header")
        with Horizontal(id="panes"):
            yield MetricsPane(id="metrics")
            with Horizontal(id="side"):
                with Vertical(classes="column", id="col-a"):
                    yield AnomaliesPane(id="anomalies")
                    yield CheckpointsPane(id="checkpoints")
                with Vertical(classes="column", id="col-b"):
                    yield SystemPane(id="system")
                    yield RewardsPane(id="rewards")
            yield Static("all panes hidden: press 1–5 to show them", id="all-hidden")

    # -- panes -------------------------------------------------------------------------------------------
    def pane(self, name: str):
        return self.query_one(f"#{name}")

    def apply_hidden(self, hidden: set[str]) -> None:
        for name in PANES:
            self.pane(name).display = name not in hidden
        col_a = not {"anomalies", "checkpoints"} <= hidden
        col_b = not {"system", "rewards"} <= hidden
        self.query_one("#col-a").display = col_a
        self.query_one("#col-b").display = col_b
        self.query_one("#side").display = col_a or col_b
        self.query_one("#all-hidden").display = set(PANES) <= hidden
        self.model.invalidate()

    def invalidate(self) -> None:
        """Redraw everything, the header included, at the next tick."""
        self.model.invalidate()
        self._header_key = None

    # -- detection ----------------------------------------------------------------------------------------
    def set_thresholds(self, thresholds, note: str | None = None) -> None:
        """Re-evaluate the whole history with new settings now (or as soon as a running pass is done). The view
        is redrawn when the new feed is in, so the band column and the feed change together."""
        self.model.set_thresholds(thresholds, note)
        self._header_key = None
        if note:
            self.pane("anomalies").note = "re-evaluating…"
        self._start_detection()

    def _start_detection(self) -> None:
        job = self.model.detection_due()
        if job is not None:
            self.run_worker(
                lambda: self._detect_thread(job), thread=True, group=f"detect-{self.id}", exit_on_error=False
            )

    def _detect_thread(self, job) -> None:
        result = self.model.run_detection(job)
        try:
            self.app.call_from_thread(self._detect_done, result)
        except RuntimeError:
            pass  # the app is shutting down

    def _detect_done(self, result: DetectResult) -> None:
        if result.error:
            self.app.notify(result.error, severity="error", timeout=8)
        if not self.model.finish_detection(result):
            self._start_detection()  # settings changed while it ran: run again with the new ones
            return
        self.pane("anomalies").note = ""
        note = self.model.take_note()
        if note:
            total = sum(result.counts.values())
            self.app.notify(f"{note} · re-evaluated {self.label}: {total} anomalies", timeout=4)
        self.app.tick()  # redraw now, not at the next tick: a threshold key's effect shows at once

    # -- drawing --------------------------------------------------------------------------------------------
    def build_report(self, spark_width: int | None = None, at_step: int | None = None) -> dict:
        """The report as shown (caller holds the store lock)."""
        return self.model.build_report(spark_width if spark_width is not None else self._spark_width(), at_step)

    def _spark_width(self) -> int:
        return self.pane("metrics").spark_width(list((self.report.get("metrics") or {}).keys()))

    def tick(self, now: float, *, visible: bool, paused: bool) -> None:
        self._start_detection()
        if not visible:
            return
        if paused:
            self._tick_paused()
            return
        job = self.model.build_due(self._spark_width)
        if job is not None:  # long histories take tens of ms: build on a worker, draw on the screen's thread
            self.run_worker(lambda: self._build_thread(job), thread=True, group=f"build-{self.id}", exit_on_error=False)

    def _tick_paused(self) -> None:
        version = self.model.header_due()
        if version is None or not self.store.lock.acquire(timeout=LOCK_WAIT):
            return
        try:
            info = header_info(self.store)
        finally:
            self.store.lock.release()
        self.model.header_drawn(version)
        self._draw_header(info, paused=True)

    def _build_thread(self, job) -> None:
        result = self.model.build(job)
        try:
            self.app.call_from_thread(self._show, result)
        except RuntimeError:
            pass  # shutting down

    def _show(self, result: BuildResult) -> None:
        report = self.model.finish_build(result)
        if report is None:
            self.app.notify(result.error or "view failed", severity="error", timeout=8)
            return
        started = time.perf_counter()
        for name in PANES:
            pane = self.pane(name)
            if pane.display:
                pane.safe_show(report)  # a pane that fails shows an error line, the others are drawn
        try:
            self._draw_header(report, paused=False)
        except Exception as exc:
            self.query_one(RunHeader).update(
                Text(f"⚠ header could not be drawn: {type(exc).__name__}", style="bold red")
            )
        self.model.drawn(result.cost + time.perf_counter() - started, self._spark_width())

    def _draw_header(self, report: dict, paused: bool) -> None:
        th = self.model.thresholds
        width = self.size.width or 80
        text = header_text(report, width) if report.get("metrics") is not None or not paused else _short_header(report)
        text.append(f"  z≥{short(th.anomaly_threshold)}", style="dim")
        if paused:
            text.append("  ⏸ PAUSED (p: follow)", style="bold black on yellow")
        elif self.at_step is not None:
            text.append(f"  at step {self.at_step}", style="reverse")
        extra = self.app.header_extra(self)
        if extra is not None:
            text.append("  ")
            text.append_text(extra)
        text.append(f"  {clean(self.label, 60)}", style="dim")
        text.no_wrap, text.overflow = True, "ellipsis"
        key = text.markup
        if key != self._header_key:
            self._header_key = key
            self.query_one(RunHeader).update(text)
            self.app.update_tab_label(self, report.get("connection"))

    # -- navigation ------------------------------------------------------------------------------------------
    def go_to_step(self, step: int | None) -> None:
        self.model.go_to_step(step)

    def on_anomalies_pane_selected(self, event: AnomaliesPane.Selected) -> None:
        a = event.anomaly
        step = a.get("step") if isinstance(a.get("step"), int) else a.get("first_step")
        self.go_to_step(step)
        metrics = self.pane("metrics")
        if a.get("metric") in metrics.names:
            try:
                metrics.table.move_cursor(row=metrics.names.index(a.get("metric")), animate=False)
            except Exception:
                pass

    def on_anomalies_pane_closed(self, event: AnomaliesPane.Closed) -> None:
        self.go_to_step(None)

    def on_metrics_pane_follow(self, event: MetricsPane.Follow) -> None:
        self.go_to_step(None)
        self.pane("anomalies").close_detail()

    def on_metrics_pane_filter_changed(self, event: MetricsPane.FilterChanged) -> None:
        self.model.filter_changed()

    def on_resize(self, event) -> None:
        self.invalidate()


def _short_header(info: dict) -> Text:
    text = run_title(info.get("run") or {}, 60, 40)
    text.append(f"  newest step {info.get('last_step')}  ")
    text.append_text(connection_text(info))
    return text


__all__ = ["RunView", "PANES", "CONNECTION"]
