"""The Anomaly feed and the Checkpoints pane follow like `tail -f` under Pilot: a new alarm arrives at the top
with the cursor on it after 300 steps of history; a cursor key stops following ("n new ↑" in the title), End / f
follow again; lows are hidden until `l`; the highlighted episode's whole message and recommendation are shown,
at 80x24 too."""

import math

from conftest import pilot_wait_for

from rlhf_tui.tui.app import MonitorApp


def _add_steps(store, first: int, last: int, nan_at: int | None = None, metric: str = "loss") -> None:
    """More steps like make_store's (a calm KL), `metric` NaN at `nan_at`: a critical nonfinite alarm."""
    with store.lock:
        run = store.current_run
        for s in range(first, last + 1):
            run.add_step(
                s,
                {
                    "reward": 0.2 + 0.003 * s + 0.05 * math.sin(s / 5),
                    "kl": 0.01 + 0.002 * math.sin(s / 7),
                    "loss": 0.05 * math.sin(s / 4),
                    **({metric: math.nan} if s == nan_at else {}),
                },
            )
        store.touch()


def _newest_is_nonfinite_at(feed, step: int) -> bool:
    return bool(feed.anomalies) and (feed.anomalies[0]["detector"], feed.anomalies[0]["step"]) == ("nonfinite", step)


def _peek(app) -> str:
    return str(app.view.query_one("#anomaly-peek").render())


async def test_a_new_alarm_arrives_at_the_top_of_the_feed_with_the_cursor_following(make_store, settle, title):
    store = make_store(steps=300)
    app = MonitorApp([], stores=[store], labels=["demo"])
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        feed = app.view.pane("anomalies")
        table = feed.table
        assert len(feed.anomalies) >= 5 and table.following
        assert table.cursor_row == 0
        first_key = table.cursor_key
        assert feed.highlighted() is feed.anomalies[0]  # the cursor is on the newest, not the first ever received
        _add_steps(store, 301, 310, nan_at=305)
        await pilot_wait_for(pilot, lambda: _newest_is_nonfinite_at(feed, 305), message="the NaN alarm in the feed")
        await pilot_wait_for(pilot, lambda: table.cursor_row == 0, message="cursor on the new top row")
        newest = feed.anomalies[0]
        assert feed.highlighted() is newest and table.cursor_key != first_key
        assert table.scroll_y == 0  # the top row is on screen
        assert newest["message"] in _peek(app) and newest["recommendation"] in _peek(app)
        assert "new ↑" not in title(feed)


async def test_moving_the_cursor_stops_following_shows_n_new_and_end_or_f_follow_again(make_store, settle, title):
    store = make_store(steps=300)
    app = MonitorApp([], stores=[store], labels=["demo"])
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        feed = app.view.pane("anomalies")
        table = feed.table
        table.focus()
        await pilot.press("down", "down")
        assert not table.following and table.cursor_row == 2
        picked = feed.highlighted()
        assert picked["message"] in _peek(app)  # the highlighted episode's text, not the newest's
        _add_steps(store, 301, 310, nan_at=305)
        await pilot_wait_for(pilot, lambda: _newest_is_nonfinite_at(feed, 305), message="the NaN alarm in the feed")
        await pilot_wait_for(pilot, lambda: "1 new ↑" in title(feed), message="the n new hint")
        assert feed.highlighted() is not None and feed.highlighted()["step"] == picked["step"]  # the cursor stayed
        assert table.cursor_row == 3 and picked["message"] in _peek(app)
        await pilot.press("f")
        assert table.following and table.cursor_row == 0 and "new ↑" not in title(feed)
        assert feed.highlighted()["detector"] == "nonfinite"
        await pilot.press("down")
        assert not table.following
        _add_steps(store, 311, 320, nan_at=315, metric="reward")
        await pilot_wait_for(pilot, lambda: "1 new ↑" in title(feed), message="the n new hint again")
        await pilot.press("end")
        assert table.following and table.cursor_row == 0 and feed.highlighted()["step"] == 315
        await pilot.press("down", "up")  # back on the top row: following again
        assert table.following


async def test_lows_are_hidden_until_l_and_still_mark_their_metric(cell, make_store, settle, title):
    app = MonitorApp([], stores=[make_store(steps=160, kl_jump_at=10_000)], labels=["demo"])
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        view, feed = app.view, app.view.pane("anomalies")
        lows = [a for a in view.anomalies if a["severity"] == "low"]
        assert lows and all(a["severity"] != "low" for a in feed.anomalies)
        assert f"{len(lows)} low hidden" in title(feed)
        spike = next(a for a in lows if a["detector"] == "grad_norm_spike")  # step 150: ongoing at step 160
        assert spike["ongoing"] and not any(a["metric"] == "grad_norm" for a in feed.anomalies)
        assert cell(view.pane("metrics").table, "grad_norm", 0).startswith("●")  # its metric is still marked
        await pilot.press("l")
        assert any(a["severity"] == "low" for a in feed.anomalies) and "hidden" not in title(feed)
        assert len(feed.anomalies) == len(view.anomalies) and feed.table.row_count == len(view.anomalies)
        assert feed.highlighted() is feed.anomalies[0] and feed.table.following
        await pilot.press("l")
        assert all(a["severity"] != "low" for a in feed.anomalies) and "low hidden" in title(feed)


async def test_showing_lows_while_pinned_counts_none_of_them_as_new(make_store, settle, title):
    app = MonitorApp([], stores=[make_store(steps=300)], labels=["demo"])
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        feed = app.view.pane("anomalies")
        feed.table.focus()
        await pilot.press("down", "down", "l")
        assert not feed.table.following and feed.table.unseen == 0 and "new ↑" not in title(feed)


async def test_the_highlighted_episodes_whole_text_is_visible_at_80x24(make_store, settle):
    app = MonitorApp([], stores=[make_store()], labels=["demo"])
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        feed = app.view.pane("anomalies")
        peek = app.view.query_one("#anomaly-peek")
        a = feed.highlighted()
        assert a is not None and len(a["message"]) + len(a["recommendation"]) > 2 * feed.size.width  # wraps
        text = peek.render()
        assert a["message"] in str(text) and a["recommendation"] in str(text)
        lines = text.wrap(peek.content_size.width)
        assert peek.content_size.height >= len(lines)  # every wrapped line fits on screen
        assert feed.table.size.height >= 2  # and the newest rows above it


async def test_checkpoints_follow_the_newest_and_say_how_many_arrived_above(make_store, settle, title):
    store = make_store()
    app = MonitorApp([], stores=[store], labels=["demo"])

    def add_checkpoint(step: int) -> None:
        with store.lock:
            store.current_run.checkpoints.append(
                {"step": step, "path": f"/runs/out/checkpoint-{step}", "health_score": 0.9, "status": "analysed"}
            )
            store.touch()

    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        pane = app.view.pane("checkpoints")
        table = pane.table
        for step in range(210, 400, 10):  # 21 checkpoints: more than the pane shows
            add_checkpoint(step)
        await pilot_wait_for(pilot, lambda: table.row_count == 21, message="the new checkpoints")
        assert table.cursor_row == 0 and table.cursor_key == "390" and table.scroll_y == 0
        table.focus()
        await pilot.press("down")
        assert table.cursor_key == "380" and not table.following
        add_checkpoint(400)
        await pilot_wait_for(pilot, lambda: "Checkpoints 22 1 new ↑" in title(pane), message="the hint")
        assert table.cursor_key == "380"
        await pilot.press("f")
        assert table.cursor_key == "400" and "new ↑" not in title(pane)
