"""The seed project's anomaly rule, kept only as the baseline that `benchmarks/detection.py` compares against.

Rule: for each of the seed's five metrics (canonical names kl, policy_loss, value_loss, reward, clip_ratio),
z = (x - mean) / std over the last `window` values INCLUDING the current one; an anomaly when at least
`min_count` values are present and |z| > `threshold`. Because the window contains the point, |z| can never
exceed sqrt(n - 1) (so z > 3 is impossible before 11 values), and a sustained shift inflates the std it is
divided by. Do not use it for alarms.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

SEED_METRICS: tuple[str, ...] = ("kl", "policy_loss", "value_loss", "reward", "clip_ratio")


def seed_zscores(x: np.ndarray, window: int = 100, min_count: int = 10) -> np.ndarray:
    """Per-row z-score of the seed rule (NaN where it cannot be computed)."""
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    v = np.where(finite, x, 0.0)
    c1 = np.concatenate([[0.0], np.cumsum(v)])
    c2 = np.concatenate([[0.0], np.cumsum(v * v)])
    cn = np.concatenate([[0], np.cumsum(finite)])
    hi = np.arange(1, x.shape[0] + 1)
    lo = np.maximum(hi - window, 0)
    n = cn[hi] - cn[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (c1[hi] - c1[lo]) / n
        var = (c2[hi] - c2[lo]) / n - mean * mean
        std = np.sqrt(np.maximum(var, 0.0))
        z = (x - mean) / std
    z[(n < min_count) | ~finite | ~(std > 1e-12 * np.maximum(np.abs(mean), 1.0))] = np.nan
    return z


def seed_detect(
    steps: Any, metrics: Mapping[str, Any], threshold: float = 3.0, window: int = 100, min_count: int = 10
) -> list[dict]:
    """Every step the seed rule flags, as alarms {step, metric, detector, severity, value, z}.
    Severity follows the seed: high when |z| > 2 x threshold, otherwise medium."""
    steps = np.asarray(steps)
    out: list[dict] = []
    for name in SEED_METRICS:
        if name not in metrics:
            continue
        x = np.asarray(metrics[name], dtype=np.float64)
        z = seed_zscores(x, window, min_count)
        with np.errstate(invalid="ignore"):
            rows = np.flatnonzero(np.abs(z) > threshold)
        for r in rows.tolist():
            zz = float(z[r])
            out.append(
                {
                    "step": int(steps[r]),
                    "metric": name,
                    "detector": "seed_zscore",
                    "severity": "high" if abs(zz) > 2 * threshold else "medium",
                    "value": float(x[r]),
                    "z": zz,
                }
            )
    out.sort(key=lambda a: (a["step"], a["metric"]))
    return out
