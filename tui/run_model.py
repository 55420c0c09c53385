"""One run's view state without Textual: when a detection pass or a redraw is due, running them (on whatever
thread the widget picks), and which results are still current (version and generation counters discard stale
ones). The `RunView` widget only runs these jobs in workers and draws what they return.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rlhf_tui.analysis.detectors import DetectionCache, evaluate
from rlhf_tui.analysis.report import log_errors
from rlhf_tui.analysis.store import Store
from rlhf_tui.tui.widgets.model import KEEP_LOW, KEEP_OTHER, view_report

DETECT_MIN_INTERVAL = 1.0  # seconds between live re-evaluations
LOCK_WAIT = 0.02  # longest the screen waits for the store lock before trying next tick
BUILD_SHARE = 3  # wait 3x a redraw's cost before the next: never more than ~a quarter of the time drawing
DETECT_SHARE = 4  # the same for detection passes (they run beside the redraws)


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
        info["rejected_fields"] = {"count": run.rejected_fields}
        info["log_errors"] = log_errors(run)
        if run.last_step_time is not None:
            info["last_step_wall"] = time.time() - (time.monotonic() - run.last_step_time)
    return info


@dataclass
class DetectJob:
    """One detection pass to run: the thresholds it judges with, the store version and settings generation."""

    thresholds: Any
    version: int
    generation: int


@dataclass
class DetectResult:
    job: DetectJob
    run_id: str | None = None
    episodes: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    cost: float = 0.0
    error: str | None = None


@dataclass
class BuildJob:
    """One report to build: everything is captured at once, so the build sees one consistent view."""

    thresholds: Any
    anomalies: list
    spark_width: int
    at_step: int | None
    counts: dict | None


@dataclass
class BuildResult:
    report: dict | None
    cost: float
    error: str | None = None
    spark_width: int = 0


class RunModel:
    """The state and schedule of one source's view. `clock` is injectable (tests use a fake one)."""

    def __init__(self, store: Store, label: str, thresholds=None, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.label = label
        self.clock = clock
        self._thresholds = thresholds
        self.generation = 0  # bumped on every settings change: passes started before it are stale
        self.cache = DetectionCache()  # baselines kept between passes: a key press recomputes little
        self.anomalies: list[dict] = []
        self.anomalies_run: str | None = None
        self.anomaly_counts: dict[str, int] | None = None
        self.at_step: int | None = None
        self.report: dict = {}
        self.pending_note: str | None = None
        self.detect_count = 0
        self.build_count = 0  # reports shown (tests and benchmarks wait on it)
        self.detect_interval = DETECT_MIN_INTERVAL
        self._dirty = True
        self._seen_version = -1
        self._built_width = 0
        self._next_build = 0.0
        self._building = False
        self._detect_running = False
        self._detect_force = True
        self._detected_version = -1
        self._detect_done_at = 0.0

    # -- settings ------------------------------------------------------------------------------------------
    @property
    def thresholds(self):
        return self._thresholds

    def set_thresholds(self, thresholds, note: str | None = None) -> None:
        """New settings: the whole history is re-evaluated (a pass running now is discarded when it ends)."""
        self._thresholds = thresholds
        self.generation += 1
        self.request_detect(note)

    # -- detection -----------------------------------------------------------------------------------------
    def request_detect(self, note: str | None = None) -> None:
        """Re-evaluate the whole history at the next `detection_due` (at once, or when a running pass ends)."""
        self._detect_force = True
        if note:
            self.pending_note = note

    @property
    def detecting(self) -> bool:
        return self._detect_running or self._detect_force

    def detection_due(self) -> DetectJob | None:
        """The pass to start now, if one is due (then it counts as running until `finish_detection`)."""
        if self._detect_running:
            return None
        version = self.store.version
        due = self._detect_force or (
            version != self._detected_version and self.clock() - self._detect_done_at >= self.detect_interval
        )
        if not due:
            return None
        self._detect_force = False
        self._detect_running = True
        return DetectJob(self._thresholds, version, self.generation)

    def run_detection(self, job: DetectJob) -> DetectResult:
        """The pass itself (any thread): the store lock is held only to take views of the arrays."""
        store, result = self.store, DetectResult(job)
        started = time.perf_counter()
        try:
            for _ in range(3):
                with store.lock:
                    run = store.current_run
                    if run is None:
                        break
                    run_id, thinned, revision = run.run_id, run.thinned, run.revision
                    # Views, not copies: rows below `rows` only change when the run is thinned (checked after).
                    arrays = (run.steps, run.metrics(), run.logged_masks(), dict(run.meta))
                episodes, counts = evaluate(
                    arrays,
                    job.thresholds,
                    cache=self.cache,
                    keep_low=KEEP_LOW,
                    keep_other=KEEP_OTHER,
                    revision=revision,  # the cache then trusts the earlier rows instead of checksumming them
                )
                del arrays
                result.run_id, result.episodes, result.counts = run_id, episodes, counts
                with store.lock:
                    if run.thinned == thinned:
                        break
            if time.perf_counter() - started > 0.05:  # a pass over the whole history: its temporaries were large
                release_memory()
        except Exception as exc:  # a detector bug must not take the monitor down
            result.error = f"anomaly detection failed: {type(exc).__name__}: {exc}"
        result.cost = time.perf_counter() - started
        return result

    def finish_detection(self, result: DetectResult) -> bool:
        """Take a pass's result (screen thread). False when settings changed while it ran: it is discarded and
        a new pass is due at once."""
        self._detect_running = False
        self._detect_done_at = self.clock()
        self.detect_interval = max(DETECT_MIN_INTERVAL, DETECT_SHARE * result.cost)
        if result.job.generation != self.generation:
            self._detect_force = True
            return False
        self._detected_version = result.job.version
        self.anomalies, self.anomalies_run, self.anomaly_counts = result.episodes, result.run_id, result.counts
        self.detect_count += 1
        self.invalidate()  # a threshold key's effect shows at once
        return True

    def take_note(self) -> str | None:
        """The settings change to announce with the finished pass (once)."""
        note, self.pending_note = self.pending_note, None
        return note

    def current_anomalies(self) -> list[dict]:
        run = self.store.current_run
        return self.anomalies if run is not None and run.run_id == self.anomalies_run else []

    def current_counts(self) -> dict[str, int] | None:
        run = self.store.current_run
        return self.anomaly_counts if run is not None and run.run_id == self.anomalies_run else None

    # -- redraws -------------------------------------------------------------------------------------------
    def invalidate(self) -> None:
        """Redraw at the next tick whatever the throttle says (layout, settings, navigation changed)."""
        self._dirty = True
        self._seen_version = -1
        self._next_build = 0.0

    @property
    def busy(self) -> bool:
        """A redraw is pending or being built."""
        return self._dirty or self._building

    def header_due(self) -> int | None:
        """While paused only the header follows the store: the version to draw it at, None when it is drawn."""
        version = self.store.version
        return None if version == self._seen_version else version

    def header_drawn(self, version: int) -> None:
        self._seen_version = version

    def build_due(self, spark_width: Callable[[], int]) -> BuildJob | None:
        """The report to build now, if the store changed or a redraw was asked for and the throttle allows.
        `spark_width`: asked only when a build is due (the pane's layout is not free to query at 10 Hz)."""
        version = self.store.version
        if self._building or (version == self._seen_version and not self._dirty) or self.clock() < self._next_build:
            return None
        self._building = True
        self._seen_version, self._dirty = version, False
        return BuildJob(self._thresholds, self.current_anomalies(), spark_width(), self.at_step, self.current_counts())

    def build(self, job: BuildJob) -> BuildResult:
        """Build the report (any thread; takes the store lock)."""
        try:
            with self.store.lock:
                started = time.perf_counter()  # the cost that counts is the work, not the wait for the lock
                report = view_report(
                    self.store,
                    job.thresholds,
                    anomalies=job.anomalies,
                    spark_width=job.spark_width,
                    at_step=job.at_step,
                    anomaly_counts=job.counts,
                )
            return BuildResult(report, time.perf_counter() - started, spark_width=job.spark_width)
        except Exception as exc:  # a bug of ours must not freeze the screen
            return BuildResult(None, 0.0, f"view failed: {type(exc).__name__}: {exc}")

    def build_report(self, spark_width: int, at_step: int | None = None) -> dict:
        """The report as shown, built now (caller holds the store lock): the snapshot key."""
        return view_report(
            self.store,
            self._thresholds,
            anomalies=self.current_anomalies(),
            spark_width=spark_width,
            at_step=at_step,
            anomaly_counts=self.current_counts(),
        )

    def finish_build(self, result: BuildResult) -> dict | None:
        """The report to draw (None after an error: retried in a second)."""
        self._building = False
        if result.error or result.report is None:
            self._next_build = self.clock() + 1.0
            return None
        self.report, self._built_width = result.report, result.spark_width
        return result.report

    def drawn(self, cost: float, spark_width: int | None = None) -> None:
        """The report was drawn; `cost`: building plus drawing, seconds. Throttles the next redraw.
        `spark_width`: the width the pane wants now; a new one (the first report is built before the pane
        knows its metrics' names) asks for a redraw at once."""
        self.build_count += 1
        self._next_build = self.clock() + BUILD_SHARE * cost
        if spark_width is not None and spark_width != self._built_width:
            self.invalidate()

    # -- navigation ----------------------------------------------------------------------------------------
    def go_to_step(self, step: int | None) -> None:
        self.at_step = step
        self._dirty = True

    def filter_changed(self) -> None:
        self._dirty = True
        self._next_build = 0.0
