"""What the detectors make of a run's metric names and meta: counters the z-score skips, 0..1 fractions,
canonical copies of trainer keys, DPO or not, off-policy or not, and the z-score's band for the monitor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from rlhf_tui.analysis.detectors.kernels import baseline, block_stats
from rlhf_tui.analysis.detectors.registry import series_wanted
from rlhf_tui.analysis.thresholds import Thresholds

# Keys that are counters or schedules, never judged by the generic z-score.
BOOKKEEPING = frozenset(
    {
        "epoch",
        "num_tokens",
        "learning_rate",
        "lr",
        "ppo/learning_rate",
        "episode",
        "eps",
        "global_step",
        "step",
        "total_flos",
        "objective/kl_coef",
        "beta",
    }
)
SYSTEM_PREFIXES = ("memory/", "time/")
FRACTION_METRICS = frozenset(
    {"frac_reward_zero_std", "completions/clipped_ratio", "clip_ratio", "rewards/accuracies", "memory/gpu_frac"}
)
# DPO's implicit rewards and logits drift by design (rejected falling, margins widening): not anomalies.
INTENDED_TRENDS = frozenset({"rewards/chosen", "rewards/rejected", "logits/chosen", "logits/rejected"})
RELATIVE_FLOOR = 1e-3  # the z-score's smallest scale relative to the level: 0.1 % moves of a flat series are not news
REWARD_PART = re.compile(r"^rewards/.+/mean$")
CANONICAL_SOURCES = {
    "kl": ("objective/kl", "kl_div"),
    "entropy": ("policy/entropy_avg", "ppo/policy/entropy", "objective/entropy"),
    "reward": ("objective/scores", "ppo/mean_scores", "env/reward_mean", "rewards/margins", "mean_reward"),
    "reward_std": ("ppo/std_scores", "env/reward_std"),
    "policy_loss": ("loss/policy_avg", "ppo/loss/policy"),
    "value_loss": ("loss/value_avg", "ppo/loss/value"),
    "clip_ratio": ("clip_ratio/region_mean", "policy/clipfrac_avg", "ppo/policy/clipfrac"),
    "learning_rate": ("lr", "ppo/learning_rate"),
    "loss": ("ppo/loss/total",),
    "completion_length": ("completions/mean_length",),
    # verl's names of the rollout metrics (bridge/wire/metrics.py ROLLOUT_SOURCES): judged once, under ours
    "completions/clipped_ratio": ("response_length/clip_ratio",),
    "time/generation_s": ("timing_s/gen",),
    "time/reward_s": ("timing_s/reward",),
    "time/optimisation_s": ("timing_s/update_actor",),
    "time/step_total_s": ("timing_s/step", "perf/time_per_step"),
    "tokens/step": ("perf/total_num_tokens",),
    "tokens/s/gpu": ("perf/throughput",),
}


def is_dpo(meta: Mapping[str, Any], names: Iterable[str]) -> bool:
    trainer = str(meta.get("trainer") or "")
    if "DPO" in trainer:
        return True
    names = set(names)
    return "rewards/accuracies" in names and "logps/chosen" in names


def is_off_policy(meta: Mapping[str, Any]) -> bool:
    args = meta.get("args") or {}
    trainer = str(meta.get("trainer") or "")
    try:
        iters = int(args.get("num_iterations", 1) or 1)
        epochs = int(args.get("num_ppo_epochs", args.get("ppo_epochs", 1)) or 1)
    except (TypeError, ValueError, AttributeError):
        iters = epochs = 1
    return iters > 1 or epochs > 1 or trainer.startswith("PPO")


def max_completion_length(meta: Mapping[str, Any]) -> float | None:
    args = meta.get("args") or {}
    try:
        v = float(args["max_completion_length"])
    except (TypeError, ValueError, AttributeError, KeyError):
        return None
    return v if v > 0 else None


def canonical_copies(names: Iterable[str]) -> set[str]:
    """Trainer keys already represented by a canonical name (every alias present, not only the first)."""
    names = set(names)
    out: set[str] = set()
    for canonical, sources in CANONICAL_SOURCES.items():
        if canonical in names:
            out.update(src for src in sources if src in names)
    return out


def zscore_skips(names: Iterable[str]) -> set[str]:
    """Metrics the generic z-score leaves alone besides counters and system series: canonical copies, the
    series a specific detector already judges (its own rule knows what a change means there), and the
    terminated-completion length twins of the completion lengths (the same values whenever nothing is cut)."""
    names = set(names)
    twins = {n for n in names if n.endswith("_terminated_length") and n.replace("_terminated", "") in names}
    return canonical_copies(names) | series_wanted(names) | twins | (INTENDED_TRENDS & names)


def z_floor(names: list[str], th: Thresholds) -> np.ndarray:
    """Smallest scale of the generic z-score per metric: 0..1 fractions move in coarse steps."""
    return np.array([th.fraction_floor if n in FRACTION_METRICS or is_fraction_name(n) else 0.0 for n in names])


def zscore_scale(scale: np.ndarray, center: np.ndarray, floor: np.ndarray | float) -> np.ndarray:
    """The z-score's scale: the baseline's, at least the metric's floor and RELATIVE_FLOOR of its level."""
    return np.maximum(np.maximum(scale, floor), RELATIVE_FLOOR * np.abs(center))


