"""Unit-free trend, per-metric summaries, per-epoch statistics and the seed's derived ratios.

Pure numpy. A trend is judged by the fitted change over the window relative to the metric's own spread, so
KL summed per sequence and KL averaged per token get the same verdict.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

TREND_CHANGE = 0.5  # fitted change over the window, in standard deviations of the values
TREND_T = 3.0  # and the slope must be this many standard errors from zero


def _finite(values: Iterable[float] | np.ndarray | None) -> np.ndarray:
    if values is None:
        return np.zeros(0)
    arr = np.asarray(
        [np.nan if v is None else v for v in values] if not isinstance(values, np.ndarray) else values, dtype=np.float64
    )
    ok = np.isfinite(arr)
    return arr if ok.all() else arr[ok]


def _verdict(v: np.ndarray, mean: float, dev: np.ndarray, ss: float) -> str:
    """The trend of finite values `v` given their mean, deviations from it and sum of squared deviations."""
    n = v.shape[0]
    sd = math.sqrt(ss / n)
    if n < 3 or not sd > 1e-12 * max(1.0, float(np.abs(v).max())):
        return "stable"
    i = np.arange(n, dtype=np.float64)
    i -= (n - 1) / 2.0
    sxx = n * (n * n - 1) / 12.0  # sum of the centred indices' squares, in closed form
    slope = float(i @ dev) / sxx
    resid_ss = max(ss - slope * slope * sxx, 0.0)  # least-squares residuals: Syy - slope * Sxy
    se = math.sqrt(resid_ss / max(n - 2, 1) / sxx)
    change = slope * (n - 1) / sd
    t = slope / se if se > 0 else math.inf * (1 if slope > 0 else -1)
    if change >= TREND_CHANGE and t >= TREND_T:
        return "increasing"
    if change <= -TREND_CHANGE and t <= -TREND_T:
        return "decreasing"
    return "stable"


def trend(values: Iterable[float] | np.ndarray | None) -> str:
    """'increasing', 'decreasing' or 'stable' for a series (None/NaN/Inf ignored).

    Least-squares slope over the finite values in order; a trend needs the fitted change across the window to
    reach TREND_CHANGE standard deviations of the values and the slope to be TREND_T standard errors from 0.
    """
    v = _finite(values)
    if v.shape[0] < 3:
        return "stable"
    mean = float(v.mean())
    dev = v - mean
    return _verdict(v, mean, dev, float(dev @ dev))


def summarise(values: Iterable[float] | np.ndarray | None) -> dict[str, Any]:
    """{last, mean, std, min, max, trend} over the finite values (None for each when there are none)."""
    v = _finite(values)
    if v.size == 0:
        return {"last": None, "mean": None, "std": None, "min": None, "max": None, "trend": "stable"}
    mean = float(v.mean())
    dev = v - mean
    ss = float(dev @ dev)
    return {
        "last": float(v[-1]),
        "mean": mean,
        "std": math.sqrt(ss / v.shape[0]),
        "min": float(v.min()),
        "max": float(v.max()),
        "trend": _verdict(v, mean, dev, ss),
    }


def epoch_statistics(steps: Any, metrics: Mapping[str, Any], epoch_values: Any = None) -> list[dict]:
    """Per-epoch summaries: [{"epoch": k, "first_step", "last_step", "steps", "metrics": {name: summary}}].

    Epochs come from `epoch_values` (the trainer's fractional epoch per row; a row logged at epoch 1.0 ends
    epoch 0), else from a metric named "epoch", else the whole history is one epoch.
    """
    steps = np.asarray(steps)
    n = steps.shape[0]
    if n == 0:
        return []
    if epoch_values is None and "epoch" in metrics:
        epoch_values = metrics["epoch"]
    if epoch_values is None:
        ep = np.zeros(n, dtype=np.int64)
    else:
        e = np.asarray(epoch_values, dtype=np.float64)
        e = np.where(np.isfinite(e), e, np.nan)
        # forward-fill rows without an epoch value so they join the epoch they were logged in
        idx = np.where(np.isfinite(e), np.arange(n), 0)
        np.maximum.accumulate(idx, out=idx)
        e = e[idx]
        e = np.where(np.isfinite(e), e, 0.0)
        ep = np.maximum(np.ceil(e - 1e-9) - 1, 0).astype(np.int64)
    out = []
    for k in np.unique(ep).tolist():
        rows = np.flatnonzero(ep == k)
        out.append(
            {
                "epoch": int(k),
                "first_step": int(steps[rows[0]]),
                "last_step": int(steps[rows[-1]]),
                "steps": int(rows.size),
                "metrics": {
                    name: summarise(np.asarray(vals, dtype=np.float64)[rows])
                    for name, vals in metrics.items()
                    if name != "epoch" and np.shape(vals) == (n,)
                },
            }
        )
    return out


def _ratio(num: Any, den: Any) -> Any:
    num_a = np.asarray(num, dtype=np.float64)
    den_a = np.abs(np.asarray(den, dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(np.isfinite(num_a) & np.isfinite(den_a) & (den_a > 1e-12), num_a / den_a, np.nan)
    if r.ndim == 0:
        f = float(r)
        return f if math.isfinite(f) else None
    return r


def derived_ratios(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The seed's ratios where their inputs exist: kl_policy_ratio = kl / |policy_loss| and
    value_policy_ratio = value_loss / |policy_loss|. Scalars give float or None (zero/NaN guarded);
    arrays give arrays with NaN where undefined."""
    out: dict[str, Any] = {}
    pl = metrics.get("policy_loss")
    if pl is None:
        return out
    if metrics.get("kl") is not None:
        out["kl_policy_ratio"] = _ratio(metrics["kl"], pl)
    if metrics.get("value_loss") is not None:
        out["value_policy_ratio"] = _ratio(metrics["value_loss"], pl)
    return out


