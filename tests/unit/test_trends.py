"""Unit-free trends, summaries, epoch statistics, derived ratios and the seed's baseline rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from seed_baseline import seed_detect, seed_zscores

from rlhf_tui.analysis.trends import derived_ratios, epoch_statistics, summarise, trend


def test_trend_directions_and_noise():
    rng = np.random.default_rng(0)
    t = np.arange(200)
    assert trend(t * 0.01 + 0.1 * rng.standard_normal(200)) == "increasing"
    assert trend(-t * 0.01 + 0.1 * rng.standard_normal(200)) == "decreasing"
    assert trend(rng.standard_normal(200)) == "stable"
    assert trend([1.0, 1.0, 1.0, 1.0]) == "stable"
    assert trend([]) == "stable" and trend([1.0, 2.0]) == "stable" and trend(None) == "stable"


def test_trend_is_unit_free_and_ignores_missing_values():
    rng = np.random.default_rng(1)
    x = np.linspace(0, 1, 100) + 0.2 * rng.standard_normal(100)
    verdict = trend(x)
    for scale in (30.0, 1e-6, 1e6):
        assert trend(x * scale) == verdict
    with_gaps = list(x) + [None, float("nan"), float("inf")]
    assert trend(with_gaps) == verdict


def test_summarise():
    s = summarise([1.0, None, 3.0, float("nan"), 2.0])
    assert s == {
        "last": 2.0,
        "mean": 2.0,
        "std": pytest.approx(math.sqrt(2 / 3)),
        "min": 1.0,
        "max": 3.0,
        "trend": "stable",
    }
    assert summarise([]) == {"last": None, "mean": None, "std": None, "min": None, "max": None, "trend": "stable"}
    assert summarise(np.arange(50.0))["trend"] == "increasing"


def test_epoch_statistics():
    steps = np.arange(1, 11)
    epoch = np.array([0.2, 0.4, 0.6, 0.8, 1.0, 1.2, np.nan, 1.6, 1.8, 2.0])
    metrics = {"reward": np.arange(10.0), "epoch": epoch}
    stats = epoch_statistics(steps, metrics)
    assert [(e["epoch"], e["first_step"], e["last_step"], e["steps"]) for e in stats] == [(0, 1, 5, 5), (1, 6, 10, 5)]
    assert stats[0]["metrics"]["reward"]["mean"] == 2.0 and "epoch" not in stats[0]["metrics"]
    single = epoch_statistics(steps, {"reward": np.arange(10.0)})
    assert len(single) == 1 and single[0]["metrics"]["reward"]["trend"] == "increasing"
    assert epoch_statistics([], {}) == []
    explicit = epoch_statistics(steps, {"reward": np.arange(10.0)}, epoch_values=np.repeat([0.5, 1.5], 5))
    assert [e["epoch"] for e in explicit] == [0, 1]


def test_derived_ratios_guarded():
    assert derived_ratios({"kl": 0.2, "policy_loss": -0.1, "value_loss": 0.5}) == {
        "kl_policy_ratio": pytest.approx(2.0),
        "value_policy_ratio": pytest.approx(5.0),
    }
    assert derived_ratios({"kl": 0.2, "policy_loss": 0.0}) == {"kl_policy_ratio": None}
    assert derived_ratios({"kl": None, "policy_loss": 0.1, "value_loss": float("nan")}) == {"value_policy_ratio": None}
    assert derived_ratios({"kl": 0.2}) == {}
    arr = derived_ratios({"kl": np.array([1.0, 1.0, np.nan]), "policy_loss": np.array([0.5, 0.0, 1.0])})
    assert arr["kl_policy_ratio"][0] == 2.0 and np.isnan(arr["kl_policy_ratio"][1:]).all()


def test_seed_rule_includes_the_point_and_needs_ten_values():
    x = np.r_[np.arange(9) * 1e-3, 100.0]
    z = seed_zscores(x)
    assert np.isnan(z[:9]).all()  # fewer than 10 values
    assert z[9] <= 3.0 + 1e-9  # the 10th: in its own window, |z| <= sqrt(n - 1)
    assert seed_detect(np.arange(1, 11), {"reward": x}) == []
    n = 30
    y = np.r_[np.random.default_rng(2).standard_normal(n), 1e6]
    z = seed_zscores(y)
    assert z[-1] <= math.sqrt(n) + 1e-9
    alarms = seed_detect(np.arange(1, n + 2), {"reward": y, "loss": y, "clip_ratio": np.zeros(n + 1)})
    assert [a["metric"] for a in alarms] == ["reward"] and alarms[0]["step"] == n + 1
