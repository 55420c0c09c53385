"""The wire protocol (docs/protocol.md): JSON envelopes on one ROUTER/DEALER port per run.

Encoding and validation live here, written once. Every message is one ZeroMQ frame holding a UTF-8 JSON
object (one envelope) or a JSON array of envelopes (a batch, used to replay history fast). Older history is
replayed as `block` envelopes: up to BLOCK_MESSAGES messages with their steps in columns (one list per
metric), which decode several times faster than rows. Non-finite floats travel as the strings "NaN",
"Infinity", "-Infinity" so the JSON stays strict.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, cast

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 4 << 20  # ZMQ MAXMSGSIZE on the monitor side: a peer cannot make us allocate more
MAX_INBOUND_BYTES = 16 << 10  # ZMQ MAXMSGSIZE on the training side: hellos and forwarded samples are tiny
MAX_BATCH = 2000  # envelopes per batch frame
MAX_BATCH_BYTES = 1 << 20  # soft bound when building a batch or a block
BLOCK_MESSAGES = 512  # messages per history block
MAX_BLOCK_ROWS = 4096  # rows a received block may hold
MAX_METRICS = 512  # keys per step message
MAX_STRING = 4096  # characters of any string we keep (sample completions are truncated)
MAX_DEPTH = 6  # nesting depth accepted in `data`
MAX_SEQ = 1 << 62
NON_FINITE = frozenset({"NaN", "Infinity", "-Infinity"})

# Kinds the training side publishes (seq-numbered, kept in history) ...
STEP, RUN_START, SYSTEM, CHECKPOINT, REWARD, RUN_END, ANOMALY = (
    "step",
    "run_start",
    "system",
    "checkpoint",
    "reward",
    "run_end",
    "anomaly",
)
HISTORY_KINDS = frozenset({STEP, RUN_START, SYSTEM, CHECKPOINT, REWARD, RUN_END, ANOMALY})
# ... a history block (a seq range of the above, steps in columns) ...
BLOCK = "block"
# ... and out-of-band kinds (not numbered): server heartbeat, client hello, rank forward, and the server's
# answer to a hello it cannot serve (`{"slots": N}`: its N monitor slots are taken).
HEARTBEAT, HELLO, FORWARD, FULL = "heartbeat", "hello", "forward", "full"
ALL_KINDS = HISTORY_KINDS | {BLOCK, HEARTBEAT, HELLO, FORWARD, FULL}
_NoneType = type(None)
_NUMBER_TYPES = frozenset({float, int, _NoneType})


class Clean(dict):
    """A payload already made JSON-safe (`to_json_safe`): encoders skip the cleaning pass."""

    # Set by the training side once the payload is encoded (`dumps` of it), so the envelope does not encode it
    # again (`encode_clean`, `encode_step`).
    encoded: bytes


class ProtocolError(ValueError):
    """A message that is not a valid envelope; the text says why (for the rejected counter)."""


def ipv6_address(address: str) -> bool:
    """True for a tcp:// address whose host is an IPv6 literal (`tcp://[::1]:5555`): ZeroMQ sockets are IPv4-only
    until their IPV6 option is set, and then fail with "No such device"."""
    if not address.startswith("tcp://"):
        return False
    host = address[len("tcp://") :].rsplit(":", 1)[0]
    return host.startswith("[") or host.count(":") > 0


def _non_finite(value: float) -> str:
    return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")


def _clean(value: Any, depth: int = 0) -> Any:
    """JSON-safe copy: non-finite floats to strings, unknown objects to str, bounded depth."""
    t = type(value)
    if t is float:
        return value if math.isfinite(value) else _non_finite(value)
    if value is None or t is str or t is int or t is bool:
        return value
    if isinstance(value, float):
        return _clean(float(value), depth)
    if isinstance(value, (bool, int, str)):
        return value
    if depth >= MAX_DEPTH:
        return str(value)[:MAX_STRING]
    if isinstance(value, dict):
        return {str(k): _clean(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, depth + 1) for v in value]
    try:
        number = float(value)  # numpy / torch scalars
    except (TypeError, ValueError, OverflowError):
        return str(value)[:MAX_STRING]
    return _clean(number, depth)


def clean_metrics(metrics: dict) -> dict:
    """`_clean` for a flat {name: float | None} dict (the hot path of every step)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if type(value) is float:
            out[key] = value if math.isfinite(value) else _non_finite(value)
        elif value is None:
            out[key] = None
        else:
            out[key] = _clean(value, 1)
    return out


