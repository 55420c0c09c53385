"""The completions browser on real tiny GRPO runs (two reward functions, num_generations=4, log_completions=True,
our callback publishing to a live monitor): under Pilot and in tmux it shows the completions and the
per-function scores TRL wrote to `output_dir/completions/*.parquet` (read here with pyarrow), sorted by a
function and searched with a regex. A second run, whose one function turns constant at its best from step
FADE_AT while the other always gives the maximum, shows the dead component and "too easy" prompt groups in the
Rewards pane and the report. Module-scoped runs: each trains once."""

from __future__ import annotations

import json
import os
import re
import shlex

import pytest
from conftest import pilot_wait_for, wait_for
from test_workloads import _common, _tokenizer, format_reward, watch

from rlhf_tui.analysis.samples import visible
from rlhf_tui.tui.cells import clean, short

pytestmark = pytest.mark.slow
pq = pytest.importorskip("pyarrow.parquet")
STEPS = 3
FADE_AT = 3  # `fading` returns 1.0 (its best) for every completion from this step's generation on
FADED_STEPS = 8
FUNCTIONS = ("length_reward", "format_reward")


def _grpo(tiny_model, reward_funcs, max_steps):
    """A builder for `watch`: GRPO, two groups of 4 completions a step, TRL's completion parquet files on."""
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_tui.bridge.demo.tiny import prompt_dataset
    from rlhf_tui.bridge.training.rewards import monitor_rewards

    def build(cb, out):
        args = GRPOConfig(
            **_common(out),
            per_device_train_batch_size=8,
            num_generations=4,
            max_completion_length=8,
            max_steps=max_steps,
            beta=0.04,
            log_completions=True,
            num_completions_to_print=0,
        )
        return GRPOTrainer(
            model=tiny_model,
            reward_funcs=monitor_rewards(reward_funcs, cb),
            args=args,
            train_dataset=prompt_dataset(64),
            processing_class=_tokenizer(tiny_model),
            callbacks=[cb],
        )

    return build


@pytest.fixture(scope="module")
def scored(tiny_model, tmp_path_factory):
    from rlhf_tui.bridge.demo.tiny import length_reward

    tmp = tmp_path_factory.mktemp("browser")
    watched = watch(_grpo(tiny_model, [length_reward, format_reward], STEPS), tmp)
    watched.parquet = {}
    for path in sorted((tmp / "out" / "completions").glob("completions_*.parquet")):
        table = pq.read_table(path).to_pydict()
        watched.parquet[table["step"][0]] = table
    watched.log = next((tmp / "logs").rglob("*.jsonl"))
    return watched


def fading(completions, trainer_state=None, **kwargs):
    if trainer_state is not None and trainer_state.global_step >= FADE_AT:
        return [1.0] * len(completions)
    return [min(0.9, (len(str(c)) % 10) / 10) for c in completions]


def solved(completions, **kwargs):
    return [1.0] * len(completions)


@pytest.fixture(scope="module")
def faded(tiny_model, tmp_path_factory):
    return watch(_grpo(tiny_model, [fading, solved], FADED_STEPS), tmp_path_factory.mktemp("faded"))


def _expected(table: dict) -> list[dict]:
    """TRL's rows of one step as the browser should hold them (index = the row)."""
    return [
        {
            "index": i,
            "prompt": visible(table["prompt"][i]),
            "completion": visible(table["completion"][i]),
            "scores": {f: table[f][i] for f in FUNCTIONS},
            "advantage": table["advantage"][i],
        }
        for i in range(len(table["step"]))
    ]


def _head(screen) -> str:
    return str(screen.query_one("#completions-head").render())


def _cells(screen) -> list[list[str]]:
    table = screen.query_one("#completions-table")
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def test_trl_wrote_the_completions_of_every_step(scored):
    assert sorted(scored.parquet) == list(range(1, STEPS + 1))
    for table in scored.parquet.values():
        assert len(table["step"]) == 8 and set(FUNCTIONS) <= set(table)


