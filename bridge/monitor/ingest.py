"""Applying what arrives (wire envelopes or JSONL events) to a `Store`: the one place that knows how each
message kind lands in a run's history. Pure Python; every value is re-checked so nothing can crash the store.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from rlhf_tui.analysis import store as store_module
from rlhf_tui.analysis.store import RunHistory, Store
from rlhf_tui.bridge.wire import events, protocol
from rlhf_tui.bridge.wire.metrics import summary_values, to_float

MAX_SAMPLES = 8
MAX_ITEMS = 20_000  # values kept from one message (scores, samples, analysis ...)
MAX_RANKS = 1024  # system samples kept per run (one per rank)
MAX_CHECKPOINTS = 1000
MAX_META_KEYS = 256
_NONFINITE_FLOAT = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _metrics(raw: Any) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    if not isinstance(raw, dict):
        return out
    if len(raw) <= protocol.MAX_METRICS and set(map(type, raw.values())) <= {float, type(None)}:
        return raw  # the common case, already validated: floats and None only
    for key, value in list(raw.items())[: protocol.MAX_METRICS]:
        if isinstance(key, str) and len(key) <= 200:
            try:
                number = to_float(value)
            except (OverflowError, ValueError):  # 10**400 and friends
                continue
            if number is not None or value is None:
                out[key] = number
    return out


def _clip_str(value: Any, limit: int = protocol.MAX_STRING) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _plain(value: Any, depth: int = 0, budget: list | None = None) -> Any:
    """A bounded copy of JSON data (non-finite strings made floats, strings clipped, at most MAX_ITEMS
    values per message: a hostile message cannot make one record huge)."""
    if budget is None:
        budget = [MAX_ITEMS]
    budget[0] -= 1
    if budget[0] < 0:
        return None
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        if value in ("NaN", "Infinity", "-Infinity"):
            return to_float(value)
        return value[: protocol.MAX_STRING]
    if depth > protocol.MAX_DEPTH:
        return None
    if isinstance(value, dict):
        return {str(k)[:200]: _plain(v, depth + 1, budget) for k, v in list(value.items())[:1000]}
    if isinstance(value, list):
        return [_plain(v, depth + 1, budget) for v in value[:5000]]
    return None


def apply_envelope(store: Store, env: dict) -> None:
    """Land one validated envelope in the store (caller holds store.lock)."""
    kind = env["kind"]
    run = store.run(env["run"])
    run.last_heartbeat = time.monotonic()
    if kind == protocol.HEARTBEAT:
        run.server_status = _plain(env["data"]) or {}
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
    if kind == protocol.STEP:
        if run.add_step(data["step"], _metrics(data["metrics"]), ts):
            run.last_step_time = time.monotonic()
            return True
    elif kind == protocol.RUN_START:
        _update_meta(run, _plain(data))
    elif kind == protocol.SYSTEM:
        _apply_system(run, data, message.rank)
    elif kind == protocol.CHECKPOINT:
        _apply_checkpoint(run, _plain(data))
    elif kind == protocol.REWARD:
        for batch in events.split_rewards(_plain(data)):
            _apply_reward(run, batch)
    elif kind == protocol.RUN_END:
        run.ended = _plain(data) or {}
        if isinstance(run.ended, dict) and isinstance(run.ended.get("summary"), dict):
            run.summary = summary_values(run.ended["summary"])
    elif kind == protocol.ANOMALY:
        _apply_anomaly(run, _plain(data))
    return False


def _apply_anomaly(run: RunHistory, episode: Any) -> None:
    """A training-side episode, new or an update of one sent before (same detector, metric and overlapping
    steps: the training side judges a bounded window, so an old episode's first step may move)."""
    if not isinstance(episode, dict):
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
    rules unchanged). Returns the number of rows written."""
    n = int(steps.size)
    if n == 0:
        return 0
    last = run.last_step
    if not _bulk_ok(run) or (last is not None and steps[0] <= last) or (n > 1 and (np.diff(steps) <= 0).any()):
        return _add_rows_one_by_one(run, steps, times, cols)
    Column = store_module.Column
    done = 0
    while done < n:
        if run.rows >= run.capacity:
            run._thin()
        k = min(n - done, run.capacity - run.rows)
        r0 = run.rows
        run._steps[r0 : r0 + k] = steps[done : done + k]
        run._times[r0 : r0 + k] = times[done : done + k]
        for name, (index, values) in cols.items():
            col = run.columns.get(name)
            if col is None:
                col = run.columns[name] = Column(run.capacity)
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


def _bulk_ok(run: RunHistory) -> bool:
    return all(hasattr(run, a) for a in ("_steps", "_times", "_thin", "columns", "capacity")) and hasattr(
        store_module, "Column"
    )


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


def _update_meta(run: RunHistory, data: Any) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            if key in run.meta or len(run.meta) < MAX_META_KEYS:
                run.meta[key] = value


def _apply_system(run: RunHistory, data: dict, rank: int) -> None:
    sample = _plain(data)
    if not isinstance(sample, dict) or (rank not in run.system and len(run.system) >= MAX_RANKS):
        return
    gpus = sample.get("gpus")
    sample["gpus"] = [g for g in gpus if isinstance(g, dict)][:64] if isinstance(gpus, list) else []
    sample["rank"] = rank
    sample["received"] = time.time()
    run.system[int(rank)] = sample


def _apply_checkpoint(run: RunHistory, data: Any) -> None:
    if not isinstance(data, dict) or not isinstance(data.get("step"), int):
        return
    for i, existing in enumerate(run.checkpoints):
        if existing.get("step") == data["step"]:
            run.checkpoints[i] = {**existing, **data}
            return
    run.checkpoints.append(data)
    run.checkpoints.sort(key=lambda c: c.get("step", 0))
    if len(run.checkpoints) > MAX_CHECKPOINTS:
        del run.checkpoints[: len(run.checkpoints) - MAX_CHECKPOINTS]


def _apply_reward(run: RunHistory, data: Any) -> None:
    if not isinstance(data, dict):
        return
    samples = data.get("samples")
    kept = [s for s in samples if isinstance(s, dict)] if isinstance(samples, list) else []
    step = data.get("step")
    data["samples"] = [s for s in kept if s.get("step", step) == step][:MAX_SAMPLES]  # the Rewards pane's few
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
    run_id = event.get("run_id") if isinstance(event.get("run_id"), str) else None
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
