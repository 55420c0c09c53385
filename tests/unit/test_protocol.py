"""Envelope encoding and validation (the wire protocol of docs/protocol.md)."""

import json
import math

import pytest

from rlhf_tui.bridge.wire import protocol
from rlhf_tui.bridge.wire.protocol import ProtocolError, decode_frame, encode, encode_batch


def test_round_trip_keeps_non_finite_values_as_strict_json():
    frame = encode(
        "step",
        "run1",
        7,
        1.5,
        {"step": 3, "metrics": {"loss": float("nan"), "kl": float("inf"), "reward": None, "x": 1.0}},
    )
    json.loads(frame, parse_constant=lambda c: pytest.fail("bare constant"))
    (env,) = decode_frame(frame)
    assert env["seq"] == 7 and env["data"]["metrics"]["loss"] == "NaN"
    assert env["data"]["metrics"]["kl"] == "Infinity" and env["data"]["metrics"]["reward"] is None


def test_batch_frame_decodes_every_envelope():
    frames = [encode("step", "r", i, 0.0, {"step": i, "metrics": {}}) for i in range(5)]
    envs = decode_frame(encode_batch(frames))
    assert [e["seq"] for e in envs] == list(range(5))


@pytest.mark.parametrize(
    "frame, reason",
    [
        (b"\xff\xfe", "not JSON"),
        (b"[1,2", "not JSON"),
        (b'{"v":2,"kind":"step","run":"r","seq":0,"ts":0,"data":{}}', "unsupported protocol version"),
        (b'{"v":1,"kind":"evil","run":"r","seq":0,"ts":0,"data":{}}', "unknown kind"),
        (b'{"v":1,"kind":"step","run":"r","seq":0,"ts":0,"data":{"step":-1,"metrics":{}}}', "valid step"),
        (b'{"v":1,"kind":"step","run":"r","seq":0,"ts":0,"data":{"step":1,"metrics":{"a":"x"}}}', "not a number"),
        (b'{"v":1,"kind":"step","run":"r","seq":0,"ts":NaN,"data":{}}', "bare NaN"),
        (b'{"v":1,"kind":"step","run":"","seq":0,"ts":0,"data":{}}', "bad run id"),
        (b'{"v":1,"kind":"step","run":"r","seq":true,"ts":0,"data":{}}', "bad seq"),
        (
            b'{"v":1,"kind":"system","run":"r","seq":0,"ts":0,"data":' + b'{"a":' * 20 + b"1" + b"}" * 20 + b"}",
            "nested too deeply",
        ),
    ],
)
def test_invalid_frames_are_rejected_with_a_reason(frame, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode_frame(frame)


def test_oversized_frame_rejected_before_parsing():
    with pytest.raises(ProtocolError, match="too large"):
        decode_frame(b" " * (protocol.MAX_MESSAGE_BYTES + 1))


def test_to_json_safe_handles_numpy_and_objects():
    import numpy as np

    out = protocol.to_json_safe({"a": np.float32(1.5), "b": np.int64(3), "c": object(), "d": (1, math.nan)})
    assert out["a"] == 1.5 and out["b"] == 3.0 and isinstance(out["c"], str) and out["d"] == [1, "NaN"]


def test_a_step_encoded_once_is_byte_identical_to_the_plain_encoding():
    metrics = protocol.Clean(protocol.clean_metrics({"kl": 0.1, "loss": float("nan"), "reward": None}))
    metrics.encoded = protocol.dumps(metrics)
    fast = protocol.encode_step("run-x", 5, 1764139000.123456, 7, metrics, 1764139000.5, 2)
    plain = encode(
        "step", "run-x", 5, 1764139000.123456, {"step": 7, "metrics": dict(metrics), "wall": 1764139000.5}, 2
    )
    assert fast == plain and decode_frame(fast)[0]["data"]["metrics"]["loss"] == "NaN"


def test_block_round_trip_dense_and_sparse_columns_and_other_messages():
    steps = [(0, 1, 10.0, {"kl": 0.1, "loss": "NaN"}), (2, 2, 11.0, {"kl": None}), (3, 3, 12.0, {"kl": 0.3})]
    other = [encode("system", "r", 1, 10.5, {"rss_mb": 1.0})]
    (env,) = decode_frame(protocol.encode_block("r", 0, 0, 4, 13.0, steps, other))  # seq 4: thinned away
    data = env["data"]
    assert env["kind"] == "block" and data["last"] == 4 and list(data["seq"]) == [0, 2, 3]
    index, values = data["cols"]["kl"]
    assert index is None and values[0] == 0.1 and values[1] != values[1] and values[2] == 0.3
    index, values = data["cols"]["loss"]
    assert list(index) == [0] and values[0] != values[0]
    assert [e["kind"] for e in data["other"]] == ["system"]


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"last": 5000}, "bad block range"),
        ({"seq": [1, 1]}, "bad block seq/step"),
        ({"step": [1, -2]}, "bad block seq/step"),
        ({"cols": {"kl": [1.0]}}, "bad block column"),
        ({"cols": {"kl": {"i": [0, 7], "x": [1.0, 2.0]}}}, "bad block column"),
        ({"cols": {"kl": [True, 1.0]}}, "not a number"),
        (
            {
                "other": [
                    {"v": 1, "kind": "step", "run": "other-run", "seq": 1, "ts": 0, "data": {"step": 1, "metrics": {}}}
                ]
            },
            "inside a block",
        ),
    ],
)
def test_bad_blocks_are_rejected(change, reason):
    data = {"last": 3, "seq": [0, 1], "step": [1, 2], "ts": [0.0, 0.0], "cols": {"kl": [0.1, 0.2]}, "other": []}
    data.update(change)
    frame = json.dumps({"v": 1, "kind": "block", "run": "r", "seq": 0, "ts": 0.0, "data": data}).encode()
    with pytest.raises(ProtocolError, match=reason):
        decode_frame(frame)


def test_gathered_reward_batches_land_as_one_record_per_batch():
    from rlhf_tui.analysis.store import Store
    from rlhf_tui.bridge.monitor.ingest import apply_envelope, apply_jsonl_event
    from rlhf_tui.bridge.wire import events

    batches = [events.RewardBatch(s, "length", [1.0, float("nan"), 2.0]) for s in (3, 4, 5)]
    data = events.coalesced_rewards("length", batches)
    assert data["steps"] == [3, 4, 5] and data["sizes"] == [3, 3, 3] and data["num_invalid"] == 3
    data["samples"] = [{"label": "best", "score": 2.0, "prompt": "p", "completion": "c"}]
    frame = protocol.encode("reward", "r1", 0, 1.0, data)
    wire, jsonl = Store(), Store()
    with wire.lock:
        for env in protocol.decode_frame(frame):
            apply_envelope(wire, env)
    apply_jsonl_event(jsonl, {"event": "run_start", "run_id": "r1"})
    apply_jsonl_event(jsonl, {"event": "reward_batch", **json.loads(protocol.dumps(protocol.to_json_safe(data)))})
    for store in (wire, jsonl):
        rewards = list(store.run("r1").rewards)
        assert [r["step"] for r in rewards] == [3, 4, 5] and [r["num_invalid"] for r in rewards] == [1, 1, 1]
        assert rewards[-1]["samples"] and not rewards[0]["samples"]
