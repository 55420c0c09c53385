"""Shared test helpers: free loopback ports, bounded waits, the tiny local model, the shared traces."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models on 2 shared cores: one torch thread per process avoids oversubscription when a test runs a
# training subprocess beside the monitor (inherited by every subprocess the tests start).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
TRACES = Path(os.environ.get("RLHF_TUI_TRACES", REPO.parent / "shared" / "traces"))


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
