"""Per-run history of everything the monitor received: bounded numpy columns plus run-level records.

Pure numpy + stdlib. One `Store` holds several runs (a restarted training is a new run id). Columns are
aligned on the step axis; a value is NaN where the metric was absent, None or NaN, and `logged` says whether
the trainer logged the key at that step (so "None where a value was expected" can be told from "absent").
Memory is bounded: a run's arrays start small and double as rows arrive (a run that never logs much costs
little, so a stream of new run ids is cheap); when a run reaches `capacity` rows the older half is thinned by
two. A run keeps at most `MAX_COLUMNS` metric names and a store at most `MAX_RUNS` runs (the oldest go first):
these caps hold whatever source fills the store (the wire, a JSONL log, a trainer_state.json).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from rlhf_tui.analysis.reward_streams import RewardStreams
from rlhf_tui.analysis.samples import SampleBuffer

DEFAULT_CAPACITY = 1 << 17  # rows per run before the older half is thinned (~131k steps at full resolution)
FIRST_ROWS = 256  # rows a new run allocates; its arrays double up to `capacity` as rows arrive
MAX_COLUMNS = 512  # metric names per run (protocol.MAX_METRICS: what one step message may carry)
MAX_RUNS = 8  # runs per store (a restarted training is a new run; the oldest are dropped first)
REJUDGE_S = 10.0  # older rows filled by trailing reward batches are judged again at most this often (`revision`)


class Column:
    """One metric's values and logged-mask, sharing the run's row count."""

    __slots__ = ("values", "logged")

    def __init__(self, capacity: int):
        self.values = np.full(capacity, np.nan)
        self.logged = np.zeros(capacity, dtype=bool)


class RunHistory:
    """Everything known about one run (one run id)."""

    def __init__(self, run_id: str, capacity: int = DEFAULT_CAPACITY):
        self.run_id = run_id
        self.capacity = max(16, int(capacity))
        self.meta: dict[str, Any] = {}
        self.rows = 0
        self._size = min(self.capacity, FIRST_ROWS)  # rows allocated (grows by doubling up to capacity)
        self._steps = np.zeros(self._size, dtype=np.int64)
        self._times = np.full(self._size, np.nan)
        self.columns: dict[str, Column] = {}
        self.max_columns = MAX_COLUMNS
        self.rejected_fields = 0  # fields dropped at ingest: wrong type or range, names past the cap (schema.py)
        self.field_rejections: deque[str] = deque(maxlen=20)  # which, most recent last
        self.thinned = 0  # rows removed by thinning (older history at half resolution)
        self.backfilled = 0  # times `revision` moved for values changed in rows older than the newest
        self._backfill_pending = False  # such a change not yet in `revision` (at most one move per REJUDGE_S)
        self._backfill_at = -math.inf
        self.out_of_order = 0  # step records older than the newest step, ignored
        self.checkpoints: list[dict] = []
        self.rewards: deque[dict] = deque(maxlen=256)  # reward batches (stats + samples), newest last
        self.reward_streams = RewardStreams()  # per reward function, from every batch (analysis/reward_streams.py)
        self.samples = SampleBuffer()  # every step's kept completions, all functions' scores (analysis/samples.py)
        self.system: dict[int, dict] = {}  # latest system sample per rank
        self.training_anomalies: deque[dict] = deque(maxlen=1000)  # anomalies found by the training side
        self.ended: dict | None = None  # run_end data (global_step, summary)
        self.summary: dict[str, float | str] = {}  # the trainer's end-of-run summary (train_loss, train_runtime ...)
        self.last_seq = -1
        self.last_heartbeat: float | None = None  # monotonic time of the last heartbeat/message
        self.last_step_time: float | None = None  # monotonic time the newest step arrived
        self.server_status: dict = {}  # the publisher's counters from heartbeats

    # -- steps ---------------------------------------------------------------------------------
    @property
    def steps(self) -> np.ndarray:
        return self._steps[: self.rows]

    @property
    def times(self) -> np.ndarray:
        return self._times[: self.rows]

    @property
    def last_step(self) -> int | None:
        return int(self._steps[self.rows - 1]) if self.rows else None

    def metric_names(self) -> list[str]:
        return list(self.columns)

    def values(self, name: str) -> np.ndarray:
        col = self.columns.get(name)
        return col.values[: self.rows] if col is not None else np.full(self.rows, np.nan)

    def logged(self, name: str) -> np.ndarray:
        col = self.columns.get(name)
        return col.logged[: self.rows] if col is not None else np.zeros(self.rows, dtype=bool)

    def metrics(self) -> dict[str, np.ndarray]:
        """{name: values} views (no copy) for the analysis functions."""
        return {name: col.values[: self.rows] for name, col in self.columns.items()}

    def logged_masks(self) -> dict[str, np.ndarray]:
        return {name: col.logged[: self.rows] for name, col in self.columns.items()}

    def latest(self, name: str) -> float | None:
        """The newest finite value of a metric, or None."""
        vals = self.values(name)
        finite = np.flatnonzero(np.isfinite(vals))
        return float(vals[finite[-1]]) if finite.size else None

    def add_step(self, step: int, metrics: Mapping[str, float | None], timestamp: float | None = None) -> bool:
        """Record one step's metrics. A repeated step merges into its row; an older step is ignored."""
        step = int(step)
        if self.rows and step < self._steps[self.rows - 1]:
            self.out_of_order += 1
            return False
        if not self.rows or step > self._steps[self.rows - 1]:
            self.make_room(1)
            row = self.rows
            self._steps[row] = step
            self._times[row] = np.nan if timestamp is None else timestamp
            self.rows += 1
        else:
            row = self.rows - 1
        for name, value in metrics.items():
            col = self.columns.get(name) or self.column(name)
            if col is not None:
                col.values[row] = math.nan if value is None else value
                col.logged[row] = True
        return True

    def column(self, name: str) -> Column | None:
        """The column of `name`, made when new; None (and counted) when the run already has `max_columns`."""
        col = self.columns.get(name)
        if col is None:
            if len(self.columns) >= self.max_columns:
                self.reject_field(f"metric names: more than {self.max_columns}")
                return None
            col = self.columns[name] = Column(self._size)
        return col

    def reject_field(self, what: str) -> None:
        """A field dropped at ingest (wrong type or range): counted and kept for the status line."""
        self.rejected_fields += 1
        self.field_rejections.append(what[:200])

    def make_room(self, wanted: int) -> int:
        """Room for up to `wanted` more rows: the arrays grown (doubling) while below `capacity`, the older half
        thinned at it. Returns how many rows fit now (at least 1)."""
        if self._size - self.rows < wanted and self._size < self.capacity:
            self._grow(min(self.capacity, max(2 * self._size, self.rows + wanted)))
        if self.rows >= self._size:
            self._thin()
        return min(wanted, self._size - self.rows)

    def _grow(self, size: int) -> None:
        rows = self.rows
        steps, times = np.zeros(size, dtype=np.int64), np.full(size, np.nan)
        steps[:rows], times[:rows] = self._steps[:rows], self._times[:rows]
        self._steps, self._times = steps, times
        for col in self.columns.values():
            if col.values.size < size:
                values, logged = np.full(size, np.nan), np.zeros(size, dtype=bool)
                values[:rows], logged[:rows] = col.values[:rows], col.logged[:rows]
                col.values, col.logged = values, logged
        self._size = size

    def add_reward(self, batch: dict, samples: list | None = None) -> None:
        """Keep one reward batch (newest last), take it into its function's reliability stream and its
        `samples` (default: the batch's) into the completions buffer; the prompt groups' split of a step
        it completes becomes that step's `groups/*` metrics (in its row when later steps arrived first)."""
        self.rewards.append(batch)
        args = self.meta.get("args")
        args = args if isinstance(args, dict) else {}
        self.reward_streams.add(batch, args.get("num_generations"))
        full = batch if samples is None else {**batch, "samples": samples}
        for step, metrics in self.samples.add(full, args.get("num_generations"), args.get("reward_weights")).items():
            if not self.rows or step >= self._steps[self.rows - 1]:
                self.add_step(step, metrics)
            else:  # reward messages trail the step rows (gathered, at most every 0.5 s): fill the step's own row
                self._fill_row(step, metrics)

    def _fill_row(self, step: int, metrics: Mapping[str, float]) -> None:
        """Set `metrics` in the existing row of an older `step` (none there: nothing)."""
        row = int(np.searchsorted(self._steps[: self.rows], step))
        if row < self.rows and self._steps[row] == step:
            for name, value in metrics.items():
                col = self.column(name)
                if col is not None:
                    old = col.values[row]
                    if row < self.rows - 1 and not (old == value or (old != old and value != value)):
                        self._backfill_pending = True  # a row a detection pass may have judged changed: `revision`
                    col.values[row] = value
                    col.logged[row] = True

    def _thin(self) -> None:
        """Halve the resolution of the older half so memory stays bounded on very long runs."""
        half = self.rows // 2
        keep = np.concatenate([np.arange(0, half, 2), np.arange(half, self.rows)])
        n = keep.size
        self._steps[:n] = self._steps[keep]
        self._times[:n] = self._times[keep]
        for col in self.columns.values():
            col.values[:n] = col.values[keep]
            col.logged[:n] = col.logged[keep]
            col.values[n:] = np.nan
            col.logged[n:] = False
        self.thinned += self.rows - n
        self.rows = n

    @property
    def revision(self) -> tuple[int, int, int]:
        """Changes whenever rows other than the newest may have changed (thinning, a trailing reward batch's
        `groups/*` filled into an older row): the detector cache's token, so its next pass starts over instead
        of leaving the filled row judged as it was. Fills change it at most every REJUDGE_S: on a live GRPO run
        reward batches trail their steps all the time, and a pass that starts over costs ~76 ms at 10^5 rows
        (1.6 ms incremental), so filled rows are judged again within REJUDGE_S instead of at every pass."""
        if self._backfill_pending:
            now = time.monotonic()
            if now - self._backfill_at >= REJUDGE_S:
                self.backfilled += 1
                self._backfill_pending, self._backfill_at = False, now
        return (id(self), self.thinned, self.backfilled)

    @property
    def trainer(self) -> str:
        return str(self.meta.get("trainer") or "unknown")


