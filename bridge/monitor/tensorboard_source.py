"""TensorBoard event files (`report_to="tensorboard"`): their scalars as step rows, followed as they grow.

A run is a directory holding `events.out.tfevents.*` files (transformers writes `output_dir/runs/<date_host>/`);
its files are read in name order, each from where the last read stopped. The records are framed here (TFRecord:
length, masked CRC32C of the length, data, masked CRC32C of the data) rather than by tensorboard's
`EventFileLoader`, whose reader stops for good at the first corrupt record: a record cut off at the end (a writer
mid-write) is retried on the next read, a record whose data fails its CRC is skipped and counted, a length that
fails its CRC is resynchronised on the next valid header. The `tensorboard` package (the optional extra
`rlhf-tui[tensorboard]`) decodes the Event protos; the CRCs are checked with numpy, many records at once.

Tags map to the names the callback uses: `train/kl` -> `kl`, `eval/loss` -> `eval_loss`, `test/x` -> `test_x`,
then `bridge.wire.metrics.normalise` adds the canonical names. A step's row is landed once it is whole: when a
later step arrives, or when its file ends on a whole record and has not changed for `SETTLE_S`. transformers'
logger drops None values (TRL logs a metric as None when every value was NaN), so a metric logged at the
previous step and missing from a step where the other training metrics are present is landed as None.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_tui.analysis.store import Store
from rlhf_tui.bridge.monitor.ingest import apply_message
from rlhf_tui.bridge.wire import events, protocol
from rlhf_tui.bridge.wire.metrics import SUMMARY_KEYS, normalise

EVENT_PREFIX = "events.out.tfevents."
INSTALL_HINT = "reading TensorBoard event files needs the tensorboard package: pip install 'rlhf-tui[tensorboard]'"
SETTLE_S = 1.0  # a file unchanged this long, ending on a whole record, holds whole steps
MAX_DEPTH = 4  # directory levels searched below the given path for event files
MAX_RUNS = 64  # run directories followed under one path
READ_CHUNK = 32 << 20  # bytes read from one file per poll (the rest on the next)
RESYNC_BYTES = 1 << 20  # bytes searched for the next valid header per read after a corrupt length
ARG_KEYS = 256  # training arguments kept from the `args` text summary
# The end-of-run summary's tags (train_runtime too: in an event file it is only written at the end, whereas a
# plain Trainer's per-step logs may carry it, which is why `is_summary` does not key on it).
SUMMARY_TAGS = SUMMARY_KEYS | {"train_runtime"}

_MASK_DELTA = 0xA282EAD8


def _crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1).astype(np.uint32)
    return table


_TABLE = _crc_table()


def masked_crc32c(columns: list[np.ndarray], count: int) -> np.ndarray:
    """The TFRecord masked CRC32C of `count` byte strings of one length at once: `columns[j]` holds byte j of each."""
    crc = np.full(count, 0xFFFFFFFF, dtype=np.uint32)
    for col in columns:
        crc = _TABLE[(crc ^ col) & 0xFF] ^ (crc >> 8)
    crc ^= np.uint32(0xFFFFFFFF)
    return (((crc >> 15) | (crc << 17)) + np.uint32(_MASK_DELTA)).astype(np.uint32)


def _u32(arr: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The little-endian uint32 stored at each offset `at` of a uint8 array."""
    out = np.zeros(at.shape[0], dtype=np.uint32)
    for j in range(4):
        out |= arr[at + j].astype(np.uint32) << np.uint32(8 * j)
    return out


def tag_name(tag: str) -> str:
    """A transformers TensorBoard tag as the name the callback logs it under."""
    for prefix, to in (("train/", ""), ("eval/", "eval_"), ("test/", "test_")):
        if tag.startswith(prefix) and len(tag) > len(prefix):
            return to + tag[len(prefix) :]
    return tag


def is_event_file(path: Path) -> bool:
    return path.name.startswith(EVENT_PREFIX)


def find_runs(root: Path) -> list[Path]:
    """Directories under `root` (itself included) holding event files, oldest first writer first."""
    if root.is_file():
        return [root.parent] if is_event_file(root) else []
    found: list[tuple[str, Path]] = []
    base = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if len(here.parts) - base >= MAX_DEPTH:
            dirnames[:] = []
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("checkpoint-"))
        names = sorted(f for f in filenames if f.startswith(EVENT_PREFIX))
        if names:
            found.append((names[0][len(EVENT_PREFIX) :], here))
        if len(found) >= MAX_RUNS:
            break
    return [p for _, p in sorted(found)]


