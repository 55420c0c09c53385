"""Shared test helpers: free loopback ports, bounded waits, the tiny local model, the labelled traces
(tests/data/traces), a synthetic GRPO history, a real terminal (`tmux`). tests/unit needs none of the real parts; tests/functional does."""

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
    """Every test gets its own XDG config dir (the monitor saves thresholds and keys there) and leaves the
    environment as it found it: `RLHFIntegrationConfig.to_trl_config` sets TENSORBOARD_LOGGING_DIR and
    WANDB_PROJECT for the process, which would send a later test's TensorBoard events elsewhere."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


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


# ======================================================================================================
# TUI test helpers (the monitor's tests): deterministic monitor data (fixed run id, no clocks), waits for the
# app to settle, pane text, and a stand-in `ssh`. Tests ask for them as fixtures.
# ======================================================================================================
import math  # noqa: E402
import stat  # noqa: E402
import sys  # noqa: E402

from rlhf_tui.analysis.store import Store  # noqa: E402

TUI_RUN_ID = "grpo-demo-0001"
TUI_INJECTION = "The answer is [red]forty-two[/red]\x1b[31m!\x1b]0;pwned\x07 done"


def make_tui_store(
    steps: int = 200,
    *,
    run_id: str = TUI_RUN_ID,
    gpu: bool = True,
    ranks: int = 1,
    kl_jump_at: int = 170,
    connection: str = "live",
    reward_shift_at: int | None = None,
) -> Store:
    """A GRPO-like run with a KL spike at step 120 and a KL level jump from `kl_jump_at`, a grad_norm spike,
    two checkpoints (one unhealthy), batches of two reward functions (the last with hostile sample text) and GPU
    samples. `reward_shift_at`: format_reward jumps by 2 from that step (a reward-function episode)."""
    store = Store()
    store.source = "tcp://127.0.0.1:5555"
    store.connection = connection
    with store.lock:
        run = store.run(run_id)
        run.meta.update(
            {
                "run_id": run_id,
                "trainer": "GRPOTrainer",
                "model": "tiny-gpt2",
                "max_steps": 300,
                "args": {"beta": 0.04, "num_generations": 4, "max_completion_length": 16},
            }
        )
        for s in range(1, steps + 1):
            kl = 0.01 + 0.002 * math.sin(s / 7) + (0.8 if s == 120 else 0.0) + (0.3 if s >= kl_jump_at else 0)
            reward = 0.2 + 0.003 * s + 0.05 * math.sin(s / 5)
            run.add_step(
                s,
                {
                    "reward": reward,
                    "reward_std": 0.3 + 0.02 * math.cos(s / 3),
                    "kl": kl,
                    "entropy": 2.0 - 0.004 * s + 0.02 * math.sin(s),
                    "loss": 0.05 * math.sin(s / 4),
                    "grad_norm": 1.0 + 0.1 * math.cos(s / 2) + (8.0 if s == 150 else 0),
                    "learning_rate": 5e-5,
                    "completion_length": 12 + 2 * math.sin(s / 9),
                    "completions/clipped_ratio": 0.1,
                    "rewards/length_reward/mean": reward,
                },
            )
        run.checkpoints.append(
            {
                "step": 100,
                "path": "/runs/out/checkpoint-100",
                "health_score": 0.93,
                "issues": [],
                "recommendations": [],
                "drift": None,
                "file_size_mb": 4.2,
                "status": "analysed",
            }
        )
        run.checkpoints.append(
            {
                "step": 200,
                "path": "/runs/out/checkpoint-200",
                "health_score": 0.41,
                "issues": ["3 tensors with exploding weight norm [bold]x[/bold]"],
                "recommendations": ["roll back to checkpoint-100 and lower the learning rate"],
                "drift": {"overall": 0.081},
                "file_size_mb": 4.2,
                "status": "analysed",
            }
        )
        for s in range(1, steps + 1):  # two reward functions, 4 completions a batch (one GRPO group)
            for name, level, spread in (("length_reward", 0.6, 0.3), ("format_reward", -0.4, 0.1)):
                jump = 2.0 if name == "format_reward" and reward_shift_at is not None and s >= reward_shift_at else 0
                scores = [round(level + jump + spread * math.sin(1.7 * s + 2.3 * i + level), 4) for i in range(4)]
                batch: dict = {"step": s, "reward_func": name, "scores": scores, "samples": []}
                if s == steps and name == "format_reward":
                    batch["samples"] = [
                        {"label": "best", "score": 0.9, "prompt": "p", "completion": TUI_INJECTION},
                        {"label": "worst", "score": 0.1, "prompt": "p", "completion": "no\nnewline\ttab"},
                    ]
                run.add_reward(batch)
        for rank in range(ranks):
            run.system[rank] = {
                "rank": rank,
                "rss_mb": 812.0 + rank,
                "gpu_available": gpu,
                "gpus": [
                    {
                        "index": i,
                        "name": "NVIDIA H100 80GB HBM3",
                        "used_mb": 41200.0 + 1000 * i,
                        "total_mb": 81559.0,
                        "util": 87.0,
                        "peak_used_mb": 60100.0,
                    }
                    for i in range(2 if ranks > 1 else 1)
                ]
                if gpu
                else [],
            }
        store.transport["received"] = steps
        store.touch()
    return store


async def settle_views(pilot, app, detections: int = 1, timeout: float = 10.0) -> None:
    """Wait until every view ran anomaly detection and drew the result."""

    def ready():
        view = app.view  # only the active tab draws
        return (
            all(v.detect_count >= detections and not v.detecting for v in app.views)
            and not view.busy
            and bool(view.report)
        )

    await pilot_wait_for(pilot, ready, timeout=timeout, message="views settled")
    await pilot.pause()


def pane_title(widget) -> str:
    """A pane's border title as plain text (Textual keeps it as Content)."""
    content = widget._border_title
    return content.plain if content is not None else ""


