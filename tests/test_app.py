"""The Textual app under Pilot: on a recorded source and on a live one."""
import pytest

from conftest import pilot_wait_for
from rlhf_tui.bridge.callback import RLHFMonitorCallback
from rlhf_tui.tui.app import MetricRow, MonitorApp


def _value(app, metric):
    row = next((r for r in app.query(MetricRow) if r.metric == metric), None)
    return str(row.query_one(".value").render()) if row is not None and row.children else None


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
        await pilot_wait_for(pilot, lambda: len(app.query(MetricRow)) >= 4, message="metric rows")
        await pilot_wait_for(pilot, lambda: _value(app, "kl") == "0.3", message="kl value")
        header = str(app.query_one("#header").render())
        assert cb.run_id in header and "step 30" in header
        names = [row.metric for row in app.query(MetricRow)]
        assert names[:4] == ["reward", "kl", "entropy", "loss"]  # canonical order
        await pilot.press("q")
    assert app.return_code in (0, None)


async def test_app_on_a_live_source_updates_as_steps_arrive(tmp_path, address):
    cb = _record(tmp_path, address=address, steps=5)
    app = MonitorApp([address])
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot_wait_for(pilot, lambda: "step 5" in str(app.query_one("#header").render()),
                                 message="first five steps")
            await pilot_wait_for(pilot, lambda: "live" in str(app.query_one("#header").render()),
                                 message="live state")
            for step in range(6, 41):
                cb.log_step(step, {"kl": 0.01 * step, "reward": 1.0, "loss": 0.5, "entropy": 2.0})
            await pilot_wait_for(pilot, lambda: "step 40" in str(app.query_one("#header").render()),
                                 message="live steps")
            await pilot_wait_for(pilot, lambda: _value(app, "kl") == "0.4", message="kl value")
    finally:
        cb.close()
