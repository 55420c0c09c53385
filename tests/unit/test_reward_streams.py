"""Reward reliability per reward function: one stream per function, the combined view, and reward anomalies as
episodes in the report (issue 12, item 2). Batches go in the way the monitor gets them: coalesced `reward`
messages through `ingest.apply_message`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from rlhf_tui.analysis.report import build_report
from rlhf_tui.analysis.reward_episodes import reward_episodes
from rlhf_tui.analysis.reward_streams import CAPACITY, MAX_FUNCTIONS, FeatureTable, RewardStreams
from rlhf_tui.analysis.store import Store
from rlhf_tui.analysis.thresholds import Thresholds
from rlhf_tui.bridge.monitor import ingest
from rlhf_tui.bridge.wire import events, protocol

DATA = Path(__file__).resolve().parents[1] / "data" / "rewards" / "grpo_two_functions.jsonl"
EPISODE_KEYS = {
    "step",
    "metric",
    "detector",
    "severity",
    "value",
    "message",
    "recommendation",
    "first_step",
    "peak_step",
    "last_step",
    "count",
    "ongoing",
    "severity_steps",
}


def _store(steps: int, functions: dict, *, tick: int = 5, num_generations: int = 4) -> Store:
    """A run whose reward functions (name -> f(step) -> scores) reach the store as the recorder publishes them:
    every `tick` steps one coalesced message per function, each holding that function's batches."""
    store = Store()
    with store.lock:
        run = store.run("r1")
        ingest.apply_message(run, events.Message(protocol.RUN_START, {"args": {"num_generations": num_generations}}))
        for start in range(1, steps + 1, tick):
            block = range(start, min(start + tick, steps + 1))
            for s in block:
                run.add_step(s, {"reward": 0.0})
            for name, fn in functions.items():
                steps_, sizes, scores = [], [], []
                for s in block:
                    batch = [float(x) for x in fn(s)]
                    steps_.append(s)
                    sizes.append(len(batch))
                    scores += batch
                data = {"step": steps_[-1], "reward_func": name, "steps": steps_, "sizes": sizes, "scores": scores}
                ingest.apply_message(run, events.Message(protocol.REWARD, data))
    return store


def _normal(mean: float, std: float, seed: int, n: int = 8):
    def fn(step: int):
        return np.random.default_rng(seed * 100_003 + step).normal(mean, std, n)

    return fn


def _report(store: Store, th: Thresholds | None = None) -> dict:
    with store.lock:
        return build_report(store, th or Thresholds(), anomalies=[])


def _reward_alarms(report: dict, minimum: int = 2) -> list[dict]:
    order = ("low", "medium", "high", "critical")
    return [
        a
        for a in report["anomalies"]
        if a["detector"].startswith("reward_") and order.index(a["severity"]) + 1 >= minimum
    ]


def test_two_healthy_functions_at_different_levels_are_each_stable_and_raise_no_alarm():
    # The run: great_reward near -0.13 and length_reward near -0.97. One shared stream saw its mean
    # jump between -0.13 and -0.97 every batch: stability 0.007 and a critical "mean reward dropped".
    store = _store(200, {"great_reward": _normal(-0.13, 0.05, 1), "length_reward": _normal(-0.97, 0.02, 2)})
    report = _report(store)
    rewards = report["rewards"]
    assert set(rewards["functions"]) == {"great_reward", "length_reward"}
    for name, mean in (("great_reward", -0.13), ("length_reward", -0.97)):
        f = rewards["functions"][name]
        assert f["reliability_metrics"]["stability"] > 0.9, name
        assert f["mean"] == pytest.approx(mean, abs=0.01) and f["batches"] == 200
        assert f["metric"] == f"rewards/{name}/mean"
    assert rewards["reliability_metrics"]["stability"] > 0.9  # the combined, standardised view
    assert rewards["reliability_metrics"]["mean_reward"] == pytest.approx(-1.10, abs=0.01)  # the total
    assert rewards["batches"] == 400
    assert _reward_alarms(report) == []  # nothing medium or worse, let alone high/critical


