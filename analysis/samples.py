"""Every step's sample completions for the completions browser: a bounded buffer keyed by step.

Each reward message carries its function's scores for the whole batch; the first wrapped function's batches
also carry the kept samples (prompt, completion, `index` in the batch, truncation; bridge/training/rewards.py).
Here the scores of every function are joined to the samples on (step, rank, batch, index), so a sample shows
each function's score, the weighted total and the group-normalised advantage where the batch is whole groups.
Untrusted text is made display-safe here (control characters shown as `\\xNN`, never passed to a terminal).
Bounded: per step (`STEP_BYTES`) and in total (`total_bytes`, the oldest steps dropped). Pure numpy + stdlib.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict, deque
from typing import Any

import numpy as np

from rlhf_tui.analysis.groups import RewardRange, group_split
from rlhf_tui.analysis.reward_stats import number, reward_weights

LIVE_STEPS = 256  # newest steps whose batches keep every function's scores (joins, the group split)
TOTAL_BYTES = 24 << 20  # text kept in all (the oldest steps dropped first)
STEP_BYTES = 256 << 10  # text kept per step
TEXT_CHARS = 8000  # characters kept of one prompt or completion
MAX_SCORES = 4096  # scores kept per function per batch
MAX_FUNCTIONS = 32
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(value: Any, limit: int = TEXT_CHARS) -> str:
    """Untrusted text shown as it is: control and escape characters spelled `\\xNN` (newlines and tabs kept)."""
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text[:limit])


class _Batch:
    __slots__ = ("rank", "scores", "samples", "texts_from", "size", "frozen")

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.scores: dict[str, np.ndarray] = {}
        self.samples: dict[int, dict] = {}
        self.texts_from: str | None = None
        self.size = 0
        # older steps: each function's scores, the total and the advantage of the kept samples only
        self.frozen: tuple[np.ndarray | None, np.ndarray | None] | None = None


class SampleBuffer:
    """The kept samples of every step (newest last), joined with every reward function's scores."""

    def __init__(self, total_bytes: int = TOTAL_BYTES) -> None:
        self.total_bytes = max(1 << 16, int(total_bytes))
        self.steps: OrderedDict[int, list[_Batch]] = OrderedDict()
        self.names: list[str] = []
        self.bytes = 0
        self.dropped_steps = 0
        self.stale = 0  # batches of steps already frozen, ignored
        self.range = RewardRange()
        self.version = 0
        self.width = 0  # the most functions that scored one batch: a batch with fewer is not complete yet
        self._step_bytes: dict[int, int] = {}
        self._live: deque[int] = deque()

    # -- taking reward batches -----------------------------------------------------------------------
    def add(self, batch: dict, num_generations: Any = None, weights: Any = None) -> dict[int, dict[str, float]]:
        """One stored reward batch (`reward_func`, `step`, `scores`, `samples`, `rank`). Returns the prompt
        group split ({step: metrics}) of the steps whose batches it completed."""
        step, name = batch.get("step"), batch.get("reward_func")
        if not isinstance(step, int) or isinstance(step, bool):
            return {}
        if self._live and step <= self._live[-1] - LIVE_STEPS:
            self.stale += 1  # older than the steps that keep their scores: nothing left to join it to
            return {}
        name = (name if isinstance(name, str) and name else "reward")[:120]
        if name not in self.names:
            if len(self.names) >= MAX_FUNCTIONS:
                return {}
            self.names.append(name)
        rank_value = batch.get("rank")
        rank = rank_value if isinstance(rank_value, int) and not isinstance(rank_value, bool) else 0
        raw = batch.get("scores")
        scores = np.asarray([number(s) for s in (raw if isinstance(raw, list) else [])[:MAX_SCORES]], dtype=np.float64)
        target = self._batch_for(step, rank, name, scores.size)
        target.scores[name] = scores
        target.size = max(target.size, scores.size)
        samples = batch.get("samples")
        for sample in samples if isinstance(samples, list) else []:
            if isinstance(sample, dict):
                where = sample.get("step")
                if where is None or where == step:
                    self._take(sample, target, step, name)
                elif isinstance(where, int) and not isinstance(where, bool):
                    self._take(sample, self._texts_batch(where, rank, name, sample.get("index")), where, name)
        self._trim()
        self._freeze(step, num_generations, weights)
        self.version += 1
        out = {}
        split = self._split(step, num_generations, weights)
        if split is not None:
            out[step] = split
        return out

    def _batch_for(self, step: int, rank: int, name: str, size: int) -> _Batch:
        batches = self.steps.get(step)
        if batches is None:
            batches = self.steps[step] = []
        for b in batches:
            if b.rank == rank and name not in b.scores and (not b.size or b.size == size):
                return b
        batches.append(_Batch(rank))
        del batches[:-64]
        return batches[-1]

    def _texts_batch(self, step: int, rank: int, name: str, index: Any) -> _Batch | None:
        """Where a sample of an earlier step of the same message goes: that step's first batch this function
        scored that has no sample at `index` yet (a step's accumulated batches, in order)."""
        for b in self.steps.get(step, []):
            if b.rank == rank and name in b.scores and b.texts_from in (None, name) and index not in b.samples:
                return b
        return None

    def _take(self, sample: dict, batch: _Batch | None, step: int, name: str) -> None:
        index = sample.get("index")
        if batch is None or not isinstance(index, int) or isinstance(index, bool) or index < 0:
            return
        if batch.texts_from not in (None, name):
            return  # another function already carries this batch's texts
        record: dict[str, Any] = {
            "index": index,
            "label": visible(sample.get("label"), 16),
            "prompt": visible(sample.get("prompt")),
            "completion": visible(sample.get("completion")),
            "truncated": sample.get("truncated") is True,
            "length": sample.get("length") if isinstance(sample.get("length"), int) else None,
        }
        size = (
            len(record["prompt"].encode("utf-8", "replace")) + len(record["completion"].encode("utf-8", "replace")) + 64
        )
        if self._step_bytes.get(step, 0) + size > STEP_BYTES or index in batch.samples:
            return
        batch.texts_from = name
        batch.samples[index] = record
        self._step_bytes[step] = self._step_bytes.get(step, 0) + size
        self.bytes += size

    def _trim(self) -> None:
        while self.bytes > self.total_bytes and len(self.steps) > 1:
            step, _ = self.steps.popitem(last=False)
            self.bytes -= self._step_bytes.pop(step, 0)
            self.dropped_steps += 1
        while len(self.steps) > 20_000:  # steps with few or short samples
            step, _ = self.steps.popitem(last=False)
            self.bytes -= self._step_bytes.pop(step, 0)

    def _freeze(self, newest: int, num_generations: Any, weights: Any) -> None:
        """Steps LIVE_STEPS behind `newest` keep their samples' rows and drop the whole batches' scores (a
        step without samples goes): the buffer's memory is its text, not 10^4 steps of score arrays."""
        while self._live and self._live[0] <= newest - LIVE_STEPS:
            step = self._live.popleft()
            batches = self.steps.get(step)
            if batches is None:
                continue
            if not any(b.samples for b in batches):
                del self.steps[step]
                continue
            for batch in batches:
                kept = np.asarray(sorted(batch.samples), dtype=np.int64)
                kept = kept[kept < batch.size]
                total = self.totals(batch, weights)
                adv = _advantages(total, num_generations)
                batch.scores = {n: v[kept[kept < v.size]] for n, v in batch.scores.items() if v.size == batch.size}
                batch.frozen = (None if total is None else total[kept], None if adv is None else adv[kept])
                batch.samples = {int(i): batch.samples[int(i)] for i in kept}
        if not self._live or newest > self._live[-1]:
            self._live.append(newest)

    # -- reading ---------------------------------------------------------------------------------------
    def totals(self, batch: _Batch, weights: Any = None) -> np.ndarray | None:
        """The weighted total per completion over the functions that scored this batch (NaN-ignoring, as TRL
        sums); GRPO's weights apply when every known function scored it."""
        names = [n for n in self.names if n in batch.scores and batch.scores[n].size == batch.size]
        if not names or not batch.size:
            return None
        w = reward_weights(weights, len(names)) if len(names) == len(self.names) else np.ones(len(names))
        matrix = np.column_stack([batch.scores[n] for n in names]) * w
        with np.errstate(invalid="ignore"):
            total = np.nansum(matrix, axis=1)
        total[np.isnan(matrix).all(axis=1)] = np.nan
        return total

    def _split(self, step: int, num_generations: Any, weights: Any) -> dict[str, float] | None:
        batches = self.steps.get(step, [])
        self.width = max([self.width, *(len(b.scores) for b in batches)])
        complete = [b for b in batches if len(b.scores) == self.width]  # every function the run has scored with
        parts = [t for t in (self.totals(b, weights) for b in complete) if t is not None]
        if not parts or len(complete) < len(batches):
            return None
        totals = np.concatenate(parts)
        self.range.update(totals)
        splits: list[dict[str, float]] = []
        for t in parts:
            split = group_split(t, num_generations, self.range.low, self.range.high)
            if split is None:
                return None
            splits.append(split)
        sizes = [t.size for t in parts]
        return {k: sum(s[k] * n for s, n in zip(splits, sizes)) / sum(sizes) for k in splits[0]}

    def sample_steps(self) -> list[int]:
        """Steps with at least one kept sample, oldest first."""
        return [s for s, bs in self.steps.items() if any(b.samples for b in bs)]

    def rows(self, step: int, num_generations: Any = None, weights: Any = None) -> list[dict]:
        """One step's samples: index, label, prompt, completion, scores {function: value}, total, advantage
        (group-normalised, where the batch is whole groups), truncated, length, nonfinite."""
        out: list[dict] = []
        for bi, batch in enumerate(self.steps.get(step, [])):
            out.extend(self._batch_rows(bi, batch, num_generations, weights))
        return out

    def _batch_rows(self, bi: int, batch: _Batch, num_generations: Any, weights: Any) -> list[dict]:
        out: list[dict] = []
        if batch.samples:
            if batch.frozen is None:
                total = self.totals(batch, weights)
                adv = _advantages(total, num_generations)
            else:
                total, adv = batch.frozen
            for j, index in enumerate(sorted(batch.samples)):
                rec = batch.samples[index]
                at = j if batch.frozen is not None else index  # frozen arrays hold the kept samples only
                scores = {n: float(batch.scores[n][at]) for n in self.names if at < batch.scores.get(n, _EMPTY).size}
                t = float(total[at]) if total is not None and at < total.size else None
                out.append(
                    {
                        **rec,
                        "batch": bi,
                        "rank": batch.rank,
                        "scores": scores,
                        "total": t,
                        "advantage": float(adv[at]) if adv is not None and at < adv.size else None,
                        "nonfinite": any(not math.isfinite(v) for v in scores.values())
                        or (t is not None and not math.isfinite(t)),
                        "chars": len(rec["completion"]),
                    }
                )
        return out


_EMPTY = np.zeros(0)


def _advantages(total: np.ndarray | None, num_generations: Any) -> np.ndarray | None:
    """GRPO's advantage: (total − group mean) / (group std + 1e-4), groups of `num_generations`."""
    if total is None or not isinstance(num_generations, int) or isinstance(num_generations, bool):
        return None
    if num_generations < 2 or total.size % num_generations:
        return None
    groups = total.reshape(-1, num_generations)
    with np.errstate(invalid="ignore"):
        mean = groups.mean(axis=1, keepdims=True)
        std = groups.std(axis=1, ddof=1, keepdims=True)
        return ((groups - mean) / (std + 1e-4)).ravel()
