"""Reward reliability, batch by batch: stability, consistency, drift from the early run, saturation, zero-spread
GRPO groups and anomalies. Pure numpy + stdlib; O(window) per call, safe to call from a background thread.

Formulas (also in docs/reward-reliability.md), over the last ``window`` batches with finite scores:

- ``stability = 1 / (1 + swing / scale)``. ``swing`` is how much batch means move beyond sampling noise:
  ``swing² = max(0, ½·mean((m_t − m_{t−1})²) − mean(s_t² / n_t))`` (von Neumann successive differences, so a
  slow steady trend barely counts; the second term removes the noise a batch mean has by chance).
  ``scale = max(|mean reward|, median within-batch std, 1e-8)``, so rewards centred on zero are judged by their
  spread, not by a mean near 0. Steady → ≈ 1; means swinging by k within-batch stds → ≈ 1/(1 + k).
  With fewer than 2 batches stability is 1.0 (nothing seen moving yet; ``warming_up`` is true).
- ``consistency`` = share of recent scores inside the expected band: ``expected_range`` if given, else the early
  run's median ± 3 × 1.4826 × MAD (std when MAD is 0).
- ``variance`` and ``mean_reward`` are those of the recent scores (last ``window_scores``).
- Anomaly ``reward_zscore``: z of the batch mean against the median and MAD-std of earlier batch means (the
  current batch excluded; at least ``warmup_batches`` of them), with the sampling noise of a batch mean as floor.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, cast

import numpy as np

__all__ = ["RewardModelIntegrator", "SEVERITIES"]

SEVERITIES = ("low", "medium", "high", "critical")
_MAD_TO_STD = 1.4826
_EPS = 1e-8

RECOMMENDATIONS = {
    "empty": "The reward function returned no scores for this batch: check that it returns one float per completion.",
    "invalid": "Make the reward function return a finite float for every completion: None/NaN scores are "
    "dropped from the update and bias the advantage.",
    "zscore": "Inspect the completions of this batch: a sudden change of mean reward often means reward "
    "hacking or a bug in the reward function.",
    "scale": "The reward scale jumped: normalise or clip the reward (e.g. scale_rewards in GRPO) and check the "
    "reward function for a unit or parsing bug.",
    "saturation": "Rewards pile up at a bound: the task may be too easy or the reward clipped; check samples for "
    "reward hacking and widen or grade the reward.",
    "drift": "The reward distribution has moved away from the early run: expected while the policy improves; "
    "check samples for reward hacking if the shift is sudden.",
    "zero_spread": "Many GRPO groups get the same reward for every completion (no learning signal): raise "
    "num_generations or the sampling temperature, or use a more graded reward.",
    "stability": "Consider reward model calibration: batch-mean rewards swing more than the noise explains; "
    "normalise the reward or average over more samples.",
    "consistency": "Review the reward model training data: many rewards fall outside the expected range.",
    "anomaly_rate": "Investigate the reward model: anomalous batches are frequent.",
}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    try:
        return _json_safe(value.item())
    except (AttributeError, ValueError):
        return repr(value)


def _to_floats(scores: Any) -> np.ndarray:
    """Scores as float64, NaN for every None or non-number. Accepts lists, numpy arrays and torch tensors."""
    if scores is None:
        return np.empty(0)
    if hasattr(scores, "detach"):  # a torch tensor, without importing torch
        scores = scores.detach().float().cpu().numpy()
    if isinstance(scores, (int, float)):
        scores = [scores]
    try:
        arr = np.asarray(scores, dtype=np.float64).reshape(-1)
        return arr
    except (TypeError, ValueError):
        pass
    out = []
    for s in scores if isinstance(scores, Iterable) else [scores]:
        try:
            out.append(float(s))
        except (TypeError, ValueError):
            out.append(math.nan)
    return np.asarray(out, dtype=np.float64)


def _severity_at_least(level: str, minimum: str) -> bool:
    return SEVERITIES.index(level) >= SEVERITIES.index(minimum)


class RewardModelIntegrator:
    """Monitor reward scores batch by batch (seed API): ``monitor_reward_model(reward_scores, step, context)``."""

    def __init__(
        self,
        log_dir: str | os.PathLike | None = None,
        window: int = 64,
        anomaly_threshold: float = 3.0,
        expected_range: tuple[float, float] | None = None,
        *,
        warmup_batches: int = 5,
        window_scores: int = 2048,
        reference_scores: int = 512,
        reference_batches: int = 16,
        num_bins: int = 16,
        saturation_share: float = 0.8,
        scale_jump_factor: float = 10.0,
        drift_min_scores: int = 128,
    ):
        if window < 2:
            raise ValueError("window must be at least 2 batches")
        if expected_range is not None:
            lo, hi = float(expected_range[0]), float(expected_range[1])
            if not lo < hi:
                raise ValueError("expected_range must be (low, high) with low < high")
            expected_range = (lo, hi)
        self.log_dir = os.fspath(log_dir) if log_dir is not None else None
        self.window = window
        self.anomaly_threshold = float(anomaly_threshold)
        self.expected_range = expected_range
        self.warmup_batches = warmup_batches
        self.reference_scores = reference_scores
        self.reference_batches = reference_batches
        self.num_bins = num_bins
        self.saturation_share = saturation_share
        self.scale_jump_factor = scale_jump_factor
        self.drift_min_scores = drift_min_scores
        self._lock = threading.Lock()
        # Per batch (finite scores only): mean, variance, count.
        self._means: deque[float] = deque(maxlen=window)
        self._vars: deque[float] = deque(maxlen=window)
        self._counts: deque[int] = deque(maxlen=window)
        self._flagged: deque[bool] = deque(maxlen=window)
        # Baseline for z-scores: like _means, but restarted when a level shift holds.
        self._baseline: deque[float] = deque(maxlen=window)
        self._baseline_vars: deque[float] = deque(maxlen=window)
        self._shift: tuple[float, float] | None = None  # (mean, sign) of the last batch flagged by z-score
        self._recent: deque[float] = deque(maxlen=window_scores)
        self._since_reference: deque[float] = deque(maxlen=window_scores)
        self._early: list[float] = []
        self._early_batches = 0
        self._reference: np.ndarray | None = None  # sorted, frozen early-run scores
        self._seen_min = math.inf
        self._seen_max = -math.inf
        self._drift_level = "none"
        self._log_failed = False
        self.calls = 0
        self.last_result: dict[str, Any] | None = None

    # --------------------------------------------------------------------------------------------- public
    def monitor_reward_model(
        self, reward_scores: Any, step: int, context: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Analyse one batch of reward scores. Never raises for bad scores (None/NaN/empty are reported)."""
        with self._lock:
            result = self._monitor(reward_scores, step, context or {})
        self._log(result)
        self.last_result = result
        return result

    def reset(self) -> None:
        with self._lock:
            type(self).__init__(
                self,
                self.log_dir,
                self.window,
                self.anomaly_threshold,
                self.expected_range,
                warmup_batches=self.warmup_batches,
                window_scores=cast(int, self._recent.maxlen),
                reference_scores=self.reference_scores,
                reference_batches=self.reference_batches,
                num_bins=self.num_bins,
                saturation_share=self.saturation_share,
                scale_jump_factor=self.scale_jump_factor,
                drift_min_scores=self.drift_min_scores,
            )

    # ------------------------------------------------------------------------------------------ internals
    def _anomaly(
        self, out: list, step: int, metric: str, detector: str, severity: str, value: Any, message: str, rec_key: str
    ) -> None:
        out.append(
            {
                "step": step,
                "metric": metric,
                "detector": detector,
                "severity": severity,
                "value": value,
                "message": message,
                "recommendation": RECOMMENDATIONS[rec_key],
            }
        )

    def _monitor(self, reward_scores: Any, step: int, context: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        raw = _to_floats(reward_scores)
        finite_mask = np.isfinite(raw)
        scores = raw[finite_mask]
        n_total, n_valid = int(raw.size), int(scores.size)
        n_invalid = n_total - n_valid
        anomalies: list[dict[str, Any]] = []
        issues: list[str] = []

        if n_total == 0:
            issues.append("empty batch: no reward scores")
            self._anomaly(
                anomalies,
                step,
                "reward",
                "reward_empty",
                "medium",
                0,
                "the reward function returned no scores for this batch",
                "empty",
            )
        elif n_invalid:
            share = n_invalid / n_total
            severity = "critical" if share >= 0.5 else "high" if share >= 0.1 else "medium"
            issues.append(f"{n_invalid} of {n_total} reward scores are None/NaN/Inf")
            self._anomaly(
                anomalies,
                step,
                "reward",
                "reward_invalid",
                severity,
                share,
                f"{n_invalid} of {n_total} reward scores ({share:.0%}) are None, NaN or Inf",
                "invalid",
            )

        batch_mean: float | None = None
        batch_std: float | None = None
        if n_valid:
            batch_mean = float(scores.mean())
            batch_std = float(scores.std())
            self._detect_batch_anomalies(anomalies, step, scores, batch_mean, batch_std)
            self._means.append(batch_mean)
            self._vars.append(batch_std**2)
            self._baseline.append(batch_mean)
            self._baseline_vars.append(batch_std**2)
            self._counts.append(n_valid)
            self._flagged.append(any(a["detector"] in ("reward_zscore", "reward_scale_jump") for a in anomalies))
            self._recent.extend(scores.tolist())
            self._seen_min = min(self._seen_min, float(scores.min()))
            self._seen_max = max(self._seen_max, float(scores.max()))
            if self._reference is None:
                room = 8 * self.reference_scores - len(self._early)  # bounded even for huge batches
                self._early.extend(scores[: max(room, 0)].tolist())
                self._early_batches += 1
                if len(self._early) >= self.reference_scores or self._early_batches >= self.reference_batches:
                    self._reference = np.sort(np.asarray(self._early, dtype=np.float64))
                    self._early = []
            else:
                self._since_reference.extend(scores.tolist())

        recent = np.fromiter(self._recent, dtype=np.float64, count=len(self._recent))
        stability, swing, scale = self._stability()
        consistency, band = self._consistency(recent)
        saturation = self._saturation(recent, scores, anomalies, step)
        drift = self._drift(anomalies, step)
        zero_spread = self._zero_spread(raw, finite_mask, context, anomalies, step)
        reliability = {
            "stability": stability,
            "consistency": consistency,
            "variance": float(recent.var()) if recent.size else None,
            "mean_reward": float(recent.mean()) if recent.size else None,
        }
        recommendations = self._recommendations(anomalies, reliability)
        if n_total == 0 and RECOMMENDATIONS["empty"] not in recommendations:
            recommendations.insert(0, RECOMMENDATIONS["empty"])
        result = {
            "step": step,
            "num_scores": n_total,
            "num_valid": n_valid,
            "num_invalid": n_invalid,
            "batch_mean": batch_mean,
            "batch_std": batch_std,
            "reliability_metrics": reliability,
            "stability_detail": {
                "swing": swing,
                "scale": scale,
                "batches": len(self._means),
                "warming_up": len(self._means) < 2,
            },
            "expected_band": band,
            "anomalies": anomalies,
            "issues": issues
            + [a["message"] for a in anomalies if a["detector"] not in ("reward_empty", "reward_invalid")],
            "recommendations": recommendations,
            "drift": drift,
            "saturation": saturation,
            "zero_spread_group_share": zero_spread,
            "histogram": self._histogram(recent),
            "context": _json_safe(context),
            "timestamp": time.time(),
        }
        return _json_safe(result)

    def _detect_batch_anomalies(
        self, anomalies: list, step: int, scores: np.ndarray, batch_mean: float, batch_std: float
    ) -> None:
        k = len(self._baseline)
        if k < self.warmup_batches:
            return
        means = np.fromiter(self._baseline, dtype=np.float64, count=k)
        center = float(np.median(means))
        spread = _MAD_TO_STD * float(np.median(np.abs(means - center)))
        if spread == 0.0:
            spread = float(means.std())
        # A batch mean is noisy by std/sqrt(n) even when nothing changes: never judge it on less than that.
        within = math.sqrt(float(np.median(np.fromiter(self._baseline_vars, dtype=np.float64))))
        noise = within / math.sqrt(max(scores.size, 1))
        # The median of k earlier means is itself uncertain (var ≈ π/2k of one mean).
        spread = max(spread, noise, 1e-6 * max(1.0, abs(center))) * math.sqrt(1.0 + 1.6 / k)
        z = (batch_mean - center) / spread
        thr = self.anomaly_threshold
        if abs(z) > thr:
            sign = math.copysign(1.0, z)
            if self._shift is not None and self._shift[1] == sign and abs(batch_mean - self._shift[0]) <= thr * spread:
                # Second batch at the same new level: a level shift, reported once; restart the baseline on it.
                self._anomaly(
                    anomalies,
                    step,
                    "reward_mean",
                    "reward_level_shift",
                    "low",
                    batch_mean,
                    f"mean reward stays at its new level {batch_mean:.4g} (was {center:.4g}); new baseline",
                    "zscore",
                )
                last_var = self._baseline_vars[-1]
                self._baseline.clear()
                self._baseline_vars.clear()
                self._baseline.append(self._shift[0])
                self._baseline_vars.append(last_var)
                self._shift = None
            else:
                severity = "medium" if abs(z) <= 2 * thr else "high" if abs(z) <= 4 * thr else "critical"
                direction = "jumped" if z > 0 else "dropped"
                self._anomaly(
                    anomalies,
                    step,
                    "reward_mean",
                    "reward_zscore",
                    severity,
                    batch_mean,
                    f"mean reward {direction} to {batch_mean:.4g} (z = {z:+.1f} against the previous "
                    f"{k} batches, median {center:.4g})",
                    "zscore",
                )
                self._shift = (batch_mean, sign)
        else:
            self._shift = None
        # Scale jumps: the spread or the magnitude of the reward changes by an order of magnitude.
        factor = self.scale_jump_factor
        if within > 0 and batch_std > factor * within:
            self._anomaly(
                anomalies,
                step,
                "reward_std",
                "reward_scale_jump",
                "high",
                batch_std,
                f"reward spread jumped ×{batch_std / within:.0f} (std {batch_std:.4g} vs {within:.4g} before)",
                "scale",
            )
        typical = max(float(np.median(np.abs(means))), within, _EPS)
        if abs(batch_mean) > factor * typical and abs(z) > thr:
            self._anomaly(
                anomalies,
                step,
                "reward_mean",
                "reward_scale_jump",
                "high",
                batch_mean,
                f"reward magnitude jumped ×{abs(batch_mean) / typical:.0f} (mean {batch_mean:.4g} vs "
                f"typical {typical:.4g})",
                "scale",
            )

    def _stability(self) -> tuple[float, float | None, float | None]:
        k = len(self._means)
        if k < 2:
            return 1.0, None, None
        means = np.fromiter(self._means, dtype=np.float64, count=k)
        variances = np.fromiter(self._vars, dtype=np.float64, count=k)
        counts = np.fromiter(self._counts, dtype=np.float64, count=k)
        successive = 0.5 * float(np.mean(np.diff(means) ** 2))
        noise = float(np.mean(variances / counts))
        swing = math.sqrt(max(0.0, successive - noise))
        weights = counts / counts.sum()
        overall_mean = float(np.dot(weights, means))
        scale = max(abs(overall_mean), math.sqrt(float(np.median(variances))), _EPS)
        return 1.0 / (1.0 + swing / scale), swing, scale

    def _band(self) -> tuple[float, float] | None:
        if self.expected_range is not None:
            return self.expected_range
        early = self._reference if self._reference is not None else np.asarray(self._early)
        if early.size < 8:
            return None
        med = float(np.median(early))
        spread = _MAD_TO_STD * float(np.median(np.abs(early - med)))
        if spread == 0.0:
            spread = float(early.std())
        spread = max(spread, 1e-9 * max(1.0, abs(med)))
        return med - 3.0 * spread, med + 3.0 * spread

    def _consistency(self, recent: np.ndarray) -> tuple[float | None, list[float] | None]:
        band = self._band()
        if not recent.size:
            return None, list(band) if band else None
        if band is None:
            return 1.0, None
        inside = np.count_nonzero((recent >= band[0]) & (recent <= band[1]))
        return float(inside) / recent.size, [band[0], band[1]]

    def _saturation(self, recent: np.ndarray, scores: np.ndarray, anomalies: list, step: int) -> dict[str, Any]:
        if self.expected_range is not None:
            lo, hi, source = self.expected_range[0], self.expected_range[1], "expected_range"
        else:
            lo, hi, source = self._seen_min, self._seen_max, "seen"
        out: dict[str, Any] = {
            "share": None,
            "at_min": None,
            "at_max": None,
            "lower": lo,
            "upper": hi,
            "bounds": source,
            "batch_share": None,
        }
        if not recent.size or not hi - lo > 1e-12 * max(1.0, abs(hi), abs(lo)):
            return out
        tol = 1e-3 * (hi - lo)
        at_min = float(np.count_nonzero(recent <= lo + tol)) / recent.size
        at_max = float(np.count_nonzero(recent >= hi - tol)) / recent.size
        out.update(share=at_min + at_max, at_min=at_min, at_max=at_max)
        if scores.size >= 4:
            b_min = float(np.count_nonzero(scores <= lo + tol)) / scores.size
            b_max = float(np.count_nonzero(scores >= hi - tol)) / scores.size
            out["batch_share"] = b_min + b_max
            side, share = ("maximum", b_max) if b_max >= b_min else ("minimum", b_min)
            if share >= self.saturation_share:
                bound = hi if side == "maximum" else lo
                what = "of the expected range" if source == "expected_range" else "seen so far"
                severity = "high" if share >= 0.95 and max(at_min, at_max) >= 0.5 else "medium"
                self._anomaly(
                    anomalies,
                    step,
                    "reward",
                    "reward_saturation",
                    severity,
                    share,
                    f"{share:.0%} of the batch's rewards sit at the {side} {what} ({bound:.4g})",
                    "saturation",
                )
        return out

    def _drift(self, anomalies: list, step: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "psi": None,
            "ks": None,
            "level": "none",
            "reference_size": 0,
            "recent_size": 0,
            "mean_shift": None,
        }
        ref = self._reference
        if ref is None:
            out["level"] = "warming_up"
            return out
        recent = np.fromiter(self._since_reference, dtype=np.float64, count=len(self._since_reference))
        out["reference_size"], out["recent_size"] = int(ref.size), int(recent.size)
        if recent.size < self.drift_min_scores:
            out["level"] = "warming_up"
            return out
        # PSI over the reference's deciles (ties merged), with a small floor for empty bins.
        edges = np.unique(np.quantile(ref, np.linspace(0, 1, 11)[1:-1]))
        ref_counts = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=edges.size + 1)
        cur_counts = np.bincount(np.searchsorted(edges, recent, side="right"), minlength=edges.size + 1)
        p = np.maximum(ref_counts / ref.size, 1e-4)
        q = np.maximum(cur_counts / recent.size, 1e-4)
        psi = float(np.sum((q - p) * np.log(q / p)))
        # Two finite samples differ by chance: PSI ≈ (bins − 1)(1/n + 1/m) under no change. Judge the excess.
        psi_excess = max(0.0, psi - (edges.size) * (1.0 / ref.size + 1.0 / recent.size))
        # Two-sample Kolmogorov–Smirnov statistic.
        cur_sorted = np.sort(recent)
        grid = np.concatenate([ref, cur_sorted])
        ks = float(
            np.max(
                np.abs(
                    np.searchsorted(ref, grid, side="right") / ref.size
                    - np.searchsorted(cur_sorted, grid, side="right") / cur_sorted.size
                )
            )
        )
        ks_critical = 1.95 * math.sqrt((ref.size + recent.size) / (ref.size * recent.size))  # α ≈ 0.001
        level = "none"
        if ks > ks_critical:
            level = "significant" if psi_excess >= 0.25 else "moderate" if psi_excess >= 0.1 else "none"
        ref_std = float(ref.std())
        shift = (float(recent.mean()) - float(ref.mean())) / ref_std if ref_std > 0 else None
        out.update(psi=psi, psi_excess=psi_excess, ks=ks, ks_critical=ks_critical, level=level, mean_shift=shift)
        order = ("none", "moderate", "significant")
        if order.index(level) > order.index(self._drift_level) and level != "none":
            direction = "" if shift is None else (" upward" if shift > 0 else " downward")
            self._anomaly(
                anomalies,
                step,
                "reward",
                "reward_drift",
                "low" if level == "moderate" else "medium",
                psi,
                f"reward distribution shifted{direction} from the early run (PSI {psi:.2f}, KS {ks:.2f})",
                "drift",
            )
        self._drift_level = level
        return out

    def _zero_spread(
        self, raw: np.ndarray, finite_mask: np.ndarray, context: dict[str, Any], anomalies: list, step: int
    ) -> float | None:
        size = context.get("num_generations", context.get("group_size"))
        try:
            size = int(size) if size is not None else None
        except (TypeError, ValueError):
            size = None
        if not size or size < 2 or raw.size < size:
            return None
        groups = raw[: raw.size - raw.size % size].reshape(-1, size)
        mask = finite_mask[: groups.size].reshape(-1, size)
        usable = mask.sum(axis=1) >= 2
        if not usable.any():
            return None
        lo = np.where(mask, groups, np.inf).min(axis=1)
        hi = np.where(mask, groups, -np.inf).max(axis=1)
        flat = (hi - lo) <= 1e-8 * np.maximum(1.0, np.abs(hi))
        share = float(np.count_nonzero(flat & usable)) / float(np.count_nonzero(usable))
        if share >= 0.5:
            self._anomaly(
                anomalies,
                step,
                "reward",
                "reward_zero_spread",
                "high" if share >= 0.9 else "medium",
                share,
                f"{share:.0%} of the {int(np.count_nonzero(usable))} groups got the same reward "
                f"for every completion (no learning signal)",
                "zero_spread",
            )
        return share

    def _histogram(self, recent: np.ndarray) -> dict[str, Any]:
        if not recent.size:
            return {"counts": [], "edges": []}
        lo, hi = float(recent.min()), float(recent.max())
        if hi - lo <= 1e-12 * max(1.0, abs(lo)):
            lo, hi = lo - 0.5, hi + 0.5
        counts, edges = np.histogram(recent, bins=self.num_bins, range=(lo, hi))
        return {"counts": counts.tolist(), "edges": edges.tolist()}

    def _recommendations(self, anomalies: list, reliability: dict[str, Any]) -> list[str]:
        recs: list[str] = []
        for a in anomalies:
            if a["recommendation"] not in recs:
                recs.append(a["recommendation"])
        if len(self._means) >= 2 and reliability["stability"] is not None and reliability["stability"] < 0.5:
            recs.append(RECOMMENDATIONS["stability"])
        if reliability["consistency"] is not None and reliability["consistency"] < 0.8:
            recs.append(RECOMMENDATIONS["consistency"])
        if len(self._flagged) >= self.warmup_batches and sum(self._flagged) / len(self._flagged) > 0.2:
            recs.append(RECOMMENDATIONS["anomaly_rate"])
        return [r for i, r in enumerate(recs) if r not in recs[:i]]

    def _log(self, result: dict[str, Any]) -> None:
        if not self.log_dir:
            return
        try:
            os.makedirs(self.log_dir, exist_ok=True)
            line = json.dumps({"event": "reward_monitoring", **result}, allow_nan=False)
            with open(os.path.join(self.log_dir, "reward_monitoring.jsonl"), "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except (OSError, TypeError, ValueError) as exc:
            if not self._log_failed:  # say it once, keep monitoring
                self._log_failed = True
                result.setdefault("issues", []).append(f"could not write {self.log_dir}/reward_monitoring.jsonl: {exc}")
