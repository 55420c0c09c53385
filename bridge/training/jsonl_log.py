"""The run's JSONL event log (the seed's format): one JSON object per line.

Written only from the publisher thread. Flushed per event, or with `autoflush=False` by `flush()`, which the
publisher thread calls after each batch of queued events (a few times a second: one system call for all). Non-finite floats are written as the strings "NaN"/"Infinity" so
every line is strict JSON and `json.loads` reads it; a line is written whole with one write() call so a
killed process leaves at most one truncated last line.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from rlhf_tui.bridge.wire.protocol import to_json_safe

PRIVATE = 0o600  # the log holds prompts and completions: the user's own unless configured otherwise


def folder_mode(file_mode: int) -> int:
    """The mode for a folder holding files of `file_mode`: each class that may read them may also enter."""
    return file_mode | ((file_mode & 0o444) >> 2)


class JsonlLog:
    def __init__(self, log_dir: str | os.PathLike, run_id: str, autoflush: bool = True, mode: int = PRIVATE):
        self.autoflush = autoflush
        self.path = Path(log_dir) / f"run-{run_id}.jsonl"
        self.mode = mode  # of the file and of the folders made for it (existing ones are left as they are)
        self._fh = None
        self._dirty = False
        self.errors = 0  # writes that failed (disk full, log_dir under a file): sent in heartbeats
        self.first_error = ""

    def _file(self):
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=folder_mode(self.mode))
            # Created with its final mode (never readable by others, not even for a moment). Binary: the lines
            # are ASCII JSON bytes already (json escapes everything else), nothing to decode and encode again.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, self.mode)
            self._fh = os.fdopen(fd, "ab", buffering=1 << 16)
        return self._fh

    def _failed(self, exc: BaseException) -> None:
        """Counted; the first failure is warned once in the training's output (never raised into training)."""
        self.errors += 1
        if self.errors == 1:
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            self.first_error = f"cannot write the run log {self.path}: {why}"
            warnings.warn(
                f"rlhf-tui: {self.first_error}. Training continues; the log is incomplete.",
                RuntimeWarning,
                stacklevel=2,
            )

    def write(self, event: dict, clean: bool = False) -> None:
        """Append one event. `clean`: the event is JSON-safe already (no cleaning pass)."""
        try:
            self.write_raw(
                json.dumps(event if clean else to_json_safe(event), separators=(",", ":"), allow_nan=False).encode()
            )
        except (ValueError, TypeError) as exc:
            self._failed(exc)

    def write_raw(self, line: bytes) -> None:
        """Append one event already encoded as one line of strict JSON (ASCII, no newline)."""
        try:
            fh = self._file()
            fh.write(line)
            fh.write(b"\n")
            self._dirty = True
            if self.autoflush:
                self.flush()
        except (OSError, ValueError) as exc:
            self._failed(exc)  # a full disk must not stop training; counted and shown in heartbeats

    def flush(self) -> None:
        if self._dirty and self._fh is not None:
            self._dirty = False
            try:
                self._fh.flush()
            except (OSError, ValueError) as exc:
                self._failed(exc)

    def close(self) -> None:
        self.flush()
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError as exc:
                self._failed(exc)
            self._fh = None
