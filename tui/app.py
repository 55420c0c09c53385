"""The live monitor: a Textual app showing one or more sources (live runs or recorded files), one tab each.

The app only draws and handles keys. Subscriber threads fill one Store per source; a 10 Hz timer asks each
visible RunView to redraw if its store changed (never faster, however fast data arrives). Keys are data
(`tui.keys`), remappable in the config file (`tui.config`), which also keeps the detector thresholds the user
tunes here.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import deque
from datetime import datetime
from pathlib import Path

from rich.text import Text
from textual.app import App, ComposeResult
from textual.widgets import Footer, TabbedContent, TabPane

from rlhf_tui.analysis.detectors import zscore_band
from rlhf_tui.analysis.store import Store
from rlhf_tui.tui import keys
from rlhf_tui.tui.cells import clean, short
from rlhf_tui.tui.config import Config, ConfigError, load_config, save_config, setting_for, step_setting, toggle_mute
from rlhf_tui.tui.render import CONNECTION, render_text, spark_width_for
from rlhf_tui.tui.run_model import keep_large_arrays_off_the_heap
from rlhf_tui.tui.widgets.chart import ChartScreen
from rlhf_tui.tui.widgets.completions import CompletionsScreen
from rlhf_tui.tui.widgets.help import HelpScreen
from rlhf_tui.tui.widgets.metrics import MetricsPane
from rlhf_tui.tui.widgets.model import run_metric_units, split_units
from rlhf_tui.tui.widgets.model import series as metric_series
from rlhf_tui.tui.widgets.runview import PANES, RunView
from rlhf_tui.tui.widgets.thresholds import ThresholdEditor

REFRESH_HZ = 10
SNAPSHOT_WIDTH = 110
HANGUP_GRACE_S = 3.0


def _unique(path: Path) -> Path:
    """`path`, or `name-2.ext`, `name-3.ext` … when two snapshots fall in the same second."""
    n, candidate = 1, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def source_label(source: str) -> str:
    if source.startswith(("tcp://", "ipc://")):
        return source.split("://", 1)[1]
    return Path(source).name or source


class MonitorApp(App):
    TITLE = "rlhf-tui"
    CSS_PATH = "monitor.tcss"
    BINDINGS = keys.bindings("app")
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (130, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (40, "-tall")]

    def __init__(
        self,
        sources: list[str],
        *,
        thresholds=None,
        snapshot_dir: str | None = None,
        training_process=None,
        training_log: str | None = None,
        stores: list[Store] | None = None,
        labels: list[str] | None = None,
        config: Config | None = None,
        config_path: str | os.PathLike | None = None,
        curve=None,
        alerts=None,
    ):
        super().__init__()
        self.curve = curve  # CURVE client keys for live sources (None: plain, loopback or SSH forward)
        self.sources = list(sources)
        self.snapshot_dir = snapshot_dir
        self.training_process = training_process
        self.training_log = training_log
        self.stores: list[Store] = list(stores or [])
        self.labels = list(labels or [])
        self.subscribers: list = []
        self.load_errors: list[str] = []
        self.config_error: str | None = None
        if config is None:
            try:
                config = load_config(config_path)
            except ConfigError as exc:
                from rlhf_tui.tui.config import config_path as default_path

                self.config_error = str(exc)
                config = Config(Path(config_path) if config_path else default_path())
        self.config = config
        # --thresholds FILE wins over the config file at start; every change is saved to the config file.
        self.thresholds = thresholds if thresholds is not None else config.thresholds
        self.hidden: set[str] = set()
        self.paused = False
        self.last_snapshot: str | None = None
        self.last_screenshot: str | None = None
        self._undo_mute: str | None = None
        self._hung_up = False
        self._hangup_timer: threading.Timer | None = None
        self._training_state: str | None = None
        self.alert_options = alerts  # tui.alerts.AlertOptions (--on-alert, --webhook, --bell, --notify) or None
        self.alerts = None  # its AlertDispatcher, made at mount
        self._alert_tracker = None
        self._alert_passes: dict[str, int] = {}  # view id -> the detection pass its alerts came from
        self._alert_notes: deque[str] = deque(maxlen=20)  # from worker threads, shown by the next tick
        self._alert_bells = 0
        self._alert_status: str | None = None

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity="information",
        timeout: float | None = None,
        markup: bool = False,
    ) -> None:
        """Notifications are plain text here: they carry paths and names that may hold `[`."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    # -- sources -----------------------------------------------------------------------------------------
    def _open(self, source: str) -> Store:
        from rlhf_tui.bridge.monitor.followed_source import follow_file_source
        from rlhf_tui.bridge.monitor.sources import SourceError, is_live, load_file_source
        from rlhf_tui.bridge.monitor.subscriber import Subscriber

        if is_live(source):
            sub = Subscriber(source, curve=self.curve).start()
            self.subscribers.append(sub)
            return sub.store
        try:
            follower = follow_file_source(source)  # TensorBoard, trackio, an output_dir: followed as they grow
            if follower is not None:
                self.subscribers.append(follower.start())
                return follower.store
            return load_file_source(source)
        except SourceError as exc:
            store = Store()
            store.source, store.connection = source, "unreachable"
            self.load_errors.append(str(exc))
            return store

    @property
    def store(self) -> Store:
        return self.stores[0]

    @property
    def views(self) -> list[RunView]:
        return list(self.query(RunView))

    @property
    def view(self) -> RunView:
        """The RunView of the active tab."""
        views = self.views
        if len(views) > 1:
            tabs = self.query_one(TabbedContent)
            active = tabs.active
            for v in views:
                if v.parent is not None and getattr(v.parent, "id", None) == active:
                    return v
        return views[0]

    # -- layout ------------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        if not self.stores:
            self.stores = [self._open(source) for source in self.sources]
        while len(self.labels) < len(self.stores):
            i = len(self.labels)
            self.labels.append(source_label(self.sources[i] if i < len(self.sources) else self.stores[i].source))
        if len(self.stores) > 1:
            with TabbedContent(id="runs"):
                for i, (store, label) in enumerate(zip(self.stores, self.labels)):
                    with TabPane(label, id=f"tab-{i}"):
                        yield RunView(store, label, self.thresholds, id=f"view-{i}")
        else:
            yield RunView(self.stores[0], self.labels[0], self.thresholds, id="view-0")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        keep_large_arrays_off_the_heap()
        if self.config.keymap:
            unknown = keys.unknown_ids(self.config.keymap)
            self.set_keymap({k: v for k, v in self.config.keymap.items() if k not in unknown})
            if unknown:
                self.notify(f"config: unknown key binding ids {', '.join(unknown)}", severity="warning", timeout=8)
        if self.config_error:
            self.notify(f"{self.config_error} (settings will not be saved)", severity="error", timeout=10)
        for error in self.load_errors:
            self.notify(error, severity="error", timeout=10)
        self._start_alerts()
        self.set_interval(1 / REFRESH_HZ, self.tick)
        self._install_hangup_handler()
        self.call_after_refresh(self.tick)
        first = self.views[0].pane("metrics").table
        first.focus()

    def tick(self) -> None:
        if not self.is_running or not self.screen_stack or self._closing:
            return  # starting up or shutting down
        now = time.monotonic()
        # The panes are visible on the main screen and under a modal dialog (help, threshold editor).
        main = not isinstance(self.screen, (ChartScreen, CompletionsScreen))
        active = self.view
        for view in self.views:
            view.tick(now, visible=main and view is active, paused=self.paused)
        self._check_training()
        self._feed_alerts()

    def header_extra(self, view: RunView) -> Text | None:
        """Training process status (demo) and what went wrong sending alerts, for the header."""
        text = Text()
        if self._training_state is not None:
            text.append(self._training_state, style="dim" if "running" in self._training_state else "bold yellow")
        status = self.alerts.status() if self.alerts is not None else None
        if status:
            text.append(("  " if text else "") + status, style="bold yellow")
        return text if text else None

    # -- alerts out ------------------------------------------------------------------------------------------
    def _start_alerts(self) -> None:
        options = self.alert_options
        if options is None or not options.sends:
            return
        from rlhf_tui.tui.alerts import AlertDispatcher, AlertTracker

        self._alert_tracker = AlertTracker(options.level)
        self.alerts = AlertDispatcher(options, note=self._alert_notes.append, bell=self._ring)

    def _ring(self) -> None:
        self._alert_bells += 1  # rung by the next tick, on the screen's thread

    def _feed_alerts(self) -> None:
        """Each view's newest detection pass goes to the alert tracker (on a worker: the reward episodes are
        built under the store lock); notes and bells from the alert threads are shown here."""
        while self._alert_notes:
            self.notify(self._alert_notes.popleft(), severity="warning", timeout=8)
        if self._alert_bells:
            self._alert_bells = 0
            self.bell()
        if self.alerts is None:
            return
        status = self.alerts.status()
        if status != self._alert_status:  # the header says what went wrong
            self._alert_status = status
            for view in self.views:
                view.invalidate()
        for view in self.views:
            model = view.model
            if self._alert_passes.get(view.id or "") == model.detect_count or model.anomalies_run is None:
                continue
            self._alert_passes[view.id or ""] = model.detect_count
            episodes, run_id = list(model.anomalies), model.anomalies_run
            self.run_worker(
                lambda v=view, e=episodes, r=run_id: self._alert_pass(v.store, r, e),
                thread=True,
                group="alerts",
                exit_on_error=False,
            )

    def _alert_pass(self, store: Store, run_id: str, episodes: list[dict]) -> None:
        from rlhf_tui.tui.follow import run_episodes

        if self._alert_tracker is None or self.alerts is None:
            return
        for alert in self._alert_tracker.new_alerts(
            run_id, run_episodes(store, run_id, episodes, self.thresholds), store.source
        ):
            self.alerts.submit(alert)

    def _check_training(self) -> None:
        proc = self.training_process
        if proc is None:
            return
        code = proc.poll()
        state = f"training pid {proc.pid} running" if code is None else f"training exited ({code})"
        if state != self._training_state:
            self._training_state = state
            for view in self.views:
                view.invalidate()
            if code not in (None, 0):
                self.notify(
                    f"training process exited with code {code}; log: {self.training_log}", severity="error", timeout=15
                )

    def update_tab_label(self, view: RunView, connection: str | None) -> None:
        if len(self.stores) < 2 or view.parent is None:
            return
        glyph, _, style = CONNECTION.get(connection or "", ("?", "", ""))
        try:
            tab = self.query_one(TabbedContent).get_tab(view.parent.id)
            tab.label = Text.assemble((glyph + " ", style), view.label)
        except Exception:
            pass

    # -- thresholds --------------------------------------------------------------------------------------
    def apply_thresholds(self, thresholds, message: str) -> None:
        """Use new thresholds everywhere: re-evaluate every run's whole history now, save, say so."""
        self.thresholds = thresholds
        self.config.thresholds = thresholds
        where = ""
        if self.config_error is None:
            try:
                where = f" · saved to {save_config(self.config)}"
            except OSError as exc:
                where = f" · NOT saved: {exc.strerror or exc}"
        for view in self.views:
            view.set_thresholds(thresholds, message)
        self.notify(message + where, timeout=4)

    def focused_detector(self) -> str | None:
        return self.view.pane("anomalies").focused_detector()

    def action_threshold(self, direction: int) -> None:
        detector = self.focused_detector()
        name = setting_for(detector)
        old = getattr(self.thresholds, name)
        try:
            new = step_setting(self.thresholds, name, int(direction))
        except ValueError as exc:
            self.notify(str(exc).splitlines()[0], severity="error")
            return
        if getattr(new, name) == old:
            self.notify(f"{name} is already at its limit ({short(old)})", severity="warning")
            return
        who = f" ({detector})" if detector and detector != "zscore" else ""
        self.apply_thresholds(new, f"{name}{who} {short(old)} → {short(getattr(new, name))}")

    def action_mute(self) -> None:
        """Mute the focused anomaly's detector; `m` again (without picking another anomaly) unmutes it."""
        table = self.view.pane("anomalies").table
        if self._undo_mute is not None and not table.user_moved:
            detector = self._undo_mute
        else:
            detector = self.focused_detector() or self._undo_mute
        if detector is None:
            self.notify(
                "focus an anomaly in the feed (Tab) to mute its detector, or open the editor (t)", severity="warning"
            )
            return
        new = toggle_mute(self.thresholds, detector)
        muted = new.is_muted(detector)
        self._undo_mute = detector if muted else None
        table.user_moved = False
        self.apply_thresholds(new, f"{detector} {'muted (m again: unmute)' if muted else 'unmuted'}")

    def action_toggle_lows(self) -> None:
        for view in self.views:  # the feed's title says which (`13 low hidden`)
            view.pane("anomalies").toggle_lows()

    def action_thresholds(self) -> None:
        self.push_screen(ThresholdEditor())

    # -- panes and navigation ------------------------------------------------------------------------------
    def action_toggle_pane(self, name: str) -> None:
        if name not in PANES:
            return
        self.hidden ^= {name}
        for view in self.views:
            view.apply_hidden(self.hidden)
        self.notify(f"{name} {'hidden' if name in self.hidden else 'shown'}", timeout=1.5)

    def action_filter(self) -> None:
        view = self.view
        if "metrics" in self.hidden:
            self.action_toggle_pane("metrics")
        view.pane("metrics").open_filter()

    def action_pause(self) -> None:
        view = self.view
        if self.paused or view.at_step is not None:
            self.paused = False
            for v in self.views:
                v.go_to_step(None)
                v.pane("anomalies").close_detail()
                v.invalidate()
            self.notify("following the newest step", timeout=1.5)
        else:
            self.paused = True
            for v in self.views:
                v.invalidate()
            self.notify("paused: the view is frozen, data keeps arriving (p: follow)", timeout=2)
        self.tick()

    def action_next_run(self, direction: int) -> None:
        if len(self.stores) < 2:
            return
        tabs = self.query_one(TabbedContent)
        ids = [f"tab-{i}" for i in range(len(self.stores))]
        i = ids.index(tabs.active) if tabs.active in ids else 0
        tabs.active = ids[(i + int(direction)) % len(ids)]

    def on_tabbed_content_tab_activated(self, event) -> None:
        for view in self.views:
            view.invalidate()
        self.call_after_refresh(self.tick)

    # -- charts --------------------------------------------------------------------------------------------
    def _chart_provider(self, view: RunView):
        store = view.store

        def provide(metric: str) -> dict:
            with store.lock:
                run = store.current_run
                if run is None:
                    return {"series": [], "metrics": [], "version": store.version}
                steps, values = metric_series(run, metric)
                unit = run_metric_units(run).get(metric)
                band = zscore_band(run.values(metric), self.thresholds, metric) if metric in run.columns else None
                names = list((view.report.get("metrics") or {}).keys()) or run.metric_names()
                version = (store.version, id(self.thresholds))
            return {
                "series": [{"label": f"{view.label} · {run.run_id}", "steps": steps, "values": values, "unit": unit}],
                "band": band,
                "metrics": names,
                "version": version,
                "marker": view.at_step,
            }

        return provide

    def _overlay_provider(self):
        def provide(metric: str) -> dict:
            out, names, version = [], [], []
            for view in self.views:
                store = view.store
                with store.lock:
                    run = store.current_run
                    version.append(store.version)
                    if run is None:
                        continue
                    for n in run.metric_names():
                        if n not in names:
                            names.append(n)
                    steps, values = metric_series(run, metric)
                    unit = run_metric_units(run).get(metric)
                label = f"{view.label} · {run.run_id}"
                out.append(
                    {"label": label, "steps": steps, "values": values, "unit": unit, "active": view is self.view}
                )
            from rlhf_tui.analysis.report import ordered_metrics

            kept, left_out = split_units(out)  # never two units in one overlay
            data = {"series": kept, "left_out": left_out, "metrics": ordered_metrics(names), "band": None}
            return {**data, "version": tuple(version)}

        return provide

    def on_metrics_pane_chart_requested(self, event: MetricsPane.ChartRequested) -> None:
        views = [self.view, *self.views]  # the active tab's metric first (several tabs may log the same name)
        view = next((v for v in views if event.metric in v.pane("metrics").names), self.view)
        self.push_screen(ChartScreen(event.metric, self._chart_provider(view)))

    def action_overlay(self) -> None:
        view = self.view
        metric = view.pane("metrics").highlighted()
        if metric is None:
            names = [n for v in self.views for n in (v.report.get("metrics") or {})]
            if not names:
                self.notify("no metrics yet", severity="warning")
                return
            metric = names[0]
        self.push_screen(ChartScreen(metric, self._overlay_provider(), overlay=True))

    def action_completions(self) -> None:
        store = self.view.store
        name = f"completions-{id(store)}"
        if not self.is_screen_installed(name):  # made once per tab, then shown again: a reopen costs no compose

            def source():
                run = store.current_run
                args = run.meta.get("args") if run is not None else None
                return (run.samples if run is not None else None), (args if isinstance(args, dict) else {})

            self.install_screen(CompletionsScreen(source, store.lock), name)
        self.push_screen(name)

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.config.keymap, str(self.config.path)))

    # -- snapshots -----------------------------------------------------------------------------------------
    def _snapshot_dir(self) -> Path:
        return Path(self.snapshot_dir or os.getcwd())

    def _snapshot_name(self, view: RunView, suffix: str) -> str:
        run = view.store.current_run
        run_id = clean(run.run_id if run else "no-run", 60)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
        step = run.last_step if run and run.last_step is not None else 0
        return f"rlhf-tui-snapshot-{safe}-step{step}-{datetime.now().strftime('%Y%m%d-%H%M%S')}{suffix}"

    def snapshot_text(self, view: RunView | None = None, width: int = SNAPSHOT_WIDTH) -> str:
        """The current view as the text report (`rlhf-tui report`'s renderer)."""
        view = view or self.view
        if self.paused and view.report:
            report = view.report
        else:
            with view.store.lock:
                report = view.build_report(spark_width=spark_width_for(width), at_step=view.at_step)
        return render_text(report, width=width)

    def action_snapshot(self) -> None:
        view = self.view
        try:
            directory = self._snapshot_dir()
            directory.mkdir(parents=True, exist_ok=True)
            path = _unique(directory / self._snapshot_name(view, ".txt"))
            # Written whole, then renamed: whoever watches the folder never reads a half-written report.
            part = path.with_name(f".{path.name}.part")
            part.write_text(self.snapshot_text(view), encoding="utf-8")
            os.replace(part, path)
        except OSError as exc:
            self.notify(f"snapshot failed: {exc.strerror or exc}", severity="error")
            return
        self.last_snapshot = str(path)
        self.notify(f"snapshot written to {path}", timeout=6)

    def action_screenshot(self) -> None:
        view = self.view
        try:
            directory = self._snapshot_dir()
            directory.mkdir(parents=True, exist_ok=True)
            path = self.save_screenshot(_unique(directory / self._snapshot_name(view, ".svg")).name, str(directory))
        except OSError as exc:
            self.notify(f"screenshot failed: {exc.strerror or exc}", severity="error")
            return
        self.last_screenshot = path
        self.notify(f"SVG screenshot written to {path}", timeout=6)

    # -- shutdown ------------------------------------------------------------------------------------------
    def _install_hangup_handler(self) -> None:
        """Exit cleanly when the terminal goes away (SSH drop, tmux kill): Textual does not handle SIGHUP."""
        if self.is_headless or threading.current_thread() is not threading.main_thread():
            return
        try:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, self._hangup)
            loop.add_signal_handler(signal.SIGTERM, self._hangup)
        except (NotImplementedError, RuntimeError, ValueError, AttributeError):
            pass

    def _hangup(self) -> None:
        if self._hung_up:
            return
        self._hung_up = True
        self.stop_sources()
        from rlhf_tui.tui import ssh

        ssh.close_all()
        if not self.is_headless:
            # If the driver blocks writing to a terminal that no longer exists, leave anyway.
            self._hangup_timer = threading.Timer(HANGUP_GRACE_S, os._exit, args=(0,))
            self._hangup_timer.daemon = True
            self._hangup_timer.start()
        self.exit(0)

    def cancel_hangup_timer(self) -> None:
        if self._hangup_timer is not None:
            self._hangup_timer.cancel()

    def stop_sources(self) -> None:
        # All at once (each waits up to 0.5 s for its thread), through the subscriber's public stop().
        stoppers = [threading.Thread(target=sub.stop, args=(0.5,), daemon=True) for sub in self.subscribers]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join(1.0)

    def on_unmount(self) -> None:
        self.stop_sources()
        if self.alerts is not None:
            self.alerts.close(timeout=1.0)


__all__ = ["MonitorApp", "spark_width_for", "source_label"]
