"""The wire protocol (docs/protocol.md): JSON envelopes on one ROUTER/DEALER port per run.

Encoding and validation live here, written once. Every message is one ZeroMQ frame holding a UTF-8 JSON
object (one envelope) or a JSON array of envelopes (a batch, used to replay history fast). Non-finite floats
travel as the strings "NaN", "Infinity", "-Infinity" so the JSON stays strict.
"""
from __future__ import annotations

import json
import math
from typing import Any

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 4 << 20      # ZMQ MAXMSGSIZE on both sides: a peer cannot make us allocate more
MAX_BATCH = 2000                 # envelopes per batch frame
MAX_BATCH_BYTES = 1 << 20        # soft bound when building a batch
MAX_METRICS = 512                # keys per step message
MAX_STRING = 4096                # characters of any string we keep (sample completions are truncated)
MAX_DEPTH = 6                    # nesting depth accepted in `data`

# Kinds the training side publishes (seq-numbered, kept in history) ...
STEP, RUN_START, SYSTEM, CHECKPOINT, REWARD, RUN_END, ANOMALY = (
    "step", "run_start", "system", "checkpoint", "reward", "run_end", "anomaly")
HISTORY_KINDS = frozenset({STEP, RUN_START, SYSTEM, CHECKPOINT, REWARD, RUN_END, ANOMALY})
# ... and out-of-band kinds (not numbered): server heartbeat, client hello, rank forward.
HEARTBEAT, HELLO, FORWARD = "heartbeat", "hello", "forward"
ALL_KINDS = HISTORY_KINDS | {HEARTBEAT, HELLO, FORWARD}


class ProtocolError(ValueError):
    """A message that is not a valid envelope; the text says why (for the rejected counter)."""


def _clean(value: Any, depth: int = 0) -> Any:
    """JSON-safe copy: non-finite floats to strings, unknown objects to str, bounded depth."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if depth >= MAX_DEPTH:
        return str(value)[:MAX_STRING]
    if isinstance(value, dict):
        return {str(k): _clean(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, depth + 1) for v in value]
    try:
        number = float(value)  # numpy / torch scalars
    except (TypeError, ValueError):
        return str(value)[:MAX_STRING]
    return _clean(number, depth)


def to_json_safe(value: Any) -> Any:
    return _clean(value)


def encode(kind: str, run_id: str, seq: int, ts: float, data: dict, rank: int = 0) -> bytes:
    """One envelope as bytes."""
    env = {"v": PROTOCOL_VERSION, "kind": kind, "run": run_id, "rank": rank, "seq": seq, "ts": ts,
           "data": _clean(data)}
    return json.dumps(env, separators=(",", ":"), allow_nan=False).encode()


def encode_batch(frames: list[bytes]) -> bytes:
    """Several encoded envelopes as one frame (a JSON array), without re-encoding them."""
    return b"[" + b",".join(frames) + b"]"


def _reject_constant(token: str) -> float:
    raise ProtocolError(f"bare {token} token")


def decode_frame(frame: bytes) -> list[dict]:
    """Parse one frame into validated envelopes. Raises ProtocolError for the whole frame if it is not
    JSON; invalid envelopes inside a batch raise too (the caller counts one rejection per frame)."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError("frame too large")
    try:
        obj = json.loads(frame, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"not JSON: {type(exc).__name__}") from None
    if isinstance(obj, list):
        if len(obj) > MAX_BATCH:
            raise ProtocolError("batch too long")
        return [validate(item) for item in obj]
    return [validate(obj)]


def _depth_ok(value: Any, depth: int = 0) -> bool:
    if depth > MAX_DEPTH:
        return False
    if isinstance(value, dict):
        return all(_depth_ok(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return all(_depth_ok(v, depth + 1) for v in value)
    return True


def validate(env: Any) -> dict:
    """Check an envelope's shape and types; return it or raise ProtocolError."""
    if not isinstance(env, dict):
        raise ProtocolError("envelope is not an object")
    version = env.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError("missing protocol version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    kind = env.get("kind")
    if kind not in ALL_KINDS:
        raise ProtocolError(f"unknown kind {str(kind)[:40]!r}")
    run = env.get("run")
    if kind != HELLO and (not isinstance(run, str) or not run or len(run) > 128):
        raise ProtocolError("bad run id")
    seq = env.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < -1 or seq > 1 << 62:
        raise ProtocolError("bad seq")
    rank = env.get("rank", 0)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < 1 << 20:
        raise ProtocolError("bad rank")
    ts = env.get("ts")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts):
        raise ProtocolError("bad timestamp")
    data = env.get("data")
    if not isinstance(data, dict):
        raise ProtocolError("data is not an object")
    if not _depth_ok(data):
        raise ProtocolError("data nested too deeply")
    if kind == STEP:
        step = data.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ProtocolError("step message without a valid step")
        metrics = data.get("metrics")
        if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
            raise ProtocolError("step message without valid metrics")
        for key, value in metrics.items():
            if len(key) > 200:
                raise ProtocolError("metric name too long")
            if value is not None and not _is_number(value):
                raise ProtocolError(f"metric {key[:40]!r} is not a number")
    return env


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return value in ("NaN", "Infinity", "-Infinity")


def hello(run_id: str | None, since: int, resync: bool = False) -> bytes:
    """What a monitor sends on connect and every second after: which run it has and the first seq it lacks.
    `resync` asks the server to (re)send from `since` even if it thinks it already did."""
    return json.dumps({"v": PROTOCOL_VERSION, "kind": HELLO, "run": run_id or "", "rank": 0, "seq": -1,
                       "ts": 0.0, "data": {"run": run_id, "since": since, "resync": resync}}).encode()