def to_json_safe(value: Any) -> Any:
    return value if type(value) is Clean else _clean(value)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _scalar(value: Any) -> bytes:
    """`dumps(value)` for an envelope's number: json writes a finite float as its repr, an int as digits."""
    t = type(value)
    if t is float and math.isfinite(value):
        return float.__repr__(value).encode()
    return b"%d" % value if t is int else dumps(value)


@functools.lru_cache(maxsize=256)
def _name(text: str) -> bytes:
    """`dumps(text)` of a kind or run id (a few per process, written into every envelope)."""
    return dumps(text)


def encode_encoded(kind: str, run_id: str, seq: int, ts: float, data_json: bytes, rank: int = 0) -> bytes:
    """The bytes `encode_clean` gives, around data encoded already (`dumps` of its clean data): a payload that
    goes to the JSONL log and the wire has its floats turned into text once."""
    run = _name(run_id) if type(run_id) is str else dumps(run_id)
    return b'{"v":%d,"kind":%s,"run":%s,"rank":%s,"seq":%s,"ts":%s,"data":%s}' % (
        PROTOCOL_VERSION,
        _name(kind),
        run,
        _scalar(rank),
        _scalar(seq),
        _scalar(ts),
        data_json,
    )


def encode_clean(kind: str, run_id: str, seq: int, ts: float, clean_data: dict, rank: int = 0) -> bytes:
    """One envelope as bytes; `clean_data` has been through `to_json_safe` already."""
    encoded = getattr(clean_data, "encoded", None) if type(clean_data) is Clean else None
    if encoded is not None and type(kind) is str:
        return encode_encoded(kind, run_id, seq, ts, encoded, rank)
    return dumps(
        {"v": PROTOCOL_VERSION, "kind": kind, "run": run_id, "rank": rank, "seq": seq, "ts": ts, "data": clean_data}
    )


def encode(kind: str, run_id: str, seq: int, ts: float, data: dict, rank: int = 0) -> bytes:
    """One envelope as bytes."""
    return encode_clean(kind, run_id, seq, ts, _clean(data), rank)


def encode_step(run_id: str, seq: int, ts: float, step: int, metrics: Clean, wall: Any, rank: int = 0) -> bytes:
    """A step envelope around metrics encoded once already (`metrics.encoded`): the same bytes as
    `encode_clean` would give, without turning the floats into text a second time."""
    data = b'{"step":%d,"metrics":%s,"wall":%s}' % (step, metrics.encoded, _scalar(wall))
    return encode_encoded(STEP, run_id, seq, ts, data, rank)


def encode_batch(frames: list[bytes]) -> bytes:
    """Several encoded envelopes as one frame (a JSON array), without re-encoding them."""
    return b"[" + b",".join(frames) + b"]"


def _block_columns(steps: list[tuple]) -> dict[str, Any]:
    """The `cols` of a block: a list per metric every row logged, {"i": rows, "x": values} for the others (in the
    order the names first appear). Rows that all logged the same names in the same order (a trainer's steps,
    nearly always) are turned into columns in one pass."""
    rows = [row[3] for row in steps]
    names = list(rows[0]) if rows else []
    if rows and all(list(m) == names for m in rows):
        return {name: list(col) for name, col in zip(names, zip(*(m.values() for m in rows)))}
    return _sparse_columns(rows)


def _sparse_columns(rows: list[dict]) -> dict[str, Any]:
    n = len(rows)
    cols: dict[str, Any] = {}
    names: dict[str, None] = {}
    for metrics in rows:
        names.update(dict.fromkeys(metrics))
    for name in names:
        present = [i for i, m in enumerate(rows) if name in m]
        if len(present) == n:
            cols[name] = [m[name] for m in rows]
        else:  # sparse: only the rows that logged it
            cols[name] = {"i": present, "x": [rows[i][name] for i in present]}
    return cols


