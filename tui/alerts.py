"""Alerts out: each new anomaly episode at or above a level goes to a command (`--on-alert`), a webhook, the
desktop (`notify-send`) and the terminal bell, without ever blocking the monitor. Standard library only.

`AlertTracker` decides what is new: an episode (run, detector, metric, first step) not alerted before in this
session, or one that escalated to a worse severity since (alerted again, once per escalation). `AlertDispatcher`
sends: a sliding-window rate limit (at most `rate` alerts a minute; the rest are counted and summarised), then
one bounded queue and one worker thread per sink, so a slow or hanging command or webhook only delays its own
sink. A command is killed after its timeout; a webhook is retried a bounded number of times with backoff. Every
failure is counted, and the first of each sink is reported once through `note` (a line in `report --follow`, a
notification and the header in the monitor). See docs/alerts.md.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rlhf_tui.analysis.severity import Severity

DEFAULT_LEVEL = "medium"
DEFAULT_RATE = 10  # alerts a minute sent out; the rest are counted and summarised
DEFAULT_COMMAND_TIMEOUT = 10.0  # seconds before an --on-alert command is killed
RATE_WINDOW_S = 60.0
QUEUE_SIZE = 64  # alerts waiting per sink; more are dropped and counted
MAX_TRACKED = 20_000  # episodes remembered as alerted (the oldest are forgotten first)
MAX_PAYLOAD = 32 << 10  # bytes of JSON on a command's stdin (under a pipe's buffer: writing never blocks)
WEBHOOK_ATTEMPTS = 3
WEBHOOK_TIMEOUT = 5.0
WEBHOOK_BACKOFF = 0.5  # seconds before the 2nd attempt, doubled for each next one
NOTIFY_TIMEOUT = 5.0
TEXT_LIMIT = 1900  # a webhook message (Discord takes at most 2000 characters)
ENV_LIMIT = 1000  # characters per environment variable

_CONTROL = re.compile(
    r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|[\x00-\x08\x0b-\x1f\x7f-\x9f]"
    r"|[\u200b-\u200f\u202a-\u202e\u2066-\u2069]"
)


def safe_text(value: Any, limit: int = 300) -> str:
    """Untrusted text (metric names, messages, run ids) as one plain line: no control or escape sequences."""
    text = str(value if value is not None else "").replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    text = _CONTROL.sub("", text).replace("\t", " ")
    return text[:limit] + ("…" if len(text) > limit else "")


def plain(value: Any, depth: int = 0) -> Any:
    """`value` as strict JSON data: non-finite floats become None, numpy scalars plain numbers, strings safe."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return safe_text(value, 2000)
    if depth < 6 and isinstance(value, Mapping):
        return {safe_text(k, 200): plain(v, depth + 1) for k, v in list(value.items())[:200]}
    if depth < 6 and isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value[:200]]
    item = getattr(value, "item", None)  # a numpy scalar
    if callable(item):
        try:
            return plain(item(), depth + 1)
        except (TypeError, ValueError):
            pass
    return safe_text(value, 200)


def parse_command(command: str) -> list[str]:
    """An --on-alert command line split like a shell would (no shell runs it); ValueError with one line."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ValueError(f"--on-alert: cannot parse {command!r}: {exc}") from None
    if not argv:
        raise ValueError("--on-alert: empty command")
    if shutil.which(argv[0]) is None:
        raise ValueError(f"--on-alert: command not found: {argv[0]}")
    return argv


def check_webhook(url: str) -> str:
    """A webhook address must be http(s)://HOST...; ValueError with one line otherwise."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--webhook: expected an http:// or https:// URL, got {redact(url)!r}")
    return url


