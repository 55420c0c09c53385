"""The detector engine: `evaluate` / `detect` run every rule over a whole history, vectorised, with a
`DetectionCache` that keeps the threshold-independent block baselines between calls (the monitor keeps one per
run) so a threshold key or a few new steps only recompute the blocks at the end.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from rlhf_tui.analysis.detectors.episodes import episodes
from rlhf_tui.analysis.detectors.kernels import baseline, block_stats, median_last
from rlhf_tui.analysis.detectors.plan import FRACTION_METRICS, Plan, canonical_copies, generic, z_floor
from rlhf_tui.analysis.detectors.registry import block_median_series, series_wanted
from rlhf_tui.analysis.detectors.rules import Context, Series, flags
from rlhf_tui.analysis.thresholds import Thresholds


def _as_floats(values: Any) -> np.ndarray:
    """A column as float64 (None and non-numbers become NaN)."""
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        out = []
        for v in values:
            try:
                out.append(math.nan if v is None else float(v))
            except (TypeError, ValueError):
                out.append(math.nan)
        return np.asarray(out, dtype=np.float64)


def _unpack(run_or_arrays: Any, context: Mapping[str, Any] | None):
    if hasattr(run_or_arrays, "metrics") and hasattr(run_or_arrays, "steps"):
        run = run_or_arrays
        steps = np.asarray(run.steps, dtype=np.int64)
        metrics = run.metrics()
        logged = run.logged_masks()
        meta = dict(getattr(run, "meta", {}) or {})
    else:
        parts = tuple(run_or_arrays)
        steps = np.asarray(parts[0], dtype=np.int64)
        metrics = parts[1]
        logged = parts[2] if len(parts) > 2 else None
        meta = dict(parts[3] or {}) if len(parts) > 3 and parts[3] else {}
    if context:
        meta.update({k: v for k, v in context.items() if k in ("trainer", "args")})
        if isinstance(context.get("meta"), Mapping):
            meta.update(context["meta"])
    return steps, metrics, logged, meta


_CHUNK_VALUES = 1 << 19  # values per chunk of metrics: bounds the temporaries of one pass (4 MB per array)
_BLOCK_MEDIANS = block_median_series()  # series whose block medians a rule reads


class _Cached:
    """One metric's block-level baselines, valid while its first `rows` values are unchanged."""

    __slots__ = ("rows", "checksum", "center", "scale", "ok", "level", "med")

    def __init__(
        self,
        rows: int,
        checksum: int,
        center: np.ndarray,
        scale: np.ndarray,
        ok: np.ndarray,
        level: np.ndarray | None,
        med: np.ndarray | None,
    ):
        self.rows, self.checksum = rows, checksum
        self.center, self.scale, self.ok, self.level, self.med = center, scale, ok, level, med


class DetectionCache:
    """Threshold-independent statistics of one growing history, kept between `detect` calls.

    Baselines do not depend on the alarm thresholds, and the baseline of a block depends only on the blocks
    before it, so re-evaluating after a threshold change (or after a few new steps) only recomputes the blocks
    at the end. Meant for one append-only history (the monitor keeps one per run); every call still checks the
    steps and a checksum of each metric's earlier rows, and recomputes whatever changed (another run, a thinned
    history, other block settings), so a wrong reuse costs time, never correctness.
    """

    def __init__(self) -> None:
        self.config: tuple | None = None
        self.steps = np.empty(0, dtype=np.int64)
        self.metrics: dict[str, _Cached] = {}
        self.specific: tuple | None = None  # (signature, flags) of the domain detectors' last pass
        self.reused_blocks = 0  # blocks of baselines reused by the last call (for tests and benchmarks)

    def _start(self, steps: np.ndarray, config: tuple) -> bool:
        """Whether anything cached can hold for `steps` under `config`; forgets everything otherwise."""
        k = self.steps.shape[0]
        if config == self.config and k <= steps.shape[0] and np.array_equal(self.steps, steps[:k]):
            return True
        self.config, self.metrics, self.specific = config, {}, None
        return False


def _checksum(rows: np.ndarray) -> np.ndarray:
    """Per row of a (k, r) float array: wrapping sum of the bit patterns (exact, NaN-safe, one pass)."""
    return rows.view(np.int64).sum(axis=1)


def detect(
    run_or_arrays: Any,
    thresholds: Thresholds | None = None,
    context: Mapping[str, Any] | None = None,
    *,
    cache: DetectionCache | None = None,
) -> list[dict]:
    """All anomaly episodes of a whole history, vectorised.

    `run_or_arrays`: a RunHistory, or (steps, {metric: values}, {metric: logged mask} | None, meta | None).
    `context`: optional {"trainer": ..., "args": {...}} merged into the run's meta.
    `cache`: a DetectionCache kept for this history makes the next call recompute only what changed.
    Returns episodes sorted by first step (see module docs for the fields).
    """
    return evaluate(run_or_arrays, thresholds, context, cache=cache)[0]