def encode_block(
    run_id: str, rank: int, first: int, last: int, ts: float, steps: list[tuple], others: list[bytes]
) -> bytes:
    """A history block: the messages with seq in [first, last]. `steps` are (seq, step, ts, clean metrics) of
    the step messages (sent as columns), `others` the encoded frames of every other message (sent as they
    are). A seq in the range that is in neither was thinned away on purpose (not a gap)."""
    cols = _block_columns(steps)
    data = {
        "last": last,
        "seq": [s[0] for s in steps],
        "step": [s[1] for s in steps],
        "ts": [round(s[2], 4) for s in steps],
        "cols": cols,
    }
    head = dumps({"v": PROTOCOL_VERSION, "kind": BLOCK, "run": run_id, "rank": rank, "seq": first, "ts": ts})
    return head[:-1] + b',"data":' + dumps(data)[:-1] + b',"other":[' + b",".join(others) + b"]}}"


def _reject_constant(token: str) -> float:
    raise ProtocolError(f"bare {token} token")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def decode_frame(frame: bytes) -> list[dict]:
    """Parse one frame into validated envelopes. Raises ProtocolError for the whole frame if it is not
    JSON; invalid envelopes inside a batch raise too (the caller counts one rejection per frame)."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError("frame is not bytes")
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError("frame too large")
    try:
        obj = _DECODER.decode(bytes(frame).decode("utf-8"))
    except ProtocolError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError, TypeError) as exc:
        raise ProtocolError(f"not JSON: {type(exc).__name__}") from None
    if type(obj) is list:
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


def _is_int(value: Any, low: int = 0, high: int = MAX_SEQ) -> bool:
    return type(value) is int and low <= value <= high


def _check_numbers(values: list, what: str) -> None:
    """Every value a number, null or one of the non-finite strings; ints small enough to be floats."""
    types = set(map(type, values))
    if types <= _NUMBER_TYPES and int not in types:
        return
    if not types <= _NUMBER_TYPES | {str}:
        raise ProtocolError(f"{what} is not a number")
    for value in values:
        t = type(value)
        if (t is str and value not in NON_FINITE) or (t is int and not -(1 << 63) <= value < 1 << 63):
            raise ProtocolError(f"{what} is not a number")


def validate(env: Any, _inner: bool = False) -> dict:
    """Check an envelope's shape and types; return it or raise ProtocolError."""
    if type(env) is not dict:
        raise ProtocolError("envelope is not an object")
    version = env.get("v")
    if type(version) is not int:
        raise ProtocolError("missing protocol version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {str(version)[:20]}")
    kind = env.get("kind")
    if type(kind) is not str or kind not in ALL_KINDS:
        raise ProtocolError(f"unknown kind {str(kind)[:40]!r}")
    run = env.get("run")
    if kind != HELLO and (type(run) is not str or not run or len(run) > 128):
        raise ProtocolError("bad run id")
    if not _is_int(env.get("seq"), -1):
        raise ProtocolError("bad seq")
    rank = env.get("rank", 0)
    if not _is_int(rank, 0, (1 << 20) - 1):
        raise ProtocolError("bad rank")
    ts = env.get("ts")
    if type(ts) not in (int, float) or not math.isfinite(cast(float, ts)):
        raise ProtocolError("bad timestamp")
    data = env.get("data")
    if type(data) is not dict:
        raise ProtocolError("data is not an object")
    if kind == STEP:
        _validate_step(data)
    elif kind == BLOCK:
        if _inner:
            raise ProtocolError("block inside a block")
        _validate_block(env, data)
    elif not _depth_ok(data):
        raise ProtocolError("data nested too deeply")
    return env


def _validate_step(data: dict) -> None:
    if not _is_int(data.get("step")):
        raise ProtocolError("step message without a valid step")
    metrics = data.get("metrics")
    if type(metrics) is not dict or len(metrics) > MAX_METRICS:
        raise ProtocolError("step message without valid metrics")
    if metrics:
        if max(map(len, metrics)) > 200:
            raise ProtocolError("metric name too long")
        _check_numbers(list(metrics.values()), "a metric")
    for key, value in data.items():
        if key != "metrics" and not _depth_ok(value, 1):
            raise ProtocolError("data nested too deeply")


