"""Reward reliability per reward function: one stream per function (named as `monitor_rewards` and TRL's
`rewards/<name>/*` keys name it) plus a combined view that standardises them, so a function near -0.97 beside one
near -0.13 is never judged as one jumpy reward.

Each batch lands in its function's stream (`RewardStreams.add`, called where a reward message is stored): the
stream's `RewardModelIntegrator` takes it (the cheap `observe` part) and its statistics go into a bounded
per-batch table that `reward_episodes` turns into anomaly episodes with the current thresholds. Batches of all
functions for the same completions (same rank, step and order within the step, same size) are aligned: each
function is standardised by its early-run mean and std, their mean per completion feeds the combined stream,
and the raw rows give each function's share of the total's variance and its correlation with the others.
Pure numpy + stdlib; every buffer is bounded. Formulas: docs/reward-reliability.md.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Any

import numpy as np

from rlhf_tui.analysis.plain_json import json_safe
from rlhf_tui.analysis.reward_stats import drift_level, histogram, number, reward_weights, to_floats
from rlhf_tui.analysis.rewards import RECOMMENDATIONS, RewardModelIntegrator

__all__ = ["COLUMNS", "FeatureTable", "RewardStream", "RewardStreams"]

MAX_FUNCTIONS = 32  # streams per run; batches of further names are counted, not analysed
CAPACITY = 16384  # batches of statistics kept per function (the oldest quarter dropped when full)
DRIFT_EVERY = 16  # batches between two drift checks of a stream
DRIFT_CHECKS = 1024  # drift checks kept per stream
PENDING = 64  # groups of batches waiting for every function before the oldest are dropped
ALIGNED_GROUPS = 512  # aligned groups kept for shares and correlations ...
ALIGNED_ROWS = 2048  # ... of which the newest rows (completions) are used
BASE_Z = 3.0  # the streams' own z threshold (level-shift restarts); `reward_batch_z` can only be stricter
MAX_NAME = 120

COLUMNS = (
    "step",
    "n_total",
    "n_valid",
    "invalid_share",
    "mean",
    "std",
    "z",
    "center",
    "k",
    "shift",
    "std_ratio",
    "mag_ratio",
    "spread_ratio",
    "sat_share",
    "sat_side",
    "zero_spread",
    "groups",
)
DRIFT_COLUMNS = ("step", "psi", "psi_excess", "ks", "ks_critical", "mean_shift")


class FeatureTable:
    """Rows of numbers (one per batch or check), newest last; at most `capacity` rows."""

    def __init__(self, columns: tuple[str, ...], capacity: int = CAPACITY):
        self.columns = columns
        self.index = {name: i for i, name in enumerate(columns)}
        self.capacity = max(8, int(capacity))
        self._data = np.full((min(64, self.capacity), len(columns)), np.nan)
        self.rows = 0
        self.dropped = 0

    def append(self, values: dict[str, float]) -> None:
        if self.rows == self._data.shape[0]:
            if self.rows < self.capacity:
                grown = np.full((min(2 * self.rows, self.capacity), len(self.columns)), np.nan)
                grown[: self.rows] = self._data
                self._data = grown
            else:  # drop the oldest quarter
                cut = self.rows // 4
                self._data[: self.rows - cut] = self._data[cut:]
                self._data[self.rows - cut :] = np.nan
                self.rows -= cut
                self.dropped += cut
        row = self._data[self.rows]
        for name, i in self.index.items():
            row[i] = values.get(name, math.nan)
        self.rows += 1

    def column(self, name: str) -> np.ndarray:
        return self._data[: self.rows, self.index[name]]


class RewardStream:
    """One reward function's batches."""

    def __init__(self, name: str):
        self.name = name
        self.integrator = RewardModelIntegrator(anomaly_threshold=BASE_Z)
        self.table = FeatureTable(COLUMNS)
        self.drift = FeatureTable(DRIFT_COLUMNS, DRIFT_CHECKS)
        self.batches = 0
        self.num_invalid = 0
        self.last_step: int | None = None
        self.samples: list = []

    def add(self, raw: np.ndarray, step: int, context: dict[str, Any], samples: list | None) -> None:
        features = self.integrator.observe(raw, step, context)
        features["step"] = float(step)
        self.table.append(features)
        self.batches += 1
        self.num_invalid += int(features["n_total"] - features["n_valid"])
        self.last_step = step
        if samples:
            self.samples = samples
        if self.batches % DRIFT_EVERY == 0:
            stats = self.integrator.drift_stats()
            if stats is not None:
                self.drift.append({**stats, "step": float(step), "mean_shift": number(stats.get("mean_shift"))})

    def metric(self, part: str = "mean") -> str:
        """The TRL key of this function's `part` (mean or std): the name its anomalies are flagged under."""
        return f"rewards/{self.name}/{part}"


