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
CONTRACT_SOURCES: dict[str, tuple[str, ...]] = {
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
    "completion_length": ("completion_length", "completions/mean_length", "tokens/responses_len_mean"),
}
CANONICAL: tuple[str, ...] = tuple(CONTRACT_SOURCES)  # the names CONTRACT.md promises

# Rollout names (docs/monitor.md, Rollout): what custom loops log in verl's names, under the names TRL and our own
# profiler (bridge/training/integration/profiling.py) use, so one gauge reads every run. verl: timing_s/* are
# seconds of one step's phases (metric_utils.compute_timing_metrics), perf/total_num_tokens the step's prompt +
# response tokens, perf/throughput those per second *per GPU*, response_length/clip_ratio the share of responses
# at the length limit. TRL 1.x logs `num_tokens` (cumulative) and `step_time` itself: kept under their names.
# OpenRLHF's timing keys changed between versions: not mapped.
ROLLOUT_SOURCES: dict[str, tuple[str, ...]] = {
    "completions/clipped_ratio": ("completions/clipped_ratio", "response_length/clip_ratio"),
    "time/generation_s": ("time/generation_s", "timing_s/gen"),
    "time/reward_s": ("time/reward_s", "timing_s/reward"),
    "time/optimisation_s": ("time/optimisation_s", "timing_s/update_actor"),
    "time/step_total_s": ("time/step_total_s", "timing_s/step", "perf/time_per_step"),
    "tokens/step": ("tokens/step", "perf/total_num_tokens"),
    "tokens/s/gpu": ("tokens/s/gpu", "perf/throughput"),
}
# Every name `normalise` copies (the training side's fast path in recorder.py walks the same dict).
CANONICAL_SOURCES: dict[str, tuple[str, ...]] = {**CONTRACT_SOURCES, **ROLLOUT_SOURCES}

# Keys of the end-of-training summary that TRL/transformers logs last; such an entry is not a step. Not
# `train_runtime` alone: with `include_num_input_tokens_seen` every step's log has `train_runtime` and
# `train_tokens_per_second` (the running throughput) beside its loss.
SUMMARY_KEYS = frozenset({"train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos"})
# Bookkeeping keys that are not metrics.
NON_METRIC_KEYS = frozenset({"step", "epoch_step"})


def to_float(value: Any) -> float | None:
    """A logged value as a float: None stays None (TRL logs all-NaN metrics as None); the strings
    'NaN'/'Infinity'/'-Infinity' of our wire format become floats; numpy scalars, 0-d and 1-element numpy
    arrays and torch tensors, Decimals and Fractions become their number; anything else (text, lists, arrays of
    several values, numbers too large for a float) gives None."""
    if value is None or isinstance(value, bool):
        return None if value is None else float(value)
    if type(value) is float:
        return value
    if isinstance(value, str):
        if value in ("NaN", "nan"):
            return math.nan
        if value in ("Infinity", "inf"):
            return math.inf
        if value in ("-Infinity", "-inf"):
            return -math.inf
        return None
    try:  # numpy / torch scalars and 0-d arrays, Decimal, Fraction, 10**400 (OverflowError)
        return float(value)
    except (TypeError, ValueError, OverflowError):
        pass
    if getattr(value, "ndim", 0) and callable(getattr(value, "item", None)):  # 1-element arrays and tensors
        try:
            item = value.item()
        except Exception:  # several values (ValueError / RuntimeError): not one number
            return None
        return None if item is value else to_float(item)
    return None


def is_summary(logs: Mapping[str, Any]) -> bool:
    """True for the end-of-training summary entry (train_runtime, train_loss, ...)."""
    return any(map(logs.__contains__, SUMMARY_KEYS))  # once per logged step on the publisher thread: no genexpr


def summary_values(logs: Mapping[str, Any], limit: int = 64) -> dict[str, float | str]:
    """The run summary of that entry: its numeric values as floats (the same rules as `to_float`, finite only)
    and short strings, at most `limit` keys (bookkeeping keys left out)."""
    out: dict[str, float | str] = {}
    for key, value in logs.items():
        if len(out) >= limit:
            break
        if not isinstance(key, str) or key in NON_METRIC_KEYS or len(key) > 200:
            continue
        if isinstance(value, str):
            out[key] = value[:200]
            continue
        number = to_float(value)
        if number is not None and math.isfinite(number):
            out[key] = int(number) if isinstance(value, int) and not isinstance(value, bool) else number
    return out


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


