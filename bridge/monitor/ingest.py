"""Applying what arrives (wire envelopes or JSONL events) to a `Store`: the one place that knows how each
message kind lands in a run's history. Pure Python; every value is re-checked so nothing can crash the store.

This is the monitor's sanitising boundary: every string kept (metric names, run ids, every field of `data`) is
made display-safe here, once, and every field a renderer reads is checked for its type and range
(`bridge/monitor/schema.py`); a bad field is dropped and counted on its run (`RunHistory.rejected_fields`).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from rlhf_tui.analysis.safe_text import safe_name
from rlhf_tui.analysis.store import RunHistory, Store
from rlhf_tui.bridge.monitor import schema
from rlhf_tui.bridge.monitor.schema import checked, checked_list, safe_copy
from rlhf_tui.bridge.wire import events, protocol
from rlhf_tui.bridge.wire.metrics import summary_values, to_float

MAX_SAMPLES = 8
MAX_RANKS = 1024  # system samples kept per run (one per rank)
MAX_CHECKPOINTS = 1000
MAX_META_KEYS = 256
MAX_RUN_ID = 128


def _printable_keys(raw: dict) -> bool:
    try:
        return "".join(raw).isprintable()
    except TypeError:
        return False


def _metrics(raw: Any, run: RunHistory | None = None, safe_names: bool = False) -> dict[str, float | None]:
    """A step's metrics as {display-safe name: float or None}; values that are not numbers are dropped (and
    counted on `run`). `safe_names`: the names went through `safe_envelopes` already."""
    out: dict[str, float | None] = {}
    if not isinstance(raw, dict):
        return out
    if (
        len(raw) <= protocol.MAX_METRICS
        and set(map(type, raw.values())) <= {float, type(None)}
        and (safe_names or _printable_keys(raw))
    ):
        return raw  # the common case, already validated: floats and None only, printable names
    reject = run.reject_field if run is not None else lambda what: None
    if len(raw) > protocol.MAX_METRICS:
        reject(f"step.metrics: more than {protocol.MAX_METRICS} names")
    for key, value in list(raw.items())[: protocol.MAX_METRICS]:
        if not isinstance(key, str) or len(key) > 200:
            reject("step.metrics: a name that is not text of at most 200 characters")
            continue
        try:
            number = to_float(value)
            ok = number is not None or value is None
        except (OverflowError, ValueError):  # 10**400 and friends
            number, ok = None, False
        if ok:
            out[safe_name(key)] = number
        else:
            reject(f"step.metrics.{safe_name(key, 60)}: not a number")
    return out


def _safe_columns(cols: dict) -> dict:
    """A block's {name: column} with display-safe names."""
    return cols if _printable_keys(cols) else {safe_name(name): col for name, col in cols.items()}


def safe_run_id(run_id: str) -> str:
    return safe_name(run_id, MAX_RUN_ID) or "?"


def safe_envelopes(envelopes: list[dict]) -> list[dict]:
    """Validated envelopes with display-safe run ids (those of a block's inner envelopes too) and metric names,
    so every id and name the subscriber keys its state and caps by is the one the store keeps and shows."""
    for env in envelopes:
        kind, run_id = env["kind"], env.get("run")
        if isinstance(run_id, str) and not run_id.isprintable():
            env["run"] = safe_run_id(run_id)
            if kind == protocol.BLOCK:
                for inner in env["data"]["other"]:
                    inner["run"] = env["run"]
        if kind == protocol.STEP:
            metrics = env["data"]["metrics"]
            if not _printable_keys(metrics):
                env["data"]["metrics"] = {safe_name(name): value for name, value in metrics.items()}
        elif kind == protocol.BLOCK:
            env["data"]["cols"] = _safe_columns(env["data"]["cols"])
    return envelopes


def apply_envelope(store: Store, env: dict) -> None:
    """Land one validated envelope in the store (caller holds store.lock)."""
    kind = env["kind"]
    run = store.run(env["run"])
    run.last_heartbeat = time.monotonic()
    if kind == protocol.HEARTBEAT:
        run.server_status = checked(safe_copy(env["data"]), schema.HEARTBEAT, "heartbeat", run.reject_field)
        return
    if env["seq"] > run.last_seq:
        run.last_seq = env["seq"]
    if kind == protocol.BLOCK:
        apply_block(store, env)
    else:
        apply_message(run, events.Message(kind, env["data"], env.get("rank", 0)), env.get("ts"))


