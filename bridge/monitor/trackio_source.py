"""A trackio project (`report_to="trackio"`): its local SQLite store, read and followed as it grows.

trackio keeps one database per project, `<TRACKIO_DIR>/<project>.db` (TRACKIO_DIR defaults to
`$HF_HOME/trackio`, i.e. `~/.cache/huggingface/trackio`), in WAL mode. Its `metrics` table has one row per
`trackio.log` call: `id`, `run_name`, `step`, `timestamp` and `metrics`, a JSON object whose non-finite values
are the strings "NaN"/"Infinity"/"-Infinity". Rows are read by increasing `id` from the last one landed, so each
log lands once and whole (a row is one transaction); a database locked by its writer, or not yet holding the
table, is retried at the next poll. Reading needs only the standard library's sqlite3, opened read-only.

transformers' TrackioCallback logs `train/<key>` (and `train/global_step`, the step used here) and
`eval/<key>`: the same names as TensorBoard's, mapped the same way. Each trackio run is one run of the store;
its config (the training arguments) gives the run's meta, and a run whose step reaches its `max_steps` has ended.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from rlhf_tui.analysis.store import Store
from rlhf_tui.bridge.monitor import completions_source
from rlhf_tui.bridge.monitor.ingest import apply_message
from rlhf_tui.bridge.monitor.tensorboard_source import guess_trainer, tag_name
from rlhf_tui.bridge.wire import events, protocol
from rlhf_tui.bridge.wire.metrics import normalise

PREFIX = "trackio:"
SKIPPED = ("train/global_step", "profiling/")  # the step itself; TRL's timings logged beside each step
BATCH = 20_000  # rows read per poll (the rest on the next)
MAX_RUNS = 64
ARG_KEYS = 256


def trackio_dir() -> Path:
    if os.environ.get("TRACKIO_DIR"):
        return Path(os.environ["TRACKIO_DIR"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(hf_home).expanduser() / "trackio"


def resolve(source: str) -> Path | None:
    """`trackio:PROJECT` as the project's database path (None for any other source)."""
    if not source.startswith(PREFIX):
        return None
    project = source[len(PREFIX) :].strip("/")
    return trackio_dir() / f"{project}.db" if project else trackio_dir()


def _connect(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=0.25, check_same_thread=False)
    conn.row_factory = None
    return conn


def is_trackio_db(path: Path) -> bool:
    """A SQLite file with trackio's `metrics` table."""
    if path.suffix != ".db" or not path.is_file():
        return False
    try:
        with open(path, "rb") as fh:
            if fh.read(16) != b"SQLite format 3\x00":
                return False
        conn = _connect(path)
        try:
            cols = {row[1] for row in conn.execute("PRAGMA table_info(metrics)")}
        finally:
            conn.close()
    except (OSError, sqlite3.Error):
        return False
    return {"run_name", "step", "metrics"} <= cols


def newest_db(directory: Path) -> Path | None:
    """The most recently written trackio project in a folder (TRACKIO_DIR)."""
    try:
        dbs = [p for p in directory.glob("*.db") if is_trackio_db(p)]
    except OSError:
        return None
    return max(dbs, key=lambda p: max(p.stat().st_mtime, _wal_mtime(p))) if dbs else None


def _wal_mtime(db: Path) -> float:
    try:
        return db.with_name(db.name + "-wal").stat().st_mtime
    except OSError:
        return 0.0


