"""TRL's `output_dir/completions/completions_<step>.parquet` (`log_completions=True`) as reward batches.

Each file holds the completions TRL logged at a step: `step`, `prompt`, `completion`, one column of scores per
reward function and `advantage`. Each reward column lands as one reward batch of the run, so the reward panes
and their detectors see runs that had no `monitor_rewards` wrapper, and the completions browser shows them: the
first column's batch carries up to 16 of the completions with their row `index` (every column's score is joined
to them on it). Read with pyarrow (the optional extra `rlhf-tui[completions]`); without it, one note.
A file still being written (no parquet footer yet) is retried at the next poll; one that stays unreadable is
counted and left out.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from rlhf_tui.analysis.store import Store
from rlhf_tui.bridge.monitor.ingest import apply_message
from rlhf_tui.bridge.wire import events, protocol
from rlhf_tui.bridge.wire.metrics import to_float

INSTALL_HINT = "completions/*.parquet not read: it needs pyarrow: pip install 'rlhf-tui[completions]'"
NOT_REWARDS = frozenset({"step", "advantage", "prompt", "completion", "image"})
MAX_FILES = 512  # files read at the first poll (the newest); later polls read each new one
MAX_ROWS = 4096  # completions taken from one file
SAMPLE_CHARS = 2000  # as the reward wrapper clips them
BROWSER_SAMPLES = 16  # completions of one file kept for the browser (the reward wrapper's default setting)
SETTLE_S = 5.0  # a file unreadable this long after its last change is corrupt, not being written


def _text(value: Any) -> str:
    """A prompt or completion as text: conversational messages joined by their contents."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return " ".join(_text(m.get("content", "")) if isinstance(m, dict) else _text(m) for m in value)
    return "" if value is None else str(value)


def _samples(scores: list[float | None], prompts: list, completions: list) -> list[dict]:
    """The completions the browser keeps of one file, each with its `index` (its row: every reward column's
    score is joined to it): all of them up to BROWSER_SAMPLES, else the best, the worst, the median and evenly
    spaced others by this column's score. Labels as the reward wrapper's ("all", "best", ...)."""
    n = min(len(completions), len(scores))
    order = sorted((i for i in range(n) if scores[i] is not None and math.isfinite(scores[i])), key=lambda i: scores[i])
    picks = [("best", order[-1]), ("worst", order[0]), ("median", order[len(order) // 2])] if order else []
    if n <= BROWSER_SAMPLES:
        picks += [("all", i) for i in range(n)]
    else:
        picks += [("nonfinite", i) for i in range(n) if i not in set(order)][:2]
        picks += [("spread", order[k * (len(order) - 1) // (BROWSER_SAMPLES - 1)]) for k in range(BROWSER_SAMPLES)]
        picks += [("first", 0)]
    out, seen = [], set()
    for label, i in picks:
        if i in seen or len(out) >= BROWSER_SAMPLES:
            continue
        seen.add(i)
        prompt = _text(prompts[i]) if i < len(prompts) else ""
        out.append(
            {
                "label": label,
                "index": i,
                "score": scores[i],
                "prompt": prompt[-SAMPLE_CHARS:],
                "completion": _text(completions[i])[:SAMPLE_CHARS],
            }
        )
    return out


class CompletionsReader:
    """Reads (and, polled again, follows) a completions/ folder into the store's current run."""

    ended = True  # never what a follower waits for

    def __init__(self, directory: Path):
        self.directory = directory
        self.done: set[str] = set()
        self.corrupt = 0
        self.note = ""
        self.error = ""
        self._pq: Any = None

    def poll(self, store: Store, final: bool = False) -> int:
        if self._pq is None:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                self.note = INSTALL_HINT
                return 0
            self._pq = pq
        try:
            files = sorted(p for p in self.directory.glob("completions_*.parquet") if p.name not in self.done)
        except OSError:
            return 0
        if not self.done:
            self.done.update(p.name for p in files[:-MAX_FILES])
            files = files[-MAX_FILES:]
        batches = 0
        for path in files:
            with store.lock:
                run = store.current_run
            if run is None:
                return batches  # the metrics reader makes the run; come back once it has
            table = self._table(path, final)
            if table is None:
                continue
            self.done.add(path.name)
            with store.lock:
                batches += land_table(run, table)
                store.touch()
        return batches

    def _table(self, path: Path, final: bool) -> dict | None:
        try:
            return self._pq.read_table(path).slice(0, MAX_ROWS).to_pydict()
        except Exception:  # no footer yet (being written), or corrupt
            try:
                settled = time.time() - path.stat().st_mtime >= SETTLE_S
            except OSError:
                settled = True
            if final or settled:
                self.done.add(path.name)
                self.corrupt += 1
            return None


def _scores(column: Any) -> list[float | None] | None:
    """A column of scores (numbers, None, or trackio's "NaN"/"Infinity" strings) as floats; None if it is not one."""
    if not isinstance(column, list):
        return None
    out = []
    for v in column:
        if isinstance(v, bool) or not (
            v is None or isinstance(v, (int, float)) or v in ("NaN", "Infinity", "-Infinity")
        ):
            return None
        out.append(to_float(v))
    return out


def land_table(run: Any, table: dict) -> int:
    """A completions table ({column: values}, TRL's layout) as one reward batch per reward column of `run`."""
    steps = [s for s in table.get("step") or [] if isinstance(s, int) and not isinstance(s, bool)]
    if not steps:
        return 0
    prompts, completions = table.get("prompt") or [], table.get("completion") or []
    landed = 0
    for name, column in table.items():
        scores = None if name in NOT_REWARDS else _scores(column)
        if not scores:
            continue
        batch = {"step": max(steps), "reward_func": name, "scores": scores}
        # the first reward column carries the texts (picked by its scores); the browser joins the others' on index
        batch["samples"] = _samples(scores, prompts, completions) if not landed else []
        apply_message(run, events.Message(protocol.REWARD, batch))
        landed += 1
    return landed