def table_cell(table, row_key: str, column: int) -> str:
    return str(table.get_row(row_key)[column])


FAKE_SSH = """#!{python}
import json, os, signal, sys, time
sys.path.insert(0, {tests!r})
args = sys.argv[1:]
with open(os.environ["FAKE_SSH_LOG"], "a") as fh:
    fh.write(json.dumps({{"pid": os.getpid(), "args": args}}) + "\\n")
if os.environ.get("FAKE_SSH_FAIL"):
    print("ssh: connect to host nowhere port 22: Connection refused", file=sys.stderr)
    sys.exit(255)
local, host, port = args[args.index("-L") + 1].split(":")
from tcp_proxy import TcpProxy
proxy = TcpProxy(int(local), int(port), host=host).start()
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
if os.environ.get("FAKE_SSH_IGNORE_HUP"):  # only the monitor's own cleanup can stop it
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
while True:
    time.sleep(0.2)
"""


def install_fake_ssh_script(bindir: Path) -> Path:
    """Write the stand-in `ssh` into `bindir`; returns its path."""
    bindir.mkdir(parents=True, exist_ok=True)
    script = bindir / "ssh"
    script.write_text(FAKE_SSH.format(python=sys.executable, tests=str(REPO / "tests")))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


@pytest.fixture
def make_store():
    """A factory of deterministic monitor stores (`make_store(steps=..., gpu=..., ranks=..., ...)`)."""
    return make_tui_store


@pytest.fixture
def tui_store():
    return make_tui_store()


@pytest.fixture
def settle():
    """`await settle(pilot, app)`: every view ran anomaly detection and drew the result."""
    return settle_views


@pytest.fixture
def title():
    return pane_title


@pytest.fixture
def cell():
    return table_cell


@pytest.fixture
def run_id() -> str:
    return TUI_RUN_ID


@pytest.fixture
def injection() -> str:
    return TUI_INJECTION


@pytest.fixture
def install_fake_ssh():
    return install_fake_ssh_script


# ======================================================================================================
# A real terminal: tmux (120x40) on its own server socket, read with capture-pane, driven with send-keys.
# ======================================================================================================
import shutil  # noqa: E402
import subprocess  # noqa: E402
import uuid  # noqa: E402


class Tmux:
    """One tmux server on a socket of its own, one 120x40 session: start a command, read the screen, send keys."""

    def __init__(self, tmp_path: Path):
        self.socket = f"rlhf-tui-test-{uuid.uuid4().hex[:8]}"
        self.session = "monitor"
        self.tmp = tmp_path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=20, check=check
        )

    def start(self, command: str) -> None:
        self.run("new-session", "-d", "-s", self.session, "-x", "120", "-y", "40", command)

    def screen(self) -> str:
        result = self.run("capture-pane", "-p", "-t", self.session, check=False)
        return result.stdout if result.returncode == 0 else ""

    def alive(self) -> bool:
        return self.run("has-session", "-t", self.session, check=False).returncode == 0

    def pane_pid(self) -> int:
        return int(self.run("display-message", "-p", "-t", self.session, "#{pane_pid}").stdout.strip())

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", self.session, *keys)

    def close(self) -> None:
        self.run("kill-server", check=False)


@pytest.fixture
def tmux(tmp_path):
    """A Tmux on a server of its own, killed after the test; the test is skipped without tmux."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    t = Tmux(tmp_path)
    yield t
    t.close()