# -- units --------------------------------------------------------------------------------------------------
# KL and entropy are logged per token by some trainers and summed per sequence by others: OnlineDPO's entropy
# (~68 on a 64-token completion) and GRPO's (~5.7) must not be read, compared or overlaid as one quantity.
PER_TOKEN = "per token"
PER_SEQUENCE = "per sequence"
UNITS = (PER_TOKEN, PER_SEQUENCE)
UNIT_METRICS = ("kl", "entropy")  # the canonical names whose unit differs between trainers
# Keys whose unit is the same whichever trainer logs them.
SOURCE_UNITS: dict[str, str] = {
    "objective/kl": PER_SEQUENCE,  # PPO (0.12+), OnlineDPO, legacy PPO: KL summed over a completion
    "objective/entropy": PER_SEQUENCE,  # -log p summed over a completion
    "policy/entropy_avg": PER_TOKEN,  # PPO (0.12+): mean over tokens
    "ppo/policy/entropy": PER_TOKEN,  # legacy PPO: masked mean over tokens
}
# What the plain `kl` / `entropy` keys of each trainer class are (and so the canonical names it fills).
TRAINER_UNITS: dict[str, dict[str, str]] = {
    "GRPOTrainer": {"kl": PER_TOKEN, "entropy": PER_TOKEN},
    "RLOOTrainer": {"kl": PER_TOKEN, "entropy": PER_TOKEN},
    "OnlineDPOTrainer": {"kl": PER_SEQUENCE, "entropy": PER_SEQUENCE},
    "PPOTrainer": {"kl": PER_SEQUENCE, "entropy": PER_TOKEN},
    "KTOTrainer": {"kl": PER_SEQUENCE, "entropy": PER_TOKEN},
    "DPOTrainer": {"entropy": PER_TOKEN},
    "SFTTrainer": {"entropy": PER_TOKEN},
}


def trainer_units(trainer: Any) -> dict[str, str]:
    """The units of `kl` and `entropy` for a trainer class, instance or class name: the first class of its MRO
    that TRAINER_UNITS knows (so a subclass of GRPOTrainer has GRPO's units); {} when none is known."""
    if isinstance(trainer, str):  # a name, or a guess such as "GRPOTrainer/RLOOTrainer" (one family's units)
        return dict(TRAINER_UNITS.get(trainer.split("/")[0], {}))
    cls = trainer if isinstance(trainer, type) else type(trainer)
    for klass in getattr(cls, "__mro__", ()):
        if klass.__name__ in TRAINER_UNITS:
            return dict(TRAINER_UNITS[klass.__name__])
    return {}


def canonical_source(name: str, names: Any, same: Any = None) -> str | None:
    """Which logged key a canonical name was copied from: the first of its sources present in `names` other than
    itself, unless `same(name, source)` says their values differ (then the trainer logged `name` itself).
    None when the canonical name is its own key."""
    present = set(names)
    for source in CANONICAL_SOURCES.get(name, ())[1:]:
        if source in present:
            if name in present and same is not None and not same(name, source):
                return None
            return source
    return None


def metric_units(trainer: str | None, names: Any, same: Any = None, recorded: Any = None) -> dict[str, str]:
    """{metric: unit} for the KL and entropy metrics of a run: keys of fixed unit (SOURCE_UNITS), the canonical
    `kl` / `entropy` from the key they were copied from, else (the trainer logged `kl` / `entropy` itself) from
    the trainer class (`recorded`: the units the training side put in the run's meta, found through the class's
    MRO, which win over the name's; only known unit strings are taken), and every `eval_` twin with its training
    twin's unit. Metrics of unknown unit are left out."""
    present = set(names)
    known = trainer_units(trainer or "")
    if isinstance(recorded, Mapping):
        known.update({k: v for k, v in recorded.items() if k in UNIT_METRICS and v in UNITS})
    units = {key: unit for key, unit in SOURCE_UNITS.items() if key in present}
    for name in UNIT_METRICS:
        if name in present:
            source = canonical_source(name, present, same)
            unit = SOURCE_UNITS.get(source or name) or known.get(name)
            if unit is not None:
                units[name] = unit
    for name in present:
        if name.startswith("eval_") and name[5:] in units:
            units[name] = units[name[5:]]
    return units
