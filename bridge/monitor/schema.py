"""The monitor's one boundary for what it keeps from a message's `data` (wire or JSONL): a bounded copy with every
string and key made display-safe (`analysis.safe_text`), then every field a renderer or an analysis reads
checked for its type and range. A field that fails is dropped and counted on its run (`RunHistory.reject_field`:
the header's "rejected fields"), so no renderer ever sees `issues: 5` or `used_mb: "abc"`. Fields nobody reads
are kept (display-safe) and shown only in the JSON report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from rlhf_tui.analysis.safe_text import safe_name, safe_text
from rlhf_tui.bridge.wire import protocol

MAX_ITEMS = 20_000  # values kept from one message (scores, samples, analysis ...)
MAX_KEYS = 1000  # keys kept from one object
MAX_LIST = 5000  # items kept from one list
MAX_KEY = 200  # characters of a key
SEVERITIES = frozenset({"low", "medium", "high", "critical"})

Check = Callable[[Any], bool]


def safe_copy(value: Any, depth: int = 0, budget: list | None = None) -> Any:
    """A bounded copy of JSON data: non-finite strings made floats, strings display-safe and clipped, keys
    display-safe on one line, at most MAX_ITEMS values (a hostile message cannot make one record huge)."""
    if budget is None:
        budget = [MAX_ITEMS]
    budget[0] -= 1
    if budget[0] < 0:
        return None
    if isinstance(value, bool) or value is None or isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        if value in protocol.NON_FINITE:
            return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[value]
        return safe_text(value[: protocol.MAX_STRING], protocol.MAX_STRING)
    if depth > protocol.MAX_DEPTH:
        return None
    if isinstance(value, dict):
        return {
            safe_name(str(k)[:MAX_KEY], MAX_KEY): safe_copy(v, depth + 1, budget)
            for k, v in list(value.items())[:MAX_KEYS]
        }
    if isinstance(value, list):
        return [safe_copy(v, depth + 1, budget) for v in value[:MAX_LIST]]
    return None


# -- checks: what a field must be (None always passes: it means "not known") ---------------------------------
def _is_number(v: Any) -> bool:
    return type(v) in (int, float)


def number(v: Any) -> bool:
    """Any number, non-finite included (a reward score, a drift PSI)."""
    return _is_number(v)


def finite(low: float = -math.inf, high: float = math.inf) -> Check:
    return lambda v: _is_number(v) and math.isfinite(v) and low <= v <= high


def integer(low: int = 0, high: int = protocol.MAX_SEQ) -> Check:
    return lambda v: type(v) is int and low <= v <= high


def text(v: Any) -> bool:
    return type(v) is str


def flag(v: Any) -> bool:
    return type(v) is bool


def mapping(v: Any) -> bool:
    return type(v) is dict


def one_of(values: frozenset) -> Check:
    return lambda v: type(v) is str and v in values


def either(*checks: Check) -> Check:
    return lambda v: any(check(v) for check in checks)


def list_of(check: Check) -> Check:
    return lambda v: type(v) is list and all(item is None or check(item) for item in v)


def a_list(v: Any) -> bool:
    """A list whose items `checked_list` checks one by one."""
    return type(v) is list


count = integer()
megabytes = finite(0.0, 1e12)
fraction = finite(0.0, 1e3)  # a used fraction above 1 is odd but harmless: the gauge clips it

# The fields each message kind may carry, with their checks; nested records (GPUs, samples, drift) have their own.
RUN_START = {
    "run_id": text,
    "trainer": text,
    "model": text,
    "hostname": text,
    "started": finite(),
    "pid": count,
    "world_size": integer(1),
    "max_steps": integer(-1),
    "args": mapping,
    "versions": mapping,
}
ARGS = {
    "num_generations": integer(1),
    "num_iterations": integer(0),
    "num_ppo_epochs": integer(0),
    "ppo_epochs": integer(0),
    "max_completion_length": finite(),
    "max_steps": integer(-1),
    "logging_steps": either(count, finite(0.0)),
    "reward_weights": list_of(finite()),
}
SYSTEM = {
    "rss_mb": megabytes,
    "gpu_available": flag,
    "gpus": a_list,
    "step": count,
    "rank": count,
    "local_rank": count,
    "hostname": text,
}
GPU = {
    "index": count,
    "name": text,
    "used_mb": megabytes,
    "total_mb": megabytes,
    "allocated_mb": megabytes,
    "reserved_mb": megabytes,
    "peak_mb": megabytes,
    "peak_used_mb": megabytes,
    "used_frac": fraction,
    "util": finite(0.0, 100.0),
}
CHECKPOINT = {
    "step": count,
    "path": text,
    "status": text,
    "health_score": finite(0.0, 1.0),
    "issues": list_of(text),
    "recommendations": list_of(text),
    "drift": either(mapping, number),
    "file_size_mb": megabytes,
    "num_tensors": count,
    "num_parameters": count,
    "error": text,
    "format": text,
}
DRIFT = {"overall": number, "reference": text}
REWARD = {
    "step": count,
    "reward_func": text,
    "rank": count,
    "num_scores": count,
    "num_invalid": count,
    "samples": a_list,
}
SAMPLE = {
    "label": text,
    "score": number,
    "prompt": text,
    "completion": text,
    "index": count,
    "step": count,
    "truncated": flag,
    "length": count,
    "clipped": flag,
}
RUN_END = {"global_step": count, "summary": mapping, "status": text, "error": text}
ANOMALY = {
    "detector": text,
    "metric": text,
    "severity": one_of(SEVERITIES),
    "step": count,
    "first_step": count,
    "last_step": count,
    "message": text,
    "recommendation": text,
    "value": number,
    "score": number,
    "ongoing": flag,
    "action": one_of(frozenset({"save", "stop"})),  # what on_alarm did about it (docs/protocol.md)
    "action_step": count,
    "action_reason": text,
}
TRAINER_STATE = {"max_steps": integer(-1), "logging_steps": either(count, finite(0.0)), "global_step": count}
HEARTBEAT = {
    "last_seq": integer(-1),
    "thinned_upto": integer(-1),
    "dropped": count,
    "queued": count,
    "rejected": count,
    "clients": count,
    "pid": count,
    "cpu_s": finite(0.0),
    "history_mb": megabytes,
    "log_errors": count,  # the training's JSONL log writes that failed
    "log_error": text,  # ... and the first one's line
}


def checked(record: Any, schema: dict[str, Check], what: str, reject: Callable[[str], None]) -> dict:
    """`record` (a safe copy) with each field that fails its check removed and reported as `what.field`;
    {} for a record that is not an object at all."""
    if not isinstance(record, dict):
        if record is not None:
            reject(f"{what}: not an object")
        return {}
    for key, check in schema.items():
        value = record.get(key)
        if value is not None and not check(value):
            del record[key]
            reject(f"{what}.{key}: {_kind(value)} out of type or range")
    return record


def checked_list(items: Any, schema: dict[str, Check], what: str, reject: Callable[[str], None], limit: int) -> list:
    """The objects of a list, each `checked`; other items dropped (and reported)."""
    if not isinstance(items, list):
        return []
    out = []
    for i, item in enumerate(items[:limit]):
        if isinstance(item, dict):
            out.append(checked(item, schema, f"{what}[{i}]", reject))
        elif item is not None:
            reject(f"{what}[{i}]: not an object")
    return out


def _kind(value: Any) -> str:
    return type(value).__name__


__all__ = [
    "ANOMALY",
    "ARGS",
    "CHECKPOINT",
    "DRIFT",
    "GPU",
    "HEARTBEAT",
    "REWARD",
    "RUN_END",
    "RUN_START",
    "SAMPLE",
    "SYSTEM",
    "TRAINER_STATE",
    "checked",
    "checked_list",
    "safe_copy",
]