def test_shares_of_the_total_variance_and_correlations():
    # a varies most; b follows a (same noise, smaller), c is independent and tiny.
    def a(s):
        return np.random.default_rng(s).normal(0.0, 1.0, 16)

    def b(s):
        return 0.5 * a(s) + 0.1

    def c(s):
        return np.random.default_rng(10_000 + s).normal(3.0, 0.1, 16)

    summary = _report(_store(60, {"a": a, "b": b, "c": c}))["rewards"]
    functions, combined = summary["functions"], summary["combined"]
    shares = [functions[n]["share"] for n in "abc"]
    assert sum(shares) == pytest.approx(1.0)
    assert shares[0] == pytest.approx(1 / 1.5, abs=0.02) and shares[1] == pytest.approx(0.5 / 1.5, abs=0.02)
    assert abs(shares[2]) < 0.02
    assert functions["a"]["correlation"]["b"] == pytest.approx(1.0)
    assert abs(functions["a"]["correlation"]["c"]) < 0.15
    assert combined["functions"] == ["a", "b", "c"] and combined["rows"] == 60 * 16 > 0


def test_reward_weights_from_the_run_args_weigh_the_total():
    store = _store(30, {"a": _normal(1.0, 0.1, 1), "b": _normal(2.0, 0.1, 2)})
    with store.lock:
        store.current_run.meta["args"]["reward_weights"] = [1.0, 0.5]
    rewards = _report(store)["rewards"]
    assert rewards["reliability_metrics"]["mean_reward"] == pytest.approx(2.0, abs=0.02)  # 1.0 + 0.5 * 2.0
    assert rewards["combined"]["weights"] == [1.0, 0.5]


def test_a_function_that_becomes_constant_is_flagged_under_its_own_name():
    def stuck(s):  # a format reward whose parser starts failing at step 100: every completion scores 0
        return np.zeros(8) if s >= 100 else _normal(0.5, 0.2, 3)(s)

    report = _report(_store(150, {"fmt_reward": stuck, "length_reward": _normal(-0.97, 0.02, 2)}))
    alarms = _reward_alarms(report)
    constant = [a for a in alarms if a["detector"] == "reward_constant"]
    assert len(constant) == 1 and constant[0]["metric"] == "rewards/fmt_reward/std"
    assert 100 <= constant[0]["first_step"] <= 104 and constant[0]["last_step"] == 150 and constant[0]["ongoing"]
    assert "no learning signal" in constant[0]["message"] and constant[0]["severity"] == "medium"
    assert not [a for a in alarms if "length_reward" in a["metric"]]
    assert report["rewards"]["functions"]["fmt_reward"]["anomaly_counts"]["medium"] >= 1
    assert set(constant[0]) >= EPISODE_KEYS


def test_a_function_that_shifts_is_flagged_under_its_own_name_and_the_threshold_applies():
    def shifted(s):
        return _normal(-0.13 if s < 120 else 0.6, 0.05, 1)(s)

    store = _store(160, {"great_reward": shifted, "length_reward": _normal(-0.97, 0.02, 2)})
    alarms = _reward_alarms(_report(store))
    jumps = [a for a in alarms if a["detector"] == "reward_zscore"]
    assert [(a["metric"], a["step"]) for a in jumps] == [("rewards/great_reward/mean", 120)]
    assert jumps[0]["severity"] == "critical" and "jumped" in jumps[0]["message"]
    assert not [a for a in alarms if "length_reward" in a["metric"]]
    lows = [a for a in _report(store)["anomalies"] if a["detector"] == "reward_level_shift"]
    assert [a["step"] for a in lows] == [121]  # the new level is taken as the baseline once
    # Settings act on what is shown: a z threshold above this jump, or muting the detector, hides it.
    strict = _report(store, Thresholds(reward_batch_z=500.0))["anomalies"]
    assert not [a for a in strict if a["detector"] in ("reward_zscore", "reward_level_shift")]
    muted = _report(store, Thresholds(muted=["reward_zscore"]))
    assert not [a for a in muted["anomalies"] if a["detector"] == "reward_zscore"]


