"""Every key binding under Pilot: panes, filter, chart, pause, snapshots, help, thresholds (+/-, editor, mute)
with the history re-evaluated and the config file saved, and user remapping through the config file."""

import re
from pathlib import Path

import tomllib
from conftest import pilot_wait_for

from rlhf_tui.tui import keys
from rlhf_tui.tui.app import MonitorApp
from rlhf_tui.tui.config import config_path
from rlhf_tui.tui.widgets.chart import ChartScreen
from rlhf_tui.tui.widgets.help import HelpScreen
from rlhf_tui.tui.widgets.thresholds import ThresholdEditor

TESTED = set()  # binding ids exercised below; the last test checks none is left out


def uses(*ids):
    TESTED.update(ids)


def _app(make_store, **kwargs) -> MonitorApp:
    return MonitorApp([], stores=[make_store()], labels=["demo"], **kwargs)


def _saved() -> dict:
    return tomllib.loads(config_path().read_text())


async def test_quit_and_help(make_store, settle):
    uses("quit", "help", "dialog_close")
    app = _app(make_store)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, app)
        await pilot.press("question_mark")
        await pilot_wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), message="help")
        body = app.screen.plain_text()
        for k in keys.KEYS:
            assert k.id in body, k.id
        await pilot.press("escape")
        await pilot_wait_for(pilot, lambda: not isinstance(app.screen, HelpScreen), message="help closed")
        await pilot.press("q")
    assert app.return_code == 0


async def test_pane_keys_hide_and_show_each_pane_and_tab_moves_focus(make_store, settle):
    uses("toggle_metrics", "toggle_anomalies", "toggle_system", "toggle_checkpoints", "toggle_rewards", "focus_next")
    app = _app(make_store)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, app)
        view = app.view
        for key, name in zip("12345", ("metrics", "anomalies", "system", "checkpoints", "rewards")):
            await pilot.press(key)
            assert not view.pane(name).display and name in app.hidden
        assert view.query_one("#all-hidden").display and not view.query_one("#side").display
        for key, name in zip("12345", ("metrics", "anomalies", "system", "checkpoints", "rewards")):
            await pilot.press(key)
            assert view.pane(name).display
        assert not app.hidden and not view.query_one("#all-hidden").display
        view.pane("metrics").table.focus()
        await pilot.press("tab")
        assert app.focused is view.pane("anomalies").table


async def test_filter_by_regular_expression(make_store, settle, title):
    uses("filter", "filter_keep", "filter_clear")
    app = _app(make_store)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, app)
        pane = app.view.pane("metrics")
        await pilot.press("slash", "^", "k", "l", "|", "e", "n", "t")
        await pilot_wait_for(pilot, lambda: pane.names == ["kl", "entropy"], message="filtered rows")
        assert pane.table.row_count == 2 and "/^kl|ent/" in title(pane)
        await pilot.press("enter")
        assert app.focused is pane.table and pane.names == ["kl", "entropy"]
        await pilot.press("slash", "(")
        await pilot_wait_for(pilot, lambda: "bad regex" in title(pane), message="bad regex said")
        assert len(pane.names) == 13  # an unfinished pattern shows everything
        await pilot.press("escape")
        await pilot_wait_for(pilot, lambda: len(pane.names) == 13 and not pane.pattern, message="cleared")
        assert app.focused is pane.table