def is_fraction_name(name: str) -> bool:
    """Clip fractions of every trainer family are 0..1 shares that move in coarse steps; a constant 0 with one
    tiny blip must not read as billions of spreads."""
    return name.startswith(
        ("clip_ratio/", "policy/clipfrac", "ppo/policy/clipfrac", "ppo/val/clipfrac", "val/clipfrac")
    ) or name.endswith("clipped_ratio")


def generic(name: str, skips: set[str]) -> bool:
    return not (name in BOOKKEEPING or name.startswith(SYSTEM_PREFIXES) or name in skips)


def generic_metrics(names: Iterable[str]) -> set[str]:
    """The metrics the generic z-score watches (see `zscore_skips`)."""
    names = list(names)
    skips = zscore_skips(names)
    return {n for n in names if generic(n, skips)}


def band_metrics(names: Iterable[str]) -> set[str]:
    """Metrics whose z-score band the monitor shows: every one but counters, schedules, system series and
    aliases (the band is the baseline's normal range; the z-score alarms outside it where no specific detector
    watches the metric)."""
    names = list(names)
    aliases = canonical_copies(names)
    return {n for n in names if generic(n, aliases)}


def zscore_band(
    values: np.ndarray, thresholds: Thresholds | None = None, metric: str | None = None
) -> tuple[float, float] | None:
    """The band outside which the generic z-score flags the next value of a metric: baseline centre ±
    anomaly_threshold × robust scale, from the blocks before the current one, with the detector's own
    statistics and, given the metric's name, its scale floor (for the monitor's band column). None while the
    metric is warming up."""
    th = thresholds or Thresholds()
    block = max(2, int(th.block_steps))
    blocks = max(1, int(th.baseline_blocks))
    n = int(values.size)
    current = (n - 1) // block if n else 0
    if current == 0:
        return None
    start = max(0, current - blocks)
    x = np.array(values[start * block : current * block], dtype=np.float64).reshape(current - start, block)
    x[~np.isfinite(x)] = np.nan
    med, spread, mean, cnt = block_stats(x)
    assert mean is not None  # asked for (with_mean defaults to True)
    center, scale, _, ok = baseline(med[None, :], spread[None, :], mean[None, :], cnt[None, :], int(th.min_history))
    c, s = float(center[0]), float(scale[0])
    if not bool(ok[0]) or not (math.isfinite(c) and math.isfinite(s)):
        return None
    s = float(zscore_scale(np.array(s), np.array(c), float(z_floor([metric], th)[0]) if metric is not None else 0.0))
    z = float(th.anomaly_threshold)
    return c - z * s, c + z * s


class Plan:
    """Which specific detector watches which metric, decided from the metric names and run meta."""

    def __init__(self, names: Iterable[str], meta: Mapping[str, Any], th: Thresholds):
        names = set(names)
        self.dpo = is_dpo(meta, names)
        self.off_policy = is_off_policy(meta)
        self.max_len = max_completion_length(meta)
        self.reward_parts = sorted(n for n in names if REWARD_PART.match(n)) if not self.dpo else []
        self.memory = [n for n in ("memory/rss_mb", "memory/gpu_mb") if n in names]
        self.step_time = [n for n in ("step_time", "time/step_s") if n in names]  # the trainer's own first
        self.eval_metrics = sorted(n for n in names if n.startswith("eval_"))
        trainer = str(meta.get("trainer") or "")
        # GRPO / RLOO: advantages centred within prompt groups, so the loss is ~0 by construction
        self.group_relative = not self.dpo and (
            any(t in trainer for t in ("GRPO", "RLOO")) or (not trainer and "frac_reward_zero_std" in names)
        )
        self.reward_metrics = [] if self.dpo else [n for n in ["reward", *self.reward_parts] if n in names]
        # per-function spreads (TRL's rewards/<f>/std): a function that turns constant is dead
        self.reward_spreads = [
            n[: -len("mean")] + "std" for n in self.reward_parts if n[: -len("mean")] + "std" in names
        ]
