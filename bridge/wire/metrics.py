"""Metric-name normalisation: every trainer's keys mapped onto the canonical names of CONTRACT.md.

Pure standard library, shared by the training side (callback) and the monitor side (file sources), so a
name means the same thing everywhere. Every numeric key is kept under its own name as well.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Canonical name -> keys that carry it, in priority order (first present wins). Covers GRPO/RLOO,
# DPO, Reward, OnlineDPO, PPO of TRL 0.12-1.12, legacy PPO (<= 0.11) and the seed's own names.
CANONICAL_SOURCES: dict[str, tuple[str, ...]] = {
    "kl": ("kl", "objective/kl", "kl_div"),
    "entropy": ("entropy", "policy/entropy_avg", "ppo/policy/entropy", "objective/entropy"),
    "reward": ("reward", "objective/scores", "ppo/mean_scores", "env/reward_mean", "rewards/margins", "mean_reward"),
    "reward_std": ("reward_std", "ppo/std_scores", "env/reward_std"),
    "policy_loss": ("policy_loss", "loss/policy_avg", "ppo/loss/policy"),
    "value_loss": ("value_loss", "loss/value_avg", "ppo/loss/value"),
    "clip_ratio": ("clip_ratio", "clip_ratio/region_mean", "policy/clipfrac_avg", "ppo/policy/clipfrac"),
    "grad_norm": ("grad_norm",),
    "learning_rate": ("learning_rate", "lr", "ppo/learning_rate"),
    "loss": ("loss", "ppo/loss/total"),
    "completion_length": ("completion_length", "completions/mean_length"),
}
CANONICAL: tuple[str, ...] = tuple(CANONICAL_SOURCES)

# Keys of the end-of-training summary that TRL/transformers logs last; such an entry is not a step.
SUMMARY_KEYS = frozenset(
    {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos"}
)
# Bookkeeping keys that are not metrics.
NON_METRIC_KEYS = frozenset({"step", "epoch_step"})


def to_float(value: Any) -> float | None:
    """A logged value as a float: None stays None (TRL logs all-NaN metrics as None); the strings
    'NaN'/'Infinity'/'-Infinity' of our wire format become floats; anything non-numeric gives None."""
    if value is None or isinstance(value, bool):
        return None if value is None else float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        if value in ("NaN", "nan"):
            return math.nan
        if value in ("Infinity", "inf"):
            return math.inf
        if value in ("-Infinity", "-inf"):
            return -math.inf
        return None
    try:  # numpy / torch scalars
        return float(value)
    except (TypeError, ValueError):
        return None


def is_summary(logs: Mapping[str, Any]) -> bool:
    """True for the end-of-training summary entry (train_runtime, train_loss, ...)."""
    return any(map(logs.__contains__, SUMMARY_KEYS))  # once per logged step on the publisher thread: no genexpr


def normalise(logs: Mapping[str, Any]) -> dict[str, float | None]:
    """Every numeric (or None) value of `logs` under its own name, plus the canonical names.

    None is kept as None (missing for that step); non-numeric values (strings, lists) are dropped.
    """
    out: dict[str, float | None] = {}
    for key, value in logs.items():
        if not isinstance(key, str) or key in NON_METRIC_KEYS:
            continue
        if value is None:
            out[key] = None
            continue
        number = to_float(value)
        if number is not None:
            out[key] = number
    for canonical, sources in CANONICAL_SOURCES.items():
        if canonical in out:
            continue
        for source in sources:
            if source in out:
                out[canonical] = out[source]
                break
    return out
