"""One source's view: a header line and the five panes, fed from one Store.

`tick()` is called by the app's 10 Hz timer. It does nothing unless the store's version changed; it builds the
report under the store lock (bounded wait, never blocking the screen), renders outside it, and throttles itself
when building gets expensive (long runs) so the screen stays responsive at any data rate. Anomaly detection runs
on a worker thread over the whole history: at once after a threshold change, otherwise at most every ~1 s (longer
for very long runs) when new data arrived.
"""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Static

from rlhf_tui.analysis.store import Store
from rlhf_tui.tui.render import CONNECTION, clean, connection_text, header_text, short
from rlhf_tui.tui.widgets.anomalies import AnomaliesPane
from rlhf_tui.tui.widgets.checkpoints import CheckpointsPane
from rlhf_tui.tui.widgets.metrics import MetricsPane
from rlhf_tui.tui.widgets.model import KEEP_LOW, KEEP_OTHER, view_report
from rlhf_tui.tui.widgets.rewards import RewardsPane
from rlhf_tui.tui.widgets.system import SystemPane

PANES = ("metrics", "anomalies", "system", "checkpoints", "rewards")
DETECT_MIN_INTERVAL = 1.0  # seconds between live re-evaluations
LOCK_WAIT = 0.02  # longest the screen waits for the store lock before trying next tick