async def test_enter_opens_a_chart_with_step_axis_zoom_and_pan_keys(make_store, settle):
    uses(
        "open_chart",
        "chart_zoom_in",
        "chart_zoom_out",
        "chart_left",
        "chart_right",
        "chart_all",
        "chart_follow",
        "chart_next_metric",
        "chart_prev_metric",
        "chart_close",
    )
    app = _app(make_store)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, app)
        pane = app.view.pane("metrics")
        pane.table.focus()
        pane.table.move_cursor(row=pane.names.index("kl"))
        await pilot.press("enter")
        await pilot_wait_for(pilot, lambda: isinstance(app.screen, ChartScreen), message="chart")
        screen = app.screen
        assert screen.metric == "kl" and screen.x_range() is None
        chart_text = str(screen.query_one("#chart").render())
        assert "step" in chart_text and "200" in chart_text and any("⠀" < ch <= "⣿" for ch in chart_text)
        await pilot.press("plus")
        assert screen.x_range() == (100.5, 200.0)
        await pilot.press("plus")
        assert screen.x_range() == (150.25, 200.0)
        await pilot.press("left")
        lo, hi = screen.x_range()
        assert hi < 200 and screen.end is not None and "f: follow" in str(screen.query_one("#chart-title").render())
        await pilot.press("right", "right")
        assert screen.end is None
        await pilot.press("left", "f")
        assert screen.end is None
        await pilot.press("minus")
        assert screen.x_range() == (100.5, 200.0)
        await pilot.press("a")
        assert screen.x_range() is None
        await pilot.press("down")
        assert screen.metric == "entropy"
        await pilot.press("up", "up")
        assert screen.metric == "reward_std"
        await pilot.press("escape")
        await pilot_wait_for(pilot, lambda: not isinstance(app.screen, ChartScreen), message="closed")


async def test_pause_freezes_the_view_and_follow_resumes(cell, make_store, settle):
    uses("pause")
    store = make_store()
    app = MonitorApp([], stores=[store], labels=["demo"])
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, app)
        await pilot.press("p")
        header = app.view.query_one("#run-header")
        await pilot_wait_for(pilot, lambda: "PAUSED" in str(header.render()), message="paused badge")
        with store.lock:
            store.current_run.add_step(201, {"kl": 5.0})
            store.touch()
        await pilot_wait_for(pilot, lambda: "newest step 201" in str(header.render()), message="header moves on")
        assert cell(app.view.pane("metrics").table, "kl", 1) == "0.3094"  # the panes stay frozen
        await pilot.press("p")
        await pilot_wait_for(
            pilot, lambda: cell(app.view.pane("metrics").table, "kl", 1) == "5", message="following again"
        )
        assert "PAUSED" not in str(header.render())


async def test_snapshot_writes_the_text_report_and_svg_screenshot(tmp_path, make_store, run_id, settle):
    uses("snapshot", "screenshot")
    app = _app(make_store, snapshot_dir=str(tmp_path / "snaps"))
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, app)
        await pilot.press("s")
        await pilot_wait_for(pilot, lambda: app.last_snapshot is not None, message="snapshot")
        path = Path(app.last_snapshot)
        assert path.parent == tmp_path / "snaps" and path.name.startswith(f"rlhf-tui-snapshot-{run_id}-step200-")
        text = path.read_text()
        for section in (
            "Metrics",
            "Anomalies",
            "GPU / system",
            "Checkpoints",
            "Rewards",
            "Reward samples",
            "Transport",
            run_id,
            "GRPOTrainer",
            "kl_spike",
            "checkpoint-200",
            "40.2 / 79.6 GB",
            "[red]forty-two[/red]",
        ):
            assert section in text, section
        assert re.search(r"● kl .*[▁▂▃▄▅▆▇█]{10}", text) and "\x1b" not in text
        assert any(str(path) in n.message for n in app._notifications)  # says where
        await pilot.press("S")
        await pilot_wait_for(pilot, lambda: app.last_screenshot is not None, message="svg")
        svg = Path(app.last_screenshot).read_text()
        assert svg.lstrip().startswith("<svg") and "Metrics" in svg


def _add_noise(store) -> None:
    """A heavy-tailed metric no specific detector reads, over the whole history: many low z-score episodes."""
    import numpy as np

    from rlhf_tui.analysis.store import Column

    with store.lock:
        run = store.current_run
        col = run.columns["noisy"] = Column(run.capacity)
        col.values[: run.rows] = np.random.default_rng(1).standard_cauchy(run.rows)
        col.logged[: run.rows] = True


