"""SVG snapshots (pytest-textual-snapshot) of the main screen at fixed sizes with deterministic data: a fixed
run id, no clocks, no live source. Update them with `pytest tests/test_tui_snapshots.py --snapshot-update`
after checking the new look in the report pytest writes on failure."""

from pathlib import Path

from conftest import pilot_wait_for

from rlhf_tui.tui.app import MonitorApp
from rlhf_tui.tui.config import Config
from rlhf_tui.tui.widgets.chart import ChartScreen
from rlhf_tui.tui.widgets.help import HelpScreen
from rlhf_tui.tui.widgets.thresholds import ThresholdEditor

CONFIG = Path("/home/user/.config/rlhf-tui/config.toml")  # shown by the help screen: a fixed path, not tmp


def _app(make_store) -> MonitorApp:
    return MonitorApp([], stores=[make_store()], labels=["grpo-demo.jsonl"], config=Config(CONFIG))


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
        await pilot.press("l")  # the step-120 episodes are lows
        feed = app.view.pane("anomalies")
        feed.table.focus()
        feed.table.move_cursor(row=next(i for i, a in enumerate(feed.anomalies) if a["step"] == 120))
        await pilot.press("enter")
        await settle(pilot, app)

    assert snap_compare(app, terminal_size=(120, 36), run_before=run_before)


def _opened(app, settle, key: str, screen_type, before=None):
    async def run_before(pilot) -> None:
        await settle(pilot, app)
        if before is not None:
            before(app)
        await pilot.press(key)
        await pilot_wait_for(pilot, lambda: isinstance(app.screen, screen_type), message=screen_type.__name__)
        await pilot.pause()

    return run_before


def test_help_screen(snap_compare, make_store, settle):
    app = _app(make_store)
    assert snap_compare(app, terminal_size=(120, 40), run_before=_opened(app, settle, "question_mark", HelpScreen))


def test_threshold_editor(snap_compare, make_store, settle):
    app = _app(make_store)
    assert snap_compare(app, terminal_size=(120, 40), run_before=_opened(app, settle, "t", ThresholdEditor))


def test_chart_screen_of_kl(snap_compare, make_store, settle):
    def pick_kl(app) -> None:
        pane = app.view.pane("metrics")
        pane.table.focus()
        pane.table.move_cursor(row=pane.names.index("kl"))

    app = _app(make_store)
    assert snap_compare(app, terminal_size=(120, 36), run_before=_opened(app, settle, "enter", ChartScreen, pick_kl))
