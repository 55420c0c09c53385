"""The detector engine: `evaluate` / `detect` run every rule over a history, vectorised, and a `DetectionCache`
(the monitor keeps one per run, the training side one per run) makes the next pass cost time in the new rows,
not in the history.

A pass over a history that grew since the last one recomputes only from the chunk (a fixed grid of rows) that
holds the last row seen before: block baselines from the blocks after those known, z-scores and flags of those
rows, the rules over those rows plus their lookback (what the rules carry across chunk boundaries is in
`carry.py`), and the episodes that may still change (`episodes.EpisodeBook`). The result is bit-identical to a
pass over the whole history. Settings that change the baselines, the z-score or the episodes recompute that
part over the whole history (the +/- keys on the z-score recompute its flags and the episodes only); a domain
setting reruns over the whole history only the rules that read it (the engine notes what each rule reads).
Every pass checks that the earlier rows are unchanged — a caller's `revision` token, or the steps and a
checksum of every metric — so a wrong reuse costs time, never correctness.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from rlhf_tui.analysis.detectors.buffers import Flags, Grow
from rlhf_tui.analysis.detectors.carry import Carry, MissingCarry, Pass
from rlhf_tui.analysis.detectors.episodes import EpisodeBook
from rlhf_tui.analysis.detectors.kernels import baseline, block_stats, median_last, windows_last
from rlhf_tui.analysis.detectors.plan import (
    FRACTION_METRICS,
    Plan,
    generic,
    is_off_policy,
    max_completion_length,
    z_floor,
    zscore_scale,
    zscore_skips,
)
from rlhf_tui.analysis.detectors.records import MissingShared, Shared
from rlhf_tui.analysis.detectors.registry import series_wanted
from rlhf_tui.analysis.detectors.rules import Context, Series, rule_names, run_rules
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


def _rows_of(values: Any) -> tuple:
    """`np.shape`, without its call overhead for arrays (once per metric per pass)."""
    shape = getattr(values, "shape", None)
    return shape if type(shape) is tuple else np.shape(values)


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


_CHUNK_VALUES = 1 << 19  # values per chunk of metrics in a pass over a long history (4 MB per array)
GRID_ROWS = 64  # a pass resumes at a multiple of this many rows (rounded up to whole blocks)


def grid_rows(block: int) -> int:
    """The chunk grid: passes start, and CUSUMs restart from their carried value, at multiples of this."""
    return block * max(1, -(-GRID_ROWS // block))


def lookback(th: Thresholds) -> int:
    """Rows before a row that a rule reads directly (everything older it carries): its k-of-n, recent-median,
    pinned and reward-climb windows."""
    return max(int(th.persist_n), 3, int(th.dpo_pinned_steps), int(th.hack_window), 2 * int(th.recent_steps))


def _checksums(metrics: Mapping[str, Any], names: tuple[str, ...], lo: int, hi: int) -> list[int]:
    """Per metric: wrapping sum of the bit patterns of rows lo..hi-1 (exact, NaN-safe, one pass)."""
    out = []
    for name in names:
        v = np.ascontiguousarray(_as_floats(metrics[name])[lo:hi])
        out.append(int(v.view(np.int64).sum()))
    return out


class DetectionCache:
    """What one growing history's passes keep between calls (the monitor keeps one per run).

    Meant for one append-only history whose newest row may still change (a repeated step merges into it).
    Every call checks that the rows before it are those of the last call — by the caller's `revision` token
    when it gives one (the store's, which changes when a run is thinned), else by the steps and a checksum of
    every metric — and starts over when they are not or the metric names changed, so a wrong reuse costs time,
    never correctness."""

    def __init__(self) -> None:
        self.key: tuple | None = None  # (metric names, block settings) the baselines were built for
        self.n = 0  # rows of the last pass
        self.revision: Any = None
        self.steps = np.empty(0, dtype=np.int64)  # the last pass's steps and checksums (when no revision)
        self.sums: list[int] | None = None
        self.domain_key: tuple | None = None
        self.z_key: tuple | None = None
        self.book_key: tuple | None = None
        self.book: EpisodeBook | None = None
        self.reused_blocks = 0  # blocks of baselines reused by the last call (for tests and benchmarks)
        self.rows_read = 0  # rows the domain rules read in the last call (for tests and benchmarks)
        self.rerun: tuple[str, ...] = ()  # the rules the last call ran over every row (for tests and benchmarks)
        self._plan_kept: tuple[tuple, Plan] | None = None
        self._th_kept: tuple[Thresholds, Thresholds] | None = None  # a copy of the last settings, and their domain part
        self._reset(None, 0)

    def _reset(self, key: tuple | None, metrics: int) -> None:
        self.key = key
        self.center = Grow(metrics, np.float64, np.nan)  # per metric and block
        self.scale = Grow(metrics, np.float64, np.nan)
        self.ok = Grow(metrics, np.bool_, False)
        self.level = Grow(metrics, np.float64, np.nan)  # median of block means (fractions only)
        self.med = Grow(metrics, np.float64, np.nan)  # block medians
        self.zabs = Grow(metrics, np.float32, np.nan)  # |z| per metric and row, NaN where not judged
        self.carry: dict[str, Carry] = {}  # what each rule carries between passes, by rule name
        self.reads: dict[str, set[str]] = {}  # the settings each rule read since it last ran over every row
        self.uses: dict[str, set[str]] = {}  # ... and the values it read from earlier rules (Context.shared)
        self.writers: dict[str, set[str]] = {}  # the rules that wrote each shared value
        self.owner: dict[tuple[str, str], str] = {}  # the rule that flags each (detector, metric)
        self.flags: dict[tuple[str, str], Flags] = {}
        self.family: dict[tuple[str, str], str] = {}  # "nonfinite", "zscore" or "domain"
        self.domain_key = self.z_key = self.book_key = None
        self.book = None

    def _plan(self, names: tuple[str, ...], meta: dict, th: Thresholds) -> Plan:
        """The run's plan, rebuilt only when the metric names or what it reads of the meta change."""
        key = (names, str(meta.get("trainer") or ""), is_off_policy(meta), max_completion_length(meta))
        if self._plan_kept is None or self._plan_kept[0] != key:
            self._plan_kept = (key, Plan(names, meta, th))
        return self._plan_kept[1]

    def _domain_settings(self, th: Thresholds) -> Thresholds:
        """The settings the domain rules read (all but the z-score threshold and the mute list), as a copy
        made again only when a setting changed (a dataclass compare costs less than a replace)."""
        if self._th_kept is None or self._th_kept[0] != th:
            self._th_kept = (
                dataclasses.replace(th, muted=list(th.muted)),
                dataclasses.replace(th, anomaly_threshold=0.0, muted=[]),
            )
        return self._th_kept[1]

    def _stable(self, key: tuple, steps: np.ndarray, metrics: Mapping, revision: Any) -> int:
        """Rows at the start known unchanged since the last pass (0: nothing can be reused); records what the
        next pass checks."""
        k, n, names = self.n, int(steps.shape[0]), key[0]
        if key != self.key or k < 2 or n < k:
            ok = False
        elif revision is not None:
            ok = revision == self.revision
        else:
            ok = self.sums is not None and np.array_equal(self.steps, steps[:k])
            ok = ok and _checksums(metrics, names, 0, k - 1) == self.sums
        before = self.sums if ok else None
        self.revision, self.sums = revision, None
        if revision is None:
            self.steps = np.array(steps)
            lo = k - 1 if before is not None else 0
            tail = _checksums(metrics, names, lo, n - 1)
            self.sums = tail if before is None else [(x + y + 2**63) % 2**64 - 2**63 for x, y in zip(before, tail)]
        return k - 1 if ok else 0


@functools.lru_cache(maxsize=64)
def _wanted(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(series_wanted(names))


@functools.lru_cache(maxsize=64)
def _judged(names: tuple[str, ...], fraction_floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Per metric: whether the generic z-score judges it, and its scale floor."""
    skips = zscore_skips(names)
    floors = z_floor(list(names), Thresholds(fraction_floor=fraction_floor))
    return np.array([generic(nm, skips) for nm in names], dtype=bool), floors


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
    revision: Any = None,
) -> tuple[list[dict], dict[str, int]]:
    """`detect` for a monitor: (episodes, count of episodes per severity).

    With `keep_low`/`keep_other`, only the newest that many low / medium-and-above episodes (in episode order:
    first step, detector, metric) and every ongoing one are built as dicts — a long noisy history has tens of
    thousands of low z-score blips — while the counts still cover all of them. `first_step`: the run's first
    step when the history is only its newest rows (the grace period counts from it). `revision`: a token that
    changes whenever rows other than the newest may have changed (e.g. the store's thinning count): given, the
    cache trusts it instead of checksumming the history.
    """
    th = thresholds or Thresholds()
    steps, metrics, logged, meta = _unpack(run_or_arrays, context)
    n = int(steps.shape[0])
    names = tuple(k for k, v in metrics.items() if _rows_of(v) == (n,)) if n else ()
    if not names:
        return [], {}
    cache = cache if cache is not None else DetectionCache()
    try:
        return _evaluate(cache, th, steps, metrics, logged, meta, names, keep_low, keep_other, first_step, revision)
    except BaseException:
        cache.key, cache.n = None, 0  # half-updated: the next call starts over
        raise


def _evaluate(cache, th, steps, metrics, logged, meta, names, keep_low, keep_other, first_step, revision):
    n = int(steps.shape[0])
    B, m = max(2, int(th.block_steps)), max(1, int(th.baseline_blocks))
    L = grid_rows(B)
    plan = cache._plan(names, meta, th)
    grace_end = int(steps[0] if first_step is None else first_step) + int(th.grace_steps)
    key = (names, B, m, int(th.min_history), float(th.fraction_floor))
    stable = cache._stable(key, steps, metrics, revision)
    if not stable:
        cache._reset(key, len(names))
    a = L * (stable // L)  # first row whose results are recomputed
    start = -(-cache.n // B) if stable else 0  # blocks whose baselines are kept
    cache.reused_blocks = start

    nonfinite: list[tuple] = []
    _blocks(cache, metrics, logged, names, n, B, m, th, start, a, nonfinite)
    redo: set[tuple[str, str]] = set()
    fresh: dict[str, dict[tuple[str, str], tuple]] = {"nonfinite": {}, "zscore": {}, "domain": {}}
    for name, rows, values in nonfinite:
        fresh["nonfinite"][("nonfinite", name)] = (
            rows,
            np.full(rows.size, 4, dtype=np.int8),
            np.zeros(rows.size),
            values,
        )

    z_key = (float(th.anomaly_threshold), grace_end)
    z_from = a if z_key == cache.z_key else 0
    fresh["zscore"] = _zscore_flags(cache, metrics, names, n, B, th, z_from, steps, grace_end)
    cache.z_key = z_key

    domain_key = (cache._domain_settings(th), plan.dpo, plan.off_policy, plan.max_len, grace_end)
    whole = _rules_to_rerun(cache, domain_key, a)
    try:
        fresh["domain"], rule_from = _domain_flags(cache, metrics, names, n, B, L, th, plan, a, whole, steps, grace_end)
    except (MissingCarry, MissingShared):  # a carried value not kept, a rule reading a new value: start over
        whole = set(rule_names())
        fresh["domain"], rule_from = _domain_flags(cache, metrics, names, n, B, L, th, plan, 0, whole, steps, grace_end)
    cache.domain_key = domain_key

    froms = {"nonfinite": a, "zscore": z_from}
    empty = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int8), np.empty(0), np.empty(0))
    for family, new in fresh.items():
        keys = set(new) | {k for k, f in cache.family.items() if f == family}
        for k in keys:
            fl = cache.flags.get(k)
            if fl is None:
                fl = cache.flags[k] = Flags()
                cache.family[k] = family
            row = froms[family] if family != "domain" else rule_from[cache.owner[k]]
            if fl.replace_from(row, *new.get(k, empty)):
                redo.add(k)

    muted = set(th.muted)
    book_key = (int(th.cooldown_steps), keep_low, keep_other, tuple(sorted(muted)))
    if cache.book is None or book_key != cache.book_key or not stable or not z_from or whole:
        cache.book, cache.book_key = EpisodeBook(int(th.cooldown_steps), keep_low, keep_other), book_key
        redo = set(cache.flags)
    live = {k: f for k, f in cache.flags.items() if k[0] not in muted}
    horizon = int(steps[L * ((n - 1) // L)])  # where the next pass starts: episodes ending well before it are final
    out = cache.book.update(live, redo, steps, horizon)
    cache.n = n
    return out


def _blocks(cache, metrics, logged, names, n, B, m, th, start, a, nonfinite):
    """Block statistics and baselines from block `start` on, block medians, the non-finite rows and |z| from row
    `a` on, written into the cache (metrics in chunks when the history is long)."""
    nb = -(-n // B)
    M = len(names)
    s0 = max(0, start - m)  # the baselines from `start` on need the m blocks before it
    r0 = min(s0 * B, a)
    cols = nb * B - r0
    judged, floors = _judged(names, float(th.fraction_floor))
    chunk = max(1, _CHUNK_VALUES // max(1, cols))
    for c0 in range(0, M, chunk):
        idx = list(range(c0, min(M, c0 + chunk)))
        k, rows = len(idx), slice(c0, c0 + len(idx))
        X = np.full((k, cols), np.nan)
        for j, i in enumerate(idx):
            X[j, : n - r0] = _as_floats(metrics[names[i]])[r0:n]
        finite = np.isfinite(X[:, : n - r0])
        for j in np.flatnonzero(~finite.all(axis=1)).tolist():
            # Non-finite values where the trainer logged the key (or +-Inf when no logged mask is known).
            name, x, bad = names[idx[j]], X[j, : n - r0], ~finite[j]
            if logged is not None and name in logged:
                bad &= np.asarray(logged[name], dtype=bool)[r0:n]
            else:
                bad &= np.isinf(x)
            bad[: a - r0] = False
            hit = bad.nonzero()[0]
            if hit.size:
                nonfinite.append((name, hit + r0, x[hit].copy()))
            x[~finite[j]] = np.nan
        del finite

        off = s0 * B - r0
        med, spread, _, cnt = block_stats(X[:, off:].reshape(k * (nb - s0), B), with_mean=False)
        med, spread, cnt = med.reshape(k, nb - s0), spread.reshape(k, nb - s0), cnt.reshape(k, nb - s0)
        cache.med.put(s0, med, rows)

        def windows(arr: np.ndarray, fill: float) -> np.ndarray:
            pad = np.concatenate([np.full((arr.shape[0], m - (start - s0)), fill, dtype=arr.dtype), arr], axis=1)
            return windows_last(pad, m)[:, : nb - start]

        center, scale, _, ok = baseline(
            windows(med, np.nan), windows(spread, np.nan), None, windows(cnt, 0), th.min_history
        )
        level = np.full((k, nb - start), np.nan)
        frac = [j for j, i in enumerate(idx) if names[i] in FRACTION_METRICS]
        if frac:  # block means only where a mean level is used (fractions), the kernel of zscore_band
            means = block_stats(X[frac, off:].reshape(len(frac) * (nb - s0), B))[2]
            assert means is not None  # with_mean defaults to True
            level[frac] = median_last(windows(means.reshape(len(frac), -1), np.nan))
        cache.center.put(start, center, rows)
        cache.scale.put(start, scale, rows)
        cache.ok.put(start, ok, rows)
        cache.level.put(start, level, rows)

        # |x - center| / scale per row from row `a` (a whole block), NaN where the z-score does not judge.
        ab = a // B
        cen = cache.center.data[rows, ab:nb]
        sc = zscore_scale(cache.scale.data[rows, ab:nb], cen, floors[rows][:, None])
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.abs(X[:, a - r0 :].reshape(k, nb - ab, B) - cen[:, :, None]) / sc[:, :, None]
        z[~cache.ok.data[rows, ab:nb]] = np.nan
        z[~judged[rows]] = np.nan
        cache.zabs.put(a, z.reshape(k, -1)[:, : n - a].astype(np.float32), rows)
        del X


def _zscore_flags(cache, metrics, names, n, B, th, z_from, steps, grace_end) -> dict:
    """The generic robust z-score (low): |z| above the threshold, from row `z_from` on."""
    out: dict[tuple[str, str], tuple] = {}
    if z_from >= n:
        return out
    zabs = cache.zabs.data[:, z_from:n]
    g_arr, r_arr = np.nonzero(zabs > np.float32(th.anomaly_threshold))
    bounds = np.searchsorted(g_arr, np.arange(len(names) + 1))
    floors = _judged(names, float(th.fraction_floor))[1]
    for i in np.unique(g_arr).tolist():
        rows = r_arr[bounds[i] : bounds[i + 1]] + z_from
        rows = rows[steps[rows] >= grace_end]
        if rows.size:
            blk = rows // B
            x = _as_floats(metrics[names[i]])[rows]
            center = cache.center.data[i, blk]
            z = (x - center) / zscore_scale(cache.scale.data[i, blk], center, floors[i])
            out[("zscore", names[i])] = (rows, np.ones(rows.size, dtype=np.int8), z, x)
    return out


def _rules_to_rerun(cache: DetectionCache, domain_key: tuple, a: int) -> set[str]:
    """The rules whose flags must be made again over every row: all of them when nothing is kept (or the plan's
    part of the key changed); else those that read a setting that changed, and (in turn) every rule that reads
    what one of those passes on. The others resume at row `a`."""
    every = rule_names()
    if not a or cache.domain_key is None or cache.domain_key[1:] != domain_key[1:]:
        return set(every)
    old, new = cache.domain_key[0], domain_key[0]
    if old is new or old == new:
        return set()
    changed = {f.name for f in dataclasses.fields(new) if getattr(old, f.name) != getattr(new, f.name)}
    whole = {r for r in every if r not in cache.reads or cache.reads[r] & changed}
    sources = {r: _sources(cache, r) for r in every}
    return _closure(whole, lambda r: [x for x in every if r in sources[x]])


def _sources(cache: DetectionCache, rule: str) -> set[str]:
    """The rules that wrote the values `rule` read from earlier rules (Context.shared; the engine's own not)."""
    return {w for k in cache.uses.get(rule, ()) for w in cache.writers.get(k, ()) if w}


def _closure(start: set[str], more) -> set[str]:
    """`start` and every rule `more(rule)` gives for a rule in it, in turn."""
    out, todo = set(start), list(start)
    while todo:
        for r in more(todo.pop()):
            if r not in out:
                out.add(r)
                todo.append(r)
    return out


def _series(metrics, names, n, B, w, leak, cache) -> tuple[dict[str, Series], int]:
    """The row-level series the rules read, over rows w .. n-1 (padded to whole blocks)."""
    nb, wb = -(-n // B), w // B
    wn = n - w
    wanted = [(i, name) for i, name in enumerate(names) if name in _wanted(names)]
    xs = np.full((len(wanted), (nb - wb) * B), np.nan)  # the rows padded to whole blocks, NaN = missing
    for j, (_i, name) in enumerate(wanted):
        xs[j, :wn] = _as_floats(metrics[name])[w:n]
    xs[~np.isfinite(xs)] = np.nan
    before = min(leak, wb)
    center, scale = cache.center.data[:, wb:nb], cache.scale.data[:, wb:nb]
    level, ok, med = cache.level.data[:, wb:nb], cache.ok.data[:, wb:nb], cache.med.data[:, wb - before : nb]
    series = {
        name: Series(xs[j], center[i], scale[i], level[i], ok[i], B, wn, med[i], before)
        for j, (i, name) in enumerate(wanted)
    }
    return series, wn


def _domain_flags(cache, metrics, names, n, B, L, th, plan, a, whole, steps, grace_end) -> tuple[dict, dict]:
    """The rules' flags: those in `whole` over every row (their carried state made again), the others over rows
    w .. n-1 (w: `a` less the rules' lookback, on the grid), flags from `a` on. Returns (flags by (detector,
    metric), the row each rule's flags were made from)."""
    every = rule_names()
    rest = [r for r in every if r not in whole]
    rule_from = {r: (0 if r in whole else a) for r in every}
    # A rule rerun over every row needs the values it reads from earlier rules over every row too: those run
    # with it on a scratch state (their own flags and state are kept from the incremental pass). While only some
    # rules run, each may read only what it read before (a new read: MissingShared, and every rule runs).
    need = _closure(whole, lambda r: _sources(cache, r))
    partial = len(whole) < len(every)
    allowed = {r: set(cache.uses.get(r, ())) for r in every} if partial else None
    for r in whole:
        cache.carry[r] = Carry()
        cache.reads[r] = set()
        cache.uses[r] = set()
    out: dict[tuple[str, str], tuple] = {}
    graces: dict[int, np.ndarray | None] = {}  # rows in the grace period, by the row flags start from
    cache.rows_read = 0
    runs = [(0, need, whole)] if whole else []
    if rest:
        runs.append((max(0, a - L * -(-lookback(th) // L)), set(rest), set(rest)))
    for w, run, keep in runs:
        series, wn = _series(metrics, names, n, B, w, int(th.memory_leak_blocks), cache)
        cache.rows_read = max(cache.rows_read, wn)
        shared = Shared(allowed)
        if plan.eval_metrics:  # rows where the trainer also logged an evaluation
            shared["eval_rows"] = np.logical_or.reduce(
                [np.isfinite(_as_floats(metrics[e])[w:n]) for e in plan.eval_metrics]
            )
        passes = {r: Pass(cache.carry.setdefault(r, Carry()) if r in keep else Carry(), w, wn, n - 1, L) for r in run}
        reads = {r: cache.reads.setdefault(r, set()) if r in keep else set() for r in run}
        ctx = Context(series, plan, th, wn, Pass(Carry(), w, wn, n - 1, L), shared)
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN = missing, everywhere in the rules
            produced = run_rules(ctx, passes, run, reads)
        for k, rules in shared.writers.items():
            cache.writers.setdefault(k, set()).update(rules)
        for r in keep:
            cache.uses.setdefault(r, set()).update(shared.readers.get(r, ()))
        for r, det, metric, lev, score in produced:
            if r not in keep:
                continue
            start = rule_from[r]
            lev = lev[start - w :]
            if start not in graces:
                grace = steps[start:] < grace_end
                graces[start] = grace if grace.any() else None
            grace = graces[start]
            if det != "nonfinite" and grace is not None:
                lev = np.where(grace, 0, lev)
            cache.owner[(det, metric)] = r
            hit = lev.nonzero()[0]
            if hit.size:
                value = series[metric].x[start - w :] if metric in series else np.full(lev.size, np.nan)
                out[(det, metric)] = (hit + start, lev[hit], score[start - w :][hit], value[hit])
    oldest = L * ((n - 1) // L) - L * -(-lookback(th) // L)
    for carry in cache.carry.values():
        carry.prune(oldest)
    cache.rerun = tuple(r for r in every if r in whole)
    return out, rule_from