def run_status(run: RunHistory) -> str | None:
    """ "finished", "crashed" or "interrupted" once run_end arrived (None before)."""
    if run.ended is None:
        return None
    status = run.ended.get("status") if isinstance(run.ended, dict) else None
    return status if status in ("crashed", "interrupted") else "finished"


class Store:
    """All runs seen by one monitor, plus transport counters. Thread-safe for one writer, many readers:
    writers hold `lock`; readers take `version` to know whether anything changed."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self.runs: dict[str, RunHistory] = {}
        self.max_runs = MAX_RUNS
        self.current: str | None = None
        self.lock = threading.RLock()
        self.version = 0
        self.transport = {"received": 0, "rejected": 0, "gaps": 0, "dropped": 0, "duplicates": 0, "runs_dropped": 0}
        self.rejections: deque[str] = deque(maxlen=20)  # why recent messages were rejected
        self.source: str = ""
        # connecting | live | stalled | stale | unreachable | ended (live sources); offline (files)
        self.connection: str = "offline"
        self.stale_since: float | None = None  # wall time the connection went stale

    def run(self, run_id: str) -> RunHistory:
        """The run with this id, created (and made current) when new; beyond `max_runs` the oldest runs other
        than the current one are dropped (and counted) first."""
        hist = self.runs.get(run_id)
        if hist is None:
            while len(self.runs) >= self.max_runs:
                oldest = next((r for r in self.runs if r != self.current), None)
                if oldest is None:
                    break
                self.drop_run(oldest)
            hist = self.runs[run_id] = RunHistory(run_id, self.capacity)
            self.current = run_id
        return hist

    def drop_run(self, run_id: str) -> None:
        if self.runs.pop(run_id, None) is not None:
            self.transport["runs_dropped"] += 1
            if self.current == run_id:
                self.current = next(reversed(self.runs), None)

    @property
    def current_run(self) -> RunHistory | None:
        return self.runs.get(self.current) if self.current else None

    def touch(self) -> None:
        self.version += 1

    def reject(self, reason: str) -> None:
        self.transport["rejected"] += 1
        self.rejections.append(reason[:200])


def steps_from_records(
    records: Iterable[tuple[int, Mapping[str, float | None]]], run_id: str = "file", capacity: int = DEFAULT_CAPACITY
) -> RunHistory:
    """Build a RunHistory from (step, metrics) pairs; handy for tests and file sources."""
    hist = RunHistory(run_id, capacity)
    for step, metrics in records:
        hist.add_step(step, metrics)
    return hist
