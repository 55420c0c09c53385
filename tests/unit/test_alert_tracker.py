"""Alerts out, the pure parts (tui/alerts.py): what is a new episode, the rate limit, the line, the JSON payload
and the environment a command gets; untrusted text stays one safe line."""

import json

import pytest

from rlhf_tui.tui.alerts import (
    Alert,
    AlertDispatcher,
    AlertOptions,
    AlertTracker,
    check_webhook,
    parse_command,
    redact,
)


def _ep(severity="critical", detector="nonfinite", metric="reward", step=40, **extra):
    return {
        "detector": detector,
        "metric": metric,
        "severity": severity,
        "step": step,
        "first_step": step,
        "message": f"{metric} is NaN",
        "value": float("nan"),
        **extra,
    }


def test_new_episodes_at_or_above_the_level_alert_once():
    tracker = AlertTracker("medium")
    episodes = [_ep(), _ep("low", "zscore", "kl", 12), _ep("medium", "reward_shift", "reward", 30)]
    first = tracker.new_alerts("r1", episodes)
    assert [(a.detector, a.metric, a.step, a.severity) for a in first] == [
        ("nonfinite", "reward", 40, "critical"),
        ("reward_shift", "reward", 30, "medium"),
    ]
    assert tracker.new_alerts("r1", episodes) == []  # the next pass: nothing new
    # The same episode in another run is another episode; a new first step is a new episode.
    assert len(tracker.new_alerts("r2", [_ep()])) == 1
    assert [a.step for a in tracker.new_alerts("r1", [_ep(step=41), _ep()])] == [41]


def test_an_escalated_episode_alerts_again_once():
    tracker = AlertTracker("medium")
    assert tracker.new_alerts("r", [_ep("low", "kl_runaway", "kl", 50)]) == []  # below the level
    (first,) = tracker.new_alerts("r", [_ep("medium", "kl_runaway", "kl", 50)])
    assert first.escalated_from is None
    (again,) = tracker.new_alerts("r", [_ep("high", "kl_runaway", "kl", 50, last_step=58)])
    assert again.escalated_from == "medium" and again.severity == "high"
    assert "(was medium)" in again.line()
    assert tracker.new_alerts("r", [_ep("high", "kl_runaway", "kl", 50)]) == []
    assert tracker.new_alerts("r", [_ep("medium", "kl_runaway", "kl", 50)]) == []  # a drop is no news


def test_the_tracker_is_bounded():
    tracker = AlertTracker("low", limit=100)
    for i in range(1000):
        tracker.new_alerts("r", [_ep(step=i)])
    assert len(tracker._seen) == 100
    with pytest.raises(ValueError, match="unknown alert level"):
        AlertTracker("severe")


def test_line_payload_and_environment_are_safe():
    hostile = "re\x1b[31mward\x1b]0;pwned\x07\nnext"
    alert = Alert("run\x00-1", _ep(metric=hostile, severity_steps={"critical": 40}), source="log.jsonl", at=0.0)
    line = alert.line()
    assert "\x1b" not in line and "\n" not in line and "\x07" not in line and "\x00" not in line
    assert "run-1  step 40  CRITICAL  nonfinite  reward next: reward next is NaN" in line
    data = json.loads(alert.payload())  # strict JSON: the NaN value is null
    assert data["value"] is None and data["detector"] == "nonfinite" and data["run_id"] == "run-1"
    assert data["first_step"] == 40 and data["source"] == "log.jsonl" and data["escalated_from"] is None
    env = alert.env()
    assert env == {
        "RLHF_TUI_RUN_ID": "run-1",
        "RLHF_TUI_SEVERITY": "critical",
        "RLHF_TUI_DETECTOR": "nonfinite",
        "RLHF_TUI_METRIC": "reward next",
        "RLHF_TUI_STEP": "40",
        "RLHF_TUI_MESSAGE": "reward next is NaN",
    }
    huge = Alert("r", _ep(recommendation="x" * 100_000, extra=["y" * 2000] * 200))
    assert len(huge.payload()) <= 32 << 10 and json.loads(huge.payload())["detector"] == "nonfinite"


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_rate_limit_counts_the_rest_and_summarises_them():
    clock, notes, bells = _Clock(), [], []
    dispatcher = AlertDispatcher(
        AlertOptions(rate=3, bell=True), note=notes.append, bell=lambda: bells.append(1), clock=clock
    )
    sent = [dispatcher.submit(Alert("r", _ep(step=i))) for i in range(10)]
    assert sent == [True] * 3 + [False] * 7 and len(bells) == 3
    assert dispatcher.suppressed == 7 and len(notes) == 1 and "more than 3 a minute" in notes[0]
    assert dispatcher.status() == "alerts: 7 over rate"
    clock.t += 61  # the window moved on: the next goes out, and the held ones are summarised once
    assert dispatcher.submit(Alert("r", _ep(step=99)))
    assert notes[-1] == "alerts: 7 over the rate limit were not sent" and len(notes) == 2
    assert dispatcher.summary() == "alerts: 4 sent; 7 over the rate limit not sent"


def test_options_are_checked_in_one_line():
    assert parse_command("python -c 'print(1)' a\\ b")[1:] == ["-c", "print(1)", "a b"]
    for bad, why in (("", "empty"), ("'open", "cannot parse"), ("no-such-binary-xyz", "not found")):
        with pytest.raises(ValueError, match=why):
            parse_command(bad)
    assert check_webhook("https://hooks.slack.com/services/T/B/secret")
    with pytest.raises(ValueError, match="http:// or https://"):
        check_webhook("file:///etc/passwd")
    assert redact("https://user:pw@hooks.slack.com/services/T/B/secret") == "https://hooks.slack.com/…"
    assert "secret" not in redact("http://127.0.0.1:9/x/secret")
