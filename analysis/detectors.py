"""Anomaly detectors for RLHF training metrics: batch over a whole history (`detect`) and per step
(`StreamingDetector`), with identical results.

Pure numpy + stdlib. Every detector compares a metric with its own trailing baseline (blocks of
`block_steps` rows before the current block, so the current point is never part of it) or with the run's own
early level, so the rules are unit-free: a per-sequence KL sum (PPO) and a per-token mean (GRPO) are judged
alike. Isolated one-step spikes are low severity; medium and above need persistence (CUSUM evidence or k of
the last n steps) or a rule that is exact (non-finite values, reward identity, memory near OOM).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections import deque
from collections.abc import Iterable, Mapping
from statistics import NormalDist
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from rlhf_tui.analysis.thresholds import Thresholds

SEVERITIES: tuple[str, ...] = ("low", "medium", "high", "critical")
_LEVEL = {name: i + 1 for i, name in enumerate(SEVERITIES)}
LN2 = math.log(2.0)


def severity_at_least(sev: str | None, level: str) -> bool:
    """True when severity `sev` is `level` or worse (unknown severities count as below low)."""
    return _LEVEL.get(str(sev), 0) >= _LEVEL[level]


DETECTORS: dict[str, str] = {
    "nonfinite": "NaN/Inf/None where a value was logged (critical)",
    "zscore": "robust rolling z-score against the trailing baseline, any metric (low)",
    "kl_spike": "isolated KL spike far above its typical level (low)",
    "kl_runaway": "KL held far above its baseline for k of the last n steps (medium/high)",
    "entropy_collapse": "entropy fallen by most of its early level (medium/high)",
    "reward_shift": "reward level shift: climbing abnormally fast, dropping, or its spread jumping (medium)",
    "reward_scale": "reward or reward_std scale jump (high)",
    "reward_mismatch": "reward no longer equals the sum of per-function means: NaN rewards dropped (high)",
    "reward_hacking": "reward climbing fast while lengths hit the limit, entropy falls or KL runs away (high)",
    "no_learning_signal": "frac_reward_zero_std rising / reward_std collapsing (medium/high)",
    "policy_shift": "abrupt rise of entropy or completion length (medium)",
    "grad_norm_spike": "isolated grad_norm spike (low)",
    "grad_norm_shift": "grad_norm held far above its baseline for k of the last n steps (medium)",
    "loss_spike": "isolated loss spike (low)",
    "loss_shift": "loss held far from its baseline for k of the last n steps (medium)",
    "value_loss_blowup": "PPO value loss many times its level (high)",
    "clip_ratio": "clip fraction too high while training off-policy (medium)",
    "lr_jump": "learning rate jumped up in one step (medium)",
    "dpo_accuracy_drop": "DPO preference accuracy fell from its plateau (medium/high)",
    "dpo_accuracy_pinned": "DPO accuracy pinned at 1.0 early (low)",
    "dpo_margin_explosion": "DPO reward margins exploding (medium)",
    "dpo_logps_falling": "DPO chosen and rejected log-probs both falling (medium)",
    "dpo_loss": "DPO loss back above ln 2: the policy prefers rejected answers (medium)",
    "memory_leak": "steady growth of RSS or GPU memory (medium/high)",
    "memory_near_oom": "device memory above 90% (high/critical)",
    "step_time_regression": "step time regressed against its baseline (medium)",
}

# Keys that are counters or schedules, never judged by the generic z-score.
_BOOKKEEPING = frozenset(
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
_SYSTEM_PREFIXES = ("memory/", "time/")
_FRACTION_METRICS = frozenset(
    {"frac_reward_zero_std", "completions/clipped_ratio", "clip_ratio", "rewards/accuracies", "memory/gpu_frac"}
)
_REWARD_PART = re.compile(r"^rewards/.+/mean$")
_CANONICAL_SOURCES = {
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
}
_MAD = 1.4826


# ----------------------------------------------------------------------------------------------------------
# Shared numeric kernels. The batch path calls them on many rows at once, the streaming path on one row;
# both run the same numpy code so their floating-point results are identical.
# ----------------------------------------------------------------------------------------------------------
_RANGE_CACHE: dict[int, np.ndarray] = {}


def _range_table(width: int) -> np.ndarray:
    """Expected normal range between the trimmed order statistics used by `_block_stats`, per count."""
    table = _RANGE_CACHE.get(width)
    if table is None:
        nd = NormalDist()
        table = np.ones(width + 1)
        for c in range(2, width + 1):
            i = c // 10
            lo = nd.inv_cdf((i + 1 - 0.375) / (c + 0.25))
            table[c] = -2.0 * lo
        _RANGE_CACHE[width] = table
    return table


def _block_stats(
    blocks: np.ndarray, with_mean: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Per row of `blocks` (K, B; NaN = missing): median, robust spread, mean (if asked), finite count."""
    srt = np.sort(blocks, axis=1)
    K, B = srt.shape
    table = _range_table(B)
    if not np.isnan(srt[:, -1]).any():  # NaN sorts last: no NaN anywhere (the common case)
        trim = B // 10
        med = (srt[:, (B - 1) // 2] + srt[:, B // 2]) / 2.0
        spread = (srt[:, B - 1 - trim] - srt[:, trim]) / table[B]
        mean = _row_sum(srt) / B if with_mean else None
        return med, spread, mean, np.full(K, B, dtype=np.int64)
    finite = ~np.isnan(srt)
    cnt = finite.sum(axis=1)
    rows = np.arange(K)
    lo = np.maximum((cnt - 1) // 2, 0)
    hi = np.minimum(cnt // 2, B - 1)
    med = (srt[rows, lo] + srt[rows, hi]) / 2.0
    trim = cnt // 10
    top = np.maximum(cnt - 1 - trim, 0)
    spread = (srt[rows, top] - srt[rows, trim]) / table[cnt]
    spread = np.where(cnt >= 2, spread, np.nan)
    mean = None
    if with_mean:
        total = _row_sum(np.where(finite, srt, 0.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(cnt > 0, total / np.maximum(cnt, 1), np.nan)
    return med, spread, mean, cnt


def _row_sum(a: np.ndarray) -> np.ndarray:
    """Row sums added left to right (a fixed order, so one row or many give bit-identical sums)."""
    total = a[:, 0].copy()
    for k in range(1, a.shape[1]):
        total += a[:, k]
    return total


def _med5(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Exact median of five arrays, elementwise (a selection network; any NaN input gives NaN)."""
    mn, mx = np.minimum, np.maximum
    lo1, hi1 = mn(a, b), mx(a, b)  # sort (p0, p1)
    lo2, hi2 = mn(d, e), mx(d, e)  # sort (p3, p4)
    mx(lo1, lo2, out=lo2)  # p3 = max(p0, p3): p0 is out (it is below three others)
    mn(hi1, hi2, out=hi1)  # p1 = min(p1, p4): p4 is out
    mn(hi1, c, out=lo1)  # sort (p1, p2)
    mx(hi1, c, out=hi1)
    mn(hi1, lo2, out=hi1)  # p2 = min(p2, p3)
    mx(lo1, hi1, out=hi1)  # p2 = max(p1, p2): the median
    return hi1


def _median_general(a: np.ndarray) -> np.ndarray:
    srt = np.sort(a, axis=-1)
    k = (~np.isnan(srt)).sum(axis=-1)
    lo = np.maximum((k - 1) // 2, 0)[..., None]
    hi = np.minimum(k // 2, a.shape[-1] - 1)[..., None]
    return ((np.take_along_axis(srt, lo, -1) + np.take_along_axis(srt, hi, -1)) / 2.0)[..., 0]


def _median_last(a: np.ndarray) -> np.ndarray:
    """NaN-ignoring median along the last axis (NaN when no finite value)."""
    if a.shape[-1] != 5 or a.size == 0:
        return _median_general(a)
    out = _med5(a[..., 0], a[..., 1], a[..., 2], a[..., 3], a[..., 4])
    bad = np.isnan(out)
    if bad.any():  # rows with a missing value: the NaN-aware path (exact same arithmetic for full rows)
        out[bad] = _median_general(a[bad])
    return out


def _median_cols(cols: list[np.ndarray]) -> np.ndarray:
    """Elementwise NaN-ignoring median of same-shaped arrays (the columns of a window)."""
    if len(cols) != 5:
        return _median_general(np.stack(cols, axis=-1))
    out = _med5(*cols)
    bad = np.isnan(out)
    if bad.any():
        out[bad] = _median_general(np.stack([c[bad] for c in cols], axis=-1))
    return out


def _baseline(
    med: np.ndarray, spread: np.ndarray, mean: np.ndarray | None, cnt: np.ndarray, min_history: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Baseline from windows of previous block statistics (..., m): center (median of block medians),
    scale (within-block spread combined with between-block spread), mean level (median of block means,
    when `mean` is given), ok (enough history)."""
    m = med.shape[-1]
    med_cols = [med[..., k] for k in range(m)]
    center = _median_cols(med_cols)
    within = _median_cols([spread[..., k] for k in range(m)])
    between = _median_cols([np.abs(c - center) for c in med_cols])
    np.nan_to_num(within, copy=False, nan=0.0)
    np.nan_to_num(between, copy=False, nan=0.0)
    between *= _MAD
    scale = np.sqrt(within * within + between * between)
    scale = np.maximum(np.maximum(scale, 1e-9 * np.abs(center)), 1e-12)
    level = _median_cols([mean[..., k] for k in range(m)]) if mean is not None else None
    ok = (_window_total(cnt) >= min_history) & ~np.isnan(center)
    return center, scale, level, ok


def _window_total(cnt: np.ndarray) -> np.ndarray:
    """Sum over the last axis of integer counts (exact in any order)."""
    if cnt.ndim == 3 and cnt.shape[-1] > 1 and cnt.base is not None:
        c = cnt[..., 0].astype(np.int64)
        for k in range(1, cnt.shape[-1]):
            c += cnt[..., k]
        return c
    return cnt.sum(axis=-1)


def _median_list(values: list[float]) -> float:
    """Median of a non-empty list of floats, same arithmetic as `_median_last`."""
    v = sorted(values)
    k = len(v)
    return (v[(k - 1) // 2] + v[k // 2]) / 2.0


def _cusum(z: np.ndarray, kref: float, clip: float, sign: float) -> np.ndarray:
    """One-sided CUSUM of clipped z-scores (sign +1: upward, -1: downward); NaN steps add nothing."""
    inc = np.clip(z, -clip, clip)
    if sign < 0:
        np.negative(inc, out=inc)
    inc -= kref
    np.copyto(inc, 0.0, where=np.isnan(inc))
    c = np.cumsum(inc)
    low = np.minimum.accumulate(c)
    np.minimum(low, 0.0, out=low)
    c -= low
    return c


def _count_last(flags: np.ndarray, n: int) -> np.ndarray:
    """How many of the last n rows (including this one) are flagged."""
    cs = np.cumsum(flags, dtype=np.int64)
    out = cs.copy()
    out[n:] -= cs[:-n]
    return out


def _recent_median(x: np.ndarray, n: int) -> np.ndarray:
    """Median of the finite values among the last n rows; NaN unless at least half of them are finite."""
    pad = np.concatenate([np.full(n - 1, np.nan), x])
    win = sliding_window_view(pad, n)
    med = _median_last(win)
    enough = (~np.isnan(win)).sum(axis=1) >= (n + 1) // 2
    return np.where(enough, med, np.nan)


def _early_level(x: np.ndarray, count: int) -> tuple[float, int]:
    """Median of the first `count` finite values and the row of the last of them (nan, -1 if too few)."""
    idx = np.flatnonzero(~np.isnan(x))[:count]
    if idx.size < count:
        return math.nan, -1
    return _median_list([float(v) for v in x[idx]]), int(idx[-1])


# ----------------------------------------------------------------------------------------------------------
# Messages
# ----------------------------------------------------------------------------------------------------------
def _fmt(v: float | None) -> str:
    return "n/a" if v is None or v != v else f"{v:.4g}"


_ZSCORE_ADVICE = "usually noise; look at the metric's chart if it repeats"


def _zscore_message(metric: str, value: float | None, score: float) -> str:
    # Past ~1000 spreads the number says nothing more (the recent spread was ~0); keep the line readable.
    size = f"{abs(score):.1f}" if abs(score) < 1000 else "over 1000"
    return f"{metric} = {value:.4g} is {size} spreads {'above' if score >= 0 else 'below'} its recent level"


def _describe(detector: str, metric: str, level: int, value: float | None, score: float) -> tuple[str, str]:
    """(message, recommendation) in plain words for one episode."""
    v = _fmt(value)
    up = score >= 0
    if detector == "nonfinite":
        return (
            f"{metric} is NaN/Inf/None where a value was expected",
            "check the reward functions and the loss for NaN (division by zero, log of 0, empty groups); "
            "lower the learning rate or enable gradient clipping if the loss diverged",
        )
    if detector == "zscore":
        return _zscore_message(metric, value, score), _ZSCORE_ADVICE
    if detector == "kl_spike":
        return (
            f"isolated KL spike: kl = {v}, {score:.0f}x its typical level",
            "single spikes are common on small models; watch whether it persists",
        )
    if detector == "kl_runaway":
        return (
            f"KL is running away: kl = {v}, held {score:.0f}x above its baseline",
            "lower the learning rate, raise the KL coefficient (beta) or check the reference model; "
            "roll back to the last good checkpoint if it keeps rising",
        )
    if detector == "entropy_collapse":
        return (
            f"entropy collapsed: {v}, {100 * score:.0f}% below its early level",
            "the policy became (near) deterministic: raise the temperature or an entropy bonus, lower the "
            "learning rate, check for reward hacking",
        )
    if detector == "reward_shift":
        if up:
            return (
                f"{metric} is climbing abnormally fast ({v})",
                "inspect sample completions for reward hacking; check the reward function and KL beta",
            )
        return (
            f"{metric} dropped abruptly ({v})",
            "check the reward function/model for errors, NaN or noise; check the learning rate",
        )
    if detector == "reward_scale":
        return (
            f"reward scale jumped: {metric} = {v} ({_fmt(score)}x / spreads from its baseline)",
            "check reward normalisation and the reward model output scale",
        )
    if detector == "reward_mismatch":
        return (
            f"reward no longer equals the sum of the per-function rewards (difference {_fmt(score)})",
            "a reward function returned NaN/None for part of the batch and TRL dropped it: fix the reward function",
        )
    if detector == "reward_hacking":
        return (
            f"reward hacking signature: reward climbing fast ({v}) with lengths at the limit, entropy "
            f"falling or KL rising",
            "read sample completions; add length penalties, raise KL beta, fix the exploitable reward",
        )
    if detector == "no_learning_signal":
        if metric == "frac_reward_zero_std":
            return (
                f"no learning signal: {v} of prompt groups have identical rewards",
                "raise temperature / num_generations, check the reward function is not constant or NaN",
            )
        return (
            f"no learning signal: {metric} collapsed to {v}",
            "rewards no longer differ within groups: check the reward function, temperature and data",
        )
    if detector == "policy_shift":
        return (
            f"{metric} rose abruptly ({v}): the policy changed suddenly",
            "check the learning rate and the last update; compare sample completions",
        )
    if detector == "grad_norm_shift":
        return (
            f"grad_norm held far above its baseline ({v}, {score:.1f}x)",
            "lower the learning rate or tighten max_grad_norm; check for bad batches",
        )
    if detector == "grad_norm_spike":
        return (f"grad_norm spike ({v})", "isolated spikes are common; watch whether they repeat")
    if detector == "loss_shift":
        return (
            f"{metric} held far from its baseline ({v})",
            "check the learning rate, the data and the reward/preference labels",
        )
    if detector == "loss_spike":
        return (f"{metric} spike ({v})", "isolated spikes are common; watch whether they repeat")
    if detector == "value_loss_blowup":
        return (
            f"value loss blew up ({v}, {score:.0f}x its level)",
            "lower the value learning rate / vf_coef, clip values, check reward scale",
        )
    if detector == "clip_ratio":
        return (
            f"clip fraction too high ({v}) while training off-policy",
            "updates are too large: lower the learning rate or num_iterations / ppo_epochs",
        )
    if detector == "lr_jump":
        return (
            f"learning rate jumped {score:.0f}x in one step ({v})",
            "check the scheduler and any manual learning-rate changes",
        )
    if detector == "dpo_accuracy_drop":
        return (
            f"DPO accuracy fell from its plateau ({v})",
            "check the preference labels (chosen/rejected swapped?) and the data pipeline",
        )
    if detector == "dpo_accuracy_pinned":
        return ("DPO accuracy pinned at 1.0 early", "pairs may be too easy or leaked; check the dataset and beta")
    if detector == "dpo_margin_explosion":
        return (f"DPO margins exploding ({v})", "raise beta or lower the learning rate; check for degenerate pairs")
    if detector == "dpo_logps_falling":
        return (
            "chosen and rejected log-probs are both falling",
            "likelihood displacement: lower the learning rate, add an SFT term (rpo_alpha) or raise beta",
        )
    if detector == "dpo_loss":
        return (
            f"DPO loss back above ln 2 ({v}): the policy now prefers rejected answers",
            "check the preference labels and the learning rate",
        )
    if detector == "memory_leak":
        return (
            f"{metric} is growing steadily (+{100 * score:.0f}% over the leak window)",
            "look for tensors kept across steps (logging, lists of losses), caches, or growing batches",
        )
    if detector == "memory_near_oom":
        return (
            f"device memory at {100 * (value or 0):.0f}% of capacity: close to out-of-memory",
            "lower batch size / max_completion_length, enable gradient checkpointing",
        )
    if detector == "step_time_regression":
        return (
            f"step time regressed ({v}s, {score:.1f}x its baseline)",
            "check for longer completions, throttling, memory pressure or other jobs on the machine",
        )
    return (f"{detector} on {metric} ({v})", "inspect the metric")


# ----------------------------------------------------------------------------------------------------------
# Episodes
# ----------------------------------------------------------------------------------------------------------
def _finite_or_none(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _new_episode(
    detector: str,
    metric: str,
    step: int,
    level: int,
    value: float | None,
    score: float,
    sev_steps: dict[str, int],
    msg_level: int,
    msg_value: float | None,
    msg_score: float,
) -> dict:
    message, recommendation = _describe(detector, metric, msg_level, msg_value, msg_score)
    return {
        "step": step,
        "metric": metric,
        "detector": detector,
        "severity": SEVERITIES[level - 1],
        "value": value,
        "message": message,
        "recommendation": recommendation,
        "first_step": step,
        "peak_step": step,
        "peak_value": value,
        "last_step": step,
        "count": 1,
        "ongoing": True,
        "severity_steps": sev_steps,
    }


class _Episodes:
    """Streaming episode builder: flagged rows (detector, metric, step, level, value, score) become episodes.

    Flags of one detector+metric at most `cooldown` steps apart belong to one episode; its severity is the
    highest level seen, `severity_steps` the first step at which it was at each level or above, the message
    is written when it reaches its final severity, the peak is the first step of largest |score|.
    `_Spans` + `_episode_dicts` compute exactly the same from whole arrays.
    """

    def __init__(self, cooldown: int):
        self.cooldown = cooldown
        self.open: dict[tuple[str, str], dict] = {}
        self.all: list[dict] = []

    def flag(self, detector: str, metric: str, step: int, level: int, value: float, score: float) -> None:
        key = (detector, metric)
        ep = self.open.get(key)
        score = score if score == score else 0.0
        value = _finite_or_none(value)
        if ep is not None and step - ep["last_step"] <= self.cooldown:
            if step != ep["last_step"]:  # a step re-delivered (streaming) counts once
                ep["last_step"] = step
                ep["count"] += 1
            if abs(score) > ep["_peak"]:
                ep["_peak"] = abs(score)
                ep["peak_step"] = step
                ep["peak_value"] = value
            old = _LEVEL[ep["severity"]]
            if level > old:
                ep["severity"] = SEVERITIES[level - 1]
                for lv in range(old + 1, level + 1):
                    ep["severity_steps"][SEVERITIES[lv - 1]] = step
                ep["message"], ep["recommendation"] = _describe(detector, metric, level, value, score)
            return
        ep = _new_episode(
            detector,
            metric,
            step,
            level,
            value,
            score,
            {SEVERITIES[lv]: step for lv in range(level)},
            level,
            value,
            score,
        )
        ep["_peak"] = abs(score)
        self.open[key] = ep
        self.all.append(ep)

    def finish(self, latest_step: int | None) -> list[dict]:
        out = []
        for ep in self.all:
            e = {k: v for k, v in ep.items() if k != "_peak"}
            e["severity_steps"] = dict(ep["severity_steps"])
            e["ongoing"] = latest_step is not None and latest_step - ep["last_step"] <= self.cooldown
            out.append(e)
        out.sort(key=_EPISODE_ORDER)
        return out


class _Spans:
    """Episodes of one detector+metric as arrays (indices into its flagged rows), before any dict is built."""

    __slots__ = ("starts", "last", "sev", "peak", "first_at")

    def __init__(self, st: np.ndarray, lev: np.ndarray, score: np.ndarray, cooldown: int):
        n = st.shape[0]
        starts = np.concatenate([[0], np.flatnonzero(np.diff(st) > cooldown) + 1])
        ends = np.concatenate([starts[1:], [n]])
        lev = lev.astype(np.int64)
        ar = np.arange(n)
        big = n + 1
        mag = np.abs(score)
        mx = np.maximum.reduceat(mag, starts)
        self.starts = starts
        self.last = ends - 1
        self.sev = np.maximum.reduceat(lev, starts)
        self.peak = np.minimum.reduceat(np.where(mag == np.repeat(mx, ends - starts), ar, big), starts)
        # first row at each level or above (only needed when a level above "low" occurs)
        self.first_at = (
            None
            if self.sev.max() == 1
            else [np.minimum.reduceat(np.where(lev >= L, ar, big), starts) for L in (1, 2, 3, 4)]
        )


def _episode_dicts(
    detector: str,
    metric: str,
    sp: _Spans,
    st: np.ndarray,
    score: np.ndarray,
    value: np.ndarray,
    cooldown: int,
    latest: int,
    which: np.ndarray | None = None,
) -> list[dict]:
    """The episode dicts of `sp` (all, or the episode indices `which`); same result as `_Episodes`."""
    idx = np.arange(sp.starts.shape[0]) if which is None else which
    if idx.size == 0:
        return []
    s0s, s1s, pks = sp.starts[idx], sp.last[idx], sp.peak[idx]
    counts = (s1s - s0s + 1).tolist()
    first, last, peak = st[s0s].tolist(), st[s1s].tolist(), st[pks].tolist()

    def vals(rows: np.ndarray) -> list:
        v = value[rows]
        return [None if x != x else x for x in np.where(np.isfinite(v), v, np.nan).tolist()]

    v0, vpk, sc0 = vals(s0s), vals(pks), score[s0s].tolist()
    out: list[dict] = []
    if sp.first_at is None and detector == "zscore":  # many low episodes: keep this loop lean
        for step, v, sc, pstep, pv, lstep, cnt in zip(first, v0, sc0, peak, vpk, last, counts):
            out.append(
                {
                    "step": step,
                    "metric": metric,
                    "detector": detector,
                    "severity": "low",
                    "value": v,
                    "message": _zscore_message(metric, v, sc),
                    "recommendation": _ZSCORE_ADVICE,
                    "first_step": step,
                    "peak_step": pstep,
                    "peak_value": pv,
                    "last_step": lstep,
                    "count": cnt,
                    "ongoing": latest - lstep <= cooldown,
                    "severity_steps": {"low": step},
                }
            )
        return out
    sevs = sp.sev[idx].tolist()
    # (levels an episode never reached hold a sentinel past the end: clipped here, never read below)
    fa = [st[np.minimum(f[idx], st.shape[0] - 1)].tolist() for f in sp.first_at] if sp.first_at is not None else None
    at_rows = np.choose(sp.sev[idx] - 1, [f[idx] for f in sp.first_at]) if sp.first_at is not None else s0s
    v_at, sc_at = vals(at_rows), score[at_rows].tolist()
    for e, (step, sv, pstep, pv, lstep, cnt) in enumerate(zip(first, sevs, peak, vpk, last, counts)):
        sev_steps = {SEVERITIES[L]: fa[L][e] for L in range(sv)} if fa is not None else {"low": step}
        ep = _new_episode(detector, metric, step, sv, v0[e], sc0[e], sev_steps, sv, v_at[e], sc_at[e])
        ep["peak_step"] = pstep
        ep["peak_value"] = pv
        ep["last_step"] = lstep
        ep["count"] = cnt
        ep["ongoing"] = latest - lstep <= cooldown
        out.append(ep)
    return out


# ----------------------------------------------------------------------------------------------------------
# Run context
# ----------------------------------------------------------------------------------------------------------
def _is_dpo(meta: Mapping[str, Any], names: Iterable[str]) -> bool:
    trainer = str(meta.get("trainer") or "")
    if "DPO" in trainer:
        return True
    names = set(names)
    return "rewards/accuracies" in names and "logps/chosen" in names


def _is_off_policy(meta: Mapping[str, Any]) -> bool:
    args = meta.get("args") or {}
    trainer = str(meta.get("trainer") or "")
    try:
        iters = int(args.get("num_iterations", 1) or 1)
        epochs = int(args.get("num_ppo_epochs", args.get("ppo_epochs", 1)) or 1)
    except (TypeError, ValueError, AttributeError):
        iters = epochs = 1
    return iters > 1 or epochs > 1 or trainer.startswith("PPO")


def _max_completion_length(meta: Mapping[str, Any]) -> float | None:
    args = meta.get("args") or {}
    try:
        v = float(args.get("max_completion_length"))
    except (TypeError, ValueError, AttributeError):
        return None
    return v if v > 0 else None


def _aliases(names: Iterable[str]) -> set[str]:
    """Trainer keys already represented by a canonical name (skipped by the generic z-score)."""
    names = set(names)
    out = set()
    for canonical, sources in _CANONICAL_SOURCES.items():
        if canonical in names:
            for src in sources:
                if src in names:
                    out.add(src)
                    break
    return out


def _z_floor(names: list[str], th: Thresholds) -> np.ndarray:
    """Smallest scale of the generic z-score per metric: 0..1 fractions move in coarse steps."""
    return np.array([th.fraction_floor if n in _FRACTION_METRICS or _is_fraction_name(n) else 0.0 for n in names])


def _is_fraction_name(name: str) -> bool:
    """Clip fractions of every trainer family are 0..1 shares that move in coarse steps; a constant 0 with one
    tiny blip must not read as billions of spreads."""
    return name.startswith(
        ("clip_ratio/", "policy/clipfrac", "ppo/policy/clipfrac", "ppo/val/clipfrac", "val/clipfrac")
    ) or name.endswith("clipped_ratio")


def _generic(name: str, aliases: set[str]) -> bool:
    return not (name in _BOOKKEEPING or name.startswith(_SYSTEM_PREFIXES) or name in aliases)


def generic_metrics(names: Iterable[str]) -> set[str]:
    """The metrics the generic z-score watches (not counters, schedules, system series or canonical copies)."""
    names = list(names)
    aliases = _aliases(names)
    return {n for n in names if _generic(n, aliases)}


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
    med, spread, mean, cnt = _block_stats(x)
    center, scale, _, ok = _baseline(med[None, :], spread[None, :], mean[None, :], cnt[None, :], int(th.min_history))
    c, s = float(center[0]), float(scale[0])
    if not bool(ok[0]) or not (math.isfinite(c) and math.isfinite(s)):
        return None
    if metric is not None:
        s = max(s, float(_z_floor([metric], th)[0]))
    z = float(th.anomaly_threshold)
    return c - z * s, c + z * s


class _Plan:
    """Which specific detector watches which metric, decided from the metric names and run meta."""

    def __init__(self, names: Iterable[str], meta: Mapping[str, Any], th: Thresholds):
        names = set(names)
        self.dpo = _is_dpo(meta, names)
        self.off_policy = _is_off_policy(meta)
        self.max_len = _max_completion_length(meta)
        self.reward_parts = sorted(n for n in names if _REWARD_PART.match(n)) if not self.dpo else []
        self.memory = [n for n in ("memory/rss_mb", "memory/gpu_mb") if n in names]
        self.step_time = [n for n in ("step_time", "time/step_s") if n in names]
        self.reward_metrics = [] if self.dpo else [n for n in ["reward", *self.reward_parts] if n in names]


# ----------------------------------------------------------------------------------------------------------
# Batch
# ----------------------------------------------------------------------------------------------------------
class _Series:
    """Row-level views of one metric's baseline (batch path)."""

    def __init__(
        self,
        xpad: np.ndarray,
        center: np.ndarray,
        scale: np.ndarray,
        level: np.ndarray,
        ok: np.ndarray,
        block: int,
        n: int,
        med_blocks: np.ndarray,
    ):
        self.xpad = xpad  # the values padded with NaN to whole blocks
        self.x = xpad[:n]
        self._c, self._s, self._l, self._ok = center, scale, level, ok
        self.block = block
        self.n = n
        self.med_blocks = med_blocks
        self._cache: dict[str, np.ndarray] = {}

    def _rows(self, arr: np.ndarray) -> np.ndarray:
        return np.repeat(arr, self.block)[: self.n]

    @property
    def center(self) -> np.ndarray:
        if "c" not in self._cache:
            self._cache["c"] = self._rows(self._c)
        return self._cache["c"]

    @property
    def scale(self) -> np.ndarray:
        if "s" not in self._cache:
            self._cache["s"] = self._rows(self._s)
        return self._cache["s"]

    @property
    def level(self) -> np.ndarray:
        if "l" not in self._cache:
            self._cache["l"] = self._rows(self._l)
        return self._cache["l"]

    @property
    def ok(self) -> np.ndarray:
        if "ok" not in self._cache:
            self._cache["ok"] = self._rows(self._ok) & ~np.isnan(self.x)
        return self._cache["ok"]

    @property
    def z(self) -> np.ndarray:
        if "z" not in self._cache:
            nb = self._c.shape[0]
            with np.errstate(invalid="ignore"):
                z = ((self.xpad.reshape(nb, self.block) - self._c[:, None]) / self._s[:, None]).reshape(-1)[: self.n]
            z[~self.ok] = np.nan
            self._cache["z"] = z
        return self._cache["z"]

    def recent(self, n: int) -> np.ndarray:
        key = f"r{n}"
        if key not in self._cache:
            self._cache[key] = _recent_median(self.x, n)
        return self._cache[key]


def _as_floats(values: Any) -> np.ndarray:
    """A column as float64 (None and non-numbers become NaN)."""
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        out = []
        for v in values:
            try:
                out.append(math.nan if v is None else float(v))
            except (TypeError, ValueError):
                out.append(math.nan)
        return np.asarray(out, dtype=np.float64)


def _unpack(run_or_arrays: Any, context: Mapping[str, Any] | None):
    if hasattr(run_or_arrays, "metrics") and hasattr(run_or_arrays, "steps"):
        run = run_or_arrays
        steps = np.asarray(run.steps, dtype=np.int64)
        metrics = run.metrics()
        logged = run.logged_masks()
        meta = dict(getattr(run, "meta", {}) or {})
    else:
        parts = tuple(run_or_arrays)
        steps = np.asarray(parts[0], dtype=np.int64)
        metrics = parts[1]
        logged = parts[2] if len(parts) > 2 else None
        meta = dict(parts[3] or {}) if len(parts) > 3 and parts[3] else {}
    if context:
        meta.update({k: v for k, v in context.items() if k in ("trainer", "args")})
        if isinstance(context.get("meta"), Mapping):
            meta.update(context["meta"])
    return steps, metrics, logged, meta


_CHUNK_VALUES = 1 << 19  # values per chunk of metrics: bounds the temporaries of one pass (4 MB per array)
_BLOCK_MEDIANS = frozenset({"memory/rss_mb", "memory/gpu_mb"})  # series whose block medians a detector reads


class _Cached:
    """One metric's block-level baselines, valid while its first `rows` values are unchanged."""

    __slots__ = ("rows", "checksum", "center", "scale", "ok", "level", "med")

    def __init__(
        self,
        rows: int,
        checksum: int,
        center: np.ndarray,
        scale: np.ndarray,
        ok: np.ndarray,
        level: np.ndarray | None,
        med: np.ndarray | None,
    ):
        self.rows, self.checksum = rows, checksum
        self.center, self.scale, self.ok, self.level, self.med = center, scale, ok, level, med


class DetectionCache:
    """Threshold-independent statistics of one growing history, kept between `detect` calls.

    Baselines do not depend on the alarm thresholds, and the baseline of a block depends only on the blocks
    before it, so re-evaluating after a threshold change (or after a few new steps) only recomputes the blocks
    at the end. Meant for one append-only history (the monitor keeps one per run); every call still checks the
    steps and a checksum of each metric's earlier rows, and recomputes whatever changed (another run, a thinned
    history, other block settings), so a wrong reuse costs time, never correctness.
    """

    def __init__(self) -> None:
        self.config: tuple | None = None
        self.steps = np.empty(0, dtype=np.int64)
        self.metrics: dict[str, _Cached] = {}
        self.specific: tuple | None = None  # (signature, flags) of the domain detectors' last pass
        self.reused_blocks = 0  # blocks of baselines reused by the last call (for tests and benchmarks)

    def _start(self, steps: np.ndarray, config: tuple) -> bool:
        """Whether anything cached can hold for `steps` under `config`; forgets everything otherwise."""
        k = self.steps.shape[0]
        if config == self.config and k <= steps.shape[0] and np.array_equal(self.steps, steps[:k]):
            return True
        self.config, self.metrics, self.specific = config, {}, None
        return False


def _checksum(rows: np.ndarray) -> np.ndarray:
    """Per row of a (k, r) float array: wrapping sum of the bit patterns (exact, NaN-safe, one pass)."""
    return rows.view(np.int64).sum(axis=1)


def detect(
    run_or_arrays: Any,
    thresholds: Thresholds | None = None,
    context: Mapping[str, Any] | None = None,
    *,
    cache: DetectionCache | None = None,
) -> list[dict]:
    """All anomaly episodes of a whole history, vectorised.

    `run_or_arrays`: a RunHistory, or (steps, {metric: values}, {metric: logged mask} | None, meta | None).
    `context`: optional {"trainer": ..., "args": {...}} merged into the run's meta.
    `cache`: a DetectionCache kept for this history makes the next call recompute only what changed.
    Returns episodes sorted by first step (see module docs for the fields).
    """
    return evaluate(run_or_arrays, thresholds, context, cache=cache)[0]


def evaluate(
    run_or_arrays: Any,
    thresholds: Thresholds | None = None,
    context: Mapping[str, Any] | None = None,
    *,
    cache: DetectionCache | None = None,
    keep_low: int | None = None,
    keep_other: int | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """`detect` for a monitor: (episodes, count of episodes per severity).

    With `keep_low`/`keep_other`, only the newest that many low / medium-and-above episodes (and every ongoing
    one) are built as dicts — a long noisy history has tens of thousands of low z-score blips — while the
    counts still cover all of them.
    """
    th = thresholds or Thresholds()
    steps, metrics, logged, meta = _unpack(run_or_arrays, context)
    n = int(steps.shape[0])
    names = [k for k, v in metrics.items() if np.shape(v) == (n,)] if n else []
    if not names:
        return [], {}
    muted = set(th.muted)
    B = max(2, int(th.block_steps))
    m = max(1, int(th.baseline_blocks))
    nb = -(-n // B)
    M = len(names)
    cache = cache if cache is not None else DetectionCache()
    reusing = cache._start(steps, (B, m, int(th.min_history)))
    frozen = (n - 1) // B  # blocks wholly before the newest row (which may still be merged into)
    # Grace period: no alarms in the first grace_steps steps except non-finite values.
    in_grace = steps < int(steps[0]) + int(th.grace_steps)
    flagged: list[tuple] = []  # (detector, metric, rows, level per row, score, value) -- sparse rows
    dense: list[tuple] = []  # (detector, metric, level for every row, score, value)
    base: dict[str, tuple] = {}  # name -> (center, scale, ok, level, med, xpad) at block level
    fresh: dict[str, _Cached] = {}
    data_sig: list[int] = []  # per metric, a checksum of all its rows
    reused = 0
    aliases = _aliases(names)
    floors = _z_floor(names, th)
    need_x = _series_wanted(names)

    chunk = max(1, _CHUNK_VALUES // (nb * B))
    for c0 in range(0, M, chunk):
        idx = list(range(c0, min(M, c0 + chunk)))
        k = len(idx)
        X = np.full((k, nb * B), np.nan)
        for j, i in enumerate(idx):
            X[j, :n] = _as_floats(metrics[names[i]])
        finite = np.isfinite(X[:, :n])
        for j in np.flatnonzero(~finite.all(axis=1)).tolist():
            # Non-finite values where the trainer logged the key (or +-Inf when no logged mask is known).
            name, x, bad = names[idx[j]], X[j, :n], ~finite[j]
            if logged is not None and name in logged:
                bad &= np.asarray(logged[name], dtype=bool)
            else:
                bad &= np.isinf(x)
            if bad.any() and "nonfinite" not in muted:
                dense.append(("nonfinite", name, np.where(bad, 4, 0).astype(np.int8), np.zeros(n), x.copy()))
            x[~finite[j]] = np.nan
        del finite

        # Which cached baselines still hold, per metric: the rows they were built from are unchanged.
        sums = _checksum(X[:, : frozen * B]) if reusing and frozen else None
        old: list[_Cached | None] = []
        for j, i in enumerate(idx):
            c = cache.metrics.get(names[i]) if reusing else None
            if c is not None and c.rows <= frozen * B:
                same_rows = sums is not None and c.rows == frozen * B
                if int(sums[j] if same_rows else _checksum(X[j : j + 1, : c.rows])[0]) != c.checksum:
                    c = None
            else:
                c = None
            old.append(c)
        start = min((c.center.shape[0] if c is not None else 0) for c in old)
        reused += start * k
        s0 = max(0, start - m)  # the baselines from `start` on need the m blocks before it
        blocks = X[:, s0 * B :].reshape(k * (nb - s0), B)
        frac = [j for j, i in enumerate(idx) if names[i] in _FRACTION_METRICS]
        med, spread, _, cnt = _block_stats(blocks, with_mean=False)
        med, spread, cnt = med.reshape(k, nb - s0), spread.reshape(k, nb - s0), cnt.reshape(k, nb - s0)
        del blocks

        def windows(a: np.ndarray, fill: float, start: int = start, s0: int = s0) -> np.ndarray:
            pad = np.concatenate([np.full((a.shape[0], m - (start - s0)), fill, dtype=a.dtype), a], axis=1)
            return sliding_window_view(pad, m, axis=1)[:, : nb - start]

        center, scale, _, ok = _baseline(
            windows(med, np.nan), windows(spread, np.nan), None, windows(cnt, 0), th.min_history
        )
        level = None
        if frac:  # block means only where a mean level is used (fractions), same kernel as streaming
            mean = _block_stats(X[frac, s0 * B :].reshape(len(frac) * (nb - s0), B))[2].reshape(len(frac), -1)
            level = _median_last(windows(mean, np.nan))
        if start:
            center = np.concatenate([np.stack([c.center[:start] for c in old]), center], axis=1)
            scale = np.concatenate([np.stack([c.scale[:start] for c in old]), scale], axis=1)
            ok = np.concatenate([np.stack([c.ok[:start] for c in old]), ok], axis=1)
            if level is not None:
                level = np.concatenate([np.stack([old[j].level[:start] for j in frac]), level], axis=1)

        # Generic robust z-score (low): |x - center| > threshold * scale, z computed for the hits only.
        gen = [j for j, i in enumerate(idx) if _generic(names[i], aliases)] if "zscore" not in muted else []
        if gen:
            zscale = np.maximum(scale[gen], floors[[idx[j] for j in gen]][:, None])
            limit = th.anomaly_threshold * zscale
            limit[~ok[gen]] = np.inf
            with np.errstate(invalid="ignore"):
                dev = np.subtract(X[gen].reshape(len(gen), nb, B), center[gen][:, :, None])
                np.abs(dev, out=dev)
                hit = dev > limit[:, :, None]
            del dev
            g_arr, r_arr = np.nonzero(hit.reshape(len(gen), nb * B))  # padding rows are NaN: never hit
            del hit
            bounds = np.searchsorted(g_arr, np.arange(len(gen) + 1))
            for q, j in enumerate(gen):
                rows = r_arr[bounds[q] : bounds[q + 1]]
                rows = rows[~in_grace[rows]]
                if rows.size:
                    blk = rows // B
                    x = X[j, rows]
                    z = (x - center[gen[q]][blk]) / zscale[q][blk]
                    flagged.append(("zscore", names[idx[j]], rows, np.ones(rows.size, dtype=np.int8), z, x))

        fsum = _checksum(X[:, : frozen * B]) if sums is None else sums
        data_sig.extend((fsum + _checksum(X[:, frozen * B : n])).tolist())  # every row (wrapping int64 sum)
        for j, i in enumerate(idx):
            name = names[i]
            lv = level[frac.index(j)] if j in frac else None
            md = None
            if name in _BLOCK_MEDIANS:
                md = med[j] if not s0 else np.concatenate([old[j].med[:s0], med[j]])
            fresh[name] = _Cached(frozen * B, int(fsum[j]), center[j], scale[j], ok[j], lv, md)
            if name in need_x:
                base[name] = (
                    center[j],
                    scale[j],
                    ok[j],
                    lv if lv is not None else np.full(nb, np.nan),
                    md,
                    X[j].copy(),
                )
        del X

    cache.metrics, cache.steps, cache.reused_blocks = fresh, np.array(steps), reused // max(M, 1)
    plan = _Plan(names, meta, th)
    # The domain detectors read every setting but the z-score's threshold: when only that changed (the +/- keys)
    # and no value did, their flags are the cached ones (same row count: `_start` checked the steps).
    signature = (
        dataclasses.replace(th, anomaly_threshold=0.0, muted=[]),
        tuple(names),
        plan.dpo,
        plan.off_policy,
        plan.max_len,
        tuple(data_sig),
        n,
    )
    if cache.specific is not None and cache.specific[0] == signature:
        specific = cache.specific[1]
    else:
        series = {name: _Series(xpad, c, s, lv, ok, B, n, md) for name, (c, s, ok, lv, md, xpad) in base.items()}
        specific = []
        for det, metric, lev, score in _specific(series, plan, th, n):
            if lev.any():
                value = series[metric].x if metric in series else np.full(n, np.nan)
                specific.append(_sparse(det, metric, lev, score, value, in_grace))
        cache.specific = (signature, specific)
        del series
    del base
    for det, metric, lev, score, value in dense:  # non-finite values
        flagged.append(_sparse(det, metric, lev, score, value, in_grace))
    flagged.extend(f for f in specific if f[0] not in muted and f[2].size)
    return _episodes(flagged, steps, th, keep_low, keep_other)


def _sparse(
    det: str, metric: str, lev: np.ndarray, score: np.ndarray, value: np.ndarray, in_grace: np.ndarray
) -> tuple:
    """(detector, metric, rows, level, score, value) of the flagged rows (none in the grace period, except
    non-finite values)."""
    if det != "nonfinite":
        lev = np.where(in_grace, 0, lev)
    rows = np.flatnonzero(lev)
    return det, metric, rows, lev[rows], score[rows], value[rows]


def _series_wanted(names: list[str]) -> set[str]:
    """Metrics a domain detector reads (their row-level series are built; the others stay block-level)."""
    fixed = {
        "kl",
        "entropy",
        "completion_length",
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "completions/clipped_ratio",
        "grad_norm",
        "loss",
        "policy_loss",
        "value_loss",
        "clip_ratio",
        "learning_rate",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "memory/gpu_frac",
        "step_time",
        "time/step_s",
        *_BLOCK_MEDIANS,
    }
    return {n for n in names if n in fixed or _REWARD_PART.match(n)}


def _episodes(
    flagged: list[tuple], steps: np.ndarray, th: Thresholds, keep_low: int | None, keep_other: int | None
) -> tuple[list[dict], dict[str, int]]:
    """Flagged rows -> episodes (only the newest kept ones built) and counts per severity."""
    latest, cooldown = int(steps[-1]), int(th.cooldown_steps)
    spans: list[tuple] = []
    for det, metric, rows, lev, score, value in flagged:
        if rows.size:
            st = steps[rows]
            score = np.nan_to_num(score, nan=0.0)
            spans.append((det, metric, _Spans(st, lev, score, cooldown), st, score, value))
    if not spans:
        return [], {}
    counts: dict[str, int] = {}
    for _d, _m, sp, *_ in spans:
        for L, c in zip(*np.unique(sp.sev, return_counts=True)):
            counts[SEVERITIES[L - 1]] = counts.get(SEVERITIES[L - 1], 0) + int(c)
    which: list[np.ndarray | None] = [None] * len(spans)
    if keep_low is not None or keep_other is not None:
        first_all = np.concatenate([st[sp.starts] for _d, _m, sp, st, *_ in spans])
        last_all = np.concatenate([st[sp.last] for _d, _m, sp, st, *_ in spans])
        low_all = np.concatenate([sp.sev == 1 for _d, _m, sp, *_ in spans])
        keep = latest - last_all <= cooldown  # ongoing episodes always stay
        order = np.lexsort((last_all, first_all))[::-1]  # newest first
        for is_low, limit in ((True, keep_low), (False, keep_other)):
            chosen = order[low_all[order] == is_low]
            keep[chosen if limit is None else chosen[: max(0, int(limit))]] = True
        sizes = [sp.starts.shape[0] for _d, _m, sp, *_ in spans]
        which = [np.flatnonzero(k) for k in np.split(keep, np.cumsum(sizes)[:-1])]
    out: list[dict] = []
    for (det, metric, sp, st, score, value), w in zip(spans, which):
        out.extend(_episode_dicts(det, metric, sp, st, score, value, cooldown, latest, w))
    out.sort(key=_EPISODE_ORDER)
    return out, counts


_EPISODE_ORDER = operator.itemgetter("step", "detector", "metric")
_ORDER = {name: i for i, name in enumerate(DETECTORS)}


def _specific(series: dict[str, _Series], plan: _Plan, th: Thresholds, n: int):
    """Yield (detector, metric, level int8 array, score array) for the domain detectors (batch)."""
    pn = int(th.persist_n)
    k = min(int(th.persist_k), pn)
    rn = int(th.recent_steps)
    s = series.get

    # KL: isolated spikes (low) vs. runaway (k of the last n steps far above the baseline).
    kl = s("kl")
    if kl is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.abs(kl.x - kl.center) / np.maximum(kl.scale, np.abs(kl.center))
        ratio[~kl.ok] = np.nan
        yield "kl_spike", "kl", np.where(ratio >= th.kl_spike_factor, 1, 0).astype(np.int8), ratio
        held = _count_last(ratio >= th.kl_runaway_factor, pn) >= k
        extreme = _count_last(ratio >= th.kl_runaway_high, pn) >= k
        lev = np.where(extreme, 3, np.where(held, 2, 0)).astype(np.int8)
        yield "kl_runaway", "kl", lev, ratio
        kl_held = held
    else:
        kl_held = np.zeros(n, dtype=bool)

    # Entropy collapse: fractional drop of the current level from the run's early level.
    ent = s("entropy")
    ent_drop = np.full(n, np.nan)
    if ent is not None:
        early, row = _early_level(ent.x, th.early_steps)
        lowest_drop = min(th.entropy_collapse_frac, th.hack_entropy_drop)
        # the recent median can only fall below a level some value fell below: skip the work otherwise
        if early > 0 and np.any(ent.x <= (1.0 - lowest_drop) * early):
            with np.errstate(invalid="ignore"):
                ent_drop = 1.0 - ent.recent(rn) / early
            ent_drop[: row + 1] = np.nan
            lev = np.where(
                ent_drop >= th.entropy_collapse_high, 3, np.where(ent_drop >= th.entropy_collapse_frac, 2, 0)
            ).astype(np.int8)
            yield "entropy_collapse", "entropy", lev, ent_drop
        up = _cusum(ent.z, th.rise_kref, th.shift_clip, 1.0)
        yield "policy_shift", "entropy", np.where(up >= th.rise_h, 2, 0).astype(np.int8), up

    length = s("completion_length")
    if length is not None:
        up = _cusum(length.z, th.rise_kref, th.shift_clip, 1.0)
        yield "policy_shift", "completion_length", np.where(up >= th.rise_h, 2, 0).astype(np.int8), up

    # Reward level shifts (not for DPO, whose "reward" is the margin: see the DPO detectors).
    reward_up = None
    for name in plan.reward_metrics:
        ser = s(name)
        up = _cusum(ser.z, th.rise_kref, th.shift_clip, 1.0)
        down = _cusum(ser.z, th.shift_kref, th.shift_clip, -1.0)
        lev = np.where((up >= th.rise_h) | (down >= th.shift_h), 2, 0).astype(np.int8)
        score = np.where(up >= down, up, -down)
        yield "reward_shift", name, lev, score
        if name == "reward":
            reward_up = up

    # Reward spread jumping up (noisy rewards); a drop is "no learning signal" below.
    if not plan.dpo and s("reward_std") is not None:
        up = _cusum(s("reward_std").z, th.rise_kref, th.shift_clip, 1.0)
        yield "reward_shift", "reward_std", np.where(up >= th.rise_h, 2, 0).astype(np.int8), up

    # Reward scale jumps.
    if not plan.dpo:
        rs = s("reward_std")
        if rs is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = np.where(rs.ok & (rs.center > 0), rs.x / rs.center, np.nan)
            yield "reward_scale", "reward_std", np.where(ratio >= th.reward_scale_factor, 3, 0).astype(np.int8), ratio
        rw = s("reward")
        if rw is not None:
            z = rw.z
            yield "reward_scale", "reward", np.where(np.abs(z) >= th.reward_scale_z, 3, 0).astype(np.int8), z

    # Reward identity: TRL's reward is the (weighted) sum of per-function means; NaN rewards break it.
    if plan.reward_parts and s("reward") is not None:
        rel, resid = _reward_residual(s("reward").x, [s(p).x for p in plan.reward_parts])
        armed_row = _armed_row(rel, th)
        if armed_row >= 0:
            lev = np.where(rel > th.reward_mismatch_tol, 3, 0).astype(np.int8)
            lev[: armed_row + 1] = 0
            yield "reward_mismatch", "reward", lev, resid

    # No learning signal.
    fz = s("frac_reward_zero_std")
    if fz is not None:
        with np.errstate(invalid="ignore"):
            zf = (fz.x - fz.level) / np.maximum(fz.scale, th.fraction_floor)
        zf[~fz.ok] = np.nan
        up = _cusum(zf, th.shift_kref, th.shift_clip, 1.0)
        cur = fz.recent(rn) if np.any(fz.x >= th.no_signal_frac) else np.full(n, np.nan)
        lev = np.where(cur >= th.no_signal_frac, 3, np.where(up >= th.shift_h, 2, 0)).astype(np.int8)
        yield "no_learning_signal", "frac_reward_zero_std", lev, np.where(cur >= th.no_signal_frac, cur, up)
    rs = s("reward_std")
    if rs is not None and not plan.dpo:
        down = _cusum(rs.z, th.shift_kref, th.shift_clip, -1.0)
        early, row = _early_level(rs.x, th.early_steps)
        collapsed = np.zeros(n, dtype=bool)
        if early > 0 and np.any(rs.x <= th.reward_std_collapse * early):
            cur = rs.recent(rn)
            collapsed = cur <= th.reward_std_collapse * early
            collapsed[: row + 1] = False
        lev = np.where(collapsed, 3, np.where(down >= th.shift_h, 2, 0)).astype(np.int8)
        yield "no_learning_signal", "reward_std", lev, -down

    # Reward hacking: a recent abnormal climb plus a hacking sign.
    if reward_up is not None:
        climb = _count_last(reward_up >= th.rise_h, max(1, int(th.hack_window))) > 0
        if climb.any():  # the signs only matter where the reward climbed
            sign = kl_held | (ent_drop >= th.hack_entropy_drop)
            cr = s("completions/clipped_ratio")
            if cr is not None:
                sign = sign | (cr.recent(rn) >= th.hack_clipped_ratio)
            if length is not None and plan.max_len:
                sign = sign | (length.recent(rn) >= th.hack_length_frac * plan.max_len)
            climb &= sign
        yield "reward_hacking", "reward", np.where(climb, 3, 0).astype(np.int8), reward_up

    # Loss and gradient spikes.
    gn = s("grad_norm")
    if gn is not None:
        z = gn.z
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(gn.ok & (gn.center > 0), gn.x / gn.center, np.nan)
        held = _count_last(ratio >= th.grad_norm_factor, pn) >= k
        yield "grad_norm_spike", "grad_norm", np.where(z >= th.spike_z, 1, 0).astype(np.int8), z
        yield "grad_norm_shift", "grad_norm", np.where(held, 2, 0).astype(np.int8), ratio
    for name in ("loss", "policy_loss"):
        ls = s(name)
        if ls is None:
            continue
        az = np.abs(ls.z)
        held = _count_last(az >= th.loss_persist_z, pn) >= k
        yield "loss_spike", name, np.where(az >= th.spike_z, 1, 0).astype(np.int8), ls.z
        yield "loss_shift", name, np.where(held, 2, 0).astype(np.int8), ls.z
    vl = s("value_loss")
    if vl is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(vl.ok & (vl.center > 0), vl.x / vl.center, np.nan)
        held = _count_last(ratio >= th.value_loss_factor, pn) >= max(1, k - 1)
        yield "value_loss_blowup", "value_loss", np.where(held, 3, 0).astype(np.int8), ratio

    # Clip fraction: only meaningful off-policy (GRPO with num_iterations=1 logs 0 by design).
    cl = s("clip_ratio")
    if cl is not None:
        armed = np.full(n, plan.off_policy)
        if not plan.off_policy:
            nz = np.flatnonzero(np.nan_to_num(cl.x) > 0)
            if nz.size:
                armed[nz[0] :] = True
        cur = cl.recent(rn) if np.any(cl.x >= th.clip_ratio_high) else np.full(n, np.nan)
        yield "clip_ratio", "clip_ratio", np.where(armed & (cur >= th.clip_ratio_high), 2, 0).astype(np.int8), cur

    # Learning-rate jumps.
    lr = s("learning_rate")
    if lr is not None:
        ratio = _lr_ratio(lr.x)
        yield "lr_jump", "learning_rate", np.where(ratio >= th.lr_jump_factor, 2, 0).astype(np.int8), ratio

    # DPO.
    if plan.dpo:
        acc = s("rewards/accuracies")
        if acc is not None:
            with np.errstate(invalid="ignore"):
                gap = acc.level - acc.x
                need = np.maximum(th.dpo_accuracy_drop, 4.0 * acc.scale)
            gap[~acc.ok] = np.nan
            big = gap >= 2 * need
            held = _count_last(gap >= need, 3) >= 2  # one dip of a small batch is not enough
            lev = np.where(_count_last(big, 3) >= 2, 3, np.where(big | held, 2, 0)).astype(np.int8)
            yield "dpo_accuracy_drop", "rewards/accuracies", lev, -gap
            ps = max(1, int(th.dpo_pinned_steps))
            pinned = _count_last(acc.x >= 0.999, ps) >= ps
            pinned[5 * ps :] = False
            yield "dpo_accuracy_pinned", "rewards/accuracies", np.where(pinned, 1, 0).astype(np.int8), acc.x
        mg = s("rewards/margins")
        if mg is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                r = (mg.x - mg.center) / np.maximum(mg.scale, np.abs(mg.center))
            r[~mg.ok] = np.nan
            held = _count_last(r >= th.dpo_margin_factor, pn) >= max(1, k - 1)
            yield "dpo_margin_explosion", "rewards/margins", np.where(held, 2, 0).astype(np.int8), r
        lc, lrj = s("logps/chosen"), s("logps/rejected")
        if lc is not None and lrj is not None:
            dc = _cusum(lc.z, th.shift_kref, th.shift_clip, -1.0)
            dr = _cusum(lrj.z, th.shift_kref, th.shift_clip, -1.0)
            both = (dc >= th.shift_h) & (dr >= th.shift_h)
            yield "dpo_logps_falling", "logps/chosen", np.where(both, 2, 0).astype(np.int8), np.minimum(dc, dr)
        ls = s("loss")
        if ls is not None:
            cur = ls.recent(rn)
            below = _count_last(cur < LN2 - th.dpo_loss_margin, n) > 0
            prev_below = np.concatenate([[False], below[:-1]])
            lev = np.where(prev_below & (cur > LN2 + th.dpo_loss_margin), 2, 0).astype(np.int8)
            yield "dpo_loss", "loss", lev, cur

    # Memory and step time.
    for name in plan.memory:
        ser = s(name)
        growth = _leak_growth(ser.med_blocks, int(th.memory_leak_blocks), B=ser.block, n=n)
        lev = np.where(growth >= 3 * th.memory_leak_frac, 3, np.where(growth >= th.memory_leak_frac, 2, 0)).astype(
            np.int8
        )
        yield "memory_leak", name, lev, growth
    gf = s("memory/gpu_frac")
    if gf is not None:
        lev = np.where(gf.x >= th.gpu_frac_critical, 4, np.where(gf.x >= th.gpu_frac_high, 3, 0)).astype(np.int8)
        yield "memory_near_oom", "memory/gpu_frac", lev, gf.x
    for name in plan.step_time:
        ser = s(name)
        pos = ser.ok & (ser.center > 0)
        if not pos.any() or not np.nanmax(ser.x) >= th.step_time_factor * np.min(ser.center[pos]):
            ratio = np.full(n, np.nan)  # no value reaches factor x the smallest baseline: nothing to flag
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = np.where(pos, ser.recent(rn) / ser.center, np.nan)
        yield "step_time_regression", name, np.where(ratio >= th.step_time_factor, 2, 0).astype(np.int8), ratio


def _reward_residual(reward: np.ndarray, parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    total = np.zeros_like(reward)
    mag = np.abs(reward)
    absum = np.zeros_like(reward)
    for p in parts:
        total = total + p
        absum = absum + np.abs(p)
    resid = reward - total
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.abs(resid) / np.maximum(np.maximum(mag, absum), 1e-12)
    return rel, resid


def _armed_row(rel: np.ndarray, th: Thresholds) -> int:
    """Row after which the reward identity is trusted: its first `early_steps` valid rows all hold exactly."""
    idx = np.flatnonzero(~np.isnan(rel))[: th.early_steps]
    if idx.size < th.early_steps or np.any(rel[idx] > th.reward_mismatch_tol * 0.1):
        return -1
    return int(idx[-1])


def _lr_ratio(x: np.ndarray) -> np.ndarray:
    """Ratio of each learning rate to the previous finite, positive one (NaN otherwise)."""
    n = x.shape[0]
    prev = np.full(n, np.nan)
    idx = np.flatnonzero(~np.isnan(x))
    if idx.size > 1:
        prev[idx[1:]] = x[idx[:-1]]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(prev > 0, x / prev, np.nan)


def _leak_growth(med_blocks: np.ndarray, L: int, B: int, n: int) -> np.ndarray:
    """Per row: fractional growth over the previous L block medians when it is steady (NaN otherwise)."""
    nb = med_blocks.shape[0]
    out_blocks = np.full(nb, np.nan)
    if nb > L and L >= 2:
        win = sliding_window_view(med_blocks, L)[: nb - L]  # blocks j-L .. j-1 for j = L .. nb-1
        out_blocks[L:] = _steady_growth(win)
    return np.repeat(out_blocks, B)[:n]


def _steady_growth(win: np.ndarray) -> np.ndarray:
    first, last = win[..., 0], win[..., -1]
    rises = (np.diff(win, axis=-1) >= 0).sum(axis=-1)
    steady = (rises >= 0.8 * (win.shape[-1] - 1)) & ~np.isnan(win).any(axis=-1) & (first > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        growth = (last - first) / first
    return np.where(steady, growth, np.nan)


# ----------------------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------------------
# Per-metric states take the row index with every update: skipped rows are filled as the batch path sees
# them (NaN / not flagged), and a second update for the same row replaces the first, so re-delivering a step
# with more keys is idempotent.
class _Cusum:
    __slots__ = ("c", "cmin", "prev", "row", "kref", "clip", "sign")

    def __init__(self, kref: float, clip: float, sign: float):
        self.c, self.cmin, self.prev, self.row = 0.0, math.inf, (0.0, math.inf), -1
        self.kref, self.clip, self.sign = kref, clip, sign

    def set(self, row: int, z: float) -> float:
        if row == self.row:
            self.c, self.cmin = self.prev
        else:
            self.prev, self.row = (self.c, self.cmin), row
        if z == z:
            inc = min(max(z, -self.clip), self.clip)
            if self.sign < 0:
                inc = -inc
            self.c = self.c + (inc - self.kref)
        if self.c < self.cmin:
            self.cmin = self.c
        return self.c - min(self.cmin, 0.0)


class _Count:
    __slots__ = ("q", "total", "row")

    def __init__(self, n: int):
        self.q: deque[bool] = deque([False] * n, maxlen=n)
        self.total, self.row = 0, -1

    def set(self, row: int, flag: bool) -> int:
        flag = bool(flag)
        if row == self.row:
            self.total += flag - self.q[-1]
            self.q[-1] = flag
            return self.total
        for _ in range(min(row - self.row - 1, len(self.q))):
            self.total -= self.q[0]
            self.q.append(False)
        self.total -= self.q[0]
        self.q.append(flag)
        self.total += flag
        self.row = row
        return self.total


class _Recent:
    """Median of the finite values among the last n rows (NaN unless at least half are finite)."""

    __slots__ = ("q", "n", "row", "need", "nans")

    def __init__(self, n: int):
        self.q: deque[float] = deque([math.nan] * n, maxlen=n)
        self.n, self.row, self.need, self.nans = n, -1, (n + 1) // 2, n

    def _push(self, x: float) -> None:
        q = self.q
        if q[0] != q[0]:
            self.nans -= 1
        q.append(x)
        if x != x:
            self.nans += 1

    def set(self, row: int, x: float) -> float:
        q = self.q
        if row == self.row:
            if q[-1] != q[-1]:
                self.nans -= 1
            q[-1] = x
            if x != x:
                self.nans += 1
        else:
            for _ in range(min(row - self.row - 1, self.n)):
                self._push(math.nan)
            self._push(x)
            self.row = row
        if self.nans:
            if self.n - self.nans < self.need:
                return math.nan
            v = sorted([u for u in q if u == u])
        else:
            v = sorted(q)
        k = len(v)
        return (v[(k - 1) // 2] + v[k // 2]) / 2.0


class _Early:
    __slots__ = ("vals", "count", "value", "done_row", "row")

    def __init__(self, count: int):
        self.vals: list[float] = []
        self.count, self.value, self.done_row, self.row = count, math.nan, -1, -1

    def known(self, row: int) -> bool:
        """Whether the early level was complete before `row`."""
        return 0 <= self.done_row < row

    def set(self, row: int, x: float) -> None:
        if self.done_row >= 0 or x != x or row == self.row:
            return
        self.row = row
        self.vals.append(x)
        if len(self.vals) == self.count:
            self.value = _median_list(self.vals)
            self.done_row = row


_NAN_INFO = (math.nan, math.nan, math.nan, math.nan, math.nan, False)
_EVENT_ORDER = operator.itemgetter(0, 1, 2)


class _RowInfo:
    """(value, z, center, scale, level, ok) of each metric in the current row, by name."""

    __slots__ = ("index", "rows")

    def __init__(self, index: dict, x: list, z: list, c: list, s: list, lv: list, ok: list):
        self.index = index
        self.rows = list(zip(x, z, c, s, lv, ok))

    def get(self, name: str, default: tuple = _NAN_INFO) -> tuple:
        i = self.index.get(name)
        return default if i is None else self.rows[i]

    def __contains__(self, name: str) -> bool:
        return name in self.index


class StreamingDetector:
    """Per-step detection with the same episodes as `detect` on the whole series.

    `update(step, metrics)` returns the episodes opened at this step; `episodes` lists all so far (an
    episode's severity, peak and last step keep updating while it is ongoing). The cost per step is O(number
    of metrics) with small constants: block statistics are computed once per `block_steps` rows, vectorised over
    metrics, and the domain detectors keep O(1)/O(window) state. A step equal to the previous one merges into
    its row (like RunHistory): the row is re-evaluated with the added keys.
    """

    def __init__(self, thresholds: Thresholds | None = None, meta: Mapping[str, Any] | None = None):
        self.th = th = thresholds or Thresholds()
        self.meta = dict(meta or {})
        self._B = max(2, int(th.block_steps))
        self._m = max(1, int(th.baseline_blocks))
        self._names: list[str] = []
        self._index: dict[str, int] = {}
        self._cap = 0
        self._alloc(32)
        self._row = -1
        self._block = 0
        self._last_step: int | None = None
        self._first_step: int | None = None
        self._seen: set[int] = set()
        self._episodes = _Episodes(th.cooldown_steps)
        self._muted = set(th.muted)
        self._state: dict[str, Any] = {}
        self._plan: _Plan | None = None
        self._plan_size = -1
        self._leak: dict[str, deque] = {}
        self._growth: dict[str, float] = {}
        # scalar states of the cross-row rules
        self._lr = [-1, math.nan, math.nan]  # row, value before that row, value at that row
        self._reward_rel: list[float] = []
        self._reward_rel_row = -1
        self._reward_armed = -2  # -2 collecting, -1 never, >= 0 armed after that row
        self._hack_last_climb = -(10**12)
        self._clip_armed_row = -1
        self._dpo_below_row = -1

    # -- storage -----------------------------------------------------------------------------------
    def _alloc(self, cap: int) -> None:
        B, m, old = self._B, self._m, self._cap

        def grow(name: str, shape: tuple, fill: Any, dtype: Any = float) -> None:
            new = np.full(shape, fill, dtype=dtype)
            if old:
                new[:old] = getattr(self, name)
            setattr(self, name, new)

        grow("_buf", (cap, B), np.nan)
        grow("_ring_med", (cap, m), np.nan)
        grow("_ring_spread", (cap, m), np.nan)
        grow("_ring_mean", (cap, m), np.nan)
        grow("_ring_cnt", (cap, m), 0, np.int64)
        grow("_center", (cap,), np.nan)
        grow("_scale", (cap,), 1.0)
        grow("_level", (cap,), np.nan)
        grow("_ok", (cap,), False, bool)
        grow("_generic", (cap,), False, bool)
        grow("_xrow", (cap,), np.nan)
        grow("_zfloor", (cap,), 0.0)
        self._cap = cap

    def _add_metric(self, name: str) -> None:
        if len(self._names) >= self._cap:
            self._alloc(self._cap * 2)
        self._index[name] = len(self._names)
        self._zfloor[len(self._names)] = self.th.fraction_floor if name in _FRACTION_METRICS else 0.0
        self._names.append(name)
        aliases = _aliases(self._names)
        for j, nm in enumerate(self._names):
            self._generic[j] = _generic(nm, aliases)

    @property
    def episodes(self) -> list[dict]:
        return self._episodes.finish(self._last_step)

    # -- per step ----------------------------------------------------------------------------------
    def update(self, step: int, metrics: Mapping[str, float | None]) -> list[dict]:
        """Feed one step's metrics (None/NaN/Inf allowed); returns the episodes opened at this step."""
        step = int(step)
        if self._last_step is not None and step < self._last_step:
            return []
        before = len(self._episodes.all)
        if self._last_step is None or step > self._last_step:
            if self._row >= 0 and (self._row + 1) % self._B == 0:
                self._finish_block()
            self._row += 1
            self._last_step = step
            if self._first_step is None:
                self._first_step = step
            self._xrow[:] = np.nan
            self._seen = set()
        index, seen, xrow = self._index, self._seen, self._xrow
        fresh: list[int] = []
        nonfinite: list[str] = []
        isfinite = math.isfinite
        for key, value in metrics.items():
            if value is None:
                x = math.nan
            else:
                try:
                    x = float(value)
                except (TypeError, ValueError):
                    continue
            i = index.get(key)
            if i is None:
                if not isinstance(key, str):
                    continue
                self._add_metric(key)
                index, xrow = self._index, self._xrow
                i = index[key]
            if not isfinite(x):
                if i not in seen or xrow[i] == xrow[i]:
                    nonfinite.append(key)
                x = math.nan
            if i not in seen:
                seen.add(i)
                fresh.append(i)
            xrow[i] = x
        self._process(step, fresh, nonfinite)
        return [{k: v for k, v in e.items() if k != "_peak"} for e in self._episodes.all[before:]]

    def _finish_block(self) -> None:
        M = len(self._names)
        if M:
            med, spread, mean, cnt = _block_stats(self._buf[:M])
            pos = self._block % self._m
            self._ring_med[:M, pos] = med
            self._ring_spread[:M, pos] = spread
            self._ring_mean[:M, pos] = mean
            self._ring_cnt[:M, pos] = cnt
            c, s, lv, ok = _baseline(
                self._ring_med[:M], self._ring_spread[:M], self._ring_mean[:M], self._ring_cnt[:M], self.th.min_history
            )
            self._center[:M], self._scale[:M], self._level[:M], self._ok[:M] = c, s, lv, ok
            L = max(2, int(self.th.memory_leak_blocks))
            for name, q in self._leak.items():
                q.append(float(med[self._index[name]]))
                self._growth[name] = (
                    float(_steady_growth(np.asarray(q, dtype=float)[None, :])[0]) if len(q) == L else math.nan
                )
            self._buf[:M] = np.nan
        self._block += 1

    def _make_states(self) -> None:
        """Create every per-rule state the plan needs (a fresh state equals one fed only missing rows)."""
        th, plan, S = self.th, self._plan, self._state
        pn, rn = int(th.persist_n), int(th.recent_steps)
        want: dict[str, tuple] = {
            "kl_held": (_Count, pn),
            "kl_extreme": (_Count, pn),
            "ent_early": (_Early, th.early_steps),
            "ent_recent": (_Recent, rn),
            "ent_up": (_Cusum, th.rise_kref, th.shift_clip, 1.0),
            "len_up": (_Cusum, th.rise_kref, th.shift_clip, 1.0),
            "len_recent": (_Recent, rn),
            "fz_up": (_Cusum, th.shift_kref, th.shift_clip, 1.0),
            "fz_recent": (_Recent, rn),
            "rs_dn": (_Cusum, th.shift_kref, th.shift_clip, -1.0),
            "rs_up": (_Cusum, th.rise_kref, th.shift_clip, 1.0),
            "rs_early": (_Early, th.early_steps),
            "rs_recent": (_Recent, rn),
            "cr_recent": (_Recent, rn),
            "gn_held": (_Count, pn),
            "vl_held": (_Count, pn),
            "cl_recent": (_Recent, rn),
            "acc_pin": (_Count, max(1, int(th.dpo_pinned_steps))),
            "mg_held": (_Count, pn),
            "acc_held": (_Count, 3),
            "acc_big": (_Count, 3),
            "lpc_dn": (_Cusum, th.shift_kref, th.shift_clip, -1.0),
            "lpr_dn": (_Cusum, th.shift_kref, th.shift_clip, -1.0),
            "dpo_loss_recent": (_Recent, rn),
        }
        for name in plan.reward_metrics:
            want["rup:" + name] = (_Cusum, th.rise_kref, th.shift_clip, 1.0)
            want["rdn:" + name] = (_Cusum, th.shift_kref, th.shift_clip, -1.0)
        for name in ("loss", "policy_loss"):
            want["lh:" + name] = (_Count, pn)
        for name in plan.step_time:
            want["st_recent:" + name] = (_Recent, rn)
        for key, (cls, *args) in want.items():
            if key not in S:
                S[key] = cls(*args)

    def _process(self, step: int, fresh: list[int], nonfinite: list[str]) -> None:
        th = self.th
        in_grace = step < self._first_step + int(th.grace_steps)
        events: list[tuple[int, str, str, int, float, float]] = []
        muted = self._muted

        def emit(det: str, metric: str, level: int, value: float, score: float) -> None:
            if level and det not in muted and (not in_grace or det == "nonfinite"):
                events.append((_ORDER.get(det, 99), det, metric, level, value, score))

        for key in nonfinite:
            emit("nonfinite", key, 4, math.nan, 0.0)

        M = len(self._names)
        xs = self._xrow[:M]
        self._buf[:M, self._row % self._B] = xs
        center = self._center[:M]
        scale = self._scale[:M]
        okb = self._ok[:M] & ~np.isnan(xs)
        z = (xs - center) / scale  # NaN arithmetic only: no floating-point warnings possible
        z[~okb] = np.nan
        if fresh and "zscore" not in muted and not in_grace:
            zscale = np.maximum(scale, self._zfloor[:M])
            hit = np.flatnonzero(self._generic[:M] & okb & (np.abs(xs - center) > th.anomaly_threshold * zscale))
            if hit.size:
                new = set(fresh)
                for j in hit.tolist():
                    if j in new:
                        zj = float((xs[j] - center[j]) / zscale[j])
                        events.append((_ORDER["zscore"], "zscore", self._names[j], 1, float(xs[j]), zj))

        if self._plan is None or self._plan_size != M:
            self._plan = _Plan(self._names, self.meta, th)
            self._plan_size = M
            for name in self._plan.memory:
                self._leak.setdefault(name, deque(maxlen=max(2, int(th.memory_leak_blocks))))
            self._make_states()
        self._specific(
            _RowInfo(
                self._index,
                xs.tolist(),
                z.tolist(),
                center.tolist(),
                scale.tolist(),
                self._level[:M].tolist(),
                okb.tolist(),
            ),
            emit,
        )

        if events:
            events.sort(key=_EVENT_ORDER)
            for _, det, metric, lev, value, score in events:
                self._episodes.flag(det, metric, step, lev, value, score)

    def _specific(self, info: dict, emit) -> None:
        th = self.th
        plan = self._plan
        k = min(int(th.persist_k), int(th.persist_n))
        S = self._state
        nan = math.nan
        row = self._row
        known = self._index
        get = info.get

        kl_held = False
        if "kl" in known:
            x, z, c, s, lv, ok = get("kl")
            ratio = abs(x - c) / max(s, abs(c)) if ok else nan
            emit("kl_spike", "kl", 1 if ratio >= th.kl_spike_factor else 0, x, ratio)
            held = S["kl_held"].set(row, ratio >= th.kl_runaway_factor) >= k
            extreme = S["kl_extreme"].set(row, ratio >= th.kl_runaway_high) >= k
            emit("kl_runaway", "kl", 3 if extreme else (2 if held else 0), x, ratio)
            kl_held = held

        ent_drop = nan
        if "entropy" in known:
            x, z, c, s, lv, ok = get("entropy")
            early = S["ent_early"]
            cur = S["ent_recent"].set(row, x)
            if early.known(row) and early.value > 0:
                ent_drop = 1.0 - cur / early.value
                emit(
                    "entropy_collapse",
                    "entropy",
                    3 if ent_drop >= th.entropy_collapse_high else (2 if ent_drop >= th.entropy_collapse_frac else 0),
                    x,
                    ent_drop,
                )
            early.set(row, x)
            up = S["ent_up"].set(row, z)
            emit("policy_shift", "entropy", 2 if up >= th.rise_h else 0, x, up)

        len_cur = nan
        if "completion_length" in known:
            x, z, c, s, lv, ok = get("completion_length")
            up = S["len_up"].set(row, z)
            emit("policy_shift", "completion_length", 2 if up >= th.rise_h else 0, x, up)
            len_cur = S["len_recent"].set(row, x)

        reward_up = None
        for name in plan.reward_metrics:
            x, z, c, s, lv, ok = get(name)
            up = S["rup:" + name].set(row, z)
            down = S["rdn:" + name].set(row, z)
            emit(
                "reward_shift",
                name,
                2 if (up >= th.rise_h or down >= th.shift_h) else 0,
                x,
                up if up >= down else -down,
            )
            if name == "reward":
                reward_up = up

        if not plan.dpo and "reward_std" in known:
            x, z, c, s, lv, ok = get("reward_std")
            up = S["rs_up"].set(row, z)
            emit("reward_shift", "reward_std", 2 if up >= th.rise_h else 0, x, up)
        if not plan.dpo:
            if "reward_std" in known:
                x, z, c, s, lv, ok = get("reward_std")
                ratio = x / c if (ok and c > 0) else nan
                emit("reward_scale", "reward_std", 3 if ratio >= th.reward_scale_factor else 0, x, ratio)
            if "reward" in known:
                x, z, c, s, lv, ok = get("reward")
                emit("reward_scale", "reward", 3 if abs(z) >= th.reward_scale_z else 0, x, z)

        if plan.reward_parts and "reward" in known:
            x = get("reward")[0]
            total = 0.0
            absum = 0.0
            for p in plan.reward_parts:
                pv = get(p)[0]
                total = total + pv
                absum = absum + abs(pv)
            resid = x - total
            rel = abs(resid) / max(max(abs(x), absum), 1e-12)
            if self._reward_armed == -2:
                if rel == rel:
                    if self._reward_rel_row == row:
                        self._reward_rel[-1] = rel
                    else:
                        self._reward_rel.append(rel)
                        self._reward_rel_row = row
                    if len(self._reward_rel) == th.early_steps:
                        bad = any(r > th.reward_mismatch_tol * 0.1 for r in self._reward_rel)
                        self._reward_armed = -1 if bad else row
            elif self._reward_armed >= 0 and row > self._reward_armed:
                emit("reward_mismatch", "reward", 3 if rel > th.reward_mismatch_tol else 0, x, resid)

        if "frac_reward_zero_std" in known:
            x, z, c, s, lv, ok = get("frac_reward_zero_std")
            zf = (x - lv) / max(s, th.fraction_floor) if ok else nan
            up = S["fz_up"].set(row, zf)
            cur = S["fz_recent"].set(row, x)
            high = cur >= th.no_signal_frac
            emit(
                "no_learning_signal",
                "frac_reward_zero_std",
                3 if high else (2 if up >= th.shift_h else 0),
                x,
                cur if high else up,
            )
        if "reward_std" in known and not plan.dpo:
            x, z, c, s, lv, ok = get("reward_std")
            down = S["rs_dn"].set(row, z)
            early = S["rs_early"]
            cur = S["rs_recent"].set(row, x)
            collapsed = early.known(row) and early.value > 0 and cur <= th.reward_std_collapse * early.value
            early.set(row, x)
            emit("no_learning_signal", "reward_std", 3 if collapsed else (2 if down >= th.shift_h else 0), x, -down)

        cr_cur = nan
        if "completions/clipped_ratio" in known:
            cr_cur = S["cr_recent"].set(row, get("completions/clipped_ratio")[0])
        if reward_up is not None:
            if reward_up >= th.rise_h:
                self._hack_last_climb = row
            climb = row - self._hack_last_climb < max(1, int(th.hack_window))
            sign = kl_held or ent_drop >= th.hack_entropy_drop or cr_cur >= th.hack_clipped_ratio
            if plan.max_len:
                sign = sign or len_cur >= th.hack_length_frac * plan.max_len
            emit("reward_hacking", "reward", 3 if (climb and sign) else 0, get("reward")[0], reward_up)

        if "grad_norm" in known:
            x, z, c, s, lv, ok = get("grad_norm")
            ratio = x / c if (ok and c > 0) else nan
            held = S["gn_held"].set(row, ratio >= th.grad_norm_factor) >= k
            emit("grad_norm_spike", "grad_norm", 1 if z >= th.spike_z else 0, x, z)
            emit("grad_norm_shift", "grad_norm", 2 if held else 0, x, ratio)
        for name in ("loss", "policy_loss"):
            if name not in known:
                continue
            x, z, c, s, lv, ok = get(name)
            az = abs(z)
            held = S["lh:" + name].set(row, az >= th.loss_persist_z) >= k
            emit("loss_spike", name, 1 if az >= th.spike_z else 0, x, z)
            emit("loss_shift", name, 2 if held else 0, x, z)
        if "value_loss" in known:
            x, z, c, s, lv, ok = get("value_loss")
            ratio = x / c if (ok and c > 0) else nan
            held = S["vl_held"].set(row, ratio >= th.value_loss_factor) >= max(1, k - 1)
            emit("value_loss_blowup", "value_loss", 3 if held else 0, x, ratio)
        if "clip_ratio" in known:
            x = get("clip_ratio")[0]
            if x > 0 and self._clip_armed_row < 0:
                self._clip_armed_row = row
            cur = S["cl_recent"].set(row, x)
            armed = plan.off_policy or 0 <= self._clip_armed_row <= row
            emit("clip_ratio", "clip_ratio", 2 if (armed and cur >= th.clip_ratio_high) else 0, x, cur)
        if "learning_rate" in info:
            x = info.get("learning_rate")[0]
            if x == x:
                lr = self._lr
                if lr[0] != row:
                    if lr[2] == lr[2]:
                        lr[1] = lr[2]
                    lr[0] = row
                lr[2] = x
                ratio = x / lr[1] if lr[1] > 0 else nan
                emit("lr_jump", "learning_rate", 2 if ratio >= th.lr_jump_factor else 0, x, ratio)

        if plan.dpo:
            if "rewards/accuracies" in known:
                x, z, c, s, lv, ok = get("rewards/accuracies")
                gap = lv - x if ok else nan
                need = max(th.dpo_accuracy_drop, 4.0 * s) if ok else nan
                big = gap >= 2 * need
                held = S["acc_held"].set(row, gap >= need) >= 2
                very = S["acc_big"].set(row, big) >= 2
                emit("dpo_accuracy_drop", "rewards/accuracies", 3 if very else (2 if (big or held) else 0), x, -gap)
                ps = max(1, int(th.dpo_pinned_steps))
                cnt = S["acc_pin"].set(row, x >= 0.999)
                emit("dpo_accuracy_pinned", "rewards/accuracies", 1 if (cnt >= ps and row < 5 * ps) else 0, x, x)
            if "rewards/margins" in known:
                x, z, c, s, lv, ok = get("rewards/margins")
                r = (x - c) / max(s, abs(c)) if ok else nan
                held = S["mg_held"].set(row, r >= th.dpo_margin_factor) >= max(1, k - 1)
                emit("dpo_margin_explosion", "rewards/margins", 2 if held else 0, x, r)
            if "logps/chosen" in known and "logps/rejected" in known:
                xc, zc = get("logps/chosen")[:2]
                dc = S["lpc_dn"].set(row, zc)
                dr = S["lpr_dn"].set(row, get("logps/rejected")[1])
                emit(
                    "dpo_logps_falling",
                    "logps/chosen",
                    2 if (dc >= th.shift_h and dr >= th.shift_h) else 0,
                    xc,
                    min(dc, dr),
                )
            if "loss" in known:
                x = get("loss")[0]
                cur = S["dpo_loss_recent"].set(row, x)
                below_before = 0 <= self._dpo_below_row < row
                emit("dpo_loss", "loss", 2 if (below_before and cur > LN2 + th.dpo_loss_margin) else 0, x, cur)
                if cur < LN2 - th.dpo_loss_margin and self._dpo_below_row < 0:
                    self._dpo_below_row = row

        for name in plan.memory:
            growth = self._growth.get(name, nan)
            emit(
                "memory_leak",
                name,
                3 if growth >= 3 * th.memory_leak_frac else (2 if growth >= th.memory_leak_frac else 0),
                get(name)[0],
                growth,
            )
        if "memory/gpu_frac" in info:
            x = info.get("memory/gpu_frac")[0]
            emit(
                "memory_near_oom",
                "memory/gpu_frac",
                4 if x >= th.gpu_frac_critical else (3 if x >= th.gpu_frac_high else 0),
                x,
                x,
            )
        for name in plan.step_time:
            x, z, c, s, lv, ok = get(name)
            cur = S["st_recent:" + name].set(row, x)
            ratio = cur / c if (ok and c > 0) else nan
            emit("step_time_regression", name, 2 if ratio >= th.step_time_factor else 0, x, ratio)