# -- eval metrics against their training twins -------------------------------------------------------------
HIGHER_IS_BETTER = ("accuracy", "accuracies", "margin", "margins")


def eval_gap_series(train: Any, evaluated: Any) -> np.ndarray:
    """Row-aligned `eval − train` at the rows holding an eval value (NaN elsewhere). The training side of each
    gap is the mean of the finite training values since the previous eval row (up to and including this row),
    or the newest earlier one when none was logged in between: an eval loss is averaged over the eval set, so
    it is compared with the training loss of the same stretch, not with one noisy step."""
    t = np.asarray(train, dtype=np.float64)
    e = np.asarray(evaluated, dtype=np.float64)
    n = min(t.shape[0], e.shape[0])
    t, e = t[:n], e[:n]
    out = np.full(n, np.nan)
    rows = np.flatnonzero(np.isfinite(e))
    if rows.size == 0:
        return out
    ok = np.isfinite(t)
    csum = np.concatenate(([0.0], np.cumsum(np.where(ok, t, 0.0))))
    ccount = np.concatenate(([0], np.cumsum(ok)))
    newest = np.where(ok, np.arange(n), -1)
    np.maximum.accumulate(newest, out=newest)
    start = np.concatenate(([0], rows[:-1] + 1))
    count = ccount[rows + 1] - ccount[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (csum[rows + 1] - csum[start]) / count
    before = newest[rows]
    fallback = np.where(before >= 0, t[np.maximum(before, 0)], np.nan)
    out[rows] = e[rows] - np.where(count > 0, mean, fallback)
    return out


def eval_pair(
    name: str, train: Any, evaluated: Any, train_summary: Any = None, eval_summary: Any = None
) -> dict[str, Any]:
    """One eval metric against its training twin: the newest values, the newest gap (eval − train, see
    eval_gap_series), its mean, the trends of the three series and `overfitting`: eval is behind training (a
    higher eval loss, a lower eval accuracy or margin) and the gap keeps moving that way while the eval metric
    itself does not improve. None when there are too few eval points to tell (a trend needs 3) or the metric
    has no direction (`better`: losses lower, accuracies and margins higher). `train_summary` / `eval_summary`:
    the `summarise()` of the two series when the caller has them already (the report's metric table)."""
    gaps = eval_gap_series(train, evaluated)
    g = _finite(gaps)
    t_sum = train_summary if train_summary is not None else summarise(train)
    e_sum = eval_summary if eval_summary is not None else summarise(evaluated)
    gap_trend = trend(g)
    higher = any(part in name.lower() for part in HIGHER_IS_BETTER)
    lower = "loss" in name.lower()
    overfitting: bool | None = None
    if g.shape[0] >= 3 and (higher or lower):
        worse, improving = ("decreasing", "increasing") if higher else ("increasing", "decreasing")
        behind = g[-1] < 0 if higher else g[-1] > 0  # eval is on the worse side of training now
        overfitting = bool(behind) and gap_trend == worse and e_sum["trend"] != improving
    return {
        "train_last": t_sum["last"],
        "eval_last": e_sum["last"],
        "gap": float(g[-1]) if g.size else None,
        "gap_mean": float(g.mean()) if g.size else None,
        "points": int(g.shape[0]),
        "gap_trend": gap_trend,
        "train_trend": t_sum["trend"],
        "eval_trend": e_sum["trend"],
        "better": "higher" if higher else "lower" if lower else None,
        "overfitting": overfitting,
    }