def redact(url: str) -> str:
    """scheme://host[:port]/… : a webhook's path is its secret (Slack, Discord), never printed."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "<webhook>"
    if not parts.scheme:
        return safe_text(url.split("/", 1)[0], 60)
    return safe_text(f"{parts.scheme}://{host}/…" if parts.path.strip("/") else f"{parts.scheme}://{host}", 80)


@dataclass(frozen=True)
class AlertOptions:
    """What to do with a new episode (the CLI's --alert-level, --on-alert, --alert-timeout, --alert-rate,
    --bell, --notify, --webhook)."""

    level: str = DEFAULT_LEVEL
    command: str | None = None
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    rate: int = DEFAULT_RATE
    bell: bool = False
    notify: bool = False
    webhook: str | None = None

    @property
    def sends(self) -> bool:
        return bool(self.command or self.bell or self.notify or self.webhook)


@dataclass
class Alert:
    """One new (or escalated) episode of one run, as sent."""

    run_id: str
    episode: dict
    escalated_from: str | None = None
    source: str | None = None
    at: float = field(default_factory=time.time)

    @property
    def severity(self) -> str:
        return str(self.episode.get("severity"))

    @property
    def detector(self) -> str:
        return str(self.episode.get("detector"))

    @property
    def metric(self) -> str:
        return str(self.episode.get("metric"))

    @property
    def step(self) -> Any:
        return self.episode.get("first_step", self.episode.get("step"))

    @property
    def message(self) -> str:
        return str(self.episode.get("message") or "")

    def line(self) -> str:
        """time, run, step, severity, detector, metric, message: one line of `report --follow`."""
        when = datetime.fromtimestamp(self.at).strftime("%Y-%m-%d %H:%M:%S")
        up = f" (was {self.escalated_from})" if self.escalated_from else ""
        return (
            f"{when}  {safe_text(self.run_id, 80)}  step {safe_text(self.step, 20)}  {self.severity.upper()}{up}  "
            f"{safe_text(self.detector, 40)}  {safe_text(self.metric, 80)}: {safe_text(self.message, 300)}"
        )

    def text(self) -> str:
        """The webhook's and the desktop notification's message."""
        up = f" (escalated from {self.escalated_from})" if self.escalated_from else ""
        return safe_text(
            f"rlhf-tui: {self.severity.upper()}{up} {self.detector} on {self.metric} at step {self.step} "
            f"(run {self.run_id}): {self.message}",
            TEXT_LIMIT,
        )

    def payload(self) -> bytes:
        """The JSON a command reads on stdin: the run, the episode's fields, whether it escalated."""
        data = plain(
            {
                "run_id": self.run_id,
                "source": self.source,
                "time": datetime.fromtimestamp(self.at).astimezone().isoformat(timespec="seconds"),
                "escalated_from": self.escalated_from,
                **self.episode,
            }
        )
        raw = json.dumps(data, allow_nan=False).encode()
        if len(raw) > MAX_PAYLOAD:  # a huge episode: its core fields only
            core = ("run_id", "source", "time", "escalated_from", "severity", "detector", "metric", "step", "message")
            raw = json.dumps({k: data.get(k) for k in core}, allow_nan=False).encode()
        return raw

    def env(self) -> dict[str, str]:
        return {
            "RLHF_TUI_RUN_ID": safe_text(self.run_id, ENV_LIMIT),
            "RLHF_TUI_SEVERITY": safe_text(self.severity, 20),
            "RLHF_TUI_DETECTOR": safe_text(self.detector, ENV_LIMIT),
            "RLHF_TUI_METRIC": safe_text(self.metric, ENV_LIMIT),
            "RLHF_TUI_STEP": safe_text(self.step, 40),
            "RLHF_TUI_MESSAGE": safe_text(self.message, ENV_LIMIT),
        }


class AlertTracker:
    """Which episodes are new for this session. Thread-safe; remembers at most MAX_TRACKED episodes."""

    def __init__(self, level: str = DEFAULT_LEVEL, limit: int = MAX_TRACKED):
        level_ = Severity.from_name(level)
        if level_ is None:
            raise ValueError(f"unknown alert level {level!r}: expected one of {', '.join(Severity.names())}")
        self.level = level_
        self._limit = limit
        self._seen: OrderedDict[tuple, Severity] = OrderedDict()
        self._lock = threading.Lock()

    def new_alerts(self, run_id: str, episodes: Iterable[dict], source: str | None = None) -> list[Alert]:
        """The alerts for `episodes` (a pass's whole list): new ones at or above the level, and escalations."""
        out: list[Alert] = []
        with self._lock:
            for episode in episodes:
                severity = Severity.from_name(episode.get("severity"))
                if severity is None or severity < self.level:
                    continue
                first = episode.get("first_step", episode.get("step"))
                key = (run_id, episode.get("detector"), episode.get("metric"), first)
                before = self._seen.get(key)
                if before is not None and severity <= before:
                    continue
                self._seen[key] = severity
                self._seen.move_to_end(key)
                while len(self._seen) > self._limit:
                    self._seen.popitem(last=False)
                out.append(Alert(run_id, dict(episode), str(before) if before is not None else None, source))
        return out