def evaluate(
    run_or_arrays: Any,
    thresholds: Thresholds | None = None,
    context: Mapping[str, Any] | None = None,
    *,
    cache: DetectionCache | None = None,
    keep_low: int | None = None,
    keep_other: int | None = None,
    first_step: int | None = None,
) -> tuple[list[dict], dict[str, int]]:
    """`detect` for a monitor: (episodes, count of episodes per severity).

    With `keep_low`/`keep_other`, only the newest that many low / medium-and-above episodes (and every ongoing
    one) are built as dicts — a long noisy history has tens of thousands of low z-score blips — while the
    counts still cover all of them. `first_step`: the run's first step when the history is only its newest rows
    (the grace period counts from it, not from the first row given).
    """
    th = thresholds or Thresholds()
    steps, metrics, logged, meta = _unpack(run_or_arrays, context)
    n = int(steps.shape[0])
    names = [k for k, v in metrics.items() if np.shape(v) == (n,)] if n else []
    if not names:
        return [], {}
    muted = set(th.muted)
    B = max(2, int(th.block_steps))
    m = max(1, int(th.baseline_blocks))
    nb = -(-n // B)
    M = len(names)
    cache = cache if cache is not None else DetectionCache()
    reusing = cache._start(steps, (B, m, int(th.min_history)))
    frozen = (n - 1) // B  # blocks wholly before the newest row (which may still be merged into)
    # Grace period: no alarms in the first grace_steps steps except non-finite values.
    in_grace = steps < int(steps[0] if first_step is None else first_step) + int(th.grace_steps)
    flagged: list[tuple] = []  # (detector, metric, rows, level per row, score, value) -- sparse rows
    dense: list[tuple] = []  # (detector, metric, level for every row, score, value)
    base: dict[str, tuple] = {}  # name -> (center, scale, ok, level, med, xpad) at block level
    fresh: dict[str, _Cached] = {}
    data_sig: list[int] = []  # per metric, a checksum of all its rows
    reused = 0
    aliases = canonical_copies(names)
    floors = z_floor(names, th)
    need_x = series_wanted(names)

    chunk = max(1, _CHUNK_VALUES // (nb * B))
    for c0 in range(0, M, chunk):
        idx = list(range(c0, min(M, c0 + chunk)))
        k = len(idx)
        X = np.full((k, nb * B), np.nan)
        for j, i in enumerate(idx):
            X[j, :n] = _as_floats(metrics[names[i]])
        finite = np.isfinite(X[:, :n])
        for j in np.flatnonzero(~finite.all(axis=1)).tolist():
            # Non-finite values where the trainer logged the key (or +-Inf when no logged mask is known).
            name, x, bad = names[idx[j]], X[j, :n], ~finite[j]
            if logged is not None and name in logged:
                bad &= np.asarray(logged[name], dtype=bool)
            else:
                bad &= np.isinf(x)
            if bad.any() and "nonfinite" not in muted:
                dense.append(("nonfinite", name, np.where(bad, 4, 0).astype(np.int8), np.zeros(n), x.copy()))
            x[~finite[j]] = np.nan
        del finite

        # Which cached baselines still hold, per metric: the rows they were built from are unchanged.
        sums = _checksum(X[:, : frozen * B]) if reusing and frozen else None
        old: list[_Cached | None] = []
        for j, i in enumerate(idx):
            c = cache.metrics.get(names[i]) if reusing else None
            if c is not None and c.rows <= frozen * B:
                same_rows = sums is not None and c.rows == frozen * B
                got = sums[j] if sums is not None and same_rows else _checksum(X[j : j + 1, : c.rows])[0]
                if int(got) != c.checksum:
                    c = None
            else:
                c = None
            old.append(c)
        start = min((c.center.shape[0] if c is not None else 0) for c in old)
        held = [c for c in old if c is not None]  # when start > 0: every metric of the chunk has its cache
        reused += start * k
        s0 = max(0, start - m)  # the baselines from `start` on need the m blocks before it
        blocks = X[:, s0 * B :].reshape(k * (nb - s0), B)
        frac = [j for j, i in enumerate(idx) if names[i] in FRACTION_METRICS]
        med, spread, _, cnt = block_stats(blocks, with_mean=False)
        med, spread, cnt = med.reshape(k, nb - s0), spread.reshape(k, nb - s0), cnt.reshape(k, nb - s0)
        del blocks

        def windows(a: np.ndarray, fill: float, start: int = start, s0: int = s0) -> np.ndarray:
            pad = np.concatenate([np.full((a.shape[0], m - (start - s0)), fill, dtype=a.dtype), a], axis=1)
            return sliding_window_view(pad, m, axis=1)[:, : nb - start]

        center, scale, _, ok = baseline(
            windows(med, np.nan), windows(spread, np.nan), None, windows(cnt, 0), th.min_history
        )
        level = None
        if frac:  # block means only where a mean level is used (fractions), the kernel of zscore_band
            block_means = block_stats(X[frac, s0 * B :].reshape(len(frac) * (nb - s0), B))[2]
            assert block_means is not None  # with_mean defaults to True
            mean = block_means.reshape(len(frac), -1)
            level = median_last(windows(mean, np.nan))
        if start:
            center = np.concatenate([np.stack([c.center[:start] for c in held]), center], axis=1)
            scale = np.concatenate([np.stack([c.scale[:start] for c in held]), scale], axis=1)
            ok = np.concatenate([np.stack([c.ok[:start] for c in held]), ok], axis=1)
            if level is not None:
                levels = [held[j].level for j in frac]
                level = np.concatenate([np.stack([lv[:start] for lv in levels if lv is not None]), level], axis=1)

        # Generic robust z-score (low): |x - center| > threshold * scale, z computed for the hits only.
        gen = [j for j, i in enumerate(idx) if generic(names[i], aliases)] if "zscore" not in muted else []
        if gen:
            zscale = np.maximum(scale[gen], floors[[idx[j] for j in gen]][:, None])
            limit = th.anomaly_threshold * zscale
            limit[~ok[gen]] = np.inf
            with np.errstate(invalid="ignore"):
                dev = np.subtract(X[gen].reshape(len(gen), nb, B), center[gen][:, :, None])
                np.abs(dev, out=dev)
                hit = dev > limit[:, :, None]
            del dev
            g_arr, r_arr = np.nonzero(hit.reshape(len(gen), nb * B))  # padding rows are NaN: never hit
            del hit
            bounds = np.searchsorted(g_arr, np.arange(len(gen) + 1))
            for q, j in enumerate(gen):
                rows = r_arr[bounds[q] : bounds[q + 1]]
                rows = rows[~in_grace[rows]]
                if rows.size:
                    blk = rows // B
                    x = X[j, rows]
                    z = (x - center[gen[q]][blk]) / zscale[q][blk]
                    flagged.append(("zscore", names[idx[j]], rows, np.ones(rows.size, dtype=np.int8), z, x))

        fsum = _checksum(X[:, : frozen * B]) if sums is None else sums
        data_sig.extend((fsum + _checksum(X[:, frozen * B : n])).tolist())  # every row (wrapping int64 sum)
        for j, i in enumerate(idx):
            name = names[i]
            lv = level[frac.index(j)] if level is not None and j in frac else None
            md = None
            if name in _BLOCK_MEDIANS:
                before = held[j].med if s0 else None
                md = med[j] if before is None else np.concatenate([before[:s0], med[j]])
            fresh[name] = _Cached(frozen * B, int(fsum[j]), center[j], scale[j], ok[j], lv, md)
            if name in need_x:
                base[name] = (
                    center[j],
                    scale[j],
                    ok[j],
                    lv if lv is not None else np.full(nb, np.nan),
                    md,
                    X[j].copy(),
                )
        del X

    cache.metrics, cache.steps, cache.reused_blocks = fresh, np.array(steps), reused // max(M, 1)
    plan = Plan(names, meta, th)
    # The domain detectors read every setting but the z-score's threshold: when only that changed (the +/- keys)
    # and no value did, their flags are the cached ones (same row count: `_start` checked the steps).
    signature = (
        dataclasses.replace(th, anomaly_threshold=0.0, muted=[]),
        tuple(names),
        plan.dpo,
        plan.off_policy,
        plan.max_len,
        tuple(data_sig),
        n,
    )
    if cache.specific is not None and cache.specific[0] == signature:
        specific = cache.specific[1]
    else:
        series = {name: Series(xpad, c, s, lv, ok, B, n, md) for name, (c, s, ok, lv, md, xpad) in base.items()}
        specific = []
        for det, metric, lev, score in flags(Context(series, plan, th, n)):
            if lev.any():
                value = series[metric].x if metric in series else np.full(n, np.nan)
                specific.append(_sparse(det, metric, lev, score, value, in_grace))
        cache.specific = (signature, specific)
        del series
    del base
    for det, metric, lev, score, value in dense:  # non-finite values
        flagged.append(_sparse(det, metric, lev, score, value, in_grace))
    flagged.extend(f for f in specific if f[0] not in muted and f[2].size)
    return episodes(flagged, steps, th, keep_low, keep_other)


def _sparse(
    det: str, metric: str, lev: np.ndarray, score: np.ndarray, value: np.ndarray, in_grace: np.ndarray
) -> tuple:
    """(detector, metric, rows, level, score, value) of the flagged rows (none in the grace period, except
    non-finite values)."""
    if det != "nonfinite":
        lev = np.where(in_grace, 0, lev)
    rows = np.flatnonzero(lev)
    return det, metric, rows, lev[rows], score[rows], value[rows]
