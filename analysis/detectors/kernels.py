"""Numeric kernels of the detectors: block statistics and baselines, exact medians, CUSUM, counts over the last
n rows, recent medians, early levels. Pure numpy, whole arrays at once (NaN = missing).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
from numpy.lib.stride_tricks import as_strided

_MAD = 1.4826

_RANGE_CACHE: dict[int, np.ndarray] = {}


def windows_last(a: np.ndarray, width: int) -> np.ndarray:
    """Read-only sliding windows of `width` along the last axis (numpy's sliding_window_view without its
    checks, which cost more than the work on the short arrays of an incremental pass)."""
    count = a.shape[-1] - width + 1
    return as_strided(a, (*a.shape[:-1], count, width), (*a.strides, a.strides[-1]), writeable=False)


def range_table(width: int) -> np.ndarray:
    """Expected normal range between the trimmed order statistics used by `block_stats`, per count."""
    table = _RANGE_CACHE.get(width)
    if table is None:
        nd = NormalDist()
        table = np.ones(width + 1)
        for c in range(2, width + 1):
            i = c // 10
            lo = nd.inv_cdf((i + 1 - 0.375) / (c + 0.25))
            table[c] = -2.0 * lo
        _RANGE_CACHE[width] = table
    return table


def block_stats(
    blocks: np.ndarray, with_mean: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Per row of `blocks` (K, B; NaN = missing): median, robust spread, mean (if asked), finite count."""
    srt = np.sort(blocks, axis=1)
    K, B = srt.shape
    table = range_table(B)
    if not np.isnan(srt[:, -1]).any():  # NaN sorts last: no NaN anywhere (the common case)
        trim = B // 10
        med = (srt[:, (B - 1) // 2] + srt[:, B // 2]) / 2.0
        spread = (srt[:, B - 1 - trim] - srt[:, trim]) / table[B]
        mean = row_sum(srt) / B if with_mean else None
        return med, spread, mean, np.full(K, B, dtype=np.int64)
    finite = ~np.isnan(srt)
    cnt = finite.sum(axis=1)
    rows = np.arange(K)
    lo = np.maximum((cnt - 1) // 2, 0)
    hi = np.minimum(cnt // 2, B - 1)
    med = (srt[rows, lo] + srt[rows, hi]) / 2.0
    trim = cnt // 10
    top = np.maximum(cnt - 1 - trim, 0)
    spread = (srt[rows, top] - srt[rows, trim]) / table[cnt]
    spread = np.where(cnt >= 2, spread, np.nan)
    mean = None
    if with_mean:
        total = row_sum(np.where(finite, srt, 0.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(cnt > 0, total / np.maximum(cnt, 1), np.nan)
    return med, spread, mean, cnt


def row_sum(a: np.ndarray) -> np.ndarray:
    """Row sums added left to right (a fixed order, so one row or many give bit-identical sums)."""
    total = a[:, 0].copy()
    for k in range(1, a.shape[1]):
        total += a[:, k]
    return total


def med5(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Exact median of five arrays, elementwise (a selection network; any NaN input gives NaN)."""
    mn, mx = np.minimum, np.maximum
    lo1, hi1 = mn(a, b), mx(a, b)  # sort (p0, p1)
    lo2, hi2 = mn(d, e), mx(d, e)  # sort (p3, p4)
    mx(lo1, lo2, out=lo2)  # p3 = max(p0, p3): p0 is out (it is below three others)
    mn(hi1, hi2, out=hi1)  # p1 = min(p1, p4): p4 is out
    mn(hi1, c, out=lo1)  # sort (p1, p2)
    mx(hi1, c, out=hi1)
    mn(hi1, lo2, out=hi1)  # p2 = min(p2, p3)
    mx(lo1, hi1, out=hi1)  # p2 = max(p1, p2): the median
    return hi1


def median_general(a: np.ndarray) -> np.ndarray:
    srt = np.sort(a, axis=-1)
    k = a.shape[-1] - np.isnan(srt).sum(axis=-1)
    lo = np.maximum((k - 1) // 2, 0)
    hi = np.minimum(k // 2, a.shape[-1] - 1)
    if srt.ndim == 2:  # (indexing a row at a time: take_along_axis costs more than the work on short windows)
        rows = np.arange(srt.shape[0])
        return (srt[rows, lo] + srt[rows, hi]) / 2.0
    return ((np.take_along_axis(srt, lo[..., None], -1) + np.take_along_axis(srt, hi[..., None], -1)) / 2.0)[..., 0]


def median_last(a: np.ndarray) -> np.ndarray:
    """NaN-ignoring median along the last axis (NaN when no finite value)."""
    if a.shape[-1] != 5 or a.size == 0:
        return median_general(a)
    out = med5(a[..., 0], a[..., 1], a[..., 2], a[..., 3], a[..., 4])
    bad = np.isnan(out)
    if bad.any():  # rows with a missing value: the NaN-aware path (exact same arithmetic for full rows)
        out[bad] = median_general(a[bad])
    return out


def median_cols(cols: list[np.ndarray]) -> np.ndarray:
    """Elementwise NaN-ignoring median of same-shaped arrays (the columns of a window)."""
    if len(cols) != 5:
        return median_general(np.stack(cols, axis=-1))
    out = med5(*cols)
    bad = np.isnan(out)
    if bad.any():
        out[bad] = median_general(np.stack([c[bad] for c in cols], axis=-1))
    return out


def baseline(
    med: np.ndarray, spread: np.ndarray, mean: np.ndarray | None, cnt: np.ndarray, min_history: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Baseline from windows of previous block statistics (..., m): center (median of block medians),
    scale (within-block spread combined with between-block spread), mean level (median of block means,
    when `mean` is given), ok (enough history)."""
    m = med.shape[-1]
    med_cols = [med[..., k] for k in range(m)]
    center = median_cols(med_cols)
    within = median_cols([spread[..., k] for k in range(m)])
    between = median_cols([np.abs(c - center) for c in med_cols])
    np.nan_to_num(within, copy=False, nan=0.0)
    np.nan_to_num(between, copy=False, nan=0.0)
    between *= _MAD
    scale = np.sqrt(within * within + between * between)
    scale = np.maximum(np.maximum(scale, 1e-9 * np.abs(center)), 1e-12)
    level = median_cols([mean[..., k] for k in range(m)]) if mean is not None else None
    ok = (window_total(cnt) >= min_history) & ~np.isnan(center)
    return center, scale, level, ok


def window_total(cnt: np.ndarray) -> np.ndarray:
    """Sum over the last axis of integer counts (exact in any order)."""
    if cnt.ndim == 3 and cnt.shape[-1] > 1 and cnt.base is not None:
        c = cnt[..., 0].astype(np.int64)
        for k in range(1, cnt.shape[-1]):
            c += cnt[..., k]
        return c
    return cnt.sum(axis=-1)


def median_list(values: list[float]) -> float:
    """Median of a non-empty list of floats, same arithmetic as `median_last`."""
    v = sorted(values)
    k = len(v)
    return (v[(k - 1) // 2] + v[k // 2]) / 2.0


def cusum(
    z: np.ndarray, kref: float, clip: float, sign: float, start: float = 0.0, chunk: int = 0
) -> tuple[np.ndarray, list[float]]:
    """One-sided CUSUM of clipped z-scores (sign +1: upward, -1: downward); NaN steps add nothing.

    The sums restart every `chunk` rows (0: one chunk) from the value carried into that chunk, beginning with
    `start`: a pass that resumes at a chunk boundary with the carried value gives bit-identical results to a
    pass over the whole history. Returns (values, the value carried into each chunk)."""
    n = z.shape[0]
    if n == 0:
        return np.zeros(0), [start]
    width = n if chunk <= 0 else chunk
    nc = -(-n // width)
    inc = np.zeros(nc * width)  # the padding adds nothing
    np.multiply(z, sign, out=inc[:n])
    np.minimum(inc[:n], clip, out=inc[:n])  # (NaN stays NaN; np.clip costs more on short arrays)
    np.maximum(inc[:n], -clip, out=inc[:n])
    inc[:n] -= kref
    inc[np.isnan(inc)] = 0.0
    c = np.cumsum(inc.reshape(nc, width), axis=1)
    # The value carried out of a chunk, in scalar arithmetic that equals the vector form below bit for bit:
    # rounding is monotonic, so min over u of (s + c_u) is s + min over u of c_u.
    carried = [start]
    if nc > 1:
        last, low = c[:-1, -1].tolist(), c[:-1].min(axis=1).tolist()
        s = start
        for k in range(nc - 1):
            s = (s + last[k]) - min(0.0, s + low[k])
            carried.append(s)
        c += np.array(carried)[:, None]
    else:
        c += start
    floor = np.minimum.accumulate(c, axis=1)
    np.minimum(floor, 0.0, out=floor)
    c -= floor
    return c.reshape(-1)[:n], carried


def count_last(flags: np.ndarray, n: int) -> np.ndarray:
    """How many of the last n rows (including this one) are flagged."""
    cs = np.cumsum(flags, dtype=np.int64)
    out = cs.copy()
    out[n:] -= cs[:-n]
    return out


def recent_median(x: np.ndarray, n: int) -> np.ndarray:
    """Median of the finite values among the last n rows; NaN unless at least half of them are finite."""
    m = x.shape[0]
    pad = np.empty(m + n - 1)
    pad[: n - 1] = np.nan
    pad[n - 1 :] = x
    enough = count_last(~np.isnan(x), n) >= (n + 1) // 2
    if n != 5:
        med = median_general(windows_last(pad, n))
    else:  # the selection network over shifted views; only windows with a missing value need sorting
        med = med5(pad[:m], pad[1 : m + 1], pad[2 : m + 2], pad[3 : m + 3], pad[4 : m + 4])
        bad = np.isnan(med) & enough
        if bad.any():
            med[bad] = median_general(windows_last(pad, n)[bad])
    med[~enough] = np.nan
    return med


def early_level(values: list[float], rows: list[int], count: int) -> tuple[float, int]:
    """Median of a series' first `count` finite values and the row of the last of them (nan, -1 if too few)."""
    if len(values) < count:
        return math.nan, -1
    return median_list(values[:count]), rows[count - 1]


def reward_residual(reward: np.ndarray, parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    total = np.zeros_like(reward)
    mag = np.abs(reward)
    absum = np.zeros_like(reward)
    for p in parts:
        total = total + p
        absum = absum + np.abs(p)
    resid = reward - total
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.abs(resid) / np.maximum(np.maximum(mag, absum), 1e-12)
    return rel, resid


def lr_ratio(x: np.ndarray, before: float = math.nan) -> np.ndarray:
    """Ratio of each learning rate to the previous finite, positive one (NaN otherwise); `before` is the last
    finite value ahead of these rows."""
    n = x.shape[0]
    prev = np.full(n, np.nan)
    idx = np.flatnonzero(~np.isnan(x))
    if idx.size:
        prev[idx[0]] = before
        prev[idx[1:]] = x[idx[:-1]]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(prev > 0, x / prev, np.nan)


def leak_growth(med_blocks: np.ndarray, L: int, B: int, n: int, before: int = 0) -> np.ndarray:
    """Per row: fractional growth over the previous L block medians when it is steady (NaN otherwise).
    `med_blocks` holds `before` blocks ahead of the rows' first block (so the first rows see their window)."""
    nb = med_blocks.shape[0]
    out_blocks = np.full(nb, np.nan)
    if nb > L and L >= 2:
        win = windows_last(med_blocks, L)[: nb - L]  # blocks j-L .. j-1 for j = L .. nb-1
        out_blocks[L:] = steady_growth(win)
    return np.repeat(out_blocks[before:], B)[:n]


def steady_growth(win: np.ndarray) -> np.ndarray:
    first, last = win[..., 0], win[..., -1]
    rises = (np.diff(win, axis=-1) >= 0).sum(axis=-1)
    steady = (rises >= 0.8 * (win.shape[-1] - 1)) & ~np.isnan(win).any(axis=-1) & (first > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        growth = (last - first) / first
    return np.where(steady, growth, np.nan)
