"""Sources that need no callback, read once (`rlhf-tui report`) or followed as they grow (the monitor): a
TensorBoard log directory or event file, a trackio project, a transformers `output_dir` (its TensorBoard runs,
else its rewritten trainer_state.json, plus TRL's completions/*.parquet). Chosen by what the path contains
(`readers_for`); each reader lands whole rows through `ingest.apply_message`, like the wire and the JSONL log.

`FileFollower` polls the readers on a daemon thread (a bounded wait between polls) with the interface of
`subscriber.Subscriber`: `start()`, `stop(timeout)`, `store`, `error`. A reader never raises for what a writer
can leave behind (a record being written, a locked database, a file mid-rewrite): it reads what is whole and
retries the rest at the next poll.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

from rlhf_tui.analysis.store import Store
from rlhf_tui.bridge.monitor import tensorboard_source, trackio_source, trainer_state_source
from rlhf_tui.bridge.monitor.completions_source import CompletionsReader
from rlhf_tui.bridge.monitor.sources import SourceError

POLL_S = 1.0  # between two polls of a followed source
RLHF_LOGS = ("run-*.jsonl", "*/run-*.jsonl", "logs/rlhf-tui/run-*.jsonl")


class Reader(Protocol):
    ended: bool
    error: str

    def poll(self, store: Store, final: bool = False) -> int: ...


class SourceUnavailable(SourceError):
    """A source that needs no callback but cannot be read here or yet (a missing optional package, nothing
    written yet); the message is one line."""


def source_path(source: str) -> Path:
    """The path a source names (`trackio:PROJECT` is that project's database)."""
    return trackio_source.resolve(source) or Path(source).expanduser()


def readers_for(source: str) -> list[Reader] | None:
    """The readers for a source that needs no callback; None for one `sources.py` reads itself (an rlhf-tui
    JSONL log, a trainer_state.json file, an output_dir holding an rlhf-tui log) or that does not exist."""
    path = source_path(source)
    if not path.exists():
        return None
    if path.is_file():
        if tensorboard_source.is_event_file(path):
            return [_tensorboard(path)]
        # `trackio:PROJECT` names its database: trackio makes the file before its tables (retried until then).
        if trackio_source.resolve(source) is not None or trackio_source.is_trackio_db(path):
            return [trackio_source.TrackioReader(path)]
        return None
    if not path.is_dir() or any(next(iter(path.glob(p)), None) for p in RLHF_LOGS):
        return None
    readers: list[Reader] = []
    if tensorboard_source.find_runs(path):
        readers.append(_tensorboard(path))
    elif trainer_state_source.state_files(path):
        readers.append(trainer_state_source.TrainerStateReader(path))
    elif (db := trackio_source.newest_db(path)) is not None:
        return [trackio_source.TrackioReader(db)]
    if not readers:
        return None
    if (path / "completions").is_dir():
        readers.append(CompletionsReader(path / "completions"))
    return readers


def _tensorboard(path: Path) -> Reader:
    if not tensorboard_source.tensorboard_available():
        raise SourceUnavailable(f"{path}: {tensorboard_source.INSTALL_HINT}")
    return tensorboard_source.TensorBoardReader(path)


def notes(readers: list[Reader]) -> list[str]:
    """One line per thing a user should know: an optional reader missing, records skipped or retried."""
    out = []
    for reader in readers:
        note = getattr(reader, "note", "")
        if note:
            out.append(note)
        corrupt = getattr(reader, "corrupt", 0)
        if corrupt:
            out.append(f"{type(reader).__name__}: {corrupt} corrupt record(s) skipped")
    return out


def read_once(source: str, readers: list[Reader], store: Store) -> Store:
    """A recorded read: every reader polled until it has nothing new, the last rows landed as they are."""
    store.source = str(source_path(source))
    store.connection = "offline"
    for reader in readers:
        while reader.poll(store, final=True):
            pass
    if not store.runs:
        why = next((r.error for r in readers if getattr(r, "error", "")), "")
        raise SourceUnavailable(why or f"{source}: nothing to read yet (no step logged)")
    with store.lock:
        for line in notes(readers):
            store.reject(line)
        store.touch()
    return store


class FileFollower:
    """Polls a source's readers into a Store until stopped (the interface of `subscriber.Subscriber`)."""

    def __init__(self, source: str, readers: list[Reader], store: Store | None = None, poll_s: float = POLL_S):
        self.source = source
        self.readers = readers
        self.store = store or Store()
        self.store.source = str(source_path(source))
        self.store.connection = "connecting"
        self.poll_s = poll_s
        self.error: str | None = None
        self.polls = 0
        self._stop = threading.Event()
        self._polled = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="rlhf-tui-follow", daemon=True)
        self._noted: set[str] = set()

    def start(self) -> FileFollower:
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def ended(self) -> bool:
        return all(r.ended for r in self.readers)

    def poll(self) -> int:
        """One pass over the readers; the rows landed. Never raises: a reader that fails is noted once."""
        rows = 0
        for reader in self.readers:
            try:
                rows += reader.poll(self.store)
            except Exception as exc:  # a reader's bug must not end the follower: noted, retried next poll
                self.error = f"{type(reader).__name__}: {type(exc).__name__}: {exc}"[:300]
        with self.store.lock:
            for line in notes(self.readers):
                if line not in self._noted:
                    self._noted.add(line)
                    self.store.reject(line)
            self.store.connection = "ended" if self.ended else "live"
            self.store.touch()
        with self._polled:
            self.polls += 1
            self._polled.notify_all()
        return rows

    def wait_polls(self, count: int, timeout: float) -> bool:
        """Block until `count` more polls finished (for tests and `report --follow`); False on timeout."""
        with self._polled:
            target = self.polls + count
            return self._polled.wait_for(lambda: self.polls >= target, timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.poll_s)


def follow_file_source(source: str, store: Store | None = None) -> FileFollower | None:
    """A follower for a source that needs no callback (not started), or None for the other sources."""
    readers = readers_for(source)
    return FileFollower(source, readers, store) if readers else None
