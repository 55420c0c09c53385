"""`rlhf-tui demo --headless`: a real GRPO training subprocess, a monitor that connects before the training is
up (imports take seconds), the report at the end. A short run must not be missed by reconnect backoff."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_headless_demo_reports_a_short_real_run(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "rlhf-tui")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}  # builds its own tiny model once
    result = subprocess.run(
        [exe, "demo", "--headless", "--steps", "6", "--save-steps", "3", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["steps"] == 6 and report["run"]["trainer"] == "GRPOTrainer"
    assert report["connection"] == "ended"
    assert [c["step"] for c in report["checkpoints"]] == [3, 6]
    assert all(c["health_score"] is not None for c in report["checkpoints"])
    assert report["rewards"]["batches"] >= 6 and report["transport"]["gaps"] == 0
    assert (tmp_path / "cache" / "rlhf-tui" / "tiny-gpt2-words" / "model.safetensors").is_file()
