"""Each pane under Pilot with deterministic data: what it shows, what selecting a row does, the layout."""

from conftest import pilot_wait_for

from rlhf_tui.tui.app import MonitorApp


def _text(widget) -> str:
    return str(widget.render())


async def test_metrics_pane_rows_values_band_trend_and_active_anomaly(cell, make_store, settle, title):
    app = MonitorApp([], stores=[make_store()], labels=["demo"])
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        pane = app.view.pane("metrics")
        assert pane.names[:5] == ["reward", "reward_std", "kl", "entropy", "loss"]  # canonical first
        groups = ["groups/too_easy", "groups/too_hard", "groups/zero_std_other"]  # from the reward batches' scores
        assert pane.names[-5:] == ["completions/clipped_ratio", *groups, "rewards/length_reward/mean"]
        table = pane.table
        assert cell(table, "kl", 0).startswith("● kl")  # a KL anomaly is in progress
        assert not cell(table, "entropy", 0).startswith("●")
        assert cell(table, "entropy", 3) == "↓" and cell(table, "reward", 3) == "↑"
        assert cell(table, "reward", 1) == "0.8373"
        assert cell(table, "grad_norm", 2) == "0.9…9.09"  # min…max
        lo, hi = (float(x) for x in cell(table, "entropy", 4).split("…"))  # the z-score band
        assert lo < 1.2 < hi
        assert cell(table, "learning_rate", 4) == "—"  # schedules are not judged
        spark = cell(table, "entropy", 5)
        assert set(spark.replace("\n", "")) <= set(" ▁▂▃▄▅▆▇█") and "█" in spark
        assert "Metrics 13" in title(pane)


async def test_anomaly_feed_newest_first_with_counts_and_details_that_move_the_metrics_view(
    cell, make_store, settle, title
):
    app = MonitorApp([], stores=[make_store()], labels=["demo"])
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        view = app.view
        feed = view.pane("anomalies")
        feed_title = title(feed)
        counts = {s: sum(a["severity"] == s for a in view.anomalies) for s in ("medium", "low")}
        assert f"{counts['medium']} medium" in feed_title and f"{counts['low']} low hidden" in feed_title
        assert len(feed.anomalies) == counts["medium"]  # medium and worse by default
        await pilot.press("l")  # the lows too
        steps = [a["step"] for a in feed.anomalies]
        assert steps == sorted(steps, reverse=True) and len(steps) == len(view.anomalies)
        feed.table.focus()
        row = next(i for i, a in enumerate(feed.anomalies) if a["detector"] == "kl_spike" and a["step"] == 120)
        feed.table.move_cursor(row=row)
        await pilot.press("enter")
        await pilot_wait_for(pilot, lambda: view.at_step == 120, message="metrics moved to the anomaly's step")
        detail = view.query_one("#anomaly-detail")
        assert detail.has_class("-shown")
        text = _text(detail)
        assert "kl_spike" in text and "→" in text and "120" in text
        await pilot_wait_for(pilot, lambda: "at step 120" in title(view.pane("metrics")), message="metrics title")
        assert cell(view.pane("metrics").table, "kl", 1) == "0.808"  # kl at step 120, not the latest
        assert "@120" in str(view.pane("metrics").table.ordered_columns[1].label)
        await pilot.press("escape")
        await pilot_wait_for(
            pilot, lambda: view.at_step is None and not detail.has_class("-shown"), message="back to following"
        )


async def test_system_pane_gauge_per_device_and_no_gpu_stated_plainly(make_store, settle, title):
    app = MonitorApp(
        [], stores=[make_store(), make_store(gpu=False), make_store(ranks=2)], labels=["gpu", "cpu", "ranks"]
    )
    async with app.run_test(size=(130, 40)) as pilot:
        await settle(pilot, app)
        text = _text(app.view.query_one("#system-body"))
        assert "GPU0" in text and "40.2/79.6 GB" in text and "peak 58.7" in text and "util 87%" in text
        assert "RSS 812" in text and "█" in text and "░" in text
        await pilot.press("right_square_bracket")
        await pilot_wait_for(
            pilot, lambda: "no GPU" in _text(app.view.query_one("#system-body")), message="CPU-only run"
        )
        assert "CPU-only" in _text(app.view.query_one("#system-body"))
        await pilot.press("right_square_bracket")
        await pilot_wait_for(
            pilot, lambda: "rank 1" in _text(app.view.query_one("#system-body")), message="several ranks"
        )
        text = _text(app.view.query_one("#system-body"))
        assert "rank 0" in text and text.count("GPU1") == 2
        assert "2 ranks, 4 GPUs" in title(app.view.pane("system"))