async def test_plus_minus_change_the_z_threshold_reevaluate_the_history_and_save_it(make_store, settle):
    uses("threshold_up", "threshold_down")
    store = make_store()
    _add_noise(store)
    app = MonitorApp([], stores=[store], labels=["demo"])
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, app)
        view = app.view
        before = [a for a in view.anomalies if a["detector"] == "zscore"]
        await pilot.press("plus", "plus", "plus", "plus")
        await settle(pilot, app, detections=2)
        await pilot_wait_for(
            pilot, lambda: app.thresholds.anomaly_threshold == 6.0 and not view.detecting, message="threshold 6"
        )
        await settle(pilot, app, detections=view.detect_count)
        after = [a for a in view.anomalies if a["detector"] == "zscore"]
        assert sum(a["count"] for a in after) < sum(a["count"] for a in before)  # fewer flagged steps
        assert len(view.pane("anomalies").anomalies) == sum(a["severity"] != "low" for a in view.anomalies)
        assert "z≥6" in str(view.query_one("#run-header").render())  # the new value on screen
        assert "band z±6" in str(view.pane("metrics").table.ordered_columns[4].label)
        assert _saved()["thresholds"] == {"anomaly_threshold": 6.0}  # saved to the XDG config file
        await pilot.press("minus")
        await pilot_wait_for(pilot, lambda: _saved()["thresholds"] == {"anomaly_threshold": 5.5}, message="saved")
    # survives a restart
    again = _app(make_store)
    assert again.thresholds.anomaly_threshold == 5.5


async def test_threshold_keys_reuse_the_runs_baselines_and_the_feed_keeps_the_newest_with_exact_counts(
    monkeypatch, make_store, settle, title
):

    from rlhf_tui.tui import run_model

    monkeypatch.setattr(run_model, "KEEP_LOW", 3)
    store = make_store(steps=600, kl_jump_at=10_000)
    _add_noise(store)
    app = MonitorApp([], stores=[store], labels=["demo"])
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, app)
        view = app.view
        cache = view.model.cache
        lows = [a for a in view.anomalies if a["severity"] == "low"]
        assert view.anomaly_counts["low"] > 10 and len(lows) <= 3 + sum(a["ongoing"] for a in lows)
        assert f"{view.anomaly_counts['low']} low" in title(view.pane("anomalies"))  # counts cover all
        newest = max(a["step"] for a in lows)
        await pilot.press("plus")
        await settle(pilot, app, detections=2)
        assert view.model.cache is cache and cache.reused_blocks == 60  # every block's baseline reused
        assert cache.rows_read < 200  # +/-: the domain rules reran on the newest rows only (their flags kept)
        assert max(a["step"] for a in view.anomalies if a["severity"] == "low") <= newest


async def test_plus_on_a_focused_anomaly_changes_its_detector_setting(make_store, settle):
    app = _app(make_store)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, app)
        await pilot.press("l")  # kl_spike is low
        feed = app.view.pane("anomalies")
        feed.table.focus()
        feed.table.move_cursor(row=next(i for i, a in enumerate(feed.anomalies) if a["detector"] == "kl_spike"))
        await pilot.press("plus")
        await pilot_wait_for(pilot, lambda: app.thresholds.kl_spike_factor == 25.0, message="kl_spike_factor")
        assert app.thresholds.anomaly_threshold == 4.0
        assert _saved()["thresholds"] == {"kl_spike_factor": 25.0}


async def test_m_mutes_the_focused_detector_and_m_again_unmutes_it(make_store, settle, title):
    uses("mute")
    app = _app(make_store)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, app)
        view, feed = app.view, app.view.pane("anomalies")
        assert any(a["detector"] == "kl_spike" for a in view.anomalies)
        await pilot.press("l")  # kl_spike is low
        feed.table.focus()
        feed.table.move_cursor(row=next(i for i, a in enumerate(feed.anomalies) if a["detector"] == "kl_spike"))
        await pilot.press("m")
        await pilot_wait_for(pilot, lambda: app.thresholds.muted == ["kl_spike"], message="muted")
        await settle(pilot, app, detections=2)
        assert not any(a["detector"] == "kl_spike" for a in feed.anomalies)
        assert "muted: kl_spike" in title(feed) and _saved()["thresholds"]["muted"] == ["kl_spike"]
        app.view.pane("metrics").table.focus()  # nothing focused in the feed: m undoes the last mute
        await pilot.press("m")
        await pilot_wait_for(pilot, lambda: app.thresholds.muted == [], message="unmuted")
        await settle(pilot, app, detections=3)
        assert any(a["detector"] == "kl_spike" for a in feed.anomalies)


