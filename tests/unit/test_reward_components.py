"""Reward components (dead, dominating) and the prompt groups' word, on made reward batches."""

import numpy as np

from rlhf_tui.analysis.reward_components import groups_section, reward_components
from rlhf_tui.analysis.store import RunHistory


def _run(batches: int, functions) -> RunHistory:
    """A GRPO run of `batches` steps of 8 completions (2 groups of 4); functions: name -> f(step, rng) -> scores."""
    run = RunHistory("r")
    run.meta["args"] = {"num_generations": 4}
    rng = np.random.default_rng(0)
    for step in range(1, batches + 1):
        run.add_step(step, {"reward": 0.0})
        for name, f in functions.items():
            run.add_reward({"reward_func": name, "step": step, "scores": [float(x) for x in f(step, rng)]})
    return run


def _components(run: RunHistory) -> dict:
    return reward_components(run.reward_streams, run.reward_streams.summary()["functions"])


def test_a_function_whose_variance_is_the_totals_dominates_and_a_constant_one_is_dead():
    run = _run(
        12,
        {
            "big": lambda s, rng: 10 * rng.standard_normal(8),
            "small": lambda s, rng: 0.1 * rng.standard_normal(8),
            "flat": lambda s, rng: np.full(8, 0.5),
        },
    )
    c = _components(run)
    assert c["big"]["share"] > 0.99 and c["big"]["dominating"]
    assert not c["small"]["dominating"] and not c["small"]["dead"]
    assert c["flat"]["dead"] and not c["flat"]["dominating"] and c["flat"]["std"] == 0.0


def test_nothing_dominates_when_the_shares_are_even_or_the_others_are_dead():
    even = _components(_run(12, {"a": lambda s, r: r.standard_normal(8), "b": lambda s, r: r.standard_normal(8)}))
    assert not any(c["dominating"] for c in even.values()) and not any(c["dead"] for c in even.values())
    alone = _components(_run(12, {"a": lambda s, r: r.standard_normal(8), "b": lambda s, r: np.ones(8)}))
    assert alone["b"]["dead"] and not alone["a"]["dominating"]  # the only one that varies: nothing to dominate


def test_a_function_is_dead_only_once_its_newest_batches_are_all_flat():
    fading = {"f": lambda s, r: r.standard_normal(8) if s < 9 else np.full(8, 2.0), "g": lambda s, r: r.random(8)}
    assert _components(_run(11, fading))["f"]["dead"] is False  # 3 flat batches: not yet
    assert _components(_run(12, fading))["f"]["dead"] is True


def test_groups_all_at_the_runs_best_are_too_easy_and_all_at_its_worst_too_hard():
    def solved_from(step_at):
        return lambda s, r: np.ones(8) if s >= step_at else r.random(8) * 0.9

    easy = groups_section(_run(12, {"acc": solved_from(6)}))
    assert easy["word"] == "too easy" and easy["too_easy"] == {"last": 1.0, "recent": 1.0} and easy["steps"] == 12
    hard = groups_section(_run(12, {"acc": lambda s, r: np.zeros(8) if s >= 6 else r.random(8) + 0.1}))
    assert hard["word"] == "too hard" and hard["too_hard"]["recent"] == 1.0
    mixed = groups_section(_run(12, {"acc": lambda s, r: r.random(8)}))
    assert mixed["word"] == "ok" and mixed["too_easy"]["recent"] == 0.0
    assert groups_section(RunHistory("none")) == {"word": None, "steps": 0}
