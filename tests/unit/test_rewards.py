"""RewardModelIntegrator: reliability metrics, anomalies and robustness to bad scores."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest

from rlhf_tui.analysis.rewards import RewardModelIntegrator


def feed(integrator, batches, start=0, context=None):
    return [integrator.monitor_reward_model(b, start + i, context) for i, b in enumerate(batches)]


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)


def test_seed_example_shape():
    result = RewardModelIntegrator().monitor_reward_model(
        [2.1, 2.3, 1.9, 2.0, 2.2], step=100, context={"batch_id": "batch_001"}
    )
    rel = result["reliability_metrics"]
    assert set(rel) == {"stability", "consistency", "variance", "mean_reward"}
    assert rel["mean_reward"] == pytest.approx(2.1)
    assert rel["variance"] == pytest.approx(np.var([2.1, 2.3, 1.9, 2.0, 2.2]))
    assert 0.0 <= rel["stability"] <= 1.0
    assert result["step"] == 100 and result["num_scores"] == 5 and result["num_invalid"] == 0
    assert result["anomalies"] == [] and result["recommendations"] == []
    assert result["context"] == {"batch_id": "batch_001"}
    hist = result["histogram"]
    assert sum(hist["counts"]) == 5 and len(hist["edges"]) == len(hist["counts"]) + 1 == 17


def test_steady_rewards_are_stable(rng):
    integrator = RewardModelIntegrator()
    results = feed(integrator, [rng.normal(2.0, 0.3, 16) for _ in range(40)])
    rel = results[-1]["reliability_metrics"]
    assert rel["stability"] > 0.8
    assert rel["consistency"] > 0.95
    assert rel["mean_reward"] == pytest.approx(2.0, abs=0.05)
    assert not [a for r in results for a in r["anomalies"] if a["detector"] == "reward_zscore"]


def test_zero_centred_rewards_do_not_collapse_stability(rng):
    integrator = RewardModelIntegrator()
    results = feed(integrator, [rng.normal(0.0, 1.0, 16) for _ in range(40)])
    assert abs(results[-1]["reliability_metrics"]["mean_reward"]) < 0.2
    assert results[-1]["reliability_metrics"]["stability"] > 0.5


def test_swinging_batch_means_are_unstable(rng):
    integrator = RewardModelIntegrator()
    batches = [rng.normal(5.0 if i % 2 else -5.0, 1.0, 16) for i in range(30)]
    result = feed(integrator, batches)[-1]
    assert result["reliability_metrics"]["stability"] < 0.3
    assert any("calibration" in r for r in result["recommendations"])


def test_slow_improvement_is_not_instability(rng):
    # A reward that climbs steadily (training works) must not read as unstable.
    integrator = RewardModelIntegrator()
    result = feed(integrator, [rng.normal(0.02 * i, 1.0, 32) for i in range(60)])[-1]
    assert result["reliability_metrics"]["stability"] > 0.8


def test_sudden_mean_jump_flags_that_step_only(rng):
    integrator = RewardModelIntegrator()
    batches = [rng.normal(1.0, 0.1, 32) for _ in range(20)] + [rng.normal(5.0, 0.1, 32) for _ in range(5)]
    results = feed(integrator, batches)
    z_steps = [a["step"] for r in results for a in r["anomalies"] if a["detector"] == "reward_zscore"]
    assert z_steps == [20]
    jump = next(a for a in results[20]["anomalies"] if a["detector"] == "reward_zscore")
    assert jump["severity"] in ("high", "critical") and jump["metric"] == "reward_mean"
    assert jump["value"] == pytest.approx(batches[20].mean())
    assert jump["recommendation"] and "jumped" in jump["message"]
    # The next batch at the same level is reported once as a level shift, then becomes the new baseline.
    assert [a["detector"] for a in results[21]["anomalies"] if a["metric"] == "reward_mean"] == ["reward_level_shift"]
    assert all(a["metric"] != "reward_mean" for r in results[22:] for a in r["anomalies"])


def test_no_anomaly_during_warmup():
    integrator = RewardModelIntegrator(warmup_batches=5)
    results = feed(integrator, [[1.0, 1.1, 0.9], [1.0, 1.05, 0.95], [50.0, 51.0, 49.0]])
    assert all(a["detector"] != "reward_zscore" for r in results for a in r["anomalies"])


def test_nan_and_none_are_counted_not_raised():
    integrator = RewardModelIntegrator()
    result = integrator.monitor_reward_model([1.0, None, float("nan"), 2.0, float("inf"), "x"], step=3)
    assert result["num_scores"] == 6 and result["num_invalid"] == 4 and result["num_valid"] == 2
    assert result["batch_mean"] == pytest.approx(1.5)
    invalid = [a for a in result["anomalies"] if a["detector"] == "reward_invalid"]
    assert invalid and invalid[0]["severity"] == "critical" and invalid[0]["value"] == pytest.approx(4 / 6)
    assert any("finite float" in r for r in result["recommendations"])
    small = integrator.monitor_reward_model([1.0] * 19 + [None], step=4)
    assert [a["severity"] for a in small["anomalies"] if a["detector"] == "reward_invalid"] == ["medium"]
    all_bad = integrator.monitor_reward_model([None, None], step=5)
    assert all_bad["num_invalid"] == 2 and all_bad["batch_mean"] is None
    json.dumps(all_bad, allow_nan=False)


def test_empty_batch():
    integrator = RewardModelIntegrator()
    result = integrator.monitor_reward_model([], step=0)
    assert result["num_scores"] == 0
    assert result["issues"] and result["recommendations"]
    assert result["reliability_metrics"]["mean_reward"] is None
    json.dumps(result, allow_nan=False)
    assert integrator.monitor_reward_model(None, step=1)["num_scores"] == 0


def test_zero_spread_group_share():
    # 4 groups of 4 completions (GRPO num_generations=4): groups 0 and 2 have one reward for everything.
    scores = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.3, 0.2, 0.2]
    integrator = RewardModelIntegrator()
    result = integrator.monitor_reward_model(scores, step=1, context={"num_generations": 4})
    assert result["zero_spread_group_share"] == pytest.approx(0.5)
    assert any(a["detector"] == "reward_zero_spread" for a in result["anomalies"])
    assert integrator.monitor_reward_model(scores, step=2)["zero_spread_group_share"] is None
    # A NaN inside a group is ignored within that group.
    with_nan = [1.0, None, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert integrator.monitor_reward_model(with_nan, 3, {"num_generations": 4})["zero_spread_group_share"] == 0.5


def test_saturation_at_expected_bound(rng):
    integrator = RewardModelIntegrator(expected_range=(0.0, 1.0))
    feed(integrator, [rng.uniform(0.0, 1.0, 32) for _ in range(6)])
    piled = np.where(rng.random(32) < 0.95, 1.0, rng.uniform(0, 1, 32))
    result = integrator.monitor_reward_model(piled, step=6)
    sat = result["saturation"]
    assert sat["bounds"] == "expected_range" and sat["at_max"] > sat["at_min"]
    alarms = [a for a in result["anomalies"] if a["detector"] == "reward_saturation"]
    assert alarms and "maximum" in alarms[0]["message"]
    assert any("reward hacking" in r for r in result["recommendations"])


def test_saturation_at_seen_bound(rng):
    integrator = RewardModelIntegrator()
    feed(integrator, [np.clip(rng.normal(0.5, 0.3, 32), 0.0, 1.0) for _ in range(5)])
    result = integrator.monitor_reward_model(np.ones(32), step=5)
    assert any(a["detector"] == "reward_saturation" for a in result["anomalies"])
    assert result["saturation"]["upper"] == 1.0 and result["saturation"]["batch_share"] == 1.0


def test_scale_jump(rng):
    integrator = RewardModelIntegrator()
    feed(integrator, [rng.normal(0.0, 1.0, 32) for _ in range(10)])
    result = integrator.monitor_reward_model(rng.normal(0.0, 50.0, 32), step=10)
    assert any(a["detector"] == "reward_scale_jump" and a["metric"] == "reward_std" for a in result["anomalies"])


def test_drift_from_early_run(rng):
    integrator = RewardModelIntegrator()
    early = feed(integrator, [rng.normal(0.0, 1.0, 32) for _ in range(20)])
    assert early[-1]["drift"]["level"] in ("none", "warming_up")
    assert not [a for r in early for a in r["anomalies"] if a["detector"] == "reward_drift"]
    late = feed(integrator, [rng.normal(2.0, 1.0, 32) for _ in range(10)], start=20)
    drift = late[-1]["drift"]
    assert drift["level"] == "significant" and drift["psi"] > 0.25 and drift["ks"] > drift["ks_critical"]
    assert drift["mean_shift"] > 1.0
    assert len([a for r in late for a in r["anomalies"] if a["detector"] == "reward_drift"]) <= 2


def test_consistency_uses_expected_range(rng):
    integrator = RewardModelIntegrator(expected_range=(-1.0, 1.0))
    result = integrator.monitor_reward_model([-0.5, 0.0, 0.5, 3.0], step=0)
    assert result["reliability_metrics"]["consistency"] == pytest.approx(0.75)
    assert any("training data" in r for r in result["recommendations"])


def test_jsonl_log_and_thread_safety(rng, tmp_path):
    integrator = RewardModelIntegrator(log_dir=str(tmp_path))
    batches = [rng.normal(0.0, 1.0, 8).tolist() + [None] for _ in range(40)]

    def worker(offset):
        for i in range(offset, 40, 4):
            integrator.monitor_reward_model(batches[i], step=i)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (tmp_path / "reward_monitoring.jsonl").read_text().splitlines()
    assert len(lines) == 40
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(c)) for line in lines]
    assert sorted(r["step"] for r in records) == list(range(40))
    assert all(r["num_invalid"] == 1 for r in records)


def test_bounded_memory():
    integrator = RewardModelIntegrator(window=8, window_scores=100)
    for step in range(200):
        integrator.monitor_reward_model(np.full(50, math.sin(step)), step)
    assert len(integrator._recent) == 100 and len(integrator._means) == 8