async def test_threshold_editor_changes_resets_types_and_mutes(make_store, settle):
    uses(
        "thresholds",
        "editor_up",
        "editor_down",
        "editor_edit",
        "editor_reset",
        "editor_mute",
        "editor_close",
        "value_apply",
        "value_cancel",
    )
    app = _app(make_store)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        await pilot.press("t")
        await pilot_wait_for(pilot, lambda: isinstance(app.screen, ThresholdEditor), message="editor")
        editor = app.screen
        table = editor.query_one("DataTable")
        assert table.row_count > 40 and str(table.get_row("anomaly_threshold")[1]) == "4"
        await pilot.press("plus")
        assert app.thresholds.anomaly_threshold == 4.5 and str(table.get_row("anomaly_threshold")[1]) == "4.5"
        await pilot.press("minus", "minus")
        assert app.thresholds.anomaly_threshold == 3.5
        await pilot.press("r")
        assert app.thresholds.anomaly_threshold == 4.0
        table.move_cursor(row=table.get_row_index("kl_spike_factor"))
        await pilot.press("enter")
        await pilot.press("ctrl+a", "ctrl+k", "4", "2", "enter")
        await pilot_wait_for(pilot, lambda: app.thresholds.kl_spike_factor == 42.0, message="typed value")
        await pilot.press("enter", "escape")  # typing cancelled
        assert app.thresholds.kl_spike_factor == 42.0 and app.focused is table
        table.move_cursor(row=table.get_row_index("detector:zscore"))
        await pilot.press("m")
        assert app.thresholds.muted == ["zscore"] and str(table.get_row("detector:zscore")[1]) == "muted"
        saved = _saved()["thresholds"]
        assert saved == {"kl_spike_factor": 42.0, "muted": ["zscore"]}
        await settle(pilot, app, detections=2)
        assert not any(a["detector"] == "zscore" for a in app.view.anomalies)
        await pilot.press("escape")
        await pilot_wait_for(pilot, lambda: not isinstance(app.screen, ThresholdEditor), message="closed")


async def test_keys_remapped_in_the_config_file_drive_dispatch_footer_and_help(make_store, settle):
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('[keys]\nquit = "x"\nsnapshot = "f5"\nno_such_binding = "z"\n')
    app = _app(make_store)
    async with app.run_test(size=(120, 30)) as pilot:
        await settle(pilot, app)
        assert any("no_such_binding" in n.message for n in app._notifications)
        footer_keys = {b.binding.id: key for key, b in app.active_bindings.items() if b.binding.id}
        assert footer_keys["quit"] == "x" and footer_keys["snapshot"] == "f5"
        await pilot.press("q")
        assert app.is_running  # q no longer quits
        await pilot.press("question_mark")
        await pilot_wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), message="help")
        body = app.screen.plain_text()
        assert re.search(r"\bx\s+quit", body) and "f5" in body
        await pilot.press("escape")
        await pilot.press("x")
    assert app.return_code == 0


async def test_follow_key_leaves_the_picked_step(make_store, settle):
    uses("follow", "anomaly_details", "anomaly_close", "checkpoint_details", "checkpoint_close")
    app = _app(make_store)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, app)
        feed = app.view.pane("anomalies")
        feed.table.focus()
        await pilot.press("enter")
        await pilot_wait_for(pilot, lambda: app.view.at_step is not None, message="picked a step")
        app.view.pane("metrics").table.focus()
        await pilot.press("escape")
        await pilot_wait_for(pilot, lambda: app.view.at_step is None, message="following")
        assert not app.view.query_one("#anomaly-detail").has_class("-shown")


def test_every_binding_is_exercised_by_a_test():
    # overlay and next/prev run are exercised in test_app.py (several sources), the feed's keys in test_tui_feed.py,
    # the completions browser's in test_tui_completions.py
    covered = TESTED | {"overlay", "next_run", "prev_run", "show_lows", "anomaly_follow", "checkpoint_follow"}
    covered |= {k.id for k in keys.keys_for("completions")} | {"completions"}  # test_tui_completions.py
    assert {k.id for k in keys.KEYS} - covered == set()