class TrackioReader:
    """Reads (and, polled again, follows) one trackio project database into a Store."""

    def __init__(self, db: Path):
        self.db = db
        self.project = db.stem
        self.last_id = 0
        self.retries = 0  # polls that found the database locked or not ready
        self.corrupt = 0  # rows whose metrics are not a JSON object
        self.runs: dict[str, dict[str, Any]] = {}  # run name -> {"id", "max_steps", "ended"}
        self.error = ""

    @property
    def ended(self) -> bool:
        return bool(self.runs) and all(r["ended"] for r in self.runs.values())

    def poll(self, store: Store, final: bool = False) -> int:
        try:
            conn = _connect(self.db)
        except (OSError, sqlite3.Error) as exc:
            self.retries += 1
            self.error = f"{self.db}: cannot open ({exc})"
            return 0
        try:
            rows = conn.execute(
                "SELECT id, run_name, step, metrics FROM metrics WHERE id > ? ORDER BY id LIMIT ?",
                (self.last_id, BATCH),
            ).fetchall()
            configs = self._configs(conn, {r[1] for r in rows if r[1] not in self.runs})
        except sqlite3.Error as exc:  # locked by the writer, or the table not made yet: retried
            self.retries += 1
            self.error = f"{self.db}: {exc}"
            return 0
        finally:
            conn.close()
        self.error = ""
        landed = 0
        with store.lock:
            for row_id, run_name, step, raw in rows:
                self.last_id = max(self.last_id, int(row_id))
                landed += self._row(store, str(run_name), step, raw, configs)
            if rows:
                store.touch()
        return landed

    @staticmethod
    def _configs(conn: sqlite3.Connection, names: set[str]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for name in list(names)[:MAX_RUNS]:
            try:
                row = conn.execute(
                    "SELECT config FROM configs WHERE run_name = ? ORDER BY id DESC LIMIT 1", (name,)
                ).fetchone()
                parsed = json.loads(row[0]) if row else {}
            except (sqlite3.Error, ValueError, TypeError):
                parsed = {}
            out[name] = parsed if isinstance(parsed, dict) else {}
        return out

    def _start(self, store: Store, name: str, config: dict) -> dict[str, Any]:
        run_id = f"trackio:{self.project}/{name}"
        args = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool)) and not k.startswith("_")}
        args = dict(list(args.items())[:ARG_KEYS])
        meta: dict[str, Any] = {"run_id": run_id, "source": str(self.db), "trainer": "unknown", "args": args}
        for key in ("max_steps", "logging_steps"):
            if isinstance(args.get(key), int) and not isinstance(args.get(key), bool) and args[key] > 0:
                meta[key] = args[key]
        apply_message(store.run(run_id), events.Message(protocol.RUN_START, meta))
        state = {"id": run_id, "max_steps": meta.get("max_steps"), "ended": False, "table_step": -1}
        self.runs[name] = state
        return state

    def _row(self, store: Store, name: str, step: Any, raw: Any, configs: dict[str, dict]) -> int:
        try:
            logged = json.loads(raw)
        except (ValueError, TypeError):
            logged = None
        if not isinstance(logged, dict):
            self.corrupt += 1
            return 0
        state = self.runs.get(name)
        if state is None:
            if len(self.runs) >= MAX_RUNS:
                return 0
            state = self._start(store, name, configs.get(name, {}))
        at = logged.get("train/global_step", step)
        if not isinstance(at, int) or isinstance(at, bool):
            at = step if isinstance(step, int) else None
        if at is None:
            self.corrupt += 1
            return 0
        run = store.run(state["id"])
        table = logged.get("completions")
        if isinstance(table, dict) and table.get("_type") == "trackio.table" and isinstance(table.get("_value"), list):
            rows = [r for r in table["_value"][: completions_source.MAX_ROWS] if isinstance(r, dict)]
            columns = {key: [r.get(key) for r in rows] for key in (rows[0] if rows else {})}
            steps = [s for s in columns.get("step", []) if isinstance(s, int)]
            if steps and max(steps) > state["table_step"]:  # TRL logs the last table twice
                state["table_step"] = max(steps)
                completions_source.land_table(run, columns)  # TRL's completions: reward batches
            return 0
        row = {tag_name(k): v for k, v in logged.items() if isinstance(k, str) and not k.startswith(SKIPPED)}
        if not row or not normalise(row):
            return 0  # nothing numeric: a table or media, not a step
        if run.meta.get("trainer") in (None, "unknown"):
            run.meta["trainer"] = guess_trainer(row)
        added = apply_message(run, events.Message(protocol.STEP, {"step": at, "metrics": normalise(row)}))
        store.transport["received"] += 1
        if state["max_steps"] and at >= state["max_steps"] and not state["ended"]:
            state["ended"] = True  # trackio keeps no end marker: the last step is the end
            apply_message(run, events.Message(protocol.RUN_END, {"global_step": at}))
        return int(added)
