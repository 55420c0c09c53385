"""Applying what arrives (wire envelopes or JSONL events) to a `Store`: the one place that knows how each
message kind lands in a run's history. Pure Python; every value is re-checked so nothing can crash the store.
"""
from __future__ import annotations

import math
import time
from typing import Any

from rlhf_tui.analysis.store import RunHistory, Store
from rlhf_tui.bridge import protocol
from rlhf_tui.bridge.metrics import to_float

MAX_SAMPLES = 8


def _metrics(raw: Any) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    if not isinstance(raw, dict):
        return out
    for key, value in list(raw.items())[: protocol.MAX_METRICS]:
        if isinstance(key, str) and len(key) <= 200:
            number = to_float(value)
            if number is not None or value is None:
                out[key] = number
    return out


def _clip_str(value: Any, limit: int = protocol.MAX_STRING) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _plain(value: Any, depth: int = 0) -> Any:
    """A bounded copy of JSON data (numbers made floats, strings clipped)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        if value in ("NaN", "Infinity", "-Infinity"):
            return to_float(value)
        return value[: protocol.MAX_STRING]
    if depth > protocol.MAX_DEPTH:
        return None
    if isinstance(value, dict):
        return {str(k)[:200]: _plain(v, depth + 1) for k, v in list(value.items())[:1000]}
    if isinstance(value, list):
        return [_plain(v, depth + 1) for v in value[:5000]]
    return None


def apply_envelope(store: Store, env: dict) -> None:
    """Land one validated envelope in the store (caller holds store.lock)."""
    kind, data = env["kind"], env["data"]
    run = store.run(env["run"])
    run.last_heartbeat = time.monotonic()
    if kind == protocol.HEARTBEAT:
        run.server_status = _plain(data) or {}
        return
    if env["seq"] > run.last_seq:
        run.last_seq = env["seq"]
    if kind == protocol.STEP:
        if run.add_step(data["step"], _metrics(data["metrics"]), env.get("ts")):
            run.last_step_time = time.monotonic()
    elif kind == protocol.RUN_START:
        run.meta.update(_plain(data) or {})
    elif kind == protocol.SYSTEM:
        _apply_system(run, data, env.get("rank", 0))
    elif kind == protocol.CHECKPOINT:
        _apply_checkpoint(run, _plain(data))
    elif kind == protocol.REWARD:
        _apply_reward(run, _plain(data))
    elif kind == protocol.RUN_END:
        run.ended = _plain(data) or {}
    elif kind == protocol.ANOMALY:
        run.training_anomalies.append(_plain(data))


def _apply_system(run: RunHistory, data: dict, rank: int) -> None:
    sample = _plain(data)
    if not isinstance(sample, dict):
        return
    gpus = sample.get("gpus")
    sample["gpus"] = [g for g in gpus if isinstance(g, dict)][:64] if isinstance(gpus, list) else []
    sample["rank"] = rank
    sample["received"] = time.time()
    run.system[int(rank)] = sample


def _apply_checkpoint(run: RunHistory, data: Any) -> None:
    if not isinstance(data, dict) or not isinstance(data.get("step"), int):
        return
    for i, existing in enumerate(run.checkpoints):
        if existing.get("step") == data["step"]:
            run.checkpoints[i] = {**existing, **data}
            return
    run.checkpoints.append(data)
    run.checkpoints.sort(key=lambda c: c.get("step", 0))


def _apply_reward(run: RunHistory, data: Any) -> None:
    if not isinstance(data, dict):
        return
    samples = data.get("samples")
    data["samples"] = [s for s in samples if isinstance(s, dict)][:MAX_SAMPLES] if isinstance(samples, list) else []
    scores = data.get("scores")
    data["scores"] = [s if isinstance(s, (int, float)) and not isinstance(s, bool) else None
                      for s in scores] if isinstance(scores, list) else []
    run.rewards.append(data)
    analysis = data.get("analysis")
    if isinstance(analysis, dict):
        run.reward_report = analysis


def apply_jsonl_event(store: Store, event: dict, default_run: str = "file") -> bool:
    """Land one JSONL event; returns True if it was an rlhf-tui event."""
    kind = event.get("event")
    run_id = event.get("run_id") if isinstance(event.get("run_id"), str) else None
    if kind == "run_start":
        run = store.run(run_id or default_run)
        run.meta.update(_plain({k: v for k, v in event.items() if k != "event"}) or {})
        return True
    run = store.current_run or store.run(default_run)
    if kind == "step_end":
        step = event.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            store.reject("step_end without a valid step")
            return False
        metrics = event.get("ppo_metrics")
        if not isinstance(metrics, dict):
            store.reject("step_end without ppo_metrics")
            return False
        if run.add_step(step, _metrics(metrics)):
            store.transport["received"] += 1
        anomalies = event.get("anomalies")
        if isinstance(anomalies, list):
            for a in anomalies[:100]:
                if isinstance(a, dict):
                    run.training_anomalies.append(_plain(a))
        return True
    if kind == "system":
        _apply_system(run, event, int(event.get("rank", 0)) if isinstance(event.get("rank"), int) else 0)
        return True
    if kind in ("checkpoint", "checkpoint_analysis"):
        _apply_checkpoint(run, _plain({k: v for k, v in event.items() if k != "event"}))
        return True
    if kind == "reward_batch":
        _apply_reward(run, _plain({k: v for k, v in event.items() if k != "event"}))
        return True
    if kind == "run_end":
        run.ended = _plain({k: v for k, v in event.items() if k != "event"}) or {}
        return True
    return False


def finite_or_none(value: Any) -> float | None:
    number = to_float(value)
    return number if number is not None and math.isfinite(number) else None