async def test_checkpoints_table_and_details_of_the_selected_checkpoint(cell, make_store, settle, title):
    app = MonitorApp([], stores=[make_store()], labels=["demo"])
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        pane = app.view.pane("checkpoints")
        table = pane.table
        assert table.row_count == 2 and str(table.get_row_at(0)[0]) == "200"  # newest first
        assert cell(table, "200", 1) == "0.41" and cell(table, "200", 2) == "1" and cell(table, "200", 3) == "0.081"
        assert cell(table, "100", 1) == "0.93" and cell(table, "100", 3) == "—"
        assert cell(table, "200", 5).endswith("/out/checkpoint-200")  # the end of the path is kept
        assert table.get_row("200")[1].style == "bold red" and table.get_row("100")[1].style == "green"
        assert "latest health 0.41" in title(pane)
        table.focus()
        await pilot.press("enter")
        detail = app.view.query_one("#checkpoint-detail")
        await pilot_wait_for(pilot, lambda: detail.has_class("-shown"), message="checkpoint details")
        text = _text(detail)
        assert "[bold]x[/bold]" in text  # shown literally, never parsed as markup
        assert "roll back to checkpoint-100" in text
        await pilot.press("escape")
        await pilot_wait_for(pilot, lambda: not detail.has_class("-shown"), message="details closed")


async def test_rewards_pane_numbers_distribution_and_escaped_samples(make_store, settle):
    app = MonitorApp([], stores=[make_store()], labels=["demo"])
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        body = app.view.query_one("#rewards-body")
        text = _text(body)
        for fragment in (
            "all stability 1  consistency 1",
            "variance 0.0662  mean 0.2",
            "batches 400",
            "samples @ step 200",
            "0.9",
            "0.1",
        ):
            assert fragment in text, fragment
        rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.endswith("—")}
        assert rows["length_reward"][:2] == ["0.6", "0.212"] and rows["length_reward"][3] == "80%"
        assert rows["format_reward"][:2] == ["-0.4", "0.0707"] and rows["format_reward"][3] == "20%"
        head = str(app.view.pane("rewards").border_title)
        assert "2 functions" in head and "400 batches" in head
        assert "The answer is [red]forty-two[/red]! done" in text  # markup literal, escapes removed
        assert "\x1b" not in text and "pwned" not in text and "\x07" not in text
        assert "no newline tab" in text


async def test_layout_shows_all_five_panes_at_80x24_and_puts_metrics_beside_the_feed_when_wide(make_store, settle):
    app = MonitorApp([], stores=[make_store()], labels=["demo"])
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot, app)
        regions = {
            name: app.view.pane(name).region for name in ("metrics", "anomalies", "system", "checkpoints", "rewards")
        }
        for name, region in regions.items():
            assert region.width >= 20 and region.height >= 3, (name, region)
        assert regions["metrics"].y < regions["anomalies"].y  # narrow: metrics on top
        await pilot.resize_terminal(180, 50)
        await pilot_wait_for(
            pilot,
            lambda: app.view.pane("metrics").region.x < app.view.pane("anomalies").region.x,
            message="wide layout",
        )
        assert app.view.pane("metrics").region.height > 40


async def test_picking_an_anomaly_posts_selected_then_follow_posts_closed(make_store, settle):
    """The feed talks to the view by messages only: Enter posts Selected (the view moves to its step), Esc posts
    Closed (the view follows the newest step again)."""
    from rlhf_tui.tui.widgets.anomalies import AnomaliesPane

    posted = []
    app = MonitorApp([], stores=[make_store()], labels=["messages"])
    async with app.run_test(size=(120, 36), message_hook=posted.append) as pilot:
        await settle(pilot, app)
        await pilot.press("l")  # the step-120 episodes are lows
        feed = app.view.pane("anomalies")
        feed.table.focus()
        feed.table.move_cursor(row=next(i for i, a in enumerate(feed.anomalies) if a["step"] == 120))
        await pilot.press("enter")
        await pilot_wait_for(pilot, lambda: app.view.at_step == 120, message="the view at the picked step")
        selected = {id(m): m for m in posted if isinstance(m, AnomaliesPane.Selected)}  # seen at each bubble hop
        assert [m.anomaly["step"] for m in selected.values()] == [120]
        await settle(pilot, app)
        assert app.view.report["at_step"] == 120
        await pilot.press("escape")
        await pilot_wait_for(pilot, lambda: app.view.at_step is None, message="following again")
        assert any(isinstance(m, AnomaliesPane.Closed) for m in posted)


async def test_a_reward_function_episode_shows_in_the_feed_its_counts_and_the_rewards_pane(make_store, settle, title):
    app = MonitorApp([], stores=[make_store(reward_shift_at=190)], labels=["demo"])
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        feed = app.view.pane("anomalies")
        shown = [a for a in feed.anomalies if a["detector"] == "reward_zscore"]
        assert [(a["metric"], a["step"], a["severity"]) for a in shown] == [
            ("rewards/format_reward/mean", 190, "critical")
        ]
        rows = [str(feed.table.get_row_at(i)) for i in range(feed.table.row_count)]
        assert any("rewards/format_reward" in r and "jumped" in r for r in rows)
        assert "1 critical" in title(feed)  # the title's counts include the reward episodes
        text = _text(app.view.query_one("#rewards-body"))
        assert next(line for line in text.splitlines() if line.startswith("format_reward")).endswith(
            "1 CRIT 1 low"
        )  # the jump, then its level shift
