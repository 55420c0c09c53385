"""SVG snapshots (pytest-textual-snapshot) of the main screen at fixed sizes with deterministic data: a fixed
run id, no clocks, no live source. Update them with `pytest tests/test_tui_snapshots.py --snapshot-update`
after checking the new look in the report pytest writes on failure."""

from rlhf_tui.tui.app import MonitorApp


def _app(make_store) -> MonitorApp:
    return MonitorApp([], stores=[make_store()], labels=["grpo-demo.jsonl"])


def _settled(app, settle):
    async def run_before(pilot) -> None:
        await settle(pilot, app)

    return run_before


def test_main_screen_80x24(snap_compare, make_store, settle):
    app = _app(make_store)
    assert snap_compare(app, terminal_size=(80, 24), run_before=_settled(app, settle))


def test_main_screen_160x48(snap_compare, make_store, settle):
    app = _app(make_store)
    assert snap_compare(app, terminal_size=(160, 48), run_before=_settled(app, settle))


def test_anomaly_picked_moves_the_metrics_view(snap_compare, make_store, settle):
    app = _app(make_store)

    async def run_before(pilot) -> None:
        await settle(pilot, app)
        feed = app.view.pane("anomalies")
        feed.table.focus()
        feed.table.move_cursor(row=next(i for i, a in enumerate(feed.anomalies) if a["step"] == 120))
        await pilot.press("enter")
        await settle(pilot, app)

    assert snap_compare(app, terminal_size=(120, 36), run_before=run_before)
