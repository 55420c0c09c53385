"""The statistics reward reliability is made of, as plain functions over numpy arrays: score parsing (and GRPO's
reward weights), stability,
the expected band and consistency, shares at a bound, drift (PSI and KS), zero-spread groups and a histogram.
Pure numpy + stdlib; `rewards.RewardModelIntegrator` and `reward_streams.RewardStreams` both use them.
Formulas: docs/reward-reliability.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

MAD_TO_STD = 1.4826
EPS = 1e-8


def to_floats(scores: Any) -> np.ndarray:
    """Scores as float64, NaN for every None or non-number. Accepts lists, numpy arrays and torch tensors."""
    if scores is None:
        return np.empty(0)
    if hasattr(scores, "detach"):  # a torch tensor, without importing torch
        scores = scores.detach().float().cpu().numpy()
    if isinstance(scores, (int, float)):
        scores = [scores]
    try:
        return np.asarray(scores, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        pass
    out = []
    for s in scores if isinstance(scores, Iterable) else [scores]:
        try:
            out.append(float(s))
        except (TypeError, ValueError):
            out.append(math.nan)
    return np.asarray(out, dtype=np.float64)


def number(value: Any) -> float:
    """A logged number as a float; anything else (a bool, a string, None) NaN."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def reward_weights(weights: Any, n: int) -> np.ndarray:
    """GRPO's `reward_weights` when they are n finite numbers (in the order the functions first reported), else
    ones."""
    if isinstance(weights, (list, tuple)) and len(weights) == n:
        values = [number(v) for v in weights]
        if all(math.isfinite(v) for v in values):
            return np.asarray(values, dtype=np.float64)
    return np.ones(n)


def stability(means: np.ndarray, variances: np.ndarray, counts: np.ndarray) -> tuple[float, float | None, float | None]:
    """(stability, swing, scale) of a run of batch means; 1.0 (nothing seen moving) with fewer than 2 batches."""
    if means.size < 2:
        return 1.0, None, None
    successive = 0.5 * float(np.mean(np.diff(means) ** 2))
    # s² is the batch's population variance: s²/(n − 1) is the unbiased noise of its mean (s²/n misses 1/n of
    # it, and a steady reward from small batches would read as swinging).
    noise = float(np.mean(variances / np.maximum(counts - 1, 1)))
    # Both are estimates from k batches: the successive-difference one is off by ~sqrt(2/k) of the noise by
    # chance, so only an excess beyond two of those counts as swing (a steady reward reads ≈ 1, not ≈ 0.85).
    swing = math.sqrt(max(0.0, successive - noise * (1.0 + 2.0 * math.sqrt(2.0 / means.size))))
    overall_mean = float(np.dot(counts / counts.sum(), means))
    scale = max(abs(overall_mean), math.sqrt(float(np.median(variances))), EPS)
    return 1.0 / (1.0 + swing / scale), swing, scale


def robust_spread(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 * MAD), the std when the MAD is 0."""
    med = float(np.median(values))
    spread = MAD_TO_STD * float(np.median(np.abs(values - med)))
    return med, spread if spread > 0.0 else float(values.std())


def band(early: np.ndarray, expected_range: tuple[float, float] | None) -> tuple[float, float] | None:
    """The expected band: `expected_range`, else the early run's median ± 3 robust spreads (None: too few)."""
    if expected_range is not None:
        return expected_range
    if early.size < 8:
        return None
    med, spread = robust_spread(early)
    spread = max(spread, 1e-9 * max(1.0, abs(med)))
    return med - 3.0 * spread, med + 3.0 * spread


def consistency(recent: np.ndarray, expected: tuple[float, float] | None) -> float | None:
    """Share of `recent` inside the band (1.0 without a band yet, None without scores)."""
    if not recent.size:
        return None
    if expected is None:
        return 1.0
    inside = np.count_nonzero((recent >= expected[0]) & (recent <= expected[1]))
    return float(inside) / recent.size


def bound_shares(values: np.ndarray, lo: float, hi: float) -> tuple[float, float] | None:
    """(share at the minimum, share at the maximum), within 0.1 % of the range; None for an empty range."""
    if not values.size or not hi - lo > 1e-12 * max(1.0, abs(hi), abs(lo)):
        return None
    tol = 1e-3 * (hi - lo)
    return (
        float(np.count_nonzero(values <= lo + tol)) / values.size,
        float(np.count_nonzero(values >= hi - tol)) / values.size,
    )


def drift(ref: np.ndarray, recent: np.ndarray) -> dict[str, Any]:
    """PSI over the sorted reference's deciles (and its excess over chance) and the two-sample KS statistic."""
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, 11)[1:-1]))
    ref_counts = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=edges.size + 1)
    cur_counts = np.bincount(np.searchsorted(edges, recent, side="right"), minlength=edges.size + 1)
    p = np.maximum(ref_counts / ref.size, 1e-4)
    q = np.maximum(cur_counts / recent.size, 1e-4)
    psi = float(np.sum((q - p) * np.log(q / p)))
    # Two finite samples differ by chance: PSI ≈ (bins − 1)(1/n + 1/m) under no change. Judge the excess.
    psi_excess = max(0.0, psi - (edges.size) * (1.0 / ref.size + 1.0 / recent.size))
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
    ref_std = float(ref.std())
    shift = (float(recent.mean()) - float(ref.mean())) / ref_std if ref_std > 0 else None
    return {"psi": psi, "psi_excess": psi_excess, "ks": ks, "ks_critical": ks_critical, "mean_shift": shift}


def drift_level(stats: dict[str, Any], significant: float = 0.25) -> str:
    """none | moderate (PSI excess ≥ 0.4 × `significant`) | significant, and only when KS is significant too."""
    if stats["ks"] <= stats["ks_critical"]:
        return "none"
    excess = stats["psi_excess"]
    return "significant" if excess >= significant else "moderate" if excess >= 0.4 * significant else "none"


def zero_spread(raw: np.ndarray, finite_mask: np.ndarray, size: int | None) -> tuple[float, int] | None:
    """(share of GRPO groups of `size` whose finite scores are all equal, usable groups); None when unknown."""
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
    n = int(np.count_nonzero(usable))
    return float(np.count_nonzero(flat & usable)) / float(n), n


def histogram(recent: np.ndarray, bins: int) -> dict[str, Any]:
    if not recent.size:
        return {"counts": [], "edges": []}
    lo, hi = float(recent.min()), float(recent.max())
    if hi - lo <= 1e-12 * max(1.0, abs(lo)):
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(recent, bins=bins, range=(lo, hi))
    return {"counts": counts.tolist(), "edges": edges.tolist()}


def group_size(context: dict[str, Any]) -> int | None:
    size = context.get("num_generations", context.get("group_size"))
    try:
        return int(size) if size is not None else None
    except (TypeError, ValueError):
        return None
