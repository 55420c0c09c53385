"""`rlhf-tui report SOURCE --follow`: follow a live source until its run ends, printing each new alarm as a line.

The source is followed as it grows: a live address through the `Subscriber`, a JSONL log by reading the lines
appended since the last look (a line still being written waits for its newline), a source that needs no
callback (TensorBoard, trackio, an output_dir) through its readers (`followed_source`: only what is new, whole
rows), a trainer_state.json file by reading it again when it changes (caught mid-rewrite: retried at the next
look). The detectors run as in the monitor: one `RunModel` (its `DetectionCache`, `revision=run.revision`: each
pass recomputes only what grew) at most once a second while data arrives. Every wait is bounded; nothing here
spins. The first note names the run followed, once its first data is read.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rlhf_tui.analysis.reward_report import run_reward_episodes
from rlhf_tui.analysis.severity import Severity
from rlhf_tui.analysis.store import Store
from rlhf_tui.tui.alerts import AlertDispatcher, AlertOptions, AlertTracker
from rlhf_tui.tui.run_model import RunModel

FILE_POLL_S = 0.25  # how often a followed file is looked at
RELOAD_POLL_S = 1.0  # how often a file read whole (trainer_state.json) is looked at
NOT_YET_POLL_S = 0.5  # how often a follow that waits for its source (not there yet) looks for it
MAX_READ = 64 << 20  # bytes of a JSONL log read per look (a long backlog is read over several)
MAX_LINE = 16 << 20  # a longer JSONL line is not ours: dropped (and counted), never buffered whole


class JsonlTail:
    """A JSONL log read as it grows. A log that shrinks or is replaced (rotated, rewritten) is read again from
    its start into a fresh store."""

    def __init__(self, path: Path):
        self.path = path
        self.store = self._fresh()
        self._fh: Any = None
        self._inode: int | None = None
        self._offset = 0
        self._partial = b""
        self._skipping = False  # inside a line longer than MAX_LINE: dropped up to its newline
        self.error: str | None = None

    def _fresh(self) -> Store:
        store = Store()
        store.source, store.connection = str(self.path), "live"
        return store

    def poll(self) -> bool:
        """Read what was appended since the last look; True when more is waiting (read it at once)."""
        from rlhf_tui.bridge.monitor.sources import apply_jsonl_line

        try:
            stat = os.stat(self.path)
            if self._fh is None or stat.st_ino != self._inode or stat.st_size < self._offset:
                self._reopen(stat.st_ino)
            chunk = self._fh.read(MAX_READ)
            self.error = None
        except OSError as exc:
            self.error = f"cannot read {self.path}: {exc.strerror or exc}"
            return False
        if not chunk:
            return False
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # after the last newline: a line still being written
        store, default_run = self.store, f"file:{self.path.stem}"
        with store.lock:
            if self._skipping:  # still inside the overlong line: drop up to its newline
                if lines:
                    lines.pop(0)
                    self._skipping = False
                else:
                    self._partial = b""
            if len(self._partial) > MAX_LINE:
                self._partial, self._skipping = b"", True
                store.reject("JSONL line too long")
            for raw in lines:
                line = raw.strip()
                if line and apply_jsonl_line(store, line, default_run) is None:
                    store.reject("unparseable JSONL line")
            store.touch()
        return len(chunk) == MAX_READ

    def _reopen(self, inode: int) -> None:
        if self._fh is not None:
            self._fh.close()
            self.store = self._fresh()  # rewritten or rotated: what was read is no longer the log
        self._fh = open(self.path, "rb")  # kept open between looks; closed in stop()
        self._inode, self._offset, self._partial, self._skipping = inode, 0, b"", False

    def wait_s(self) -> float:
        return FILE_POLL_S

    def stop(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class FollowedReaders:
    """A source that needs no callback, through its readers (`followed_source.FileFollower`, polled here rather
    than on a thread of its own): each look lands only the rows written since the last. Reading such a source
    again whole when its path changed missed every append below a directory (an event file's growth changes
    neither `output_dir`'s nor the log directory's modification time)."""

    def __init__(self, follower):
        self.follower = follower
        self.store = follower.store

    @property
    def error(self) -> str | None:
        return self.follower.error

    def poll(self) -> bool:
        self.follower.poll()
        return False  # a reader reads at most its bound per look; the rest waits FILE_POLL_S

    def wait_s(self) -> float:
        return FILE_POLL_S

    def stop(self) -> None:
        pass


class ReloadedFile:
    """A file source without an append-only format (a trainer_state.json file): read again whole when
    its size or modification time changes; a read that fails (caught mid-rewrite) keeps the last good store."""

    def __init__(self, source: str):
        self.source = source
        self.store = Store()
        self.store.source = source
        self._key: tuple | None = None
        self.error: str | None = None

    def poll(self) -> bool:
        from rlhf_tui.bridge.monitor.sources import SourceError, load_file_source, resolve_file_source

        try:
            path = resolve_file_source(self.source)
            stat = path.stat()
            key = (str(path), stat.st_size, stat.st_mtime_ns)
            if key == self._key:
                return False
            store = load_file_source(self.source)
        except (SourceError, OSError) as exc:
            self.error = str(exc)
            return False
        store.connection = "live"
        self.store, self._key, self.error = store, key, None
        return False

    def wait_s(self) -> float:
        return RELOAD_POLL_S

    def stop(self) -> None:
        pass


class LiveAddress:
    """A tcp:// or ipc:// address, mirrored by a Subscriber thread that wakes the follower on new data."""

    def __init__(self, address: str, wake: threading.Event, curve=None):
        from rlhf_tui.bridge.monitor.subscriber import Subscriber

        self.sub = Subscriber(address, curve=curve, on_change=wake.set).start()
        self.store = self.sub.store

    @property
    def error(self) -> str | None:
        return self.sub.error

    def poll(self) -> bool:
        return False

    def wait_s(self) -> float:
        return 1.0  # woken at once by new data; the wait only bounds how late a timeout or signal is seen

    def stop(self) -> None:
        self.sub.stop(0.5)


