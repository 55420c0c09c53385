"""The Textual app under Pilot on real sources: a recorded JSONL log and a live run over ZeroMQ."""

from conftest import pilot_wait_for

from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
from rlhf_tui.tui.app import MonitorApp


def _value(app, metric):
    table = app.view.pane("metrics").table
    try:
        return str(table.get_row(metric)[1])
    except Exception:
        return None


def _header(app) -> str:
    return str(app.view.query_one("#run-header").render())


def _record(tmp_path, address=False, steps=30):
    cb = RLHFMonitorCallback(address=address, log_dir=str(tmp_path / "logs"), analyze_checkpoints=False)
    for step in range(1, steps + 1):
        cb.log_step(step, {"kl": 0.01 * step, "reward": 1.0 + 0.1 * step, "loss": 0.5, "entropy": 2.0})
    return cb


async def test_app_on_a_recorded_jsonl_source(tmp_path):
    cb = _record(tmp_path)
    cb.close()
    app = MonitorApp([cb.log_path])
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot_wait_for(pilot, lambda: _value(app, "kl") == "0.3", message="kl value")
        header = _header(app)
        assert cb.run_id in header and "step 30" in header and "recorded" in header
        names = app.view.pane("metrics").names
        assert names[:4] == ["reward", "kl", "entropy", "loss"]  # canonical order first
        await pilot.press("q")
    assert app.return_code in (0, None)


async def test_app_on_a_live_source_updates_as_steps_arrive(tmp_path, address):
    cb = _record(tmp_path, address=address, steps=5)
    app = MonitorApp([address])
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot_wait_for(pilot, lambda: "step 5" in _header(app), message="first five steps")
            await pilot_wait_for(pilot, lambda: "live" in _header(app), message="live state")
            for step in range(6, 41):
                cb.log_step(step, {"kl": 0.01 * step, "reward": 1.0, "loss": 0.5, "entropy": 2.0})
            await pilot_wait_for(pilot, lambda: "step 40" in _header(app), message="live steps")
            await pilot_wait_for(pilot, lambda: _value(app, "kl") == "0.4", message="kl value")
    finally:
        cb.close()
    assert not any(sub._thread.is_alive() for sub in app.subscribers) if app.subscribers else True


async def test_several_sources_are_tabs_and_the_overlay_charts_one_metric_across_runs(tmp_path):
    paths = []
    for i in range(2):
        cb = RLHFMonitorCallback(
            address=False, log_dir=str(tmp_path / f"logs{i}"), analyze_checkpoints=False, run_id=f"run-{i}"
        )
        for step in range(1, 21):
            cb.log_step(step, {"kl": 0.01 * (i + 1) * step, "reward": 1.0 + i})
        cb.close()
        paths.append(cb.log_path)
    app = MonitorApp(paths)
    async with app.run_test(size=(120, 36)) as pilot:
        from textual.widgets import TabbedContent

        tabs = app.query_one(TabbedContent)
        assert len(app.views) == 2 and tabs.active == "tab-0"
        await pilot_wait_for(pilot, lambda: "run-0" in _header(app), message="first tab drawn")
        await pilot.press("right_square_bracket")
        await pilot_wait_for(pilot, lambda: tabs.active == "tab-1" and "run-1" in _header(app), message="second tab")
        await pilot.press("left_square_bracket")
        await pilot_wait_for(pilot, lambda: tabs.active == "tab-0", message="back to the first tab")
        table = app.view.pane("metrics").table
        table.focus()
        table.move_cursor(row=app.view.pane("metrics").names.index("kl"))
        await pilot.press("o")
        from rlhf_tui.tui.widgets.chart import ChartScreen

        await pilot_wait_for(pilot, lambda: isinstance(app.screen, ChartScreen), message="overlay")
        screen = app.screen
        assert screen.overlay and screen.metric == "kl"
        labels = [s["label"] for s in screen._data["series"]]
        assert len(labels) == 2 and "run-0" in labels[0] and "run-1" in labels[1]
        assert [float(s["values"][-1]) for s in screen._data["series"]] == [0.2, 0.4]
        await pilot.press("escape")
        await pilot_wait_for(pilot, lambda: not isinstance(app.screen, ChartScreen), message="closed")


async def test_hangup_stops_the_subscribers_and_exits(tmp_path, address):
    cb = _record(tmp_path, address=address, steps=3)
    app = MonitorApp([address])
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot_wait_for(pilot, lambda: "step 3" in _header(app), message="connected")
            threads = [sub._thread for sub in app.subscribers]
            app._hangup()  # what SIGHUP (terminal gone) and SIGTERM run
            await pilot_wait_for(pilot, lambda: not any(t.is_alive() for t in threads), message="stopped")
    finally:
        cb.close()
    assert app.return_code == 0


async def test_connection_states_in_the_header(make_store):
    import time as _time

    store = make_store(connection="live")
    app = MonitorApp([], stores=[store], labels=["states"])
    async with app.run_test(size=(140, 30)) as pilot:
        await pilot_wait_for(pilot, lambda: "● live" in _header(app), message="live")
        with store.lock:
            store.connection = "stalled"
            store.current_run.last_step_time = _time.monotonic() - 120
            store.touch()
        await pilot_wait_for(
            pilot, lambda: "alive but stalled: heartbeats, no new step since" in _header(app), message="stalled"
        )
        with store.lock:
            store.connection, store.stale_since = "stale", _time.time() - 30
            store.touch()
        stamp = _time.strftime("%H:%M:%S", _time.localtime(store.stale_since))
        await pilot_wait_for(pilot, lambda: f"stale since {stamp}" in _header(app), message="stale")
        with store.lock:
            store.connection = "unreachable"
            store.touch()
        await pilot_wait_for(pilot, lambda: "✖ unreachable" in _header(app), message="unreachable")
        with store.lock:
            store.connection = "ended"
            store.touch()
        await pilot_wait_for(pilot, lambda: "run ended" in _header(app), message="ended")