class _Sink:
    """One way out: a bounded queue and one worker thread (started with the first alert)."""

    name = "sink"

    def __init__(self, note: Callable[[str], None]):
        self._note = note
        self._queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.sent = self.failed = self.dropped = self.undelivered = 0
        self.first_error: str | None = None

    def put(self, alert: Alert) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=f"rlhf-tui-alerts-{self.name}", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            self.dropped += 1

    def _work(self) -> None:
        while True:
            alert = self._queue.get()
            try:
                if alert is None:
                    return
                try:
                    error = self.send(alert)
                except Exception as exc:  # a bug here must not kill the worker
                    error = f"{type(exc).__name__}: {exc}"
                if error is None:
                    self.sent += 1
                else:
                    self.failed += 1
                    if self.first_error is None:
                        self.first_error = error
                        self._note(f"{error} (further failures are counted)")
            finally:
                self._queue.task_done()

    def send(self, alert: Alert) -> str | None:
        """Deliver one alert; the failure as one line, or None."""
        raise NotImplementedError

    def close(self, deadline: float) -> None:
        """Deliver what is queued until `deadline` (time.monotonic()); then stop what runs (a command is killed)
        and count what is left as undelivered."""
        with self._lock:
            self._stop.set()
            thread = self._thread
        if thread is None:
            return
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks and time.monotonic() < deadline:
                self._queue.all_tasks_done.wait(max(0.0, deadline - time.monotonic()))
        while True:  # past the deadline: what is still queued is not sent
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            self.undelivered += 1
            self._queue.task_done()
        self.abort()
        try:
            self._queue.put_nowait(None)  # the worker's end (room now: the queue was emptied)
        except queue.Full:
            pass
        thread.join(1.0)

    def abort(self) -> None:
        """Stop what runs now (closing)."""


class CommandSink(_Sink):
    """Runs the --on-alert command (no shell) with the alert's JSON on stdin and RLHF_TUI_* in its environment;
    its output is discarded; killed (its whole process group) after `timeout` seconds."""

    name = "on-alert"

    def __init__(self, argv: list[str], timeout: float, note: Callable[[str], None]):
        super().__init__(note)
        self.argv, self.timeout = list(argv), float(timeout)
        self.killed = 0
        self._proc: subprocess.Popen | None = None

    def send(self, alert: Alert) -> str | None:
        what = f"--on-alert {safe_text(self.argv[0], 60)}"
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    env={**os.environ, **alert.env()},
                    start_new_session=True,  # its own process group: a timeout kills its children too
                    close_fds=True,
                )
            except OSError as exc:
                return f"{what}: cannot run: {exc.strerror or exc}"
            self._proc = proc
            try:
                try:
                    assert proc.stdin is not None
                    proc.stdin.write(alert.payload())  # under the pipe's buffer: never blocks
                    proc.stdin.close()
                except OSError:
                    pass  # it did not read its stdin: its business
                try:
                    code = proc.wait(self.timeout)
                except subprocess.TimeoutExpired:
                    self._kill(proc)
                    self.killed += 1
                    return f"{what}: killed after {self.timeout:g} s (it hung)"
            finally:
                self._proc = None
            if code != 0:
                err.seek(0)
                tail = err.read()[-2000:].decode("utf-8", "replace").strip().splitlines()
                why = f": {safe_text(tail[-1], 160)}" if tail else ""
                return f"{what}: exited with {code}{why}"
        return None

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        try:
            proc.wait(2.0)
        except subprocess.TimeoutExpired:
            pass

    def abort(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self._kill(proc)


class WebhookSink(_Sink):
    """POSTs `{"text": ..., "content": ...}` (Slack and Discord both read one of them) with urllib; a failed
    attempt (network error, HTTP 5xx or 429) is retried up to WEBHOOK_ATTEMPTS times with doubling backoff."""

    name = "webhook"

    def __init__(self, url: str, note: Callable[[str], None], attempts: int = WEBHOOK_ATTEMPTS):
        super().__init__(note)
        self.url, self.attempts = url, max(1, int(attempts))
        self.tries = 0  # HTTP attempts made (tests read it)

    def send(self, alert: Alert) -> str | None:
        text = alert.text()
        body = json.dumps({"text": text, "content": text}).encode()
        why = ""
        for attempt in range(self.attempts):
            if attempt:
                self._stop.wait(WEBHOOK_BACKOFF * 2 ** (attempt - 1))  # closing: no more waiting
            request = urllib.request.Request(
                self.url,
                data=body,
                method="POST",
                headers={"Content-Type": "application/json", "User-Agent": "rlhf-tui"},
            )
            self.tries += 1
            try:
                with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT) as response:
                    response.read(1 << 16)
                return None
            except urllib.error.HTTPError as exc:
                why = f"HTTP {exc.code}"
                if exc.code < 500 and exc.code != 429:  # the hook refused it: retrying will not help
                    return f"webhook {redact(self.url)} refused the alert: {why}"
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                why = safe_text(getattr(reason, "strerror", None) or reason, 120)
        return f"webhook {redact(self.url)} unreachable after {self.attempts} attempts: {why}"


