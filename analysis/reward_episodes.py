"""Reward-function anomalies as episodes: each stream's per-batch statistics (`reward_streams`) judged with the
current `Thresholds`, vectorised over the stream's whole table, then grouped into episodes by the same code as
every other detector (`detectors.episodes`), so they carry the same fields and land in the feed, the reports and
`--fail-on` like any other anomaly. The detectors' records (words, settings) are in `detectors/registry.py`.

Rules (per function; `thr` = `reward_batch_z`; rows are batches; persistence = `persist_k` of `persist_n`):

| detector | fires when | severity |
| --- | --- | --- |
| reward_zscore | abs(z) > thr, z of the batch mean against its recent batches | medium, high > 2 thr, critical > 4 thr |
| reward_level_shift | the next batch stays at the new level (the baseline restarts) | low |
| reward_scale_jump | std > `reward_scale_factor` × usual, or abs(mean) as much with abs(z) > thr | high |
| reward_constant | batch std ≤ `reward_std_collapse` × early std, persistently | medium |
| reward_invalid | None/NaN/Inf scores (no grace) | medium, high ≥ `reward_invalid_high`, critical ≥ ½ |
| reward_empty | no scores at all (no grace) | medium |
| reward_saturation | ≥ `reward_saturation_share` at a bound over `persist_n` batches, not constant | medium, high ≥ 95 % |
| reward_zero_spread | ≥ `no_signal_frac` flat GRPO groups over `persist_n` batches, not constant | medium |
| reward_drift | the distribution's drift level rises (PSI excess ≥ `reward_drift_psi`, 0.4× for moderate) | low, medium |
"""

from __future__ import annotations

import numpy as np

from rlhf_tui.analysis.detectors.episodes import EPISODE_ORDER, episodes
from rlhf_tui.analysis.reward_streams import RewardStream, RewardStreams
from rlhf_tui.analysis.severity import SEVERITIES
from rlhf_tui.analysis.thresholds import Thresholds

DETECTORS = (
    "reward_zscore",
    "reward_level_shift",
    "reward_scale_jump",
    "reward_constant",
    "reward_invalid",
    "reward_empty",
    "reward_saturation",
    "reward_zero_spread",
    "reward_drift",
)
NO_GRACE = frozenset({"reward_invalid", "reward_empty"})  # like non-finite values: reported from the first batch


def _rolling_sum(x: np.ndarray, n: int) -> np.ndarray:
    """Sum of the last `n` values at each row (fewer at the start)."""
    c = np.concatenate([[0.0], np.cumsum(x)])
    idx = np.arange(1, x.size + 1)
    return c[idx] - c[np.maximum(idx - n, 0)]