class NotYet:
    """A path source that is not there yet (`report --follow` started before the training wrote its log):
    looked for again every NOT_YET_POLL_S; once it is there, the follow goes on through its real follower."""

    def __init__(self, source: str, wake: threading.Event, curve=None):
        self.source, self.wake, self.curve = source, wake, curve
        self.inner = None
        self.store = Store()
        self.store.source = source

    @property
    def error(self) -> str | None:
        return self.inner.error if self.inner is not None else None

    def poll(self) -> bool:
        from rlhf_tui.bridge.monitor.sources import SourceNotYet

        if self.inner is None:
            try:
                self.inner = open_source(self.source, self.wake, self.curve)
            except SourceNotYet:
                return False
            self.store = self.inner.store
        return self.inner.poll()

    def wait_s(self) -> float:
        return self.inner.wait_s() if self.inner is not None else NOT_YET_POLL_S

    def stop(self) -> None:
        if self.inner is not None:
            self.inner.stop()


def open_source(source: str, wake: threading.Event, curve=None):
    """The follower for a source: LiveAddress, FollowedReaders, JsonlTail or ReloadedFile. Raises SourceError
    (one line)."""
    from rlhf_tui.bridge.monitor.followed_source import follow_file_source
    from rlhf_tui.bridge.monitor.sources import is_live, resolve_file_source

    if is_live(source):
        return LiveAddress(source, wake, curve)
    follower = follow_file_source(source)  # SourceUnavailable (a SourceError) where an optional reader is missing
    if follower is not None:
        return FollowedReaders(follower)
    path = resolve_file_source(source)
    return JsonlTail(path) if path.suffix == ".jsonl" else ReloadedFile(source)


