"""The publisher thread's output, byte for byte: a fixed run of queued events (steps with non-finite, None, int,
string and numpy values, finite floats whose sum overflows, a key set that changes, three reward functions with
samples, checkpoints (one result with a key of the JSONL event's own, one empty), training-side anomalies, system
samples, the end) drained a few at a time gives the same JSONL lines and the same wire frames (tail frames and a
sealed history block) as the recorder and publisher did before they were made cheaper
(tests/data/publisher_golden.json, written by the code of commit 26d974d).

Regenerate the golden file only for an intended change of the formats (docs/protocol.md; last: reward batches
carry no training-side `analysis` since the monitor judges each reward function itself):
RLHF_TUI_WRITE_GOLDEN=1 pytest tests/unit/test_publisher_encoding.py
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from rlhf_tui.bridge.training import history as history_module
from rlhf_tui.bridge.training import recorder as recorder_module
from rlhf_tui.bridge.training.publisher import Publisher
from rlhf_tui.bridge.training.recorder import Recorder
from rlhf_tui.bridge.training.system import MB, SystemSampler
from rlhf_tui.bridge.wire import events, protocol

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "publisher_golden.json"
STEP_S = 0.05  # a fast run: 5 steps per drain of 0.25 s, a system sample every 10 steps
EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class FakeClock:
    """`time` as the recorder and the history see it: wall and monotonic clocks moved by the test."""

    def __init__(self) -> None:
        self.t = 0.0

    def time(self) -> float:
        return EPOCH + self.t

    def monotonic(self) -> float:
        return 1000.0 + self.t


class FakeProcess:
    def __init__(self) -> None:
        self.rss = 300 * MB

    def memory_info(self):
        self.rss += 3 * MB + 12345
        return SimpleNamespace(rss=self.rss)


class FakeCuda:
    def is_initialized(self):
        return True

    def is_available(self):
        return True

    def device_count(self):
        return 1

    def memory_allocated(self, i):
        return 1234 * MB

    def memory_reserved(self, i):
        return 2048 * MB

    def max_memory_allocated(self, i):
        return 1500 * MB

    def get_device_properties(self, i):
        return SimpleNamespace(total_memory=80_000 * MB)

    def get_device_name(self, i):
        return "Fake H100"


class FakeDetector:
    """Stands in for the training-side engine pass: a new episode at step 12, it grows at step 20."""

    def __init__(self) -> None:
        self.step = 0

    def add(self, step: int, metrics: dict) -> None:
        self.step = step

    def poll(self) -> tuple[list, list]:
        ep = {"detector": "kl_runaway", "metric": "kl", "step": 12, "first_step": 12, "severity": "high"}
        if self.step == 12:
            ep = {**ep, "last_step": 12, "score": float("inf"), "message": "KL ran away \u2014 \x1b[31m"}
            return [ep], [ep]
        if self.step == 20:
            ep = {**ep, "last_step": 20, "score": 7.25, "values": np.array([1.5, np.nan])}
            return [], [ep]
        return [], []


def _logs(step: int) -> dict:
    logs = {
        "loss": 0.1 / step,
        "grad_norm": 1.0 + step / 7,
        "learning_rate": 5e-5 * (1 - step / 100),
        "num_tokens": float(step * 256),
        "completions/mean_length": 12.0 + step % 3,
        "rewards/length_reward/mean": 0.3 + step / 300,
        "rewards/length_reward/std": 0.1,
        "reward": 0.5 + step / 100,
        "reward_std": 0.25,
        "kl": 1e-5 * step,
        "entropy": 2.0 - step / 50,
        "clip_ratio/region_mean": 0.0,
        "step_time": 0.05,
        "epoch": step / 40,
    }
    if step == 7:
        logs["loss"] = float("nan")
    if step == 9:
        logs["grad_norm"] = float("inf")
        logs["kl"] = float("-inf")
    if step == 14:
        logs["loss"] = None
    if step == 16:
        logs["num_tokens"] = step * 256  # an int
        logs["completions/mean_length"] = np.float32(12.5)
    if step == 18:
        logs["note"] = "warm\x00up \u2603"
    if step == 22:  # finite floats whose sum overflows
        logs["grad_norm"] = 1.5e308
        logs["num_tokens"] = 1.2e308
    if step >= 25:  # the trainer starts logging one more key: a new plan
        logs["frac_reward_zero_std"] = 0.5
    if step >= 30:  # names json escapes, and a % sign
        logs['entropie/\u00e9"q"'] = 1.0 + step / 10
        logs["ratio%d/%s"] = 0.25
    return logs


def _events() -> list[list]:
    """The queued events, one list per drain."""
    drains, current = [], [events.RunStarted({"model": "tiny", "args": {"num_generations": 4}, "run_id": "golden"})]
    completions = [f"completion {i} " + "x" * (i * 40) for i in range(8)]
    prompts = [f"prompt {i}" for i in range(8)]
    for step in range(1, 36):
        for k, name in enumerate(("length_reward", "word_reward", "vowel_reward")):
            scores = [((step * 7 + i * 3 + k) % 11) / 10 for i in range(8)]
            if step == 5 and k == 1:
                scores[2] = float("nan")
                scores[3] = None
            current.append(events.RewardBatch(step, name, scores, None, prompts, completions))
        current.append(events.LoggedStep(step, EPOCH + step * STEP_S, _logs(step)))
        if step == 10:
            current.append(events.CheckpointSaved(10, "/tmp/out/checkpoint-10"))
        if step == 11:
            result = {"step": 10, "health_score": 0.75, "issues": ["nan\nweights"], "timestamp": "own"}
            current.append(events.CheckpointAnalysed(result))  # a key of the JSONL event's own
            current.append(events.CheckpointAnalysed({}))
        if step % 5 == 0:
            drains.append(current)
            current = []
    current.append(events.LoggedStep(36, EPOCH + 36 * STEP_S, {"train_runtime": 3.5, "train_loss": 0.1}))
    current.append(events.RunEnded(35))
    drains.append(current)
    return drains


def run_publisher(tmp_path, monkeypatch) -> tuple[list[str], list[str]]:
    """(JSONL lines, wire frames: the sealed blocks then the tail) for the fixed run."""
    clock = FakeClock()
    monkeypatch.setattr(recorder_module, "time", clock)
    monkeypatch.setattr(history_module, "time", clock)
    monkeypatch.setattr(recorder_module, "SYSTEM_PERIOD_S", 0.5)  # the golden run's sampling period
    monkeypatch.setattr(protocol, "BLOCK_MESSAGES", 48)  # one sealed block, the rest in the tail
    random.seed(0)  # the random sample completion
    cb = SimpleNamespace(
        log_dir=str(tmp_path),
        log_mode=0o600,
        run_id="golden",
        rank=0,
        rank_info={"rank": 0, "local_rank": 0, "hostname": "host"},
        detect_anomalies=True,
        meta={"args": {"num_generations": 4}},
        thresholds=None,
        analyze_checkpoints=False,
        thresholds_z=lambda: 3.0,
    )
    rec = Recorder(cb)
    rec.sampler = SystemSampler(nvml=None, torch_module=SimpleNamespace(cuda=FakeCuda()), process=FakeProcess())
    rec.detector = FakeDetector()
    pub = Publisher(False, "golden", rec, idle=rec.tick)
    for drain in _events():
        for event in drain:
            assert pub.put(event)
        pub._drain()
        pub._publish_all(pub._idle())
        clock.t += 5 * STEP_S
    rec.jsonl.close()
    lines = rec.jsonl.path.read_text(encoding="utf-8").splitlines()
    frames = [b.frame.decode() for b in pub._blocks] + [f.decode() for f in pub._frames]
    assert len(pub._blocks) == 1 and pub._frames and pub.stats["handler_errors"] == 0
    return lines, frames


def test_a_drained_run_gives_the_same_jsonl_lines_and_wire_frames_as_before(tmp_path, monkeypatch):
    lines, frames = run_publisher(tmp_path, monkeypatch)
    if os.environ.get("RLHF_TUI_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"jsonl": lines, "frames": frames}, indent=0) + "\n", encoding="utf-8")
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    # Content first (a readable diff of the first difference), then the bytes themselves.
    assert [json.loads(line) for line in lines] == [json.loads(line) for line in golden["jsonl"]]
    assert [json.loads(frame) for frame in frames] == [json.loads(frame) for frame in golden["frames"]]
    assert lines == golden["jsonl"]
    assert frames == golden["frames"]
    kinds = [json.loads(line)["event"] for line in lines]
    assert kinds.count("step_end") == 35 and kinds.count("reward_batch") == 3 * 4 and "system" in kinds
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"


def test_an_envelope_around_encoded_data_is_the_bytes_of_the_plain_encoder():
    data = protocol.Clean(protocol.to_json_safe({"rss_mb": 1.5, "gpus": [], "x": float("nan"), "s": "\u2603\n"}))
    data.encoded = protocol.dumps(data)
    for run_id, seq, ts, rank in [("r", 0, 1.0, 0), ('run \u00e9"x', 1 << 40, 1e-7, 3), ("r", 5, 17, 1)]:
        plain = protocol.dumps(
            {"v": protocol.PROTOCOL_VERSION, "kind": "system", "run": run_id, "rank": rank, "seq": seq, "ts": ts}
            | {"data": dict(data)}
        )
        assert protocol.encode_clean("system", run_id, seq, ts, data, rank) == plain
        assert protocol.encode_encoded("system", run_id, seq, ts, data.encoded, rank) == plain


def test_a_block_of_rows_with_the_same_names_is_the_same_as_column_by_column():
    rng = np.random.default_rng(3)
    names = [f"metric/{i}" for i in range(30)]
    same = [(i, i + 1, 100.0 + i, {k: float(rng.normal()) for k in names}) for i in range(64)]
    same[5][3]["metric/3"] = "NaN"
    mixed = same[:10] + [(10, 11, 110.0, {"metric/0": 1.0})] + same[11:20]
    for steps in (same, mixed, [], same[:1]):
        rows = [row[3] for row in steps]
        assert protocol._block_columns(steps) == protocol._sparse_columns(rows)
        assert list(protocol._block_columns(steps)) == list(protocol._sparse_columns(rows))  # the same order
    assert protocol._block_columns(mixed)["metric/1"] == {
        "i": [i for i in range(len(mixed)) if i != 10],
        "x": [r[3]["metric/1"] for r in mixed if "metric/1" in r[3]],
    }