def apply_message(run: RunHistory, message: events.Message, ts: float | None = None) -> bool:
    """Land one message (from the wire or a JSONL log) in a run: the one place that knows how each kind is
    stored. Returns True when a new step row was written."""
    kind, data = message.kind, message.data
    reject = run.reject_field
    if kind == protocol.STEP:
        if run.add_step(data["step"], _metrics(data["metrics"], run), ts):
            run.last_step_time = time.monotonic()
            return True
    elif kind == protocol.RUN_START:
        _update_meta(run, checked(safe_copy(data), schema.RUN_START, "run_start", reject))
    elif kind == protocol.SYSTEM:
        _apply_system(run, data, message.rank)
    elif kind == protocol.CHECKPOINT:
        _apply_checkpoint(run, checked(safe_copy(data), schema.CHECKPOINT, "checkpoint", reject))
    elif kind == protocol.REWARD:
        copy = safe_copy(data)
        for batch in events.split_rewards(copy) if isinstance(copy, dict) else []:
            _apply_reward(run, batch)
    elif kind == protocol.RUN_END:
        run.ended = checked(safe_copy(data), schema.RUN_END, "run_end", reject)
        if isinstance(run.ended.get("summary"), dict):
            run.summary = summary_values(run.ended["summary"])
    elif kind == protocol.ANOMALY:
        _apply_anomaly(run, checked(safe_copy(data), schema.ANOMALY, "anomaly", reject))
    return False


def _apply_anomaly(run: RunHistory, episode: Any) -> None:
    """A training-side episode, new or an update of one sent before (same detector, metric and overlapping
    steps: the training side judges a bounded window, so an old episode's first step may move)."""
    if not episode:
        return
    key = (episode.get("detector"), episode.get("metric"))
    first, last = episode.get("first_step", episode.get("step")), episode.get("last_step", episode.get("step"))
    kept = run.training_anomalies
    for i in range(len(kept) - 1, max(-1, len(kept) - 200), -1):  # updates concern recent episodes
        old = kept[i]
        if (old.get("detector"), old.get("metric")) != key:
            continue
        try:
            overlaps = first <= old.get("last_step", old.get("step")) and last >= old.get("step")
        except TypeError:
            overlaps = False
        if overlaps:
            kept[i] = {**episode, "step": min(old.get("step"), first), "first_step": min(old.get("step"), first)}
            return
    kept.append(episode)


def apply_block(store: Store, env: dict, min_seq: int = 0) -> int:
    """Land a validated `block` envelope (steps as columns, other messages as envelopes); rows and messages
    with seq < `min_seq` were already received and are skipped. Returns how many messages were applied."""
    data = env["data"]
    data["cols"] = _safe_columns(data["cols"])
    run = store.run(env["run"])
    if data["last"] > run.last_seq:
        run.last_seq = data["last"]
    seqs = data["seq"]
    keep = seqs >= min_seq
    applied = 0
    if keep.any():
        if not keep.all():
            rows = np.flatnonzero(keep)
            cols = {name: _select(index, values, rows) for name, (index, values) in data["cols"].items()}
            add_rows(run, data["step"][rows], data["ts"][rows], cols)
        else:
            add_rows(run, data["step"], data["ts"], data["cols"])
        applied += int(keep.sum())
    for inner in data["other"]:
        if inner["seq"] >= min_seq:
            apply_envelope(store, inner)
            applied += 1
    return applied


def _select(index, values, rows):
    """Column (index or None, values) restricted to block rows `rows` (renumbered 0..len(rows)-1)."""
    if index is None:
        return None, values[rows]
    pos = np.searchsorted(rows, index)
    hit = (pos < rows.size) & (rows[np.minimum(pos, rows.size - 1)] == index)
    return pos[hit], values[hit]


def rows_to_columns(metrics_list: list[dict]) -> dict:
    """Step rows ({name: value}) as columns {name: (row index or None when every row has it, float array)}."""
    n = len(metrics_list)
    first = list(metrics_list[0])
    if all(list(m) == first for m in metrics_list):  # the common case: the same keys every step
        matrix = np.array([list(m.values()) for m in metrics_list], dtype=np.float64).reshape(n, len(first))
        return {name: (None, matrix[:, j]) for j, name in enumerate(first)}
    cols: dict[str, tuple[list, list]] = {}
    for i, m in enumerate(metrics_list):
        for name, value in m.items():
            entry = cols.get(name)
            if entry is None:
                entry = cols[name] = ([], [])
            entry[0].append(i)
            entry[1].append(value)
    return {
        name: (None if len(idx) == n else np.array(idx, dtype=np.int64), np.array(vals, dtype=np.float64))
        for name, (idx, vals) in cols.items()
    }