class NotifySink(_Sink):
    """A desktop notification through notify-send."""

    name = "notify"

    def __init__(self, binary: str, note: Callable[[str], None]):
        super().__init__(note)
        self.binary = binary

    def send(self, alert: Alert) -> str | None:
        urgency = "critical" if Severity.at_least(alert.severity, "high") else "normal"
        title = f"rlhf-tui: {alert.severity.upper()} {safe_text(alert.detector, 40)}"
        try:
            done = subprocess.run(
                [self.binary, "--app-name=rlhf-tui", "-u", urgency, title, alert.text()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=NOTIFY_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            return f"notify-send: no answer within {NOTIFY_TIMEOUT:g} s"
        except OSError as exc:
            return f"notify-send: cannot run: {exc.strerror or exc}"
        return None if done.returncode == 0 else f"notify-send exited with {done.returncode}"


class AlertDispatcher:
    """Sends alerts to the configured sinks, at most `rate` a minute; `submit` never blocks.

    `note(text)`: one line for the user (called from worker threads too); `bell()`: ring the terminal bell.
    """

    def __init__(
        self,
        options: AlertOptions,
        note: Callable[[str], None] | None = None,
        bell: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.options = options
        self._note = note or (lambda text: None)
        self._bell = bell if options.bell else None
        self._clock = clock
        self._window: deque[float] = deque()
        self._lock = threading.Lock()
        self.submitted = 0
        self.suppressed = 0  # over the rate limit, all time
        self._suppressed_now = 0  # over the rate limit since the last summary
        self.sinks: list[_Sink] = []
        if options.command:
            self.sinks.append(CommandSink(parse_command(options.command), options.command_timeout, self._note))
        if options.webhook:
            self.sinks.append(WebhookSink(check_webhook(options.webhook), self._note))
        if options.notify:
            binary = shutil.which("notify-send")
            if binary is None:
                self._note("--notify: notify-send not found (install libnotify-bin); no desktop notifications")
            else:
                self.sinks.append(NotifySink(binary, self._note))

    def sink(self, name: str) -> _Sink | None:
        return next((s for s in self.sinks if s.name == name), None)

    def submit(self, alert: Alert) -> bool:
        """Queue `alert` for every sink unless over the rate limit (then counted); returns whether it went."""
        if not (self.sinks or self._bell):
            return False
        with self._lock:
            now = self._clock()
            while self._window and now - self._window[0] >= RATE_WINDOW_S:
                self._window.popleft()
            if len(self._window) >= self.options.rate:
                self.suppressed += 1
                self._suppressed_now += 1
                if self._suppressed_now == 1:
                    self._note(
                        f"alerts: more than {self.options.rate} a minute; the rest are counted, not sent (--alert-rate)"
                    )
                return False
            self._window.append(now)
            self.submitted += 1
            held, self._suppressed_now = self._suppressed_now, 0
        if held:
            self._note(f"alerts: {held} over the rate limit were not sent")
        if self._bell is not None:
            try:
                self._bell()
            except Exception:
                pass
        for sink in self.sinks:
            sink.put(alert)
        return True

    def status(self) -> str | None:
        """A short line for the monitor's header: only when something went wrong (None otherwise)."""
        parts = []
        if self.suppressed:
            parts.append(f"{self.suppressed} over rate")
        for sink in self.sinks:
            if sink.failed or sink.dropped:
                bad = f"{sink.failed} failed" + (f", {sink.dropped} dropped" if sink.dropped else "")
                parts.append(f"{sink.name} {bad}")
        return "alerts: " + " · ".join(parts) if parts else None

    def summary(self) -> str | None:
        """One closing line: what was sent and what failed (None when nothing was to send)."""
        if not self.submitted and not self.suppressed:
            return None
        parts = [f"{self.submitted} sent"]
        if self.suppressed:
            parts.append(f"{self.suppressed} over the rate limit not sent")
        for sink in self.sinks:
            lost = f", {sink.dropped} dropped (queue full)" if sink.dropped else ""
            lost += f", {sink.undelivered} undelivered at exit" if sink.undelivered else ""
            parts.append(f"{sink.name}: {sink.sent} ok, {sink.failed} failed{lost}")
        return "alerts: " + "; ".join(parts)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued for up to `timeout` seconds (all sinks together), then stop."""
        deadline = time.monotonic() + max(0.0, timeout)
        closers = [threading.Thread(target=sink.close, args=(deadline,), daemon=True) for sink in self.sinks]
        for closer in closers:
            closer.start()
        for closer in closers:
            closer.join(max(0.0, deadline - time.monotonic()) + 3.0)


__all__ = [
    "Alert",
    "AlertDispatcher",
    "AlertOptions",
    "AlertTracker",
    "DEFAULT_LEVEL",
    "check_webhook",
    "parse_command",
    "plain",
    "redact",
    "safe_text",
]
