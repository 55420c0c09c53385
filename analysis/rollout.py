"""The rollout block of the report: sampler-vs-trainer mismatch against its reference level, truncation,
throughput and where a step's time goes, each only when the run logs what it needs. Pure numpy + stdlib.

Names are the canonical ones of bridge/wire/metrics.py (TRL's, and verl's mapped onto them at ingest). The plain
words judge the last three logged values by their median (= two of the three at or above a level, as the
sampling_mismatch detector counts), so one odd batch neither raises nor clears them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rlhf_tui.analysis.detectors.rules import SAMPLING_DIFFERENCE, SAMPLING_IS_RATIO
from rlhf_tui.analysis.plain_json import finite
from rlhf_tui.analysis.store import RunHistory

OK, ELEVATED, HIGH = "ok", "elevated", "high"
LEVELS = (OK, ELEVATED, HIGH)
RECENT = 3  # logged values the words judge (their median)
HIGH_FACTOR = 10.0  # the mismatch is high at 10x its reference (the detector's rule)
CLIPPED = "completions/clipped_ratio"
# The max twin of each mismatch mean: TRL's /max, verl's _max.
MISMATCH_MAX = {
    "sampling/sampling_logp_difference/mean": "sampling/sampling_logp_difference/max",
    "training/rollout_probs_diff_mean": "training/rollout_probs_diff_max",
}
IS_RATIO_MIN, IS_RATIO_MAX = "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/max"

TOKENS_PER_S = "tokens/s"  # a logged (or derived) training throughput
TOKENS_PER_S_GPU = "tokens/s/gpu"  # verl's perf/throughput: per GPU
TOKEN_COUNTS = ("num_tokens", "num_input_tokens_seen")  # cumulative: TRL, transformers
TOKENS_PER_STEP = "tokens/step"  # one step's tokens (verl's perf/total_num_tokens)
STEP_WALL = "time/step_s"  # the callback's wall time per step between logs (evaluation and saving left out)
# A step's seconds, the phases' own total first (our profiler's and verl's), then TRL's training_step time, then
# the callback's wall time per step.
STEP_TOTALS = ("time/step_total_s", "step_time", STEP_WALL)
PHASES = (
    ("generation", "time/generation_s"),
    ("reward", "time/reward_s"),
    ("scoring", "time/scoring_s"),
    ("update", "time/optimisation_s"),
)


def _recent(run: RunHistory, name: str) -> np.ndarray:
    """The last RECENT finite values of a metric (fewer when fewer were logged)."""
    values = run.values(name)
    return values[np.flatnonzero(np.isfinite(values))[-RECENT:]]


def _worst(*levels: str | None) -> str:
    return max((lv for lv in levels if lv in LEVELS), key=LEVELS.index, default=OK)


def mismatch(run: RunHistory, reference: float = 0.01, is_band: float = 0.2) -> dict | None:
    """The sampler's log-probs against the trainer's: the mean difference (and its max twin when logged) against
    `reference` (elevated at it, high at 10x), the importance-sampling ratio's mean against 1 ± `is_band`."""
    out: dict[str, Any] = {}
    name = next((n for n in SAMPLING_DIFFERENCE if np.isfinite(run.values(n)).any()), None)
    levels = []
    if name is not None:
        recent = float(np.median(_recent(run, name)))
        level = HIGH if recent >= HIGH_FACTOR * reference else ELEVATED if recent >= reference else OK
        out.update(metric=name, mean=run.latest(name), recent=recent, max=run.latest(MISMATCH_MAX[name]))
        out.update(reference=reference, high_at=HIGH_FACTOR * reference, difference_level=level)
        levels.append(level)
    if np.isfinite(run.values(SAMPLING_IS_RATIO)).any():
        recent = float(np.median(_recent(run, SAMPLING_IS_RATIO)))
        # Off by the band either way on a log scale (0.8 and 1.25 are equally far), as the detector judges it.
        off = abs(math.log(recent)) if recent > 0 else math.inf
        level = ELEVATED if off >= math.log1p(is_band) else OK
        out.update(is_ratio=run.latest(SAMPLING_IS_RATIO), is_ratio_recent=recent, is_band=is_band)
        out.update(is_ratio_min=run.latest(IS_RATIO_MIN), is_ratio_max=run.latest(IS_RATIO_MAX), is_ratio_level=level)
        levels.append(level)
    if not levels:
        return None
    out["level"] = _worst(*levels)
    return out


def truncation(run: RunHistory, limit: float = 0.9, elevated: float = 0.5) -> dict | None:
    """The share of completions cut at max_completion_length: high at `limit` (the length limit shapes the
    reward), elevated at `elevated` (the reward-hacking detector's "running to the limit")."""
    if not np.isfinite(run.values(CLIPPED)).any():
        return None
    recent = float(np.median(_recent(run, CLIPPED)))
    level = HIGH if recent >= limit else ELEVATED if recent >= elevated else OK
    out = {"clipped_ratio": run.latest(CLIPPED), "recent": recent, "limit": limit, "level": level}
    if level == HIGH:
        out["note"] = "the length limit shapes the reward"
    args = run.meta.get("args")
    max_len = finite(args.get("max_completion_length")) if isinstance(args, dict) else None
    if max_len is not None and max_len > 0:
        out["max_completion_length"] = int(max_len) if max_len.is_integer() else max_len
    return out


def _row_seconds(run: RunHistory, rows: np.ndarray) -> np.ndarray:
    """Each row's step seconds: the first of STEP_TOTALS logged at that row (NaN where none is)."""
    out = np.full(rows.size, np.nan)
    for name in reversed(STEP_TOTALS):  # the earlier names win: written last
        if name in run.columns:
            values = run.values(name)[rows]
            out = np.where(np.isfinite(values), values, out)
    return out