async def test_the_browser_shows_what_trl_wrote_sorted_and_searched(scored, settle):
    from rlhf_tui.tui.app import MonitorApp
    from rlhf_tui.tui.widgets.completions import CompletionsScreen

    app = MonitorApp([], stores=[scored.store], labels=["grpo"])
    async with app.run_test(size=(160, 44)) as pilot:
        await settle(pilot, app)
        await pilot.press("c")
        await pilot_wait_for(pilot, lambda: isinstance(app.screen, CompletionsScreen), message="browser open")
        screen = app.screen
        assert f"step {STEPS} (newest)" in _head(screen) and "8/8 samples" in _head(screen)
        for step in sorted(scored.parquet, reverse=True):
            await pilot.press("g", *str(step), "enter")
            assert f"step {step}" in _head(screen)
            want = _expected(scored.parquet[step])
            got = sorted(screen.shown, key=lambda r: r["index"])
            assert [r["index"] for r in got] == list(range(8)) and {r["label"] for r in got} >= {"all"}
            for g, w in zip(got, want):
                assert g["completion"] == w["completion"] and w["prompt"].endswith(g["prompt"])
                assert g["scores"] == pytest.approx(w["scores"], abs=1e-6)
                assert g["total"] == pytest.approx(sum(w["scores"].values()), abs=1e-6)
                assert g["advantage"] == pytest.approx(w["advantage"], abs=1e-3)  # GRPO's own, from the totals
            # the table draws the same numbers: # label total length_reward format_reward adv len flags text
            totals = [sum(w["scores"].values()) for w in want]
            cells = _cells(screen)
            assert [c[2] for c in cells] == [short(t) for t in sorted(totals, reverse=True)]
            for c in cells:
                w = want[int(c[0])]
                assert c[3:5] == [short(w["scores"][f]) for f in FUNCTIONS]
                assert clean(w["completion"], 200).startswith(c[8]) and len(c[8]) >= min(20, len(w["completion"]))

        await pilot.press("end")  # the newest step, sorted by format_reward
        want = _expected(scored.parquet[STEPS])
        while "sort: format_reward" not in _head(screen):
            await pilot.press("o")
        assert [r["scores"]["format_reward"] for r in screen.shown] == pytest.approx(
            sorted((w["scores"]["format_reward"] for w in want), reverse=True), abs=1e-6
        )
        assert [c[4] for c in _cells(screen)] == [short(r["scores"]["format_reward"]) for r in screen.shown]

        words = sorted({w for r in want for w in re.findall(r"[a-z]{3,}", r["completion"])})
        assert words, want
        pattern = rf"\b({re.escape(words[0])}|{re.escape(words[-1])})\b"
        await pilot.press("slash", *pattern, "enter")
        assert f"search: {pattern}" in _head(screen)
        expected = {w["index"] for w in want if re.search(pattern, w["completion"]) or re.search(pattern, w["prompt"])}
        assert expected and {int(c[0]) for c in _cells(screen)} == expected
        await pilot.press("escape")
        await pilot_wait_for(pilot, lambda: not isinstance(app.screen, CompletionsScreen), message="closed")


def test_the_report_carries_the_newest_completions_components_and_groups(scored):
    from rlhf_tui.tui.render import render_text

    report = scored.report
    newest = report["completions"][0]
    assert newest["step"] == STEPS and [c["step"] for c in report["completions"]] == [STEPS, STEPS - 1, STEPS - 2]
    by_index = {s["index"]: s for s in newest["samples"]}
    for w in _expected(scored.parquet[STEPS]):
        assert by_index[w["index"]]["completion"] == w["completion"]
        assert by_index[w["index"]]["scores"] == pytest.approx(w["scores"], abs=1e-6)
    components = report["reward_components"]
    assert set(components) == set(FUNCTIONS)
    for name in FUNCTIONS:
        assert {"mean", "std", "share", "correlation", "dead", "dominating"} <= set(components[name])
    assert report["groups"]["word"] in ("ok", "too easy", "too hard", "no signal") and report["groups"]["steps"] >= 1
    json.dumps(report)  # the JSON report's blocks are plain JSON
    assert "Reward components" in render_text(report, stamp=False)


