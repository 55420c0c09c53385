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
from typing import Any, cast

import numpy as np

from rlhf_tui.analysis import reward_stats as stats
from rlhf_tui.analysis.plain_json import json_safe
from rlhf_tui.analysis.reward_stats import EPS

__all__ = ["RewardModelIntegrator", "SEVERITIES"]

SEVERITIES = ("low", "medium", "high", "critical")
CONSTANT_K, CONSTANT_N = 4, 5  # a reward constant over the batch in 4 of the last 5 batches: no signal from it
_to_floats = stats.to_floats  # kept for callers of the old private name
_json_safe = json_safe

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
    "constant": "The reward function returns one value for every completion: it gives GRPO no signal. Check it "
    "is not stuck (an exception caught and a default returned, a parse that always fails) or grade it more finely.",
    "drift": "The reward distribution has moved away from the early run: expected while the policy improves; "
    "check samples for reward hacking if the shift is sudden.",
    "zero_spread": "Many GRPO groups get the same reward for every completion (no learning signal): raise "
    "num_generations or the sampling temperature, or use a more graded reward.",
    "stability": "Consider reward model calibration: batch-mean rewards swing more than the noise explains; "
    "normalise the reward or average over more samples.",
    "consistency": "Review the reward model training data: many rewards fall outside the expected range.",
    "anomaly_rate": "Investigate the reward model: anomalous batches are frequent.",
}

NO_SCORES = "the reward function returned no scores for this batch"


def _severity_at_least(level: str, minimum: str) -> bool:
    return SEVERITIES.index(level) >= SEVERITIES.index(minimum)


