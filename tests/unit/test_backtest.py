"""analysis/backtest.py on synthetic runs: per detector the runs it alarms on, the first step at the level asked
for, its severity there and the worst, the level and muted detectors honoured, every registry detector listed."""

import math

import numpy as np
import pytest

from rlhf_tui.analysis.backtest import alarm_start, backtest
from rlhf_tui.analysis.detectors import REGISTRY
from rlhf_tui.analysis.severity import Severity
from rlhf_tui.analysis.store import steps_from_records
from rlhf_tui.analysis.thresholds import Thresholds


def _run(run_id: str, nan_at: int | None = None, steps: int = 120):
    """Stationary noise around fixed levels (a calm run), the loss NaN at `nan_at`."""
    rng = np.random.default_rng(sum(map(ord, run_id)))

    def metrics(s: int) -> dict:
        noise = rng.normal(0.0, 0.01, 3).tolist()
        return {
            "reward": 0.5 + noise[0],
            "kl": 0.02 + noise[1] / 10,
            "loss": math.nan if s == nan_at else 0.3 + noise[2],
        }

    return steps_from_records(((s, metrics(s)) for s in range(1, steps + 1)), run_id=run_id)


def test_alarm_start_is_the_first_step_at_the_level_and_its_severity_there():
    episode = {
        "severity": "high",
        "first_step": 10,
        "severity_steps": {"low": 10, "medium": 14, "high": 20},
    }
    assert alarm_start(episode, Severity.LOW) == (10, "low")
    assert alarm_start(episode, Severity.MEDIUM) == (14, "medium")
    assert alarm_start(episode, Severity.HIGH) == (20, "high")
    assert alarm_start(episode, Severity.CRITICAL) is None
    jumped = {"severity": "high", "first_step": 7, "severity_steps": {"low": 7, "medium": 7, "high": 7}}
    assert alarm_start(jumped, Severity.MEDIUM) == (7, "high")  # straight to high
    folded = {"severity": "medium", "step": 30}  # no per-level steps (an episode from the wire)
    assert alarm_start(folded, Severity.MEDIUM) == (30, "medium")


def test_backtest_counts_runs_per_detector_and_where_each_first_alarmed():
    runs = [("calm-a", _run("a")), ("nan-b", _run("b", nan_at=80)), ("calm-c", _run("c"))]
    result = backtest(runs)
    assert result["level"] == "medium" and result["total_runs"] == 3
    assert result["runs_alarmed"] == 1 and result["rate"] == pytest.approx(1 / 3)
    by_name = {d["detector"]: d for d in result["detectors"]}
    assert set(by_name) == set(REGISTRY)  # every detector listed, the quiet ones too
    nonfinite = by_name["nonfinite"]
    assert result["detectors"][0] is nonfinite  # most runs alarmed first
    assert nonfinite["runs_alarmed"] == 1 and nonfinite["rate"] == pytest.approx(1 / 3)
    assert nonfinite["alarms"] == [
        {"run": "nan-b", "first_step": 80, "metric": "loss", "severity": "critical", "worst": "critical", "episodes": 1}
    ]
    per_run = {r["run"]: r for r in result["runs"]}
    assert not per_run["calm-a"]["alarmed"] and per_run["calm-a"]["first_alarm"] is None
    assert per_run["nan-b"]["first_alarm"]["detector"] == "nonfinite"
    assert per_run["nan-b"]["first_alarm"]["first_step"] == 80 and per_run["nan-b"]["steps"] == 120


def test_level_and_muted_detectors_are_honoured():
    runs = [("nan", _run("n", nan_at=60))]
    assert backtest(runs, level="critical")["runs_alarmed"] == 1
    muted = backtest(runs, Thresholds(muted=["nonfinite"]))
    row = next(d for d in muted["detectors"] if d["detector"] == "nonfinite")
    assert row["muted"] and row["runs_alarmed"] == 0 and muted["runs_alarmed"] == 0
    assert muted["thresholds"] == {"muted": ["nonfinite"]}  # only what differs from the defaults
    with pytest.raises(ValueError, match="unknown level"):
        backtest(runs, level="severe")


def test_no_runs_is_an_empty_result_not_an_error():
    result = backtest([])
    assert result["total_runs"] == 0 and result["rate"] == 0.0 and all(d["rate"] == 0.0 for d in result["detectors"])
