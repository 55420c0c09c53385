"""Actions on alarms, in training: `RLHFMonitorCallback(on_alarm={"critical": "stop", "high": "save"})`.

The training-side engine's episodes (judged on the publisher thread) may ask for an action; the callback takes
it at the next step boundary on the training thread, through the public `TrainerControl`:
- "save": `control.should_save` — a rescue checkpoint, training goes on;
- "stop": `control.should_save` and `control.should_training_stop` — a checkpoint, then a clean stop.
Each episode acts at most once per action; nothing acts on a detector still in its warm-up (the run's grace
period), except non-finite values, which have none. Off unless asked for.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

ACTIONS = ("save", "stop")  # weakest first
LEVELS = ("low", "medium", "high", "critical")


def parse_policy(on_alarm: Mapping[str, str] | None) -> dict[str, str]:
    """{severity: action}; a bad key or action raises ValueError at construction (a configuration error, not
    something found mid-run)."""
    if not on_alarm:
        return {}
    if not isinstance(on_alarm, Mapping):
        raise ValueError("on_alarm: a mapping such as {'critical': 'stop', 'high': 'save'}")
    policy = {}
    for level, action in on_alarm.items():
        if level not in LEVELS:
            raise ValueError(f"on_alarm: unknown severity {level!r} (one of {', '.join(LEVELS)})")
        if action not in ACTIONS:
            raise ValueError(f"on_alarm: unknown action {action!r} for {level!r} (one of {', '.join(ACTIONS)})")
        policy[level] = action
    return policy


@dataclass(frozen=True)
class Decision:
    """An action the training thread should take, and the episode that asked for it."""

    action: str
    episode: dict


class AlarmActions:
    """Between the publisher thread (`consider`) and the training thread (`take`)."""

    def __init__(self, policy: Mapping[str, str], grace_steps: int = 10):
        self.policy = dict(policy)
        self.grace_steps = int(grace_steps)
        self._lock = threading.Lock()
        self._pending: Decision | None = None
        self._done: set[tuple] = set()  # (detector, metric, first step, action) acted on
        self.taken: list[dict] = []  # what was done (bounded by the episodes of one run)

    def action_for(self, severity: str) -> str | None:
        """The strongest action configured at or below `severity`."""
        if severity not in LEVELS:
            return None
        asked = [self.policy[lv] for lv in LEVELS[: LEVELS.index(severity) + 1] if lv in self.policy]
        return max(asked, key=ACTIONS.index) if asked else None

    def consider(self, episodes: list[dict], first_step: int | None) -> None:
        """New or changed episodes of a training-side pass (publisher thread)."""
        if not self.policy:
            return
        for ep in episodes:
            action = self.action_for(str(ep.get("severity")))
            if action is None:
                continue
            start = ep.get("first_step", ep.get("step"))
            if ep.get("detector") != "nonfinite" and first_step is not None:
                if not isinstance(start, int) or start < first_step + self.grace_steps:
                    continue  # still in the warm-up
            key = (ep.get("detector"), ep.get("metric"), start, action)
            with self._lock:
                if key in self._done:
                    continue
                self._done.add(key)
                if self._pending is None or ACTIONS.index(action) > ACTIONS.index(self._pending.action):
                    self._pending = Decision(action, dict(ep))

    def take(self) -> Decision | None:
        """The action to take at this step boundary, if any (training thread; never blocks for long)."""
        if self._pending is None:
            return None
        with self._lock:
            decision, self._pending = self._pending, None
        return decision

    def reset(self) -> None:
        """A new run: nothing pending, nothing done."""
        with self._lock:
            self._pending, self._done = None, set()
            self.taken = []


def record(decision: Decision, step: int) -> dict:
    """What was done and why, as the JSONL event / the episode update carries it."""
    ep = decision.episode
    return {
        **ep,
        "action": decision.action,
        "action_step": int(step),
        "action_reason": f"{ep.get('severity')} {ep.get('detector')} on {ep.get('metric')}: {ep.get('message')}",
    }
