"""A transformers `output_dir` followed through its `trainer_state.json`, rewritten whole at each checkpoint.

The newest of `output_dir/trainer_state.json` and `output_dir/checkpoint-*/trainer_state.json` is read when it
changes; its `log_history` entries from the newest step already landed on are applied (that step's row merges,
older ones were landed before), so the run grows by whole entries. A file caught mid-rewrite (a writer that
truncates and writes in place, or a checkpoint removed by `save_total_limit` while being read) is not valid
JSON, or changes while it is read: it is counted as a retry and read again at the next poll, never half-applied.
A checkpoint's state holds no end-of-training entry: a state whose `global_step` reached its `max_steps` ends
the run (`finished_step`), or a follower of a finished run would wait for an end that is never written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rlhf_tui.analysis.store import Store
from rlhf_tui.bridge.monitor.ingest import apply_message
from rlhf_tui.bridge.wire import events, protocol

STATE = "trainer_state.json"
MAX_STATE_BYTES = 1 << 30


def state_files(path: Path) -> list[Path]:
    """The trainer_state.json files of an output_dir (or the file itself)."""
    if path.is_file():
        return [path]
    found = [path / STATE] if (path / STATE).is_file() else []
    try:
        found += [p / STATE for p in path.glob("checkpoint-*") if (p / STATE).is_file()]
    except OSError:
        pass
    return found


def finished_step(state: dict) -> int | None:
    """The step at which a trainer state says training is over (`global_step` >= `max_steps` > 0), else None."""
    step, planned = state.get("global_step"), state.get("max_steps")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (step, planned)):
        return None
    return step if 0 < planned <= step else None


def _checkpoint_step(path: Path) -> int:
    digits = re.sub(r"\D", "", path.parent.name)
    return int(digits) if digits and path.parent.name.startswith("checkpoint-") else -1


class TrainerStateReader:
    """Reads (and, polled again, follows) an output_dir's trainer state into a Store."""

    def __init__(self, path: Path):
        self.path = path
        base = path.parent if path.is_file() else path
        self.run_id = f"file:{base.name or 'run'}"
        self.seen: tuple[str, int, int] | None = None  # (file, mtime_ns, size) last applied
        self.retries = 0  # reads that caught a file mid-rewrite (or gone), retried at the next poll
        self.ended = False
        self.error = ""  # why the newest file could not be read, for a recorded read's error line

    def newest(self) -> Path | None:
        """The file with the newest state: the most recently written (a checkpoint's step breaks ties)."""
        best: tuple[int, int, Path] | None = None
        for f in state_files(self.path):
            try:
                key = (f.stat().st_mtime_ns, _checkpoint_step(f), f)
            except OSError:
                continue
            if best is None or key[:2] > best[:2]:
                best = key
        return best[2] if best else None

    def poll(self, store: Store, final: bool = False) -> int:
        path = self.newest()
        if path is None:
            return 0
        state = self._read(path)
        if state is None:
            return 0
        with store.lock:
            run = store.run(self.run_id)
            before = run.rows
            if not run.meta:
                apply_message(run, events.Message(protocol.RUN_START, self._meta(state, path)))
            self._apply(run, state)
            end = finished_step(state)
            if run.ended is None and end is not None:
                apply_message(run, events.Message(protocol.RUN_END, {"global_step": end}))
            store.transport["received"] += run.rows - before
            store.touch()
            self.ended = run.ended is not None
            return run.rows - before

    def _read(self, path: Path) -> dict | None:
        try:
            st = path.stat()
            key = (str(path), st.st_mtime_ns, st.st_size)
            if key == self.seen:
                return None
            if st.st_size > MAX_STATE_BYTES:
                self.error = f"{path}: file too large ({st.st_size >> 20} MB)"
                return None
            raw = path.read_bytes()
            state = json.loads(raw)
            after = path.stat()
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
            self.retries += 1
            self.error = f"{path}: cannot be read whole yet ({type(exc).__name__})"
            return None
        if (after.st_mtime_ns, after.st_size) != key[1:] or not isinstance(state, dict):
            self.retries += 1  # rewritten while read: the next poll reads the new one
            self.error = f"{path}: changed while read"
            return None
        if not isinstance(state.get("log_history"), list):
            self.error = f"{path}: not a trainer_state.json (no 'log_history' list)"
            self.seen = key
            return None
        self.seen, self.error = key, ""
        return state

    def _meta(self, state: dict, path: Path) -> dict[str, Any]:
        from rlhf_tui.bridge.monitor.sources import _guess_trainer

        meta: dict[str, Any] = {"run_id": self.run_id, "source": str(self.path), "trainer": "unknown"}
        meta["trainer"] = _guess_trainer(state["log_history"])
        for key in ("max_steps", "logging_steps"):
            if isinstance(state.get(key), int) and not isinstance(state.get(key), bool):
                meta[key] = state[key]
        return meta

    def _apply(self, run: Any, state: dict) -> None:
        from rlhf_tui.bridge.monitor.sources import _ingest_log_history

        last = run.last_step
        entries = [
            e
            for e in state["log_history"]
            if isinstance(e, dict) and isinstance(e.get("step"), int) and (last is None or e["step"] >= last)
        ]
        _ingest_log_history(run, entries)
        step = state.get("global_step")
        if isinstance(step, int) and not isinstance(step, bool):
            run.meta["global_step"] = step
