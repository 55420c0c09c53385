"""The callback's checkpoint analyses: each saved checkpoint analysed on a worker thread, never on the training
thread, with the previous one as reference; results go to the run's publisher and a bounded in-memory list."""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import Any

from rlhf_tui.bridge.wire import events

KEPT = 256  # results kept in memory (a long run saves many)


class CheckpointAnalyses:
    """One analysis at a time (a lock); `wait` blocks on a condition until those started so far are done."""

    def __init__(self) -> None:
        self.last: str | None = None  # the previous checkpoint: the next one's reference
        self.thread: threading.Thread | None = None
        self.pending = 0  # analyses in flight
        self.results: deque[dict] = deque(maxlen=KEPT)
        self._lock = threading.Lock()
        self._done = threading.Condition()

    def start(self, step: int, path: str, pub: Any) -> None:
        """Analyse `path` on a worker thread; the result is put on `pub` (the run it belongs to, even if another
        one has started since), kept, and then `wait` is woken."""
        reference, self.last = self.last, path
        with self._done:
            self.pending += 1
        self.thread = threading.Thread(
            target=self._work, args=(step, path, reference, pub), name="rlhf-tui-checkpoint", daemon=True
        )
        self.thread.start()

    def _work(self, step: int, path: str, reference: str | None, pub: Any) -> None:
        with self._lock:
            result = {"step": step, "path": path, "status": "failed", "issues": [], "health_score": None}
            try:
                from rlhf_tui.analysis.checkpoint import CheckpointAnalyzer

                ref = reference if reference and os.path.isdir(reference) else None
                result = CheckpointAnalyzer().analyze_checkpoint(path, step, reference_checkpoint=ref)
                result = {k: v for k, v in result.items() if k != "weight_stats"}
                result.update({"step": step, "path": path, "status": "analysed", "reference": ref})
            except Exception as exc:
                result["issues"] = [str(exc)]
            try:
                if pub is not None:
                    pub.put(events.CheckpointAnalysed(result))
            finally:
                with self._done:  # published (queued for the log and the wire) and kept: the waiter may go on
                    self.results.append(result)
                    self.pending -= 1
                    self._done.notify_all()

    def wait(self, timeout: float) -> list[dict]:
        """Block (at most `timeout` seconds) until the analyses started so far are done; the kept results,
        oldest first."""
        with self._done:
            self._done.wait_for(lambda: self.pending == 0, timeout)
            return list(self.results)
