"""The run's JSONL event log (the seed's format): one JSON object per line.

Written only from the publisher thread. Flushed per event, or with `autoflush=False` by `flush()`, which the
publisher thread calls after each batch of queued events (a few times a second: one system call for all). Non-finite floats are written as the strings "NaN"/"Infinity" so
every line is strict JSON and `json.loads` reads it; a line is written whole with one write() call so a
killed process leaves at most one truncated last line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rlhf_tui.bridge.wire.protocol import to_json_safe


class JsonlLog:
    def __init__(self, log_dir: str | os.PathLike, run_id: str, autoflush: bool = True):
        self.autoflush = autoflush
        self.path = Path(log_dir) / f"run-{run_id}.jsonl"
        self._fh = None
        self._dirty = False
        self.errors = 0

    def write(self, event: dict, clean: bool = False) -> None:
        """Append one event. `clean`: the event is JSON-safe already (no cleaning pass)."""
        try:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "a", encoding="utf-8", buffering=1 << 16)
            line = json.dumps(event if clean else to_json_safe(event), separators=(",", ":"), allow_nan=False) + "\n"
            self._fh.write(line)
            self._dirty = True
            if self.autoflush:
                self.flush()
        except (OSError, ValueError, TypeError):
            self.errors += 1  # a full disk must not stop training; counted and shown in heartbeats

    def write_raw(self, line: bytes) -> None:
        """Append one event already encoded as one line of strict JSON (no newline)."""
        try:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "a", encoding="utf-8", buffering=1 << 16)
            self._fh.write(line.decode() + "\n")
            self._dirty = True
            if self.autoflush:
                self.flush()
        except (OSError, ValueError, UnicodeDecodeError):
            self.errors += 1

    def flush(self) -> None:
        if self._dirty and self._fh is not None:
            self._dirty = False
            try:
                self._fh.flush()
            except (OSError, ValueError):
                self.errors += 1

    def close(self) -> None:
        self.flush()
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None