def run_episodes(store: Store, run_id: str | None, episodes: list[dict], thresholds) -> list[dict]:
    """A detection pass's episodes with the run's reward-function episodes (as the feed shows them)."""
    with store.lock:
        run = store.runs.get(run_id) if run_id else None
        rewards = run_reward_episodes(run, thresholds) if run is not None else []
    return [*episodes, *rewards]


@dataclass
class FollowResult:
    store: Store
    reason: str  # "ended" | "timeout" | "interrupted"
    alarms: int = 0  # lines printed
    worst: str | None = None  # the worst severity of the last pass (every episode counted, rewards too)


class Follower:
    """Follows one source; `run()` returns when its current run has ended, at `timeout`, or on `stop()`."""

    def __init__(
        self,
        source: str,
        thresholds,
        tracker: AlertTracker,
        dispatcher: AlertDispatcher | None = None,
        *,
        curve=None,
        out: TextIO | None = None,
        note: Callable[[str], None] | None = None,
    ):
        self.wake = threading.Event()
        self._stopped = False
        self.source = source
        self.thresholds = thresholds
        self.tracker = tracker
        self.dispatcher = dispatcher
        self.out = out or sys.stdout
        self.note = note or (lambda text: None)
        from rlhf_tui.bridge.monitor.sources import SourceNotYet

        try:
            self.feed = open_source(source, self.wake, curve)
        except SourceNotYet as exc:  # started before the training wrote it: wait (like `tail -F`)
            self.feed = NotYet(source, self.wake, curve)
            self.note(f"{exc}; waiting for it to appear (--timeout S gives up after S seconds)")
        self.model = RunModel(self.feed.store, source, thresholds)
        self._ended_at: int | None = None  # the store version at which its current run was seen ended
        self._covered = -1  # the store version the last finished pass saw
        self._error: str | None = None
        self._following: str | None = None  # the run the last note named

    def stop(self) -> None:
        """Stop following (any thread, a signal handler too): `run()` returns within a wait."""
        self._stopped = True
        self.wake.set()

    def run(self, timeout: float | None = None) -> FollowResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        result = FollowResult(self.model.store, "interrupted")
        try:
            while True:
                more = self.feed.poll()
                self._report_error()
                self._report_run()
                if self.feed.store is not self.model.store:  # a file read again whole: a new history
                    self.model = RunModel(self.feed.store, self.source, self.thresholds)
                ended = self._check_ended()
                if self._detect(result) and ended:
                    result.reason = "ended"
                    break
                if self._stopped:
                    break
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    result.reason = "timeout"
                    self.model.request_detect()  # what arrived since the last pass
                    self._detect(result)
                    break
                if not more:
                    wait = self.feed.wait_s() if ended is None else 0.05
                    if deadline is not None:
                        wait = min(wait, max(0.0, deadline - now))
                    self.wake.wait(wait)
                    self.wake.clear()
        except KeyboardInterrupt:
            result.reason = "interrupted"
        finally:
            self.feed.stop()
        result.store = self.model.store
        return result

    def _check_ended(self) -> int | None:
        """The store version at which the current run was first seen ended (None while it runs)."""
        store = self.model.store
        with store.lock:
            run = store.current_run
            if run is None or run.ended is None:
                self._ended_at = None
            elif self._ended_at is None:
                self._ended_at = store.version
        return self._ended_at

    def _detect(self, result: FollowResult) -> bool:
        """Run a pass if one is due, print and send its new alarms. True when the last pass covers the run's
        end (its store version is at or past the one at which the run was seen ended)."""
        model = self.model
        job = model.detection_due()
        if job is not None:
            done = model.run_detection(job)
            if model.finish_detection(done):
                self._covered = job.version
            if done.error:
                self.note(done.error)
            episodes = run_episodes(model.store, done.run_id, done.episodes, self.thresholds)
            worst = Severity.worst([s for s, n in done.counts.items() if n] + [e.get("severity") for e in episodes])
            result.worst = None if worst is None else str(worst)
            if done.run_id is not None:
                with model.store.lock:
                    source = model.store.source
                for alert in self.tracker.new_alerts(done.run_id, episodes, source):
                    self.out.write(alert.line() + "\n")
                    result.alarms += 1
                    if self.dispatcher is not None:
                        self.dispatcher.submit(alert)
                self.out.flush()
        return self._ended_at is not None and self._covered >= self._ended_at

    def _report_run(self) -> None:
        """One note when a run is first seen (or another one becomes current): what is followed, at which step."""
        with self.feed.store.lock:
            run = self.feed.store.current_run
            run_id, step = (run.run_id, run.last_step) if run is not None else (None, None)
        if run_id is not None and run_id != self._following:
            self._following = run_id
            self.note(f"following run {run_id}" + (f", at step {step}" if step is not None else ""))

    def _report_error(self) -> None:
        error = self.feed.error
        if error and error != self._error:
            self.note(error)
        self._error = error