class RewardStreams:
    """Every reward function's stream of one run, and the combined view. Not thread-safe: the store's lock
    guards it (one writer, readers under the same lock)."""

    def __init__(self) -> None:
        self.streams: dict[str, RewardStream] = {}
        self.combined = RewardModelIntegrator(anomaly_threshold=BASE_Z)
        self.ignored = 0  # batches of functions beyond MAX_FUNCTIONS
        self.version = 0
        self._where: dict[tuple[str, int], tuple[int, int]] = {}  # (name, rank) -> (step, batches at that step)
        self._pending: OrderedDict[tuple[int, int, int], dict[str, np.ndarray]] = OrderedDict()
        self._aligned: deque[tuple[tuple[str, ...], int, np.ndarray]] = deque(maxlen=ALIGNED_GROUPS)
        self._summary: tuple[int, Any, dict] | None = None

    # -- taking batches ------------------------------------------------------------------------------------
    def add(self, batch: dict, num_generations: Any = None) -> None:
        """One stored reward batch (`reward_func`, `step`, `scores`, `samples`, optional `rank`). Never raises
        for malformed input: a batch without a usable step or scores is skipped."""
        step, name = batch.get("step"), batch.get("reward_func")
        if not isinstance(step, int) or isinstance(step, bool):
            return
        name = (name if isinstance(name, str) and name else "reward")[:MAX_NAME]
        stream = self.streams.get(name)
        if stream is None:
            if len(self.streams) >= MAX_FUNCTIONS:
                self.ignored += 1
                return
            stream = self.streams[name] = RewardStream(name)
        scores = batch.get("scores")
        raw = to_floats(scores if isinstance(scores, list) else [])
        samples = batch.get("samples")
        stream.add(raw, step, {"num_generations": num_generations}, samples if isinstance(samples, list) else None)
        rank_value = batch.get("rank")
        rank = rank_value if isinstance(rank_value, int) and not isinstance(rank_value, bool) else 0
        seen_step, count = self._where.get((name, rank), (-1, 0))
        count = count + 1 if seen_step == step else 0
        self._where[(name, rank)] = (step, count)
        if len(self._where) > 4 * MAX_FUNCTIONS:  # ranks come and go: keep the newest
            self._where.pop(next(iter(self._where)))
        self._pending.setdefault((rank, step, count), {})[name] = raw
        if len(self._pending) > PENDING:
            self._flush()
            while len(self._pending) > PENDING:
                self._pending.popitem(last=False)
        self.version += 1

    def _flush(self) -> None:
        """Align the groups every known function has contributed to (equal sizes), oldest first."""
        if len(self.streams) < 2:
            self._pending.clear()
            return
        names = tuple(self.streams)
        refs = []
        for name in names:
            ref = self.streams[name].integrator.reference()
            refs.append(ref if ref is not None and ref[1] > 0 else None)
        for key in [k for k, group in self._pending.items() if len(group) == len(names)]:
            group = self._pending.pop(key)
            sizes = {v.size for v in group.values()}
            if len(sizes) != 1 or not sizes.pop():
                continue
            matrix = np.column_stack([group[n] for n in names])
            z = np.column_stack(
                [(matrix[:, i] - r[0]) / r[1] if r else np.zeros(matrix.shape[0]) for i, r in enumerate(refs)]
            )
            ok = np.isfinite(z)
            count = ok.sum(axis=1)
            combined = np.where(count > 0, np.where(ok, z, 0.0).sum(axis=1) / np.maximum(count, 1), np.nan)
            self.combined.observe(combined, key[1])
            self._aligned.append((names, key[1], matrix))

    # -- reading -----------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.streams)

    def batches(self) -> int:
        return sum(s.batches for s in self.streams.values())

    def summary(self, weights: Any = None) -> dict[str, Any]:
        """`functions` (name -> mean, std, reliability_metrics, share, correlation, drift, ...) and `combined`
        (the standardised stream's reliability and the weighted total's mean and variance). Cached until the
        next batch."""
        if self._summary is not None and self._summary[:2] == (self.version, weights):
            return self._summary[2]
        self._flush()
        names = self.names
        w = reward_weights(weights, len(names))
        functions = {name: _function_summary(self.streams[name]) for name in names}
        combined: dict[str, Any] = {"functions": names, "weights": w.tolist(), "rows": 0}
        rows = self._aligned_rows(tuple(names))
        if rows is not None and len(names) >= 2:
            share, corr, total = _shares(rows, w)
            for i, name in enumerate(names):
                functions[name]["share"] = share[i]
                functions[name]["correlation"] = {o: corr[i][j] for j, o in enumerate(names) if j != i}
            combined.update(rows=int(rows.shape[0]), mean_reward=float(total.mean()), variance=float(total.var()))
            combined["histogram"] = histogram(total, self.combined.num_bins)  # of the total, in reward units
        if len(names) >= 2:
            view = self.combined.summary()
            combined["reliability_metrics"] = view["reliability_metrics"]
        elif names:
            functions[names[0]]["share"] = 1.0
        out = json_safe({"functions": functions, "combined": combined, "ignored_batches": self.ignored})
        self._summary = (self.version, weights, out)
        return out

    def _aligned_rows(self, names: tuple[str, ...]) -> np.ndarray | None:
        parts, total = [], 0
        for group_names, _step, matrix in reversed(self._aligned):
            if group_names != names:
                continue
            parts.append(matrix)
            total += matrix.shape[0]
            if total >= ALIGNED_ROWS:
                break
        if not parts:
            return None
        rows = np.vstack(parts[::-1])[-ALIGNED_ROWS:]
        rows = rows[np.isfinite(rows).all(axis=1)]
        return rows if rows.shape[0] >= 2 else None


