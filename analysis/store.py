"""Per-run history of everything the monitor received: bounded numpy columns plus run-level records.

Pure numpy + stdlib. One `Store` holds several runs (a restarted training is a new run id). Columns are
aligned on the step axis; a value is NaN where the metric was absent, None or NaN, and `logged` says whether
the trainer logged the key at that step (so "None where a value was expected" can be told from "absent").
Memory is bounded: when a run reaches `capacity` rows the older half is thinned by two.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from rlhf_tui.analysis.reward_streams import RewardStreams
from rlhf_tui.analysis.samples import SampleBuffer

DEFAULT_CAPACITY = 1 << 17  # rows per run before the older half is thinned (~131k steps at full resolution)


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
        self._steps = np.zeros(self.capacity, dtype=np.int64)
        self._times = np.full(self.capacity, np.nan)
        self.columns: dict[str, Column] = {}
        self.thinned = 0  # rows removed by thinning (older history at half resolution)
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
            if self.rows == self.capacity:
                self._thin()
            row = self.rows
            self._steps[row] = step
            self._times[row] = np.nan if timestamp is None else timestamp
            self.rows += 1
        else:
            row = self.rows - 1
        for name, value in metrics.items():
            col = self.columns.get(name)
            if col is None:
                col = self.columns[name] = Column(self.capacity)
            col.values[row] = math.nan if value is None else value
            col.logged[row] = True
        return True

    def add_reward(self, batch: dict, samples: list | None = None) -> None:
        """Keep one reward batch (newest last), take it into its function's reliability stream and its
        `samples` (default: the batch's) into the completions buffer; the prompt groups' split of a step
        it completes becomes that step's `groups/*` metrics (unless older steps arrived since)."""
        self.rewards.append(batch)
        args = self.meta.get("args")
        args = args if isinstance(args, dict) else {}
        self.reward_streams.add(batch, args.get("num_generations"))
        full = batch if samples is None else {**batch, "samples": samples}
        for step, metrics in self.samples.add(full, args.get("num_generations"), args.get("reward_weights")).items():
            if not self.rows or step >= self._steps[self.rows - 1]:
                self.add_step(step, metrics)

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
    def revision(self) -> tuple[int, int]:
        """Changes whenever rows other than the newest may have changed (thinning): the detector cache's token."""
        return (id(self), self.thinned)

    @property
    def trainer(self) -> str:
        return str(self.meta.get("trainer") or "unknown")


class Store:
    """All runs seen by one monitor, plus transport counters. Thread-safe for one writer, many readers:
    writers hold `lock`; readers take `version` to know whether anything changed."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self.runs: dict[str, RunHistory] = {}
        self.current: str | None = None
        self.lock = threading.RLock()
        self.version = 0
        self.transport = {"received": 0, "rejected": 0, "gaps": 0, "dropped": 0, "duplicates": 0}
        self.rejections: deque[str] = deque(maxlen=20)  # why recent messages were rejected
        self.source: str = ""
        # connecting | live | stalled | stale | unreachable | ended (live sources); offline (files)
        self.connection: str = "offline"
        self.stale_since: float | None = None  # wall time the connection went stale

    def run(self, run_id: str) -> RunHistory:
        """The run with this id, created (and made current) when new."""
        hist = self.runs.get(run_id)
        if hist is None:
            hist = self.runs[run_id] = RunHistory(run_id, self.capacity)
            self.current = run_id
        return hist

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