class RecordFile:
    """One event file read incrementally: whole records only, corrupt ones skipped and counted."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.corrupt = 0
        self.whole = True  # the file ended on a record boundary at the last read
        self.size = -1
        self.mtime = 0.0

    def read(self) -> list[bytes]:
        try:
            st = self.path.stat()
            if st.st_size < self.offset:  # rewritten from scratch: read it again
                self.offset = 0
            self.size, self.mtime = st.st_size, st.st_mtime
            if st.st_size == self.offset:
                return []
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                buf = fh.read(READ_CHUNK)
        except OSError:  # removed or unreadable for now: retried on the next read
            return []
        records: list[bytes] = []
        start = 0
        while start < len(buf):  # a corrupt length stops a pass at the next valid header: go on from there
            got, used = self._frames(buf[start:] if start else buf)
            records += got
            start += used
            if not used:
                break
        self.offset += start
        self.whole = self.offset == self.size
        return records

    def _frames(self, buf: bytes) -> tuple[list[bytes], int]:
        """The whole, valid records at the start of `buf`, and how many bytes were used up (records and skipped
        garbage; a record cut off at the end is left for the next read)."""
        arr = np.frombuffer(buf, dtype=np.uint8)
        starts: list[int] = []
        pos, n = 0, len(buf)
        while pos + 12 <= n:
            (length,) = struct.unpack_from("<Q", buf, pos)
            end = pos + 16 + length
            if end > n:
                break
            starts.append(pos)
            pos = end
        heads = np.asarray(starts + ([pos] if pos + 12 <= n else []), dtype=np.int64)
        bad = np.flatnonzero(masked_crc32c([arr[heads + j] for j in range(8)], heads.size) != _u32(arr, heads + 8))
        if bad.size:  # a length that fails its CRC: the framing is lost from there on
            self.corrupt += 1
            starts = starts[: int(bad[0])]
            pos = self._resync(arr, int(heads[bad[0]]) + 1)
        return self._checked_data(arr, buf, starts), pos

    @staticmethod
    def _resync(arr: np.ndarray, start: int) -> int:
        """The offset of the next header at or after `start` that passes its CRC, searched in at most
        RESYNC_BYTES (the search goes on at the next read from there); a possible header at the very end waits."""
        last = min(arr.size - 12, start + RESYNC_BYTES)
        if last < start:
            return start
        at = np.arange(start, last + 1, dtype=np.int64)
        hits = np.flatnonzero(masked_crc32c([arr[at + j] for j in range(8)], at.size) == _u32(arr, at + 8))
        return start + int(hits[0]) if hits.size else last + 1

    def _checked_data(self, arr: np.ndarray, buf: bytes, starts: list[int]) -> list[bytes]:
        """The data of each framed record whose CRC matches (grouped by length: one vectorised pass per length)."""
        if not starts:
            return []
        lengths = [struct.unpack_from("<Q", buf, s)[0] for s in starts]
        keep = np.ones(len(starts), dtype=bool)
        by_length: dict[int, list[int]] = {}
        for i, length in enumerate(lengths):
            by_length.setdefault(length, []).append(i)
        for length, members in by_length.items():
            at = np.asarray([starts[i] + 12 for i in members], dtype=np.int64)
            keep[members] = masked_crc32c([arr[at + j] for j in range(length)], at.size) == _u32(arr, at + length)
        self.corrupt += int((~keep).sum())
        return [buf[starts[i] + 12 : starts[i] + 12 + lengths[i]] for i in np.flatnonzero(keep)]


def _event_proto() -> Any:
    try:
        from tensorboard.compat.proto import event_pb2
    except ImportError:
        return None
    return event_pb2


def tensorboard_available() -> bool:
    return _event_proto() is not None


class TensorBoardRun:
    """One run directory: its event files, the step row being assembled, the metrics expected at each step."""

    def __init__(self, directory: Path, run_id: str):
        self.directory = directory
        self.run_id = run_id
        self.files: dict[Path, RecordFile] = {}
        self.pending_step: int | None = None
        self.pending: dict[str, float | None] = {}
        self.pending_time: float | None = None
        self.expected: set[str] = set()
        self.summary: dict[str, float] = {}
        self.args: dict[str, Any] = {}
        self.started = False
        self.ended = False


class TensorBoardReader:
    """Reads (and, polled again, follows) the event files under a path into a Store."""

    def __init__(self, path: Path):
        self.path = path
        self.runs: dict[Path, TensorBoardRun] = {}
        self.decode_errors = 0
        self.error = ""
        self._proto = _event_proto()

    @property
    def ended(self) -> bool:
        return bool(self.runs) and all(r.ended for r in self.runs.values())

    @property
    def corrupt(self) -> int:
        return self.decode_errors + sum(f.corrupt for r in self.runs.values() for f in r.files.values())

    def poll(self, store: Store, final: bool = False) -> int:
        """Land what is new and whole; `final`: nothing more will come (a recorded read), so the last step is
        landed if its file ends on a whole record. Returns the rows landed."""
        if self._proto is None:
            raise RuntimeError(INSTALL_HINT)
        rows = 0
        for directory in find_runs(self.path):
            run = self.runs.get(directory)
            if run is None:
                run = self.runs[directory] = TensorBoardRun(directory, self._run_id(directory))
            rows += self._poll_run(store, run, final)
        return rows

    def _run_id(self, directory: Path) -> str:
        base = self.path if self.path.is_dir() else self.path.parent
        try:
            rel = directory.relative_to(base)
        except ValueError:
            rel = Path(directory.name)
        name = str(rel) if str(rel) != "." else (base.name or "run")
        return "tb:" + name

    def _poll_run(self, store: Store, run: TensorBoardRun, final: bool) -> int:
        try:
            names = sorted(p for p in run.directory.iterdir() if is_event_file(p) and p.is_file())
        except OSError:
            names = []
        if self.path.is_file():
            names = [self.path]
        rows = 0
        last: RecordFile | None = None
        for name in names:
            rf = run.files.get(name)
            if rf is None:
                rf = run.files[name] = RecordFile(name)
            for record in rf.read():
                rows += self._record(store, run, record)
            last = rf
        if run.pending_step is not None and last is not None and last.whole:
            if final or time.time() - last.mtime >= SETTLE_S:
                rows += self._commit(store, run)
        return rows

    def _record(self, store: Store, run: TensorBoardRun, record: bytes) -> int:
        try:
            event = self._proto.Event.FromString(record)
        except Exception:  # a record whose CRC matched but whose proto does not parse
            self.decode_errors += 1
            return 0
        if not event.HasField("summary"):
            return 0
        step = int(event.step)
        rows = 0
        for value in event.summary.value:
            kind = value.WhichOneof("value")
            if kind == "simple_value":
                number = float(value.simple_value)
            elif kind == "tensor" and value.metadata.plugin_data.plugin_name == "text":
                self._text(store, run, value)
                continue
            elif kind == "tensor" and value.tensor.float_val:
                number = float(value.tensor.float_val[0])
            elif kind == "tensor" and value.tensor.double_val:
                number = float(value.tensor.double_val[0])
            else:
                continue
            if run.pending_step is not None and step > run.pending_step:
                rows += self._commit(store, run)
            if run.pending_step is None:
                run.pending_step, run.pending_time = step, float(event.wall_time) or None
            name = tag_name(value.tag)
            if name in SUMMARY_TAGS:
                run.summary[name] = number
            elif step == run.pending_step:
                run.pending[name] = number
            else:  # an older step (a resumed writer): landed as the store's rules say
                self._land(store, run, step, {name: number}, None)
        return rows

    def _text(self, store: Store, run: TensorBoardRun, value: Any) -> None:
        """transformers' `args` text summary: the training arguments, for the run's meta (num_generations ...)."""
        if value.tag != "args/text_summary" or run.args or not value.tensor.string_val:
            return
        try:
            parsed = json.loads(value.tensor.string_val[0])
        except (ValueError, UnicodeDecodeError):
            return
        if isinstance(parsed, dict):
            scalars = {k: v for k, v in parsed.items() if isinstance(v, (int, float, str, bool)) or v is None}
            run.args = dict(list(scalars.items())[:ARG_KEYS])
            self._start(store, run)

    def _start(self, store: Store, run: TensorBoardRun) -> None:
        meta: dict[str, Any] = {"run_id": run.run_id, "source": str(run.directory), "trainer": "unknown"}
        if run.args:
            meta["args"] = run.args
            for key in ("max_steps", "logging_steps"):
                if isinstance(run.args.get(key), int):
                    meta[key] = run.args[key]
        with store.lock:
            apply_message(store.run(run.run_id), events.Message(protocol.RUN_START, meta))
            store.touch()
        run.started = True

    def _commit(self, store: Store, run: TensorBoardRun) -> int:
        step, row = run.pending_step, run.pending
        run.pending_step, run.pending = None, {}
        if step is None:
            return 0
        if run.summary:
            self._end(store, run, step)
        if not row:
            return 0
        training = {k for k in row if not k.startswith(("eval_", "test_"))}
        if training and len(training) * 2 >= len(run.expected):  # a training log, not a lone extra value
            for name in run.expected - training:  # dropped by transformers' logger: it was None
                row[name] = None
            run.expected |= training
        return self._land(store, run, step, row, run.pending_time)

    def _land(self, store: Store, run: TensorBoardRun, step: int, row: dict, ts: float | None) -> int:
        if not run.started:
            self._start(store, run)
        with store.lock:
            hist = store.run(run.run_id)
            if hist.meta.get("trainer") in (None, "unknown"):
                hist.meta["trainer"] = guess_trainer(row)
            added = apply_message(hist, events.Message(protocol.STEP, {"step": step, "metrics": normalise(row)}), ts)
            store.transport["received"] += 1
            store.touch()
        return int(added)

    def _end(self, store: Store, run: TensorBoardRun, step: int) -> None:
        summary = {k: v for k, v in run.summary.items()}
        with store.lock:
            apply_message(
                store.run(run.run_id),
                events.Message(protocol.RUN_END, {"global_step": step, "summary": summary}),
            )
            store.touch()
        run.summary = {}
        run.ended = True


def guess_trainer(keys: Any) -> str:
    """The trainer a row of metric names comes from (the same rules as a trainer_state.json's)."""
    from rlhf_tui.bridge.monitor.sources import _guess_trainer

    return _guess_trainer([dict.fromkeys(keys)])