def _shares(rows: np.ndarray, w: np.ndarray) -> tuple[list, list, np.ndarray]:
    """Each function's share of the weighted total's variance (w_i·cov(f_i, total) / var(total), summing to 1)
    and the correlation matrix (None where a function is constant)."""
    total = rows @ w
    centred = rows - rows.mean(axis=0)
    t = total - total.mean()
    var_t = float(t @ t) / rows.shape[0]
    share = [float(w[i] * (centred[:, i] @ t) / rows.shape[0] / var_t) if var_t > 0 else None for i in range(w.size)]
    std = np.sqrt((centred**2).mean(axis=0))
    cov = centred.T @ centred / rows.shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = cov / np.outer(std, std)
    corr_list = [[float(c) if math.isfinite(c) else None for c in row] for row in corr]
    return share, corr_list, total


def _function_summary(stream: RewardStream) -> dict[str, Any]:
    view = stream.integrator.summary()
    recent = stream.integrator.recent_scores()
    rel = view["reliability_metrics"]
    out: dict[str, Any] = {
        "metric": stream.metric(),
        "batches": stream.batches,
        "last_step": stream.last_step,
        "mean": float(recent.mean()) if recent.size else None,
        "std": float(recent.std()) if recent.size else None,
        "reliability_metrics": rel,
        "num_invalid": stream.num_invalid,
        "histogram": view["histogram"],
        "saturation": view["saturation"],
        "drift": _drift_view(stream),
        "share": None,
        "correlation": {},
        "samples": stream.samples,
        "stability_detail": view["stability_detail"],
    }
    recs = []
    if rel.get("stability") is not None and stream.batches >= 2 and rel["stability"] < 0.5:
        recs.append(RECOMMENDATIONS["stability"])
    if rel.get("consistency") is not None and rel["consistency"] < 0.8:
        recs.append(RECOMMENDATIONS["consistency"])
    out["recommendations"] = recs
    return out


def _drift_view(stream: RewardStream) -> dict[str, Any]:
    """The newest drift check (level judged with the default PSI threshold; episodes use the configured one)."""
    if not stream.drift.rows:
        return {"level": "warming_up", "psi": None, "ks": None, "mean_shift": None}
    last = {c: float(stream.drift.column(c)[-1]) for c in DRIFT_COLUMNS}
    return {
        "level": drift_level(last),
        "psi": last["psi"],
        "psi_excess": last["psi_excess"],
        "ks": last["ks"],
        "ks_critical": last["ks_critical"],
        "mean_shift": last["mean_shift"] if math.isfinite(last["mean_shift"]) else None,
        "step": int(last["step"]),
    }