def test_a_function_that_turns_constant_is_dead_and_solved_groups_are_too_easy(faded):
    from rlhf_tui.tui.render import render_text
    from rlhf_tui.tui.widgets.rewards import rewards_lines

    report = faded.report
    components = report["reward_components"]
    assert components["fading"]["dead"] and components["solved"]["dead"]
    assert not components["fading"]["dominating"]  # nothing else varies: no component dominates
    assert report["groups"]["word"] == "too easy" and report["groups"]["too_easy"]["recent"] == 1.0
    values = faded.run.values("groups/too_easy")
    assert values[-1] == 1.0 and (values[: FADE_AT - 1] < 1.0).all()  # before the fade, not every group
    pane = rewards_lines(report, width=100).plain
    assert re.search(r"fading .* dead", pane) and "groups too easy" in pane
    text = render_text(report, width=120, stamp=False)
    assert re.search(r"fading .* dead", text) and "Prompt groups: too easy" in text


def test_the_browser_in_tmux_shows_the_recorded_runs_completions(scored, tmp_path):
    """The real console script in a real terminal on the run's JSONL log: `c`, scrub back, search, read. (The
    screen is read every 0.2 s: a tighter loop of `tmux capture-pane` starves the app on 2 cores.)"""
    import shutil

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    from conftest import Tmux
    from test_tmux import _command

    tmux = Tmux(tmp_path)
    try:
        # the test's own import path, made absolute: the console script starts in tmp_path and must run this
        # checkout's code (a relative PYTHONPATH entry would leave it the installed copy's)
        paths = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = f"PYTHONPATH={shlex.quote(os.pathsep.join(paths))}" if paths else ""
        tmux.start(_command(tmp_path, str(scored.log), env=env))
        wait_for(lambda: "Rewards" in tmux.screen(), timeout=30, interval=0.2, message="the monitor on the log")
        tmux.keys("c")
        wait_for(lambda: f"step {STEPS} (newest)" in tmux.screen(), timeout=10, interval=0.2, message="the browser")
        assert "← Earlier  → Later  g Step  o Sort  / Search" in tmux.screen()  # its key line (tui/keys.py)
        tmux.keys("Left")
        wait_for(lambda: f"step {STEPS - 1} " in tmux.screen(), timeout=10, interval=0.2, message="scrubbed back")
        want = _expected(scored.parquet[STEPS - 1])
        firsts = [w["completion"].split("\n")[0][:30].strip() for w in want]  # as TRL wrote them
        wait_for(
            lambda: all(f in tmux.screen() for f in firsts),
            timeout=10,
            interval=0.2,
            message=f"the completions {firsts}",
        )
        words = sorted({x for r in want for x in re.findall(r"[a-z]{3,}", r["completion"])})
        pattern = f"{words[0]}|{words[-1]}"  # no backslashes: tmux send-keys takes them as key names
        tmux.keys("/")  # then wait for the input, as a person would: keys sent in one burst race its focus
        wait_for(lambda: "regular expression" in tmux.screen(), timeout=10, interval=0.2, message="the search input")
        tmux.keys(pattern, "Enter")
        wait_for(lambda: f"search: {pattern}" in tmux.screen(), timeout=10, interval=0.2, message="searched")
        n = sum(1 for w in want if re.search(pattern, w["completion"]) or re.search(pattern, w["prompt"]))
        wait_for(lambda: f"{n}/8 samples" in tmux.screen(), timeout=10, interval=0.2, message=f"{n} matches")
        matching = [f for f, w in zip(firsts, want) if re.search(pattern, w["completion"])]
        assert all(f in tmux.screen() for f in matching)
        tmux.keys("Escape")  # the browser, then the app
        wait_for(lambda: "Anomalies" in tmux.screen(), timeout=10, interval=0.2, message="the main screen")
        tmux.keys("q")
        wait_for(lambda: not tmux.alive(), timeout=10, interval=0.2, message="the app to exit on q")
    finally:
        tmux.close()
