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


def _dpo_store():
    """A DPO run (deterministic): the implicit rewards climb, an evaluation every 4 steps."""
    import math

    from rlhf_tui.analysis.store import Store
    from rlhf_tui.bridge.wire.metrics import normalise

    store = Store()
    with store.lock:
        run = store.run("dpo-demo-0001")
        run.meta.update({"run_id": "dpo-demo-0001", "trainer": "DPOTrainer", "model": "tiny-gpt2", "max_steps": 80})
        for s in range(1, 61):
            margin = 0.02 * s + 0.05 * math.sin(s)
            logs = {"loss": 0.69 - 0.004 * s + 0.01 * math.cos(s), "grad_norm": 1 + 0.1 * math.sin(s / 3)}
            logs |= {"rewards/chosen": margin / 2, "rewards/rejected": -margin / 2, "rewards/margins": margin}
            logs |= {"rewards/accuracies": min(1.0, 0.5 + 0.01 * s), "logps/chosen": -9 + 0.01 * s}
            logs |= {"logps/rejected": -9 - 0.02 * s, "entropy": 4.5, "learning_rate": 5e-6, "num_tokens": 22.0 * s}
            run.add_step(s, {**normalise(logs), "time/step_s": 0.25})
            if s % 4 == 0:
                run.add_step(s, normalise({"eval_loss": 0.66 + 0.0005 * s, "eval_rewards/accuracies": 0.75}))
        store.touch()
    return store


def test_main_screen_of_a_dpo_run(snap_compare, settle):
    app = MonitorApp([], stores=[_dpo_store()], labels=["dpo.jsonl"], config=Config(CONFIG))
    assert snap_compare(app, terminal_size=(120, 36), run_before=_settled(app, settle))