def add_rows(run: RunHistory, steps: np.ndarray, times: np.ndarray, cols: dict) -> int:
    """Append many step rows at once (the late-join path). Steps increasing and newer than the run's last
    step are written column-wise; anything else goes row by row through `RunHistory.add_step` (merge/ignore
    rules unchanged). Names past the run's column cap are dropped (counted). Returns the number of rows
    written."""
    n = int(steps.size)
    if n == 0:
        return 0
    last = run.last_step
    if (last is not None and steps[0] <= last) or (n > 1 and (np.diff(steps) <= 0).any()):
        return _add_rows_one_by_one(run, steps, times, cols)
    targets = [(col, index, values) for name, (index, values) in cols.items() if (col := run.column(name)) is not None]
    done = 0
    while done < n:
        k = run.make_room(n - done)  # grown or thinned: the Column objects stay, their arrays may be new
        r0 = run.rows
        run._steps[r0 : r0 + k] = steps[done : done + k]
        run._times[r0 : r0 + k] = times[done : done + k]
        for col, index, values in targets:
            if index is None:
                col.values[r0 : r0 + k] = values[done : done + k]
                col.logged[r0 : r0 + k] = True
            else:
                sel = (index >= done) & (index < done + k)
                where = index[sel] - done + r0
                col.values[where] = values[sel]
                col.logged[where] = True
        run.rows += k
        done += k
    run.last_step_time = time.monotonic()
    return n


def _add_rows_one_by_one(run: RunHistory, steps, times, cols) -> int:
    per_row: list[dict] = [{} for _ in range(int(steps.size))]
    for name, (index, values) in cols.items():
        rows = range(len(values)) if index is None else index.tolist()
        for row, value in zip(rows, values.tolist()):
            per_row[row][name] = value
    written = 0
    for step, ts, metrics in zip(steps.tolist(), times.tolist(), per_row):
        if run.add_step(step, metrics, ts):
            written += 1
            run.last_step_time = time.monotonic()
    return written


def _update_meta(run: RunHistory, data: dict) -> None:
    reject = run.reject_field
    if "args" in data:
        data["args"] = checked(data["args"], schema.ARGS, "run_start.args", reject)
    versions = data.get("versions")
    if isinstance(versions, dict):
        for key in [k for k, v in versions.items() if v is not None and not isinstance(v, str)]:
            del versions[key]
            reject(f"run_start.versions.{key}: not text")
    for key, value in data.items():
        if key in run.meta or len(run.meta) < MAX_META_KEYS:
            run.meta[key] = value


def _apply_system(run: RunHistory, data: dict, rank: int) -> None:
    if rank not in run.system and len(run.system) >= MAX_RANKS:
        return
    sample = checked(safe_copy(data), schema.SYSTEM, "system", run.reject_field)
    if not sample:
        return
    sample["gpus"] = checked_list(sample.get("gpus"), schema.GPU, "system.gpus", run.reject_field, 64)
    sample["rank"] = rank
    sample["received"] = time.time()
    run.system[int(rank)] = sample


def _apply_checkpoint(run: RunHistory, data: dict) -> None:
    if not isinstance(data.get("step"), int):
        if data:
            run.reject_field("checkpoint.step: missing")
        return
    if isinstance(data.get("drift"), dict):
        data["drift"] = checked(data["drift"], schema.DRIFT, "checkpoint.drift", run.reject_field)
    for i, existing in enumerate(run.checkpoints):
        if existing.get("step") == data["step"]:
            run.checkpoints[i] = {**existing, **data}
            return
    run.checkpoints.append(data)
    run.checkpoints.sort(key=lambda c: c.get("step", 0))
    if len(run.checkpoints) > MAX_CHECKPOINTS:
        del run.checkpoints[: len(run.checkpoints) - MAX_CHECKPOINTS]


MAX_MESSAGE_SAMPLES = 4096  # samples one reward message may carry (16 per batch over a few batches)


def _apply_reward(run: RunHistory, data: Any) -> None:
    reject = run.reject_field
    data = checked(data, schema.REWARD, "reward", reject)
    if not data:
        return
    data.pop("analysis", None)  # the training side's mixed analysis: the monitor judges each function itself
    # Every kept sample goes to the completions buffer (bounded there); the Rewards pane keeps the newest step's few.
    kept = checked_list(data.get("samples"), schema.SAMPLE, "reward.samples", reject, MAX_MESSAGE_SAMPLES)
    step = data.get("step")
    data["samples"] = [s for s in kept if s.get("step", step) == step][:MAX_SAMPLES]
    scores = data.get("scores")
    data["scores"] = (
        [s if isinstance(s, (int, float)) and not isinstance(s, bool) else None for s in scores]
        if isinstance(scores, list)
        else []
    )
    run.add_reward(data, kept)  # judged per reward function by the monitor (the training side's `analysis` mixed them)


def apply_jsonl_event(store: Store, event: dict, default_run: str = "file") -> bool:
    """Land one JSONL event; returns True if it was an rlhf-tui event."""
    try:
        messages = events.from_jsonl(event)
    except ValueError as exc:
        store.reject(str(exc))
        return False
    if not messages:
        return False
    run_id = safe_run_id(event["run_id"]) if isinstance(event.get("run_id"), str) else None
    if messages[0].kind == protocol.RUN_START:
        run = store.run(run_id or default_run)
    else:
        run = store.current_run or store.run(default_run)
    for message in messages:
        if apply_message(run, message):
            store.transport["received"] += 1
    return True


def finite_or_none(value: Any) -> float | None:
    number = to_float(value)
    return number if number is not None and math.isfinite(number) else None