def _flags(stream: RewardStream, th: Thresholds) -> list[tuple]:
    """(detector, metric, rows, level, score, value) for one stream's table."""
    t = stream.table
    col = t.column
    mean, std, z = col("mean"), col("std"), col("z")
    az, thr = np.abs(z), float(th.reward_batch_z)
    with np.errstate(invalid="ignore"):
        shift = col("shift") == 1
        n = max(1, int(th.persist_n))
        constant_row = col("spread_ratio") <= th.reward_std_collapse
        constant = constant_row & (_rolling_sum(constant_row.astype(float), n) >= min(int(th.persist_k), n))
        sat = _rolling_sum(np.nan_to_num(col("sat_share")), n) / np.minimum(np.arange(1, t.rows + 1), n)
        groups = col("groups")
        flat = _rolling_sum(np.nan_to_num(col("zero_spread")) * groups, n) / np.maximum(_rolling_sum(groups, n), 1)
        invalid = np.nan_to_num(col("invalid_share"))
        rules = {
            "reward_zscore": (az > thr) & ~shift,
            "reward_level_shift": shift & (az > thr),
            "reward_scale_jump/std": col("std_ratio") > th.reward_scale_factor,
            "reward_scale_jump/mean": (col("mag_ratio") > th.reward_scale_factor) & (az > thr),
            "reward_constant": constant,
            "reward_invalid": invalid > 0,
            "reward_empty": col("n_total") == 0,
            "reward_saturation": (sat >= th.reward_saturation_share)
            & (col("sat_share") >= th.reward_saturation_share)
            & ~constant_row,
            "reward_zero_spread": (flat >= th.no_signal_frac) & (groups > 0) & ~constant_row,
        }
    one = np.ones(t.rows)
    levels = {
        "reward_zscore": 2 + (az > 2 * thr) + (az > 4 * thr),
        "reward_level_shift": one,
        "reward_scale_jump/std": 3 * one,
        "reward_scale_jump/mean": 3 * one,
        "reward_constant": 2 * one,
        "reward_invalid": 2 + (invalid >= th.reward_invalid_high) + (invalid >= max(0.5, th.reward_invalid_high)),
        "reward_empty": 2 * one,
        "reward_saturation": 2 + (sat >= 0.95),
        "reward_zero_spread": 2 * one,
    }
    scores = {
        "reward_zscore": z,
        "reward_level_shift": z,
        "reward_scale_jump/std": col("std_ratio"),
        "reward_scale_jump/mean": col("mag_ratio"),
        "reward_constant": _rolling_sum(constant_row.astype(float), n),
        "reward_invalid": invalid,
        "reward_empty": one,
        "reward_saturation": sat,
        "reward_zero_spread": flat,
    }
    values = {"reward_scale_jump/std": std, "reward_invalid": invalid, "reward_saturation": sat}
    values["reward_zero_spread"] = flat
    steps = col("step")
    grace = steps - steps[0] >= th.grace_steps if t.rows else steps > 0
    out = []
    for key, mask in rules.items():
        detector, _, part = key.partition("/")
        if th.is_muted(detector):
            continue
        if detector not in NO_GRACE:
            mask = mask & grace
        rows = np.flatnonzero(mask)
        if rows.size:
            metric = stream.metric("std" if part == "std" or detector == "reward_constant" else "mean")
            level = np.asarray(levels[key], dtype=np.int64)[rows]
            out.append((detector, metric, rows, level, scores[key][rows], values.get(key, mean)[rows]))
    return out


def _drift_flags(stream: RewardStream, th: Thresholds) -> list[tuple]:
    """Checks where the drift level rose above every earlier check's (reported once per level, as the seed)."""
    d = stream.drift
    if th.is_muted("reward_drift") or not d.rows:
        return []
    sig = float(th.reward_drift_psi)
    excess = d.column("psi_excess")
    ks_ok = d.column("ks") > d.column("ks_critical")
    level = np.where(ks_ok, (excess >= 0.4 * sig).astype(np.int64) + (excess >= sig), 0)
    before = np.concatenate([[0], np.maximum.accumulate(level)[:-1]])
    steps = d.column("step")
    rows = np.flatnonzero((level > before) & (steps - stream.table.column("step")[0] >= th.grace_steps))
    if not rows.size:
        return []
    return [("reward_drift", stream.metric(), rows, level[rows], excess[rows], d.column("psi")[rows])]


def reward_episodes(streams: RewardStreams, th: Thresholds | None = None, latest: int | None = None) -> list[dict]:
    """Every reward function's anomaly episodes, in the order of `detectors.episodes` (step, detector, metric).
    `latest`: the run's newest step (an episode is ongoing within `cooldown_steps` of it)."""
    th = th or Thresholds()
    out: list[dict] = []
    for stream in streams.streams.values():
        if not stream.table.rows:
            continue
        steps = stream.table.column("step").astype(np.int64)
        tail = steps if latest is None or latest <= steps[-1] else np.append(steps, latest)
        for flagged, at in ((_flags(stream, th), tail), (_drift_flags(stream, th), None)):
            if not flagged:
                continue
            if at is None:
                at = stream.drift.column("step").astype(np.int64)
                at = at if latest is None or latest <= at[-1] else np.append(at, latest)
            found, _counts = episodes(flagged, at, th, None, None)
            out.extend(found)
    out.sort(key=EPISODE_ORDER)
    return out


def severity_counts(found: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in found:
        if e.get("severity") in SEVERITIES:
            counts[e["severity"]] = counts.get(e["severity"], 0) + 1
    return counts
