"""View helpers shared by the panes and the text renderer: the feed's order, counts per severity, a metric's
label with its unit and the unicode sparkline (one copy; `analysis/` computes numbers and never draws). Pure
numpy + stdlib.
"""

from __future__ import annotations

import numpy as np

SEVERITY_ORDER = ("critical", "high", "medium", "low")
SPARK_CHARS = "▁▂▃▄▅▆▇█"
EIGHTHS = " ▁▂▃▄▅▆▇█"
UNIT_SHORT = {"per token": "/tok", "per sequence": "/seq"}


def unit_suffix(row: dict) -> str:
    """ " /tok" or " /seq" for a metric whose unit differs between trainers (KL, entropy), else ""."""
    unit = UNIT_SHORT.get(row.get("unit") or "")
    return f" {unit}" if unit else ""


def newest_first(anomalies: list[dict]) -> list[dict]:
    """The feed's order: newest first (by the step an anomaly began, then its latest step)."""

    def key(a: dict) -> tuple:
        first = a.get("step") if isinstance(a.get("step"), int) else -1
        last = a.get("last_step") if isinstance(a.get("last_step"), int) else first
        return (first, last)

    return sorted(anomalies, key=key, reverse=True)


def severity_counts(anomalies: list[dict]) -> dict[str, int]:
    """Episodes per severity, every severity present (zero when none)."""
    counts = {s: 0 for s in SEVERITY_ORDER}
    for a in anomalies:
        sev = a.get("severity")
        if sev in counts:
            counts[sev] += 1
    return counts


def bucket_means(values: np.ndarray, width: int) -> np.ndarray:
    """The finite values averaged into at most `width` buckets (one character of a sparkline each)."""
    ok = np.isfinite(values)
    data = values if ok.all() else values[ok]
    if data.size > width:
        edges = np.linspace(0, data.size, width + 1).astype(int)
        data = np.add.reduceat(data, edges[:-1]) / np.diff(edges)
    return data


def spark_lines(buckets, rows: int = 1) -> list[str]:
    """A sparkline of bucket means `rows` characters tall (top line first)."""
    buckets = np.asarray(buckets, dtype=float)
    if buckets.size == 0:
        return [""] * rows
    lo, hi = float(buckets.min()), float(buckets.max())
    if rows == 1:
        if hi - lo <= 1e-12 * max(1.0, abs(hi)):
            return [SPARK_CHARS[3] * buckets.size]
        idx = np.clip(((buckets - lo) / (hi - lo) * 7).round().astype(int), 0, 7)
        return ["".join(SPARK_CHARS[i] for i in idx)]
    levels = rows * 8
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        height = np.full(buckets.size, levels // 2)
    else:
        height = 1 + ((buckets - lo) / (hi - lo) * (levels - 1)).round().astype(int)
    lines = []
    for r in range(rows - 1, -1, -1):  # top row first
        part = np.clip(height - 8 * r, 0, 8)
        lines.append("".join(EIGHTHS[p] for p in part))
    return lines


def sparkline(values: np.ndarray, width: int = 24) -> str:
    """A one-row unicode sparkline of the finite values, bucketed (mean per bucket) to `width` characters."""
    return spark_lines(bucket_means(values, width))[0]


def spark_marker(values: np.ndarray, width: int, row: int | None) -> int | None:
    """Which character of `sparkline(values, width)` holds row `row` (None if not shown)."""
    if row is None:
        return None
    finite = np.flatnonzero(np.isfinite(values))
    if finite.size == 0:
        return None
    pos = int(np.searchsorted(finite, row, side="right")) - 1
    if pos < 0:
        return None
    if finite.size <= width:
        return pos
    edges = np.linspace(0, finite.size, width + 1).astype(int)
    return int(np.searchsorted(edges, pos, side="right")) - 1