def follow_source(
    source: str,
    thresholds,
    alerts: AlertOptions | None = None,
    *,
    curve=None,
    timeout: float | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> tuple[Store, str | None]:
    """`report SOURCE --follow`: alarm lines on `out`, notes on `err` (one line each, "rlhf-tui: ..."), until the
    run ends, `timeout`, Ctrl-C or SIGTERM. Returns the store and the worst severity found (for --fail-on).
    A source that cannot be read, or one that gave no data at all, is a CliError."""
    from rlhf_tui.bridge.monitor.sources import SourceError
    from rlhf_tui.tui.cli_options import CliError

    err = err or sys.stderr
    lock = threading.Lock()

    def note(text: str) -> None:
        with lock:
            err.write(f"rlhf-tui: {text}\n")
            err.flush()

    options = alerts or AlertOptions()
    dispatcher = AlertDispatcher(options, note=note, bell=_terminal_bell) if options.sends else None
    try:
        follower = Follower(
            source, thresholds, AlertTracker(options.level), dispatcher, curve=curve, out=out, note=note
        )
    except SourceError as exc:
        raise CliError(str(exc)) from None
    previous = _catch_sigterm(follower.stop)
    try:
        result = follower.run(timeout)
    finally:
        _restore_sigterm(previous)
        if dispatcher is not None:
            dispatcher.close(timeout=DRAIN_S + options.command_timeout)  # what is queued still goes out
            summary = dispatcher.summary()
            if summary:
                note(summary)
    store = result.store
    with store.lock:
        run = store.current_run
        run_id, step = (run.run_id, run.last_step) if run is not None else (None, None)
    if run_id is None:
        why = f": {follower.feed.error}" if follower.feed.error else ""
        limit = f" within {timeout:g} s" if result.reason == "timeout" and timeout is not None else ""
        raise CliError(f"no data from {source}{limit}{why}")
    alarms = f"{result.alarms} alarm{'s' if result.alarms != 1 else ''} at {options.level} or above"
    if result.reason == "ended":
        note(f"run {run_id} ended at step {step}: {alarms}")
    elif result.reason == "timeout":
        note(f"stopped after {timeout:g} s (--timeout) at step {step}, run {run_id} still running: {alarms}")
    else:
        note(f"stopped at step {step} of run {run_id}: {alarms}")
    return store, result.worst


DRAIN_S = 20.0  # at exit, seconds (beyond one command's timeout) to deliver the alerts still queued


def _terminal_bell() -> None:
    for stream in (sys.stderr, sys.stdout):
        if stream.isatty():
            stream.write("\a")
            stream.flush()
            return


def _catch_sigterm(stop: Callable[[], None]):
    """SIGTERM (Slurm's time limit, `kill`) ends the follow cleanly, its report and exit code included.
    Returns what to give `_restore_sigterm` (nothing changes off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    return signal.signal(signal.SIGTERM, lambda signum, frame: stop())


def _restore_sigterm(previous) -> None:
    if previous is not False:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


__all__ = [
    "Follower",
    "FollowedReaders",
    "follow_source",
    "FollowResult",
    "JsonlTail",
    "LiveAddress",
    "ReloadedFile",
    "open_source",
    "run_episodes",
]
