"""Typed events: what the callback queues for the publisher thread, and what that thread publishes.

Frozen, slotted records replace positional tuples dispatched by strings. A `Message` is what goes on the wire
(and, shaped the same, in the JSONL log): a kind from `protocol`, its JSON-safe data and the rank it is from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from rlhf_tui.bridge.wire import protocol


# -- what the training thread queues (the callback's hooks) -------------------------------------------------
@dataclass(frozen=True, slots=True)
class RunStarted:
    meta: dict


@dataclass(frozen=True, slots=True)
class LoggedStep:
    """One `on_log` (or `log_step`): the trainer's raw logs at `step`, `wall` seconds since the epoch."""

    step: int
    wall: float
    logs: dict


@dataclass(frozen=True, slots=True)
class CheckpointSaved:
    step: int
    path: str
    wall: float | None = None  # when the save finished (the next step's time/step_s is counted from here)


@dataclass(frozen=True, slots=True)
class Evaluated:
    """`on_evaluate`: an evaluation ran after `step` and finished at `wall` (left out of time/step_s)."""

    step: int
    wall: float


@dataclass(frozen=True, slots=True)
class CheckpointAnalysed:
    result: dict


@dataclass(frozen=True, slots=True)
class RewardBatch:
    """One reward function's scores for one batch. Sample completions are picked later, on the publisher
    thread, and only for the batches that are published (`prompts`/`completions` are references, not copies)."""

    step: int
    reward_func: str
    scores: list
    samples: list | None = None
    prompts: Any = None
    completions: Any = None
    completion_ids: Any = None  # token ids per completion (reference): lengths, truncation


@dataclass(frozen=True, slots=True)
class ActionTaken:
    """`on_alarm`: the training thread asked the trainer to save (and stop) at `step` because of `episode`."""

    step: int
    action: str
    episode: dict


@dataclass(frozen=True, slots=True)
class RunEnded:
    """The end of a run: `status` "finished", or "crashed" / "interrupted" with the exception (`error`)."""

    global_step: int | None
    status: str = "finished"
    error: str | None = None


@dataclass(frozen=True, slots=True)
class SystemCue:
    """A non-main rank's `on_log`: a cue to sample (and forward) its system state, at its global step."""

    step: int | None = None


# -- what the publisher thread publishes -------------------------------------------------------------------
class Message(NamedTuple):
    kind: str
    data: dict
    rank: int = 0


def clean_scores(scores: list) -> list:
    """Reward scores as a compact JSON-safe list: floats, None, and non-finite floats as strings."""
    out: list[float | str | None] = []
    for s in scores:
        if s is None or type(s) is bool:
            out.append(None)
            continue
        try:
            x = float(s)
        except (TypeError, ValueError, OverflowError):
            out.append(None)
            continue
        out.append(x if math.isfinite(x) else protocol.to_json_safe(x))
    return out


def coalesced_rewards(reward_func: str, batches: list[RewardBatch], max_scores: int = 4096) -> dict:
    """The data of one `reward` message for several batches of one reward function (docs/protocol.md):
    `scores` holds every batch's scores in order (at most `max_scores`, the newest kept), `steps` and `sizes`
    say which scores came from which batch; `step` is the newest batch's step."""
    steps: list[int] = []
    sizes: list[int] = []
    scores: list = []
    total = 0
    for batch in reversed(batches):  # newest first, so the bound keeps the newest batches whole
        total += len(batch.scores)
        if len(scores) + len(batch.scores) > max_scores and scores:
            continue
        steps.append(batch.step)
        sizes.append(len(batch.scores))
        scores[:0] = batch.scores
    steps.reverse()
    sizes.reverse()
    clean = clean_scores(scores)
    valid = sum(1 for s in clean if type(s) is float and math.isfinite(s))
    return {
        "step": steps[-1],
        "reward_func": reward_func,
        "steps": steps,
        "sizes": sizes,
        "scores": clean,
        "num_scores": total,
        "num_invalid": len(clean) - valid,
    }


def split_rewards(data: dict) -> list[dict]:
    """A received `reward` message as one record per batch (a message without `steps`/`sizes` is one batch).
    Samples and the reliability analysis belong to the newest batch."""
    steps, sizes, scores = data.get("steps"), data.get("sizes"), data.get("scores")
    if (
        type(steps) is not list
        or type(sizes) is not list
        or type(scores) is not list
        or len(steps) != len(sizes)
        or len(steps) < 2
        or any(type(s) is not int for s in steps + sizes)
        or sum(sizes) != len(scores)
        or min(sizes) < 0
    ):
        return [data]
    common = {k: v for k, v in data.items() if k not in ("steps", "sizes", "scores", "samples", "analysis")}
    out, start = [], 0
    for step, size in zip(steps, sizes):
        part = scores[start : start + size]
        start += size
        invalid = sum(1 for x in part if type(x) not in (int, float) or not math.isfinite(x))
        out.append({**common, "step": step, "scores": part, "num_scores": size, "num_invalid": invalid, "samples": []})
    out[-1].update({k: data[k] for k in ("samples", "analysis") if k in data})
    return out


_JSONL_KINDS = {
    "run_start": protocol.RUN_START,
    "system": protocol.SYSTEM,
    "checkpoint": protocol.CHECKPOINT,
    "checkpoint_analysis": protocol.CHECKPOINT,
    "reward_batch": protocol.REWARD,
    "run_end": protocol.RUN_END,
    "action": protocol.ANOMALY,  # an on_alarm action: the episode that asked for it, with what was done
}


def from_jsonl(event: dict) -> list[Message]:
    """The messages one JSONL event stands for (the log's lines are the wire's messages in the seed's shape):
    a `step_end` is a step plus one anomaly message per anomaly found on the training side. [] for an event
    that is not ours; ValueError (one line) for one of ours that is malformed."""
    kind = event.get("event")
    if kind == "step_end":
        step = event.get("step")
        if type(step) is not int or not 0 <= step < protocol.MAX_SEQ:
            raise ValueError("step_end without a valid step")
        metrics = event.get("ppo_metrics")
        if not isinstance(metrics, dict):
            raise ValueError("step_end without ppo_metrics")
        out = [Message(protocol.STEP, {"step": step, "metrics": metrics})]
        anomalies = event.get("anomalies")
        if isinstance(anomalies, list):
            out += [Message(protocol.ANOMALY, a) for a in anomalies[:100] if isinstance(a, dict)]
        return out
    if kind not in _JSONL_KINDS:
        return []
    data = {k: v for k, v in event.items() if k != "event"}
    rank = event.get("rank", 0) if kind == "system" else 0
    return [Message(_JSONL_KINDS[kind], data, rank if type(rank) is int and 0 <= rank < 1 << 20 else 0)]
