"""Where a monitor's data comes from: a live address, a JSONL log, a trainer_state.json or an output_dir.

File sources are read whole into a `Store`; a live source is handled by `subscriber.Subscriber`. Errors a user
can cause raise `SourceError` with one clear line (the CLI prints it and exits 2).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rlhf_tui.analysis.safe_text import safe_text
from rlhf_tui.analysis.store import RunHistory, Store
from rlhf_tui.bridge.monitor import schema
from rlhf_tui.bridge.monitor.ingest import _metrics, apply_jsonl_event, apply_message, safe_run_id
from rlhf_tui.bridge.monitor.trainer_state_source import finished_step
from rlhf_tui.bridge.wire import events, protocol
from rlhf_tui.bridge.wire.metrics import is_summary, normalise, summary_values

LIVE_PREFIXES = ("tcp://", "ipc://")
MAX_FILE_BYTES = 4 << 30  # refuse absurd files rather than exhausting memory
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")  # checkpoints: `analyze-checkpoint` reads them


class SourceError(Exception):
    """A source that cannot be read; the message is one line meant for the user."""


class SourceNotYet(SourceError):
    """A path source that is not there yet: no such path, or a folder with nothing to read inside (a training
    that has not written its log; `report --follow` waits for it)."""


def is_live(source: str) -> bool:
    return source.startswith(LIVE_PREFIXES)


def no_callback_readers(source: str) -> list | None:
    """The readers of a source that needs no callback (TensorBoard, trackio, an output_dir without an rlhf-tui
    log: bridge/monitor/followed_source.py), or None for the sources read below."""
    from rlhf_tui.bridge.monitor.followed_source import readers_for

    return readers_for(source)  # SourceUnavailable (a SourceError) where an optional reader is missing


def resolve_file_source(source: str) -> Path:
    """The file to read for a path source: the file itself, or inside an output_dir the newest
    checkpoint's trainer_state.json, a trainer_state.json, or the newest JSONL log (a source that needs no
    callback: its path)."""
    if no_callback_readers(source):
        from rlhf_tui.bridge.monitor.followed_source import source_path

        return source_path(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceNotYet(f"no such file or directory: {source}")
    if path.is_file():
        return path
    if not path.is_dir():
        raise SourceError(f"not a file or directory: {source}")
    candidates: list[Path] = []
    # An rlhf-tui log dir (or an output_dir holding one) wins: it has checkpoints, rewards and system data.
    jsonl = sorted(path.glob("*.jsonl")) + sorted(path.glob("*/*.jsonl")) + sorted(path.glob("logs/rlhf-tui/*.jsonl"))
    jsonl = [p for p in jsonl if p.name.startswith("run-")]
    if jsonl:
        candidates.append(max(jsonl, key=lambda p: p.stat().st_mtime))
    if (path / "trainer_state.json").is_file():
        candidates.append(path / "trainer_state.json")
    ckpts = [p for p in path.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    if ckpts:
        newest = max(ckpts, key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
        candidates.append(newest / "trainer_state.json")
    if not candidates:
        raise SourceNotYet(
            f"{source}: no trainer_state.json, checkpoint-*/, TensorBoard event file, trackio project or rlhf-tui JSONL log inside"
        )
    return candidates[0]


def load_file_source(source: str, store: Store | None = None) -> Store:
    """Read a JSONL log, trainer_state.json, output_dir, TensorBoard log or trackio project into a Store."""
    store = store or Store()
    readers = no_callback_readers(source)
    if readers:
        from rlhf_tui.bridge.monitor.followed_source import read_once

        return read_once(source, readers, store)
    path = resolve_file_source(source)
    store.source = str(path)
    store.connection = "offline"
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise SourceError(f"{path}: file too large ({size >> 20} MB)")
        with open(path, "rb") as fh:
            head = fh.read(4096).lstrip()
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not head:
        raise SourceError(f"{path}: file is empty")
    if path.suffix.lower() in WEIGHT_SUFFIXES:
        raise SourceError(f"{path}: looks like a checkpoint, not a run log (use `rlhf-tui analyze-checkpoint {path}`)")
    if path.suffix == ".jsonl" or _looks_like_jsonl(path):
        load_jsonl(path, store)
    else:
        load_trainer_state(path, store)
    return store


def _looks_like_jsonl(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            first = fh.readline()
        obj = json.loads(first)
        return isinstance(obj, dict) and "event" in obj
    except (ValueError, OSError, UnicodeDecodeError, RecursionError):
        return False


def load_trainer_state(path: Path | str, store: Store | None = None) -> Store:
    """Read `log_history` of a transformers trainer_state.json (NaN/Infinity tokens accepted)."""
    store = store or Store()
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            state = json.load(fh)
    except (ValueError, UnicodeDecodeError) as exc:
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise SourceError(f"{path}: not a JSONL log or trainer_state.json (not valid JSON: {why})") from None
    except RecursionError:
        raise SourceError(
            f"{path}: JSON nested too deeply to read (a trainer_state.json is a few levels deep)"
        ) from None
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise SourceError(f"{path}: not a trainer_state.json (no 'log_history' list)")
    run_id = safe_run_id(f"file:{path.parent.name or path.stem}")
    with store.lock:
        run = store.run(run_id)
        numbers = {key: state.get(key) for key in ("max_steps", "logging_steps", "global_step")}
        numbers = schema.checked(numbers, schema.TRAINER_STATE, "trainer_state", run.reject_field)
        run.meta.update(
            {
                "run_id": run_id,
                "source": safe_text(str(path)),
                "trainer": _guess_trainer(state["log_history"]),
                "max_steps": numbers.get("max_steps"),
                "logging_steps": numbers.get("logging_steps"),
            }
        )
        _ingest_log_history(run, state["log_history"])
        if numbers.get("global_step") is not None:
            run.meta["global_step"] = numbers["global_step"]
        end = finished_step(numbers)  # a checkpoint's state at max_steps: no end-of-training entry, yet ended
        if run.ended is None and end is not None:
            apply_message(run, events.Message(protocol.RUN_END, {"global_step": end}))
        store.transport["received"] += run.rows
        store.touch()
    return store


def _ingest_log_history(run: RunHistory, entries: list[Any]) -> None:
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        step = entry.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        if is_summary(entry):
            ended = schema.safe_copy({k: v for k, v in entry.items() if isinstance(v, (int, float, str))})
            run.ended, run.summary = ended, summary_values(ended)
            continue
        run.add_step(step, _metrics(normalise(entry), run))


def _guess_trainer(entries: list[Any]) -> str:
    keys: set[str] = set()
    for entry in entries[:5]:
        if isinstance(entry, dict):
            keys.update(entry)
    if "rewards/margins" in keys and "logps/chosen" in keys:
        return "DPOTrainer"
    if "objective/rlhf_reward" in keys or "ppo/mean_scores" in keys:
        return "PPOTrainer"
    if "mean_reward" in keys and "accuracy" in keys:
        return "RewardTrainer"
    if "frac_reward_zero_std" in keys or "completions/mean_length" in keys:
        return "GRPOTrainer/RLOOTrainer"
    return "unknown"


def apply_jsonl_line(store: Store, line: bytes, default_run: str) -> bool | None:
    """Land one line of a JSONL log (store.lock held): True for an rlhf-tui event, False for any other line
    (counted as rejected when malformed), None when it is not JSON (the caller knows whether it was cut off)."""
    try:
        event = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(event, dict):
        store.reject("JSONL line is not an object")
        return False
    try:
        return apply_jsonl_event(store, event, default_run=default_run)
    except Exception as exc:  # one odd line must not make the whole log unreadable
        store.reject(f"bad JSONL event: {type(exc).__name__}")
        return False


def load_jsonl(path: Path | str, store: Store | None = None) -> Store:
    """Read an rlhf-tui JSONL log. A truncated last line (training killed mid-write) is skipped;
    other unparseable lines are counted as rejected."""
    store = store or Store()
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None
    parsed, rejected_before = 0, store.transport["rejected"]
    with fh, store.lock:
        for raw in fh:
            line = raw.strip()
            if not line:
                continue
            landed = apply_jsonl_line(store, line, default_run=f"file:{path.stem}")
            if landed is None:
                if not raw.endswith(b"\n") and not fh.read(1):
                    continue  # the last line, cut off by a killed training: expected, not an error
                store.reject("unparseable JSONL line")
            parsed += bool(landed)
        store.touch()
    if parsed == 0:
        rejected = store.transport["rejected"] - rejected_before
        why = f"{rejected} unreadable line{'s' if rejected != 1 else ''}, " if rejected else ""
        raise SourceError(f"{path}: no rlhf-tui events found ({why}is this a JSONL log written by the callback?)")
    return store


__all__ = [
    "SourceError",
    "SourceNotYet",
    "apply_jsonl_line",
    "is_live",
    "load_file_source",
    "load_trainer_state",
    "load_jsonl",
    "resolve_file_source",
]
