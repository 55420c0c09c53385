"""The completions browser under Pilot: scrub steps, sort, search with a regex, open one sample whole; markup
and escape sequences in a completion are shown literally."""

from conftest import pilot_wait_for

from rlhf_tui.tui.app import MonitorApp
from rlhf_tui.tui.widgets.completions import CompletionsScreen

TEXTS = {
    0: ("What is 2+2?", "The answer is [bold red]4[/bold red]\x1b[2J done"),
    1: ("What is 3+3?", "six, I think"),
    2: ("Name a colour", "blue\nand green"),
    3: ("Name a fruit", "apple " * 40),
}


def _add_steps(store):
    """Three steps of two reward functions (acc carries the texts); the middle one has a NaN."""
    run = store.current_run
    run.meta.setdefault("args", {})["num_generations"] = 2
    first = (run.last_step or 0) + 1
    with store.lock:
        for k, step in enumerate(range(first, first + 3)):
            samples = [
                {"index": i, "label": "all", "prompt": p, "completion": c, "truncated": i == 3, "length": 10 + i}
                for i, (p, c) in TEXTS.items()
            ]
            acc = [1.0, 0.0, 1.0, float("nan") if k == 1 else 1.0]
            run.add_reward({"reward_func": "acc", "step": step, "scores": acc, "samples": samples, "rank": 0})
            fmt = [0.5, 0.25, 0.0, 0.75]
            run.add_reward({"reward_func": "fmt", "step": step, "scores": fmt, "samples": [], "rank": 0})
        store.touch()
    return list(range(first, first + 3))


def _table_rows(screen):
    table = screen.query_one("#completions-table")
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def _head(screen) -> str:
    return str(screen.query_one("#completions-head").render())


async def test_browser_scrubs_sorts_searches_and_opens_one_sample_literally(make_store, settle):
    store = make_store()
    steps = _add_steps(store)
    app = MonitorApp([], stores=[store], labels=["demo"])
    async with app.run_test(size=(140, 40)) as pilot:
        await settle(pilot, app)
        await pilot.press("c")
        await pilot_wait_for(pilot, lambda: isinstance(app.screen, CompletionsScreen), message="browser open")
        screen = app.screen
        assert f"step {steps[-1]}" in _head(screen) and "4/4 samples" in _head(screen)
        rows = _table_rows(screen)
        # sorted by the total (acc + fmt), highest first; the columns: # label total acc fmt adv len flags text
        assert [r[0] for r in rows] == ["3", "0", "2", "1"]
        assert [r[2] for r in rows] == ["1.75", "1.5", "1", "0.25"]
        assert rows[0][7] == "T" and rows[0][6] == "13"  # truncated, its length in tokens
        assert rows[1][8].startswith("The answer is [bold red]4[/bold red]\\x1b[2J done")  # literal
        assert rows[1][5] == "0.707"  # (1.5 - 0.875) / (std 0.884 + 1e-4): its group is #0 and #1

        await pilot.press("left")  # the step before: a non-finite reward
        assert f"step {steps[-2]}" in _head(screen)
        flagged = {r[0]: r[7] for r in _table_rows(screen)}
        assert flagged["3"] == "T!" and flagged["0"] == ""
        await pilot.press("right")
        assert f"step {steps[-1]}" in _head(screen)
        await pilot.press("g", *str(steps[0]), "enter")
        assert f"step {steps[0]}" in _head(screen)
        await pilot.press("end")
        assert f"step {steps[-1]}" in _head(screen)

        await pilot.press("o")  # sort by acc, then fmt
        assert "sort: acc" in _head(screen)
        await pilot.press("o")
        assert "sort: fmt" in _head(screen)
        assert [r[0] for r in _table_rows(screen)] == ["3", "0", "1", "2"]

        await pilot.press("slash", *"colou?r|fruit", "enter")
        assert "search: colou?r|fruit" in _head(screen)
        assert sorted(r[0] for r in _table_rows(screen)) == ["2", "3"]
        await pilot.press("slash", "enter")  # an empty search clears it
        assert len(_table_rows(screen)) == 4
        await pilot.press("slash", "q")  # typed into the search, not the close key
        assert screen.query_one("#completions-input").value == "q" and app.screen is screen
        await pilot.press("escape")  # closes the input only
        assert screen.asking is None and app.screen is screen and len(_table_rows(screen)) == 4

        screen.query_one("#completions-table").move_cursor(row=1)  # #0 under sort by fmt
        await pilot.press("enter")
        assert screen.opened and screen.query_one("#completions-detail").display
        body = str(screen.query_one("#completions-body").render())
        assert "What is 2+2?" in body and "The answer is [bold red]4[/bold red]\\x1b[2J done" in body
        assert "\x1b" not in body
        assert "total 1.5" in body and "acc 1" in body and "fmt 0.5" in body
        await pilot.press("escape")
        assert not screen.opened and screen.query_one("#completions-table").display
        newer = _add_steps(store)  # a live run: the browser follows the newest step
        await pilot_wait_for(pilot, lambda: f"step {newer[-1]} (newest)" in _head(screen), message="followed")
        await pilot.press("left")
        assert f"step {newer[-2]}" in _head(screen) and "(newest)" not in _head(screen)
        await pilot.press("escape")
        await pilot_wait_for(pilot, lambda: not isinstance(app.screen, CompletionsScreen), message="closed")


async def test_browser_says_where_samples_come_from_when_there_are_none(make_store, settle):
    app = MonitorApp([], stores=[make_store()], labels=["demo"])
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot, app)
        await pilot.press("c")
        await pilot_wait_for(pilot, lambda: isinstance(app.screen, CompletionsScreen), message="browser open")
        assert "no sample completions yet" in _head(app.screen)
        assert _table_rows(app.screen) == []


async def _browser_open(pilot, app, settle) -> None:
    await settle(pilot, app)
    await pilot.press("c")
    await pilot_wait_for(pilot, lambda: isinstance(app.screen, CompletionsScreen), message="browser open")
    await pilot.press("left")  # the step with a non-finite reward: both flags drawn


def test_browser_snapshot_with_flags_and_literal_markup(snap_compare, make_store, settle):
    """The browser's look: its head, one column per reward function, T and ! flags, markup and an escape
    sequence from the model shown as text, and the line of its keys."""
    store = make_store()
    _add_steps(store)
    app = MonitorApp([], stores=[store], labels=["demo"])

    async def run_before(pilot) -> None:
        await _browser_open(pilot, app, settle)

    assert snap_compare(app, terminal_size=(120, 16), run_before=run_before)
