"""on_alarm: which action an episode asks for, when it may not, and that each episode acts once."""

from __future__ import annotations

import pytest

from rlhf_tui.bridge.training.actions import AlarmActions, parse_policy, record


def ep(severity: str, step: int = 50, detector: str = "lr_jump", metric: str = "learning_rate") -> dict:
    return {"severity": severity, "detector": detector, "metric": metric, "step": step, "first_step": step}


def test_the_policy_is_checked_at_once_and_the_strongest_action_at_or_below_the_severity_wins():
    with pytest.raises(ValueError, match="unknown severity"):
        parse_policy({"severe": "stop"})
    with pytest.raises(ValueError, match="unknown action"):
        parse_policy({"high": "reboot"})
    actions = AlarmActions(parse_policy({"critical": "stop", "high": "save"}))
    assert [actions.action_for(s) for s in ("low", "medium", "high", "critical")] == [None, None, "save", "stop"]
    assert AlarmActions(parse_policy({"medium": "stop", "high": "save"})).action_for("critical") == "stop"
    assert AlarmActions({}).action_for("critical") is None


def test_an_episode_acts_once_stop_outranks_save_and_nothing_acts_in_the_warm_up():
    actions = AlarmActions(parse_policy({"high": "save", "critical": "stop"}), grace_steps=10)
    actions.consider([ep("critical", step=5)], first_step=1)  # in the grace period: no action
    assert actions.take() is None
    actions.consider([ep("critical", step=5, detector="nonfinite", metric="loss")], first_step=1)
    assert actions.take().action == "stop"  # non-finite values have no warm-up
    actions.consider([ep("high", 40, "kl_runaway", "kl"), ep("critical", 41, "reward_scale", "reward")], first_step=1)
    decision = actions.take()
    assert decision.action == "stop" and decision.episode["detector"] == "reward_scale"
    assert actions.take() is None
    actions.consider([ep("critical", 41, "reward_scale", "reward")], first_step=1)  # the same episode again
    assert actions.take() is None
    done = record(decision, 43)
    assert done["action"] == "stop" and done["action_step"] == 43 and "reward_scale on reward" in done["action_reason"]
    actions.reset()
    actions.consider([ep("critical", 41, "reward_scale", "reward")], first_step=1)  # a new run acts again
    assert actions.take().action == "stop"


def test_the_header_and_the_report_say_what_on_alarm_did():
    from rlhf_tui.tui.render import actions_text, header_text

    report = {
        "run": {"run_id": "r", "trainer": "GRPOTrainer"},
        "last_step": 23,
        "actions": [{"action": "stop", "step": 23, "severity": "medium", "detector": "lr_jump", "metric": "lr"}],
    }
    assert "STOPPED by on_alarm at step 23" in header_text(report).plain
    assert actions_text(report).plain.startswith("on_alarm: stopped the run at step 23 (medium lr_jump on lr)")
    assert actions_text({"actions": []}) is None