def _validate_block(env: dict, data: dict) -> None:
    """A block's columns become numpy arrays here (decoded once, checked once)."""
    import numpy as np

    first, last = env["seq"], data.get("last")
    if first < 0 or not _is_int(last, first) or last - first >= MAX_BLOCK_ROWS:
        raise ProtocolError("bad block range")
    seqs, steps, stamps, cols = data.get("seq"), data.get("step"), data.get("ts"), data.get("cols")
    if type(seqs) is not list or type(steps) is not list or type(stamps) is not list or type(cols) is not dict:
        raise ProtocolError("block without columns")
    n = len(seqs)
    if n > MAX_BLOCK_ROWS or len(steps) != n or len(stamps) != n or len(cols) > MAX_METRICS:
        raise ProtocolError("bad block shape")
    if set(map(type, seqs + steps)) - {int}:
        raise ProtocolError("bad block seq/step")
    _check_numbers(stamps, "a block timestamp")
    try:
        seq_arr = np.array(seqs, dtype=np.int64)
        step_arr = np.array(steps, dtype=np.int64)
        ts_arr = np.array(stamps, dtype=np.float64)
    except (OverflowError, ValueError):
        raise ProtocolError("bad block seq/step") from None
    if n and (
        seq_arr[0] < first or seq_arr[-1] > last or (n > 1 and (np.diff(seq_arr) <= 0).any()) or (step_arr < 0).any()
    ):
        raise ProtocolError("bad block seq/step")
    columns = {}
    for name, col in cols.items():
        if len(name) > 200:
            raise ProtocolError("metric name too long")
        if type(col) is list:
            index, values = None, col
            if len(values) != n:
                raise ProtocolError("bad block column")
        elif type(col) is dict and type(col.get("i")) is list and type(col.get("x")) is list:
            index, values = col["i"], col["x"]
            if len(index) != len(values) or len(index) > n or set(map(type, index)) - {int}:
                raise ProtocolError("bad block column")
            index = np.array(index, dtype=np.int64) if index else np.zeros(0, dtype=np.int64)
            if index.size and (index[0] < 0 or index[-1] >= n or (np.diff(index) <= 0).any()):
                raise ProtocolError("bad block column")
        else:
            raise ProtocolError("bad block column")
        _check_numbers(values, "a metric")
        columns[name] = (index, np.array(values, dtype=np.float64) if values else np.zeros(0))
    others = data.get("other", [])
    if type(others) is not list or len(others) > MAX_BATCH:
        raise ProtocolError("bad block messages")
    inner = []
    for item in others:
        item = validate(item, _inner=True)
        if item["kind"] not in HISTORY_KINDS or item.get("run") != env["run"] or not first <= item["seq"] <= last:
            raise ProtocolError("bad message inside a block")
        inner.append(item)
    env["data"] = {"last": last, "seq": seq_arr, "step": step_arr, "ts": ts_arr, "cols": columns, "other": inner}


def hello(run_id: str | None, since: int, resync: bool = False) -> bytes:
    """What a monitor sends on connect and every second after: which run it has and the first seq it lacks.
    `resync` asks the server to (re)send from `since` even if it thinks it already did."""
    return json.dumps(
        {
            "v": PROTOCOL_VERSION,
            "kind": HELLO,
            "run": run_id or "",
            "rank": 0,
            "seq": -1,
            "ts": 0.0,
            "data": {"run": run_id, "since": since, "resync": resync},
        }
    ).encode()


def forward(run_id: str, rank: int, kind: str, data: dict, ts: float, token: str | None = None) -> bytes:
    """What a non-main rank sends to the main process: one sample to re-publish under the run's numbering, with
    the run's token (the main process refuses a forward without it)."""
    body: dict[str, Any] = {"kind": kind, "data": _clean(data, 1)}
    if token is not None:
        body["token"] = token
    return encode_clean(FORWARD, run_id, -1, ts, body, rank)