class RewardModelIntegrator:
    """Monitor reward scores batch by batch (seed API): ``monitor_reward_model(reward_scores, step, context)``.

    ``observe`` is the cheap part of one call (the state update and this batch's own statistics, returned as
    plain numbers, no anomalies); ``summary`` the window-wide part (stability, consistency, drift, histogram).
    `reward_streams.RewardStreams` calls them apart, on every batch and only when a view is drawn."""

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
        self._constant: deque[bool] = deque(maxlen=CONSTANT_N)
        # Baseline for z-scores: like _means, but restarted when a level shift holds.
        self._baseline: deque[float] = deque(maxlen=window)
        self._baseline_vars: deque[float] = deque(maxlen=window)
        self._shift: tuple[float, float] | None = None  # (mean, sign) of the last batch flagged by z-score
        self._recent: deque[float] = deque(maxlen=window_scores)
        self._since_reference: deque[float] = deque(maxlen=window_scores)
        self._early: list[float] = []
        self._early_stds: list[float] = []
        self._early_batches = 0
        self._reference: np.ndarray | None = None  # sorted, frozen early-run scores
        self._early_within: float | None = None  # median within-batch std of the early run, frozen with it
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
        context = context or {}
        with self._lock:
            raw = stats.to_floats(reward_scores)
            features = self._observe(raw, step, context)
            anomalies = self._anomalies(features, step)
            result = self._summary(raw, features, anomalies, step, context)
        self._log(result)
        self.last_result = result
        return result

    def observe(self, reward_scores: Any, step: int, context: dict[str, Any] | None = None) -> dict[str, float]:
        """Take one batch into the state; its statistics as numbers (NaN where not known yet):
        `n_total`, `n_valid`, `invalid_share`, `mean`, `std`, `z` and `center`/`k` (its baseline), `shift` (1 at
        the second batch of a level shift: the baseline restarts), `std_ratio` (std / usual within-batch std),
        `mag_ratio` (|mean| / usual magnitude), `spread_ratio` (std / the early run's within-batch std; 0 for a
        constant batch), `sat_share` (share of the batch at a bound seen so far), `sat_side` (+1 max, -1 min),
        `zero_spread` (share of flat GRPO groups) and `groups`."""
        with self._lock:
            return self._observe(stats.to_floats(reward_scores), step, context or {})

    def summary(self) -> dict[str, Any]:
        """Reliability over the window, without taking a batch: `reliability_metrics`, `stability_detail`,
        `expected_band`, `saturation`, `histogram` (JSON-safe)."""
        with self._lock:
            recent = np.fromiter(self._recent, dtype=np.float64, count=len(self._recent))
            stability, swing, scale = self._stability()
            band = self._band()
            saturation = self._saturation(recent)
            return json_safe(
                {
                    "reliability_metrics": self._reliability(recent, stability, band),
                    "stability_detail": self._stability_detail(swing, scale),
                    "expected_band": list(band) if band else None,
                    "saturation": saturation,
                    "histogram": stats.histogram(recent, self.num_bins),
                    "batches": len(self._means),
                }
            )

    def drift_stats(self) -> dict[str, Any] | None:
        """PSI/KS of the scores since the early-run reference against it (None while warming up)."""
        with self._lock:
            ref = self._reference
            if ref is None or len(self._since_reference) < self.drift_min_scores:
                return None
            recent = np.fromiter(self._since_reference, dtype=np.float64, count=len(self._since_reference))
            return {**stats.drift(ref, recent), "reference_size": int(ref.size), "recent_size": int(recent.size)}

    def reference(self) -> tuple[float, float] | None:
        """(mean, std) of the early-run scores (so far, until frozen); None before any score."""
        with self._lock:
            early = self._reference if self._reference is not None else np.asarray(self._early)
            return (float(early.mean()), float(early.std())) if early.size else None

    def recent_scores(self) -> np.ndarray:
        with self._lock:
            return np.fromiter(self._recent, dtype=np.float64, count=len(self._recent))

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

    # ------------------------------------------------------------------------------------------ observing
    def _observe(self, raw: np.ndarray, step: int, context: dict[str, Any]) -> dict[str, float]:
        self.calls += 1
        finite_mask = np.isfinite(raw)
        scores = raw[finite_mask]
        nan = math.nan
        f: dict[str, float] = dict.fromkeys(
            ("mean", "std", "z", "center", "std_ratio", "mag_ratio", "spread_ratio", "sat_share", "sat_side"), nan
        )
        f.update(n_total=raw.size, n_valid=scores.size, k=0.0, shift=0.0, zero_spread=nan, groups=0.0)
        f["invalid_share"] = (raw.size - scores.size) / raw.size if raw.size else nan
        zs = stats.zero_spread(raw, finite_mask, stats.group_size(context))
        if zs is not None:
            f["zero_spread"], f["groups"] = zs[0], float(zs[1])
        if not scores.size:
            return f
        mean, std = float(scores.mean()), float(scores.std())
        f["mean"], f["std"] = mean, std
        self._judge_batch(f, scores.size)
        if scores.size >= 2:
            constant = std <= EPS * max(1.0, abs(mean))
            early = self._early_within
            if early is None and self._early_stds:
                early = float(np.median(self._early_stds))
            f["spread_ratio"] = 0.0 if constant else std / early if early else math.inf
            self._constant.append(constant)
        self._means.append(mean)
        self._vars.append(std**2)
        self._baseline.append(mean)
        self._baseline_vars.append(std**2)
        self._counts.append(scores.size)
        self._recent.extend(scores.tolist())
        self._seen_min = min(self._seen_min, float(scores.min()))
        self._seen_max = max(self._seen_max, float(scores.max()))
        if scores.size >= 4:
            lo, hi = self.expected_range or (self._seen_min, self._seen_max)
            shares = stats.bound_shares(scores, lo, hi)
            if shares is not None:
                f["sat_share"], f["sat_side"] = max(shares), 1.0 if shares[1] >= shares[0] else -1.0
        if self._reference is None:
            room = 8 * self.reference_scores - len(self._early)  # bounded even for huge batches
            self._early.extend(scores[: max(room, 0)].tolist())
            if scores.size >= 2:
                self._early_stds.append(std)
            self._early_batches += 1
            if len(self._early) >= self.reference_scores or self._early_batches >= self.reference_batches:
                self._reference = np.sort(np.asarray(self._early, dtype=np.float64))
                self._early_within = float(np.median(self._early_stds)) if self._early_stds else 0.0
                self._early, self._early_stds = [], []
        else:
            self._since_reference.extend(scores.tolist())
        return f

    def _judge_batch(self, f: dict[str, float], n: int) -> None:
        """z of the batch mean against the baseline of earlier batch means; the level-shift restart; scale."""
        k = len(self._baseline)
        if k < self.warmup_batches:
            return
        mean = f["mean"]
        means = np.fromiter(self._baseline, dtype=np.float64, count=k)
        center, spread = stats.robust_spread(means)
        # A batch mean is noisy by std/sqrt(n) even when nothing changes: never judge it on less than that.
        within = math.sqrt(float(np.median(np.fromiter(self._baseline_vars, dtype=np.float64))))
        noise = within / math.sqrt(max(n, 1))
        # The median of k earlier means is itself uncertain (var ≈ π/2k of one mean).
        spread = max(spread, noise, 1e-6 * max(1.0, abs(center))) * math.sqrt(1.0 + 1.6 / k)
        z = (mean - center) / spread
        f.update(z=z, center=center, k=float(k))
        thr = self.anomaly_threshold
        if abs(z) > thr:
            sign = math.copysign(1.0, z)
            if self._shift is not None and self._shift[1] == sign and abs(mean - self._shift[0]) <= thr * spread:
                # Second batch at the same new level: a level shift, reported once; restart the baseline on it.
                f["shift"] = 1.0
                last_var = self._baseline_vars[-1]
                self._baseline.clear()
                self._baseline_vars.clear()
                self._baseline.append(self._shift[0])
                self._baseline_vars.append(last_var)
                self._shift = None
            else:
                self._shift = (mean, sign)
        else:
            self._shift = None
        if within > 0:
            f["std_ratio"] = f["std"] / within
        f["mag_ratio"] = abs(mean) / max(float(np.median(np.abs(means))), within, EPS)

    # ------------------------------------------------------------------------------------------ anomalies
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

    def _anomalies(self, f: dict[str, float], step: int) -> list[dict[str, Any]]:
        """The seed API's anomalies of one observed batch, judged with this integrator's own settings."""
        out: list[dict[str, Any]] = []
        n_total, n_valid = int(f["n_total"]), int(f["n_valid"])
        if n_total == 0:
            self._anomaly(out, step, "reward", "reward_empty", "medium", 0, NO_SCORES, "empty")
        elif n_valid < n_total:
            share = f["invalid_share"]
            severity = "critical" if share >= 0.5 else "high" if share >= 0.1 else "medium"
            msg = f"{n_total - n_valid} of {n_total} reward scores ({share:.0%}) are None, NaN or Inf"
            self._anomaly(out, step, "reward", "reward_invalid", severity, share, msg, "invalid")
        z, thr, factor, mean = f["z"], self.anomaly_threshold, self.scale_jump_factor, f["mean"]
        if abs(z) > thr:  # NaN compares False
            k, center = int(f["k"]), f["center"]
            if f["shift"]:
                msg = f"mean reward stays at its new level {mean:.4g} (was {center:.4g}); new baseline"
                self._anomaly(out, step, "reward_mean", "reward_level_shift", "low", mean, msg, "zscore")
            else:
                severity = "medium" if abs(z) <= 2 * thr else "high" if abs(z) <= 4 * thr else "critical"
                msg = (
                    f"mean reward {'jumped' if z > 0 else 'dropped'} to {mean:.4g} (z = {z:+.1f} against the "
                    f"previous {k} batches, median {center:.4g})"
                )
                self._anomaly(out, step, "reward_mean", "reward_zscore", severity, mean, msg, "zscore")
        if f["std_ratio"] > factor:
            ratio, std = f["std_ratio"], f["std"]
            msg = f"reward spread jumped ×{ratio:.0f} (std {std:.4g} vs {std / ratio:.4g} before)"
            self._anomaly(out, step, "reward_std", "reward_scale_jump", "high", std, msg, "scale")
        if f["mag_ratio"] > factor and abs(z) > thr:
            ratio = f["mag_ratio"]
            msg = f"reward magnitude jumped ×{ratio:.0f} (mean {mean:.4g} vs typical {abs(mean) / ratio:.4g})"
            self._anomaly(out, step, "reward_mean", "reward_scale_jump", "high", mean, msg, "scale")
        if n_valid >= 2 and f["spread_ratio"] == 0.0 and sum(self._constant) >= CONSTANT_K:
            msg = f"every score was {mean:.4g} in {sum(self._constant)} of the last {len(self._constant)} batches"
            self._anomaly(out, step, "reward_std", "reward_constant", "medium", mean, msg, "constant")
        if f["sat_share"] >= self.saturation_share:
            self._saturation_anomaly(out, step, f)
        zs = f["zero_spread"]
        if zs >= 0.5:
            msg = (
                f"{zs:.0%} of the {int(f['groups'])} groups got the same reward for every completion "
                f"(no learning signal)"
            )
            self._anomaly(
                out, step, "reward", "reward_zero_spread", "high" if zs >= 0.9 else "medium", zs, msg, "zero_spread"
            )
        self._flagged.append(any(a["detector"] in ("reward_zscore", "reward_scale_jump") for a in out))
        return out

    def _saturation_anomaly(self, out: list, step: int, f: dict[str, float]) -> None:
        share, side = f["sat_share"], "maximum" if f["sat_side"] > 0 else "minimum"
        recent = np.fromiter(self._recent, dtype=np.float64, count=len(self._recent))
        lo, hi = self.expected_range or (self._seen_min, self._seen_max)
        shares = stats.bound_shares(recent, lo, hi) or (0.0, 0.0)
        what = "of the expected range" if self.expected_range is not None else "seen so far"
        severity = "high" if share >= 0.95 and max(shares) >= 0.5 else "medium"
        bound = hi if side == "maximum" else lo
        msg = f"{share:.0%} of the batch's rewards sit at the {side} {what} ({bound:.4g})"
        self._anomaly(out, step, "reward", "reward_saturation", severity, share, msg, "saturation")

    # ---------------------------------------------------------------------------------------------- summary
    def _summary(
        self, raw: np.ndarray, f: dict[str, float], anomalies: list, step: int, context: dict[str, Any]
    ) -> dict[str, Any]:
        recent = np.fromiter(self._recent, dtype=np.float64, count=len(self._recent))
        stability, swing, scale = self._stability()
        band = self._band()
        reliability = self._reliability(recent, stability, band)
        saturation = self._saturation(recent)
        if f["sat_share"] == f["sat_share"]:
            saturation["batch_share"] = f["sat_share"]
        drift = self._drift(anomalies, step)
        recommendations = self._recommendations(anomalies, reliability)
        if raw.size == 0 and RECOMMENDATIONS["empty"] not in recommendations:
            recommendations.insert(0, RECOMMENDATIONS["empty"])
        n_total, n_valid = int(f["n_total"]), int(f["n_valid"])
        issues = []
        if n_total == 0:
            issues.append("empty batch: no reward scores")
        elif n_valid < n_total:
            issues.append(f"{n_total - n_valid} of {n_total} reward scores are None/NaN/Inf")
        issues += [a["message"] for a in anomalies if a["detector"] not in ("reward_empty", "reward_invalid")]
        result = {
            "step": step,
            "num_scores": n_total,
            "num_valid": n_valid,
            "num_invalid": n_total - n_valid,
            "batch_mean": f["mean"] if n_valid else None,
            "batch_std": f["std"] if n_valid else None,
            "reliability_metrics": reliability,
            "stability_detail": self._stability_detail(swing, scale),
            "expected_band": list(band) if band else None,
            "anomalies": anomalies,
            "issues": issues,
            "recommendations": recommendations,
            "drift": drift,
            "saturation": saturation,
            "zero_spread_group_share": f["zero_spread"] if f["zero_spread"] == f["zero_spread"] else None,
            "histogram": stats.histogram(recent, self.num_bins),
            "context": json_safe(context),
            "timestamp": time.time(),
        }
        return json_safe(result)

    def _reliability(self, recent: np.ndarray, stability: float, band: tuple[float, float] | None) -> dict:
        return {
            "stability": stability,
            "consistency": stats.consistency(recent, band),
            "variance": float(recent.var()) if recent.size else None,
            "mean_reward": float(recent.mean()) if recent.size else None,
        }

    def _stability_detail(self, swing: float | None, scale: float | None) -> dict[str, Any]:
        return {"swing": swing, "scale": scale, "batches": len(self._means), "warming_up": len(self._means) < 2}

    def _stability(self) -> tuple[float, float | None, float | None]:
        k = len(self._means)
        return stats.stability(
            np.fromiter(self._means, dtype=np.float64, count=k),
            np.fromiter(self._vars, dtype=np.float64, count=k),
            np.fromiter(self._counts, dtype=np.float64, count=k),
        )

    def _band(self) -> tuple[float, float] | None:
        early = self._reference if self._reference is not None else np.asarray(self._early)
        return stats.band(early, self.expected_range)

    def _saturation(self, recent: np.ndarray) -> dict[str, Any]:
        if self.expected_range is not None:
            lo, hi, source = self.expected_range[0], self.expected_range[1], "expected_range"
        else:
            lo, hi, source = self._seen_min, self._seen_max, "seen"
        shares = stats.bound_shares(recent, lo, hi)
        at_min, at_max = shares if shares is not None else (None, None)
        return {
            "share": None if shares is None else sum(shares),
            "at_min": at_min,
            "at_max": at_max,
            "lower": lo,
            "upper": hi,
            "bounds": source,
            "batch_share": None,
        }

    def _drift(self, anomalies: list, step: int) -> dict[str, Any]:
        out: dict[str, Any] = {"psi": None, "ks": None, "level": "warming_up", "reference_size": 0}
        out.update(recent_size=0, mean_shift=None)
        ref = self._reference
        if ref is None:
            return out
        recent = np.fromiter(self._since_reference, dtype=np.float64, count=len(self._since_reference))
        out["reference_size"], out["recent_size"] = int(ref.size), int(recent.size)
        if recent.size < self.drift_min_scores:
            return out
        out.update(stats.drift(ref, recent))
        level = out["level"] = stats.drift_level(out)
        order = ("none", "moderate", "significant")
        if order.index(level) > order.index(self._drift_level) and level != "none":
            shift = out["mean_shift"]
            direction = "" if shift is None else (" upward" if shift > 0 else " downward")
            msg = (
                f"reward distribution shifted{direction} from the early run (PSI {out['psi']:.2f}, KS {out['ks']:.2f})"
            )
            severity = "low" if level == "moderate" else "medium"
            self._anomaly(anomalies, step, "reward", "reward_drift", severity, out["psi"], msg, "drift")
        self._drift_level = level
        return out

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
