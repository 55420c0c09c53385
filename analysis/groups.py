"""Prompt groups of a GRPO/RLOO batch (`num_generations` completions per prompt): the groups whose rewards are
all equal (TRL's `frac_reward_zero_std`) split into all at the run's maximum (too easy: every completion
solved it), all at the run's minimum (too hard: none did) and the other equal ones. The fixes are opposite
(harder prompts or a finer reward, against easier prompts or a denser reward), so the one fraction hides it.

Pure numpy. The range is the run's observed range of the total reward (`RewardRange`), not the batch's: a
batch where every group is solved has no spread of its own.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

METRICS = ("groups/too_easy", "groups/too_hard", "groups/zero_std_other")
TOLERANCE = 1e-6  # a group's spread (max − min) at most this (relative to the run's range) counts as zero


class RewardRange:
    """The lowest and highest finite total reward seen in a run."""

    def __init__(self) -> None:
        self.low = math.inf
        self.high = -math.inf

    def update(self, totals: np.ndarray) -> None:
        finite = totals[np.isfinite(totals)]
        if finite.size:
            self.low = min(self.low, float(finite.min()))
            self.high = max(self.high, float(finite.max()))


def group_split(totals: Any, num_generations: Any, low: float, high: float) -> dict[str, float] | None:
    """The fractions of the batch's prompt groups that are zero-spread at `high` (too easy), at `low` (too
    hard) and elsewhere, keyed by METRICS; None when the batch is not whole groups of `num_generations`.
    With no range yet (low == high) every zero-spread group counts as "other"."""
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 2:
        return None
    values = np.asarray(totals, dtype=np.float64).ravel()
    if values.size == 0 or values.size % num_generations:
        return None
    groups = values.reshape(-1, num_generations)
    ok = np.isfinite(groups).all(axis=1)
    span = high - low if math.isfinite(high) and math.isfinite(low) else 0.0
    tol = TOLERANCE * max(1.0, abs(span))
    with np.errstate(invalid="ignore"):
        spread = groups.max(axis=1) - groups.min(axis=1)
        flat = ok & (spread <= tol)
        value = groups[:, 0]
        easy = flat & (span > tol) & (value >= high - tol)
        hard = flat & (span > tol) & (value <= low + tol)
    n = groups.shape[0]
    return {
        METRICS[0]: float(easy.sum()) / n,
        METRICS[1]: float(hard.sum()) / n,
        METRICS[2]: float((flat & ~easy & ~hard).sum()) / n,
    }