def _libc():
    try:
        import ctypes
        import ctypes.util

        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_large_arrays_off_the_heap() -> None:
    """Have glibc map every allocation of 1 MiB or more on its own (mallopt M_MMAP_THRESHOLD), so the
    detectors' and report builder's large temporaries go back to the OS when freed. By default glibc raises
    that threshold after each large free (up to 32 MiB) and keeps such arrays on per-thread heaps, and the
    monitor's RSS creeps up with every detection pass. No-op where mallopt does not exist."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixing it also stops the dynamic raise)


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise). No-op where malloc_trim does not
    exist."""
    global _TRIM
    if _TRIM is None:
        libc = _libc()
        _TRIM = getattr(libc, "malloc_trim", False) if libc is not None else False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def header_info(store: Store) -> dict:
    """The few fields the header needs (cheap: used while paused). Caller holds the lock."""
    run = store.current_run
    info: dict[str, Any] = {
        "connection": store.connection,
        "stale_since": store.stale_since,
        "source": store.source,
        "run": {},
        "steps": 0,
        "last_step": None,
    }
    if run is not None:
        info["run"] = {
            "run_id": run.run_id,
            "trainer": run.trainer,
            "model": run.meta.get("model"),
            "max_steps": run.meta.get("max_steps"),
        }
        info["steps"], info["last_step"] = int(run.rows), run.last_step
        if run.last_step_time is not None:
            info["last_step_wall"] = time.time() - (time.monotonic() - run.last_step_time)
    return info


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

    def __init__(self, store: Store, label: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.store = store
        self.label = label
        self.anomalies: list[dict] = []
        self.anomalies_run: str | None = None
        self.anomaly_counts: dict[str, int] | None = None
        self.at_step: int | None = None
        self.report: dict = {}
        self.dirty = True
        self._seen_version = -1
        self._next_build = 0.0
        self._header_key: Any = None
        # detection state
        self._detect_running = False
        self._detect_force = True
        self._detected_version = -1
        self._detect_done_at = 0.0
        self._detect_interval = DETECT_MIN_INTERVAL
        self._detect_thresholds = None
        self._detect_cache = None
        self.detect_count = 0
        self.build_count = 0  # reports shown (tests and benchmarks wait on it)
        self.pending_note: str | None = None
        self._building = False

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
        self.dirty = True

    # -- detection ----------------------------------------------------------------------------------------
    def request_detect(self, note: str | None = None) -> None:
        """Re-evaluate the whole history now (threshold change): at once, not at the next tick, or as soon as
        a pass already running is done. The view is redrawn when the new feed is in, so the band column and
        the feed change together and the two passes do not compete for the CPU."""
        self._detect_force = True
        if note:
            self.pending_note = note
            self.pane("anomalies").note = "re-evaluating…"
        self._maybe_detect(time.monotonic())

    def _maybe_detect(self, now: float) -> None:
        if self._detect_running:
            return
        version = self.store.version
        due = self._detect_force or (
            version != self._detected_version and now - self._detect_done_at >= self._detect_interval
        )
        if not due:
            return
        self._detect_force = False
        self._detect_running = True
        thresholds = self.app.thresholds
        self._detect_thresholds = thresholds
        self.run_worker(
            lambda: self._detect_thread(thresholds, version),
            thread=True,
            group=f"detect-{self.id}",
            exit_on_error=False,
            name="detect",
        )

    def _detect_thread(self, thresholds, version: int) -> None:
        from rlhf_tui.analysis.detectors import DetectionCache, evaluate

        if self._detect_cache is None:
            self._detect_cache = DetectionCache()  # baselines kept between passes: a key press recomputes little
        started = time.perf_counter()
        store = self.store
        run_id, episodes, counts = None, [], {}
        try:
            for _ in range(3):
                with store.lock:
                    run = store.current_run
                    if run is None:
                        break
                    run_id, thinned = run.run_id, run.thinned
                    # Views, not copies: rows below `rows` only change when the run is thinned (checked after).
                    arrays = (run.steps, run.metrics(), run.logged_masks(), dict(run.meta))
                episodes, counts = evaluate(
                    arrays, thresholds, cache=self._detect_cache, keep_low=KEEP_LOW, keep_other=KEEP_OTHER
                )
                del arrays
                with store.lock:
                    if run.thinned == thinned:
                        break
            error = None
            release_memory()
        except Exception as exc:  # a detector bug must not take the monitor down
            error = f"anomaly detection failed: {type(exc).__name__}: {exc}"
        cost = time.perf_counter() - started
        try:
            self.app.call_from_thread(self._detect_done, thresholds, version, run_id, (episodes, counts), cost, error)
        except RuntimeError:
            pass  # the app is shutting down

    def _detect_done(self, thresholds, version: int, run_id, result: tuple, cost: float, error: str | None) -> None:
        episodes, counts = result
        self._detect_running = False
        self._detect_done_at = time.monotonic()
        self._detect_interval = max(DETECT_MIN_INTERVAL, 4 * cost)
        if error:
            self.app.notify(error, severity="error", timeout=8)
        if thresholds is not self.app.thresholds:
            self._detect_force = True  # settings changed while this ran: its result is stale
            self._maybe_detect(time.monotonic())
            return
        self._detected_version = version
        self.anomalies, self.anomalies_run, self.anomaly_counts = episodes, run_id, counts
        self.detect_count += 1
        pane = self.pane("anomalies")
        pane.note = ""
        if self.pending_note:
            self.app.notify(
                f"{self.pending_note} · re-evaluated {self.label}: {sum(counts.values())} anomalies", timeout=4
            )
            self.pending_note = None
        self.dirty = True
        self.app.tick()  # redraw now, not at the next tick: a threshold key's effect shows at once

    @property
    def detecting(self) -> bool:
        return self._detect_running or self._detect_force

    # -- drawing --------------------------------------------------------------------------------------------
    def current_anomalies(self) -> list[dict]:
        run = self.store.current_run
        return self.anomalies if run is not None and run.run_id == self.anomalies_run else []

    def build_report(self, spark_width: int | None = None, at_step: int | None = None) -> dict:
        """The report as shown (caller holds the store lock)."""
        width = spark_width if spark_width is not None else self._spark_width()
        return view_report(
            self.store,
            self.app.thresholds,
            anomalies=self.current_anomalies(),
            spark_width=width,
            at_step=at_step,
            anomaly_counts=self.current_counts(),
        )

    def current_counts(self) -> dict[str, int] | None:
        run = self.store.current_run
        return self.anomaly_counts if run is not None and run.run_id == self.anomalies_run else None

    def _spark_width(self) -> int:
        return self.pane("metrics").spark_width(list((self.report.get("metrics") or {}).keys()))

    @property
    def busy(self) -> bool:
        """A redraw is pending or being built."""
        return self.dirty or self._building

    def tick(self, now: float, *, visible: bool, paused: bool) -> None:
        self._maybe_detect(now)
        if not visible:
            return
        version = self.store.version
        if paused:
            if version != self._seen_version:
                if self.store.lock.acquire(timeout=LOCK_WAIT):
                    try:
                        info = header_info(self.store)
                    finally:
                        self.store.lock.release()
                    self._seen_version = version
                    self._draw_header(info, paused=True)
            return
        if self._building or (version == self._seen_version and not self.dirty) or now < self._next_build:
            return
        # Build the report on a worker thread (long histories take tens of ms), draw it on the screen's thread.
        self._building = True
        self._seen_version, self.dirty = version, False
        args = (self.app.thresholds, self.current_anomalies(), self._spark_width(), self.at_step, self.current_counts())
        self.run_worker(
            lambda: self._build_thread(*args), thread=True, group=f"build-{self.id}", exit_on_error=False, name="build"
        )

    def _build_thread(self, thresholds, anomalies, spark_width, at_step, counts) -> None:
        report, error = None, None
        started = time.perf_counter()
        try:
            with self.store.lock:
                started = time.perf_counter()  # the cost that counts is the work, not the wait for the lock
                report = view_report(
                    self.store,
                    thresholds,
                    anomalies=anomalies,
                    spark_width=spark_width,
                    at_step=at_step,
                    anomaly_counts=counts,
                )
        except Exception as exc:  # a bug of ours must not freeze the screen
            error = f"view failed: {type(exc).__name__}: {exc}"
        cost = time.perf_counter() - started
        try:
            self.app.call_from_thread(self._show, report, cost, error)
        except RuntimeError:
            pass  # shutting down

    def _show(self, report: dict | None, cost: float, error: str | None) -> None:
        self._building = False
        if error or report is None:
            self.app.notify(error or "view failed", severity="error", timeout=8)
            self._next_build = time.monotonic() + 1.0
            return
        started = time.perf_counter()
        self.report = report
        for name in PANES:
            pane = self.pane(name)
            if pane.display:
                pane.show(report)
        self._draw_header(report, paused=False)
        self.build_count += 1
        cost += time.perf_counter() - started
        # Never spend more than ~a quarter of the time drawing, however fast data arrives.
        self._next_build = time.monotonic() + 3 * cost

    def _draw_header(self, report: dict, paused: bool) -> None:
        th = self.app.thresholds
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
        self.at_step = step
        self.dirty = True

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
        self.dirty = True
        self._next_build = 0.0

    def on_resize(self, event) -> None:
        self.dirty = True
        self._header_key = None


def _short_header(info: dict) -> Text:
    run = info.get("run") or {}
    text = Text.assemble(
        ("rlhf-tui", "bold"),
        "  run ",
        (clean(run.get("run_id"), 60), "bold cyan"),
        f"  {clean(run.get('trainer'), 40)}  newest step {info.get('last_step')}  ",
    )
    text.append_text(connection_text(info))
    return text


__all__ = ["RunView", "PANES", "CONNECTION", "header_info"]
