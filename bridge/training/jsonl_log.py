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

    def _file(self):
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Binary: the lines are ASCII JSON bytes already (json escapes everything else), nothing to decode
            # and encode again on the way to the file.
            self._fh = open(self.path, "ab", buffering=1 << 16)
        return self._fh

    def write(self, event: dict, clean: bool = False) -> None:
        """Append one event. `clean`: the event is JSON-safe already (no cleaning pass)."""
        try:
            self.write_raw(
                json.dumps(event if clean else to_json_safe(event), separators=(",", ":"), allow_nan=False).encode()
            )
        except (ValueError, TypeError):
            self.errors += 1

    def write_raw(self, line: bytes) -> None:
        """Append one event already encoded as one line of strict JSON (ASCII, no newline)."""
        try:
            fh = self._file()
            fh.write(line)
            fh.write(b"\n")
            self._dirty = True
            if self.autoflush:
                self.flush()
        except (OSError, ValueError):
            self.errors += 1  # a full disk must not stop training; counted and shown in heartbeats

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
