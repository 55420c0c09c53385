"""Shared test helpers: free loopback ports, bounded waits, the tiny local model, the labelled traces
(tests/data/traces), a synthetic GRPO history. tests/unit needs none of the real parts; tests/functional does."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models on 2 shared cores: one torch thread per process avoids oversubscription when a test runs a
# training subprocess beside the monitor (inherited by every subprocess the tests start).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
TRACES = Path(os.environ.get("RLHF_TUI_TRACES", REPO / "tests" / "data" / "traces"))


def grpo_run(n: int = 300, seed: int = 0, kl: bool = True) -> dict[str, np.ndarray]:
    """A healthy GRPO-like history: noisy, slowly learning, KL with isolated x100 spikes."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / n
    a = 0.6 + 0.3 * t + 0.3 * rng.standard_normal(n)
    b = 0.14 + 0.03 * rng.standard_normal(n)
    m = {
        "rewards/sentiment/mean": a,
        "rewards/format/mean": b,
        "reward": a + b,
        "reward_std": 0.8 + 0.1 * rng.standard_normal(n),
        "frac_reward_zero_std": rng.choice([0.0, 0.25, 0.5], n, p=[0.7, 0.25, 0.05]),
        "entropy": 1.0 - 0.2 * t + 0.12 * rng.standard_normal(n),
        "loss": 0.05 * rng.standard_normal(n),
        "grad_norm": np.exp(0.35 * rng.standard_normal(n)),
        "learning_rate": np.full(n, 5e-5),
        "completion_length": 7 + 1.5 * rng.standard_normal(n),
        "completions/clipped_ratio": np.zeros(n),
        "clip_ratio": np.zeros(n),
        "step_time": 0.1 * np.exp(0.1 * rng.standard_normal(n)),
    }
    if kl:
        spikes = np.where(rng.random(n) < 0.02, rng.uniform(30, 150, n), 1.0)
        m["kl"] = 0.02 * np.exp(0.4 * rng.standard_normal(n)) * spikes
    return m


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_address() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01, message: str = "condition"):
    """Poll `predicate` until it is truthy (returns its value) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


async def pilot_wait_for(pilot, predicate, timeout: float = 10.0, message: str = "condition"):
    """The same bounded wait inside a Textual Pilot test (lets the app run between checks)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await pilot.pause(0.02)


@pytest.fixture(autouse=True)
def isolated_config(tmp_path, monkeypatch):
    """Every test gets its own XDG config dir: the monitor saves thresholds and keys there."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


@pytest.fixture
def address() -> str:
    return free_address()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny GPT-2 + tokenizer saved with save_pretrained (built once per test session, no download)."""
    pytest.importorskip("trl")
    from rlhf_tui.bridge.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-gpt2")


@pytest.fixture
def traces_dir() -> Path:
    if not (TRACES / "labels.json").is_file():
        pytest.skip(f"traces not found at {TRACES}")
    return TRACES
