"""Anomaly detection on the training side: a bounded recent history of the run's metrics, judged by the same
engine as the monitor (`evaluate` with a `DetectionCache`) at most once a period, on the publisher thread.

A pass costs a few ms whatever the rows it adds (the engine resumes where it stopped; its fixed cost is the
rules' numpy calls), so on a fast run it also waits for `every()` new rows: its recent cost over BUDGET_S per
row (~2 ms / 0.02 ms = 100 rows, 2.5 s at 40 steps a second), and never longer than CEILING_S after the last one
(a slow run is judged at the first step boundary after that). On a run of a step a second or slower, and while
passes are cheap, it is one pass a second as before.

A pass returns the episodes that are new or changed since the previous pass; the JSONL log's per-step
`anomalies` holds the new ones, the wire gets one `anomaly` message per new or changed episode.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from rlhf_tui.analysis.detectors import DetectionCache, evaluate
from rlhf_tui.analysis.thresholds import Thresholds

ROWS = 2048  # the recent history kept (rows); older rows are dropped half a window at a time
PERIOD_S = 1.0  # at most one pass per this many seconds
# A pass waits for rows until its cost per row is at most this (issue 11: the publisher thread's whole budget is
# 0.15 ms a step; at 0.05 ms the passes took a third of it).
BUDGET_S = 0.02e-3
CEILING_S = 5.0  # ... but never longer than this after the last pass (on_alarm's latency on mid-speed runs)
COSTS_KEPT = 5  # the cost of a pass: the median of the last few (one cold pass after a drop is not the rule)
_SAME = ("severity", "last_step", "count", "peak_step", "ongoing")  # what makes a known episode "changed"


def _number(v: Any) -> float:
    try:
        return math.nan if v is None else float(v)
    except (TypeError, ValueError, OverflowError):  # (an int past float's range: missing, as normalise drops it)
        return math.nan


def _numbers(values: list[Any]) -> np.ndarray:
    """`_number` of each value, in one conversion when numpy can make them all floats (None is NaN)."""
    try:
        out = np.array(values, dtype=float)
        if out.shape == (len(values),):
            return out
    except (TypeError, ValueError, OverflowError):
        pass
    return np.array([_number(v) for v in values], dtype=float)


class TrainingAnomalies:
    """Feed every logged step with `add`; call `poll` as often as you like: it runs a pass when one is due and
    returns (new episodes, new or changed episodes) of that pass, ([], []) otherwise.

    The engine judges the newest `rows` rows only (their baselines and early levels are those of that window),
    with the grace period counted from the run's first step. An episode cut by the window's start keeps its
    identity (same detector and metric, overlapping steps), so it is not reported as new again.
    """

    def __init__(
        self,
        thresholds: Thresholds | None = None,
        meta: Mapping[str, Any] | None = None,
        rows: int = ROWS,
        period_s: float = PERIOD_S,
        clock: Callable[[], float] = time.monotonic,
        budget_s: float = BUDGET_S,
        ceiling_s: float = CEILING_S,
    ):
        self.th = thresholds or Thresholds()
        self.meta = dict(meta or {})
        self.rows, self.period_s, self.clock = max(16, int(rows)), float(period_s), clock
        self.budget_s, self.ceiling_s = float(budget_s), float(ceiling_s)
        self.costs: list[float] = []  # the last passes' durations on `clock` (wall time: at least their CPU)
        self.pending = 0  # rows added or merged into since the last pass
        self.wait = 1  # `every()` as of the last pass
        self.steps = np.zeros(self.rows, dtype=np.int64)
        self.values: dict[str, np.ndarray] = {}
        self.logged: dict[str, np.ndarray] = {}
        self.n = 0  # rows, those added since the last flush included
        self._flushed = 0  # rows written into the arrays
        self._pending: list[tuple[int, int, Mapping[str, Any]]] = []  # (row, step, metrics) not written yet
        self._last_step: int | None = None
        self.drops = 0  # times the oldest rows were dropped (the engine's cache starts over then)
        self.first_step: int | None = None
        self.cache = DetectionCache()
        self.known: dict[tuple[str, str], list[dict]] = {}  # episodes of the last pass, by detector and metric
        self.seen: dict[int, dict] = {}  # the last pass's episode dicts by id (held here, so no id is reused)
        self.last_pass = -math.inf
        self.dirty = False

    def add(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One logged step; the same step again merges into its row, an older step is ignored. Kept as it came
        until the next pass (`flush`): one numpy write per column for all the rows since, not one per value."""
        step = int(step)
        last = self._last_step
        if last is not None and step < last:
            return
        if last is None or step != last:
            if self.n == self.rows:
                self.flush()
                self._drop(self.rows // 2)
            self.n += 1
            self._last_step = step
            if self.first_step is None:
                self.first_step = step
        self._pending.append((self.n - 1, step, metrics))
        if len(self._pending) >= self.rows:  # bounded whatever the passes' rate (a step merged again and again)
            self.flush()
        self.dirty = True
        self.pending += 1

    def flush(self) -> None:
        """Write the rows added since the last flush into the arrays (each pass does it first)."""
        pend, lo, hi = self._pending, self._flushed, self.n
        if not pend:
            return
        self._pending = []
        for col in self.values.values():
            col[lo:hi] = math.nan
        for mask in self.logged.values():
            mask[lo:hi] = False
        if self._flush_rows(pend, lo, hi):
            self._flushed = hi
            return
        columns: dict[str, tuple[list[int], list[Any]]] = {}
        for row, step, metrics in pend:
            self.steps[row] = step
            for name, v in metrics.items():
                got = columns.get(name)
                if got is None:
                    got = columns[name] = ([], [])
                got[0].append(row)
                got[1].append(v)
        for name, (rows, values) in columns.items():
            # (a row merged twice keeps its newest value: numpy assigns repeated indices in order)
            self._column(name)[rows] = _numbers(values)
            self.logged[name][rows] = True
        self._flushed = hi

    def _column(self, name: str) -> np.ndarray:
        col = self.values.get(name)
        if col is None:
            col = self.values[name] = np.full(self.rows, math.nan)
            self.logged[name] = np.zeros(self.rows, dtype=bool)
        return col

    def _flush_rows(self, pend: list, lo: int, hi: int) -> bool:
        """The common case in one conversion: one new row each, all with the same keys (a trainer logs the same
        keys every step). False (nothing written) otherwise."""
        keys = tuple(pend[0][2])
        if len(pend) != hi - lo or pend[0][0] != lo or any(tuple(m) != keys for _r, _s, m in pend):
            return False
        try:
            table = np.array([list(m.values()) for _r, _s, m in pend], dtype=float)
        except (TypeError, ValueError, OverflowError):
            return False
        if table.shape != (hi - lo, len(keys)):
            return False
        self.steps[lo:hi] = [step for _r, step, _m in pend]
        for j, name in enumerate(keys):
            self._column(name)[lo:hi] = table[:, j]
            self.logged[name][lo:hi] = True
        return True

    def _drop(self, k: int) -> None:
        keep = self.n - k
        self.steps[:keep] = self.steps[k : self.n]
        for arrays in (self.values, self.logged):
            for col in arrays.values():
                col[:keep] = col[k : self.n]
        self.n = self._flushed = keep
        self.drops += 1

    def every(self) -> int:
        """New rows a pass waits for: the median cost of the last passes over the budget per row (1 while
        passes are cheap or none ran yet)."""
        if not self.costs or self.budget_s <= 0:
            return 1
        return max(1, math.ceil(round(statistics.median(self.costs) / self.budget_s, 6)))  # (2e-3/2e-5: 100)

    def due(self, now: float) -> bool:
        """A pass is due: a period since the last one, and `every()` new rows or the ceiling reached."""
        since = now - self.last_pass
        return since >= self.period_s and (since >= self.ceiling_s or self.pending >= self.wait)

    def poll(self, force: bool = False) -> tuple[list[dict], list[dict]]:
        """Run a pass when one is due (or `force`): (new episodes, new or changed episodes)."""
        now = self.clock()
        if not self.dirty or not self.n or (not force and not self.due(now)):
            return [], []
        self.flush()
        self.last_pass, self.dirty, self.pending = now, False, 0
        n = self.n
        # Views: nothing else writes these arrays while the pass runs (add and poll share the publisher thread).
        history = (
            self.steps[:n],
            {k: v[:n] for k, v in self.values.items()},
            {k: m[:n] for k, m in self.logged.items()},
            self.meta,
        )
        episodes, _counts = evaluate(
            history, self.th, cache=self.cache, first_step=self.first_step, revision=(id(self), self.drops)
        )
        new: list[dict] = []
        changed: list[dict] = []
        known: dict[tuple[str, str], list[dict]] = {}
        seen = self.seen
        for ep in episodes:
            key = (ep["detector"], ep["metric"])
            if seen.get(id(ep)) is ep:
                # The engine kept this very dict (a closed episode is built once and never mutated; an update
                # is a new dict): the episode it continues is itself, unchanged. Most episodes of a pass.
                known.setdefault(key, []).append(ep)
                continue
            before = self._match(key, ep)
            if before is None:
                new.append(ep)
                changed.append(ep)
            elif any(before.get(f) != ep.get(f) for f in _SAME):
                changed.append(ep)
            known.setdefault(key, []).append(ep)
        self.known = known
        self.seen = {id(ep): ep for ep in episodes}
        self.costs = [*self.costs[1 - COSTS_KEPT :], self.clock() - now]
        self.wait = self.every()
        return new, changed

    def _match(self, key: tuple[str, str], ep: dict) -> dict | None:
        """The last pass's episode that this one continues (same detector and metric, overlapping steps)."""
        cooldown = int(self.th.cooldown_steps)
        for old in self.known.get(key, ()):
            if ep["first_step"] <= old["last_step"] + cooldown and ep["last_step"] >= old["first_step"]:
                return old
        return None
