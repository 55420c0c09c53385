"""The run's history on the training side: every published message, numbered, for monitors that join late.

The newest messages are kept one frame each; every BLOCK_MESSAGES they are sealed into one `block` frame
(steps as columns). Over the memory bound the oldest blocks are thinned (every other row); see docs/protocol.md.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

from rlhf_tui.bridge.wire import protocol

MAX_CACHED_BATCHES = 8  # encoded tail batches kept (each at most protocol.MAX_BATCH_BYTES)


@dataclass
class _Block:
    first: int
    last: int
    frame: bytes
    level: int = 0  # times thinned


class History:
    """Numbered, encoded messages: `publish()` adds one, `_next_payload(cursor)` serves a monitor's cursor."""

    def __init__(self, run_id: str, history_bytes: int = 256 << 20):
        self.run_id = run_id
        self._blocks: list[_Block] = []  # sealed history: blocks of BLOCK_MESSAGES messages, steps in columns
        self._block_lasts: list[int] = []
        self._frames: list[bytes] = []  # the newest messages (not sealed yet), one frame each
        self._seqs: list[int] = []
        # Tail batches already encoded, by (first seq, last seq): monitors that ask for the same range (a resync,
        # a late joiner, a flood of either) get the same bytes object, sent zero-copy, never one copy each.
        self._batches: dict[tuple[int, int], bytes] = {}
        self._tail_steps: list[tuple | None] = []  # (seq, step, ts, clean metrics, rank) of tail steps
        self._tail_bytes = 0
        self._history_bytes = 0
        self._thinned_upto = -1
        self._next_seq = 0
        self._history_bytes_max = history_bytes
        self.stats: dict = {"published": 0}

    def publish(self, kind: str, data: dict, rank: int = 0) -> int:
        """Number, encode and keep a message in history (background thread only)."""
        seq = self._next_seq
        ts = time.time()
        step_row = None
        metrics = data.get("metrics")
        if (
            kind == protocol.STEP
            and type(metrics) in (dict, protocol.Clean)
            and data.keys() <= {"step", "metrics", "wall"}
        ):
            clean = {
                "step": data["step"],
                "metrics": metrics if type(metrics) is protocol.Clean else protocol.clean_metrics(metrics),
                "wall": protocol.to_json_safe(data.get("wall")),
            }
            if type(clean["step"]) is int:
                step_row = (seq, clean["step"], ts, clean["metrics"], rank)
        else:
            clean = protocol.to_json_safe(data)
        encoded = getattr(clean.get("metrics"), "encoded", None) if step_row is not None else None
        if encoded is not None:
            frame = protocol.encode_step(self.run_id, seq, ts, clean["step"], clean["metrics"], clean["wall"], rank)
        else:
            frame = protocol.encode_clean(kind, self.run_id, seq, ts, clean, rank)
        self._next_seq += 1
        self._frames.append(frame)
        self._seqs.append(seq)
        self._tail_steps.append(step_row)
        self._tail_bytes += len(frame)
        self._history_bytes += len(frame)
        self.stats["published"] += 1
        if len(self._frames) >= protocol.BLOCK_MESSAGES or self._tail_bytes >= protocol.MAX_BATCH_BYTES:
            self._seal()
        return seq

    def _seal(self) -> None:
        """Turn the tail into one history block (steps as columns): a late joiner decodes it several times
        faster than rows, and it takes about half the memory."""
        frames, seqs, rows = self._frames, self._seqs, self._tail_steps
        rank = next((r[4] for r in rows if r is not None), 0)
        steps = [r[:4] for r in rows if r is not None and r[4] == rank]
        others = [f for f, r in zip(frames, rows) if r is None or r[4] != rank]
        block = protocol.encode_block(self.run_id, rank, seqs[0], seqs[-1], time.time(), steps, others)
        self._blocks.append(_Block(seqs[0], seqs[-1], block))
        self._block_lasts.append(seqs[-1])
        self._history_bytes += len(block) - self._tail_bytes
        self._frames, self._seqs, self._tail_steps, self._tail_bytes = [], [], [], 0
        self._batches.clear()

    def _thinnable(self) -> bool:
        return any(b.level < 100 for b in self._blocks[:-1] or self._blocks)

    def _thin_history(self) -> bool:
        """Over the history bound: halve the least-thinned block (the oldest first; the newest block last):
        every other step row, system sample and reward batch goes. Late joiners still see the whole run, at
        lower resolution. Returns False when nothing is left to thin."""
        if not self._blocks or not self._thinnable():
            return False
        import json

        candidates = range(max(1, len(self._blocks) - 1))
        index = min(candidates, key=lambda i: (self._blocks[i].level, i))
        block = self._blocks[index]
        env = json.loads(block.frame)
        data = env["data"]
        rows = list(range(0, len(data["seq"]), 2))
        removed = [s for i, s in enumerate(data["seq"]) if i % 2]
        dense = {name: col for name, col in data["cols"].items() if isinstance(col, list)}
        sparse = {
            name: dict(zip(col["i"], col["x"])) for name, col in data["cols"].items() if not isinstance(col, list)
        }
        steps = []
        for i in rows:
            metrics = {name: col[i] for name, col in dense.items()}
            metrics.update({name: col[i] for name, col in sparse.items() if i in col})
            steps.append((data["seq"][i], data["step"][i], data["ts"][i], metrics))
        others, counts = [], {}
        for inner in data["other"]:
            kind = inner.get("kind")
            if kind in (protocol.SYSTEM, protocol.REWARD):
                counts[kind] = counts.get(kind, 0) + 1
                if counts[kind] % 2 == 0:
                    removed.append(inner["seq"])
                    continue
            others.append(protocol.dumps(inner))
        frame = protocol.encode_block(
            self.run_id, env.get("rank", 0), block.first, block.last, env["ts"], steps, others
        )
        self._history_bytes += len(frame) - len(block.frame)
        block.frame, block.level = frame, block.level + 1
        if removed:
            self._thinned_upto = max(self._thinned_upto, max(removed))
        if not removed:
            block.level += 100  # nothing left to thin here; prefer other blocks
        return True

    def _next_payload(self, cursor: int) -> tuple[bytes | None, int]:
        """The frame that serves `cursor` next, and the cursor after it."""
        if self._blocks and cursor <= self._block_lasts[-1]:
            block = self._blocks[bisect.bisect_left(self._block_lasts, cursor)]
            return block.frame, block.last + 1
        start = bisect.bisect_left(self._seqs, cursor)
        if start >= len(self._seqs):
            return None, cursor
        end, size = start, 0
        while end < len(self._frames) and end - start < protocol.MAX_BATCH and size < protocol.MAX_BATCH_BYTES:
            size += len(self._frames[end])
            end += 1
        if end - start == 1:
            return self._frames[start], self._seqs[start] + 1
        key = (self._seqs[start], self._seqs[end - 1])
        batch = self._batches.get(key)
        if batch is None:
            if len(self._batches) >= MAX_CACHED_BATCHES:
                del self._batches[next(iter(self._batches))]  # the oldest
            batch = self._batches[key] = protocol.encode_batch(self._frames[start:end])
        return batch, key[1] + 1