def test_invalid_scores_are_episodes_from_the_first_batch():
    def broken(s):
        out = list(_normal(0.5, 0.1, 4)(s))
        return out[:4] + [math.nan] * 4 if s in (2, 3) else out

    report = _report(_store(40, {"r": broken}))
    invalid = [a for a in report["anomalies"] if a["detector"] == "reward_invalid"]
    assert len(invalid) == 1 and invalid[0]["severity"] == "critical"  # half the scores (inside grace_steps)
    assert invalid[0]["first_step"] == 2 and invalid[0]["last_step"] == 3 and invalid[0]["count"] == 2
    assert report["rewards"]["num_invalid"] == 8 and report["rewards"]["anomalies"] == invalid


def test_the_real_two_function_grpo_log(tmp_path):
    """A real tiny GRPO run with two reward functions (tests/data/rewards): the training side's analysis in
    the log mixed them (stability 0.41); judged per function each is steady and nothing is high or critical."""
    from rlhf_tui.tui.cli import main

    out = tmp_path / "report.json"
    assert main(["report", str(DATA), "--format", "json", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    functions = report["rewards"]["functions"]
    assert set(functions) == {"great_reward", "length_reward"}
    assert all(f["batches"] == 60 and f["reliability_metrics"]["stability"] > 0.85 for f in functions.values())
    assert sum(f["share"] for f in functions.values()) == pytest.approx(1.0)
    assert _reward_alarms(report, minimum=3) == []
    assert main(["report", str(DATA), "--fail-on", "high", "-o", str(out)]) == 0


def test_a_reward_episode_is_in_the_text_report_and_sets_the_fail_on_exit_code(tmp_path):
    from rlhf_tui.tui.cli import main

    path = tmp_path / "run.jsonl"
    lines = [{"event": "run_start", "run_id": "r", "trainer": "GRPOTrainer", "args": {"num_generations": 4}}]
    for s in range(1, 41):
        lines.append({"event": "step_end", "step": s, "ppo_metrics": {"reward": 0.5}, "anomalies": []})
        scores = [0.5, 0.4, 0.6, 0.5] if s != 30 else [0.5, None, None, None]
        lines.append({"event": "reward_batch", "step": s, "reward_func": "format_reward", "scores": scores})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    text = tmp_path / "report.txt"
    assert main(["report", str(path), "--fail-on", "critical", "-o", str(text)]) == 1
    assert "reward_invalid" in text.read_text() and "rewards/format_reward/mean" in text.read_text()
    muted = tmp_path / "muted.toml"
    muted.write_text('muted = ["reward_invalid"]\n')
    assert main(["report", str(path), "--fail-on", "critical", "--thresholds", str(muted), "-o", str(text)]) == 0


def test_bounded_streams_and_tables():
    streams = RewardStreams()
    for i in range(MAX_FUNCTIONS + 5):
        streams.add({"step": 1, "reward_func": f"f{i}", "scores": [1.0, 2.0]})
    assert len(streams.streams) == MAX_FUNCTIONS and streams.ignored == 5
    streams.add({"step": "x", "reward_func": "f0", "scores": [1.0]})  # malformed: skipped, never raises
    streams.add({"step": 2, "reward_func": None, "scores": "nope"})
    table = FeatureTable(("step",), capacity=64)
    for s in range(1000):
        table.append({"step": float(s)})
    assert table.rows <= 64 and table.column("step")[-1] == 999 and table.dropped == 1000 - table.rows
    assert CAPACITY >= 4096


def test_episodes_need_no_store():
    streams = RewardStreams()
    for s in range(1, 60):
        streams.add({"step": s, "reward_func": "r", "scores": [0.5] * 8 if s > 30 else list(np.linspace(0, 1, 8))})
    found = reward_episodes(streams, Thresholds(), latest=80)
    constant = [e for e in found if e["detector"] == "reward_constant"]
    assert [(e["first_step"], e["last_step"], e["ongoing"]) for e in constant] == [(34, 59, False)]
    assert not [e for e in found if e["detector"] == "reward_zscore"]  # the mean did not move