def tokens_per_second(run: RunHistory) -> np.ndarray | None:
    """Row-aligned training throughput derived from token counts; None when the run logs `tokens/s` itself or no
    count. Cumulative counts (`num_tokens`, `num_input_tokens_seen`): tokens since the previous row with a count,
    over the training time in between (`time/step_s` × steps, which leaves out evaluation and saving; the rows'
    wall clocks without it). One step's count (`tokens/step`, verl's perf/total_num_tokens): over that step's
    seconds (STEP_TOTALS)."""
    if TOKENS_PER_S in run.columns:
        return None
    source = next((n for n in TOKEN_COUNTS if n in run.columns), None)
    out = np.full(run.rows, np.nan)
    if source is None:
        if TOKENS_PER_STEP not in run.columns:
            return None
        tokens = run.values(TOKENS_PER_STEP)
        rows = np.flatnonzero(np.isfinite(tokens))
        seconds = _row_seconds(run, rows)
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = tokens[rows] / seconds
        out[rows] = np.where(np.isfinite(rate) & (seconds > 0) & (rate >= 0), rate, np.nan)
        return out
    tokens, steps = run.values(source), run.steps.astype(np.float64)
    rows = np.flatnonzero(np.isfinite(tokens))
    if rows.size < 2:
        return out
    cur, prev = rows[1:], rows[:-1]
    step_s = run.values(STEP_WALL)[cur]
    seconds = np.where(np.isfinite(step_s), step_s * (steps[cur] - steps[prev]), run.times[cur] - run.times[prev])
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = (tokens[cur] - tokens[prev]) / seconds
    out[cur] = np.where(np.isfinite(rate) & (seconds > 0) & (rate >= 0), rate, np.nan)
    return out


def token_source(run: RunHistory) -> str | None:
    """The logged count a derived tokens/s comes from (None when it is not derived)."""
    if TOKENS_PER_S in run.columns:
        return None
    return next((n for n in (*TOKEN_COUNTS, TOKENS_PER_STEP) if n in run.columns), None)


def throughput(run: RunHistory) -> dict | None:
    """The newest tokens/s (logged, else derived from token counts) and verl's per-GPU figure when logged."""
    out: dict[str, Any] = {}
    source: str | None
    if TOKENS_PER_S in run.columns:
        value, source = run.latest(TOKENS_PER_S), TOKENS_PER_S
    else:
        rate = tokens_per_second(run)
        finite = np.flatnonzero(np.isfinite(rate)) if rate is not None else np.empty(0, dtype=int)
        value = float(rate[finite[-1]]) if rate is not None and finite.size else None
        source = f"derived from {token_source(run)}" if value is not None else None
    if value is not None:
        out.update(tokens_per_s=value, source=source)
    per_gpu = run.latest(TOKENS_PER_S_GPU)
    if per_gpu is not None:
        out["tokens_per_s_per_gpu"] = per_gpu
    return out or None


def time_split(run: RunHistory) -> dict | None:
    """Where the newest timed step's time goes: each phase's seconds and share of the step (generation, reward,
    scoring, update; `other` the rest), from the newest row with a phase timing. The share is of the step's
    seconds when they are logged and cover the phases, else of the phases' sum (`of`: "step" or "phases").
    With no phase timings, only the step's seconds (`step_s`, `step_metric`)."""
    present = [(phase, name) for phase, name in PHASES if name in run.columns]
    timed = np.zeros(run.rows, dtype=bool)
    for _, name in present:
        timed |= np.isfinite(run.values(name))
    rows = np.flatnonzero(timed)
    if rows.size == 0:
        for name in STEP_TOTALS:
            seconds = run.latest(name)
            if seconds is not None:
                return {"step_s": seconds, "step_metric": name}
        return None
    row = int(rows[-1])
    phases = {}
    for phase, name in present:
        v = finite(run.values(name)[row])
        if v is not None and v >= 0:
            phases[phase] = v
    total = sum(phases.values())
    step_metric = next((n for n in STEP_TOTALS if n in run.columns and np.isfinite(run.values(n)[row])), None)
    step_s = finite(run.values(step_metric)[row]) if step_metric else None
    of_step = step_s is not None and step_s > 0 and step_s >= total * (1 - 1e-6)
    base = step_s if of_step else total
    out: dict[str, Any] = {"step": int(run.steps[row]), "of": "step" if of_step else "phases"}
    if step_s is not None:
        out.update(step_s=step_s, step_metric=step_metric)
    out["seconds"] = phases
    if base and base > 0:
        shares = {phase: v / base for phase, v in phases.items()}
        if of_step:
            shares["other"] = max(0.0, 1.0 - sum(shares.values()))
        out["shares"] = shares
    return out


def rollout_section(run: RunHistory | None, thresholds=None) -> dict:
    """The report's `rollout` block: `mismatch`, `truncation`, `throughput`, `time`, each only when known; {} for
    a run that logs no rollout signal (mismatch, truncation or phase timings), whatever its throughput: every
    run has the callback's time/step_s, and an SFT run's tokens/s is its Language model block's."""
    if run is None or not run.rows:
        return {}
    th = thresholds
    parts = {
        "mismatch": mismatch(
            run, getattr(th, "sampling_difference", 0.01) or 0.01, getattr(th, "sampling_is_band", 0.2) or 0.2
        ),
        "truncation": truncation(run, getattr(th, "truncation_ratio", 0.9), getattr(th, "hack_clipped_ratio", 0.5)),
        "throughput": throughput(run),
        "time": time_split(run),
    }
    if parts["mismatch"] is None and parts["truncation"] is None and "shares" not in (parts["time"] or {}):
        return {}
    return {k: v for k, v in parts.items() if v is not None}
