"""`rlhf-tui demo`: a REAL tiny TRL GRPO training in a subprocess, monitored live (or reported headless).

The model and tokenizer are built once and cached under the user cache dir; the training publishes on a
free loopback port; its output goes to a log file so the terminal stays the monitor's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_training(
    address: str,
    steps: int,
    output_dir: str,
    *,
    step_delay: float = 0.0,
    save_steps: int = 0,
    log_path: str | None = None,
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "rlhf_tui.bridge.demo.train",
        "--address",
        address,
        "--steps",
        str(steps),
        "--output-dir",
        output_dir,
        "--step-delay",
        str(step_delay),
        "--save-steps",
        str(save_steps),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    # A tiny model gains nothing from several threads and loses a lot when they fight the monitor for cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def run_demo(
    steps: int = 300, headless: bool = False, step_delay: float | None = None, save_steps: int = 50, fmt: str = "text"
) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="rlhf-tui-demo-"))
    address = f"tcp://127.0.0.1:{free_port()}"
    log_path = workdir / "training.log"
    delay = step_delay if step_delay is not None else (0.0 if headless else 0.1)
    proc = start_training(
        address, steps, str(workdir / "output"), step_delay=delay, save_steps=save_steps, log_path=str(log_path)
    )
    try:
        if headless:
            return _headless(address, proc, log_path, fmt)
        from rlhf_tui.tui.app import MonitorApp

        print(f"rlhf-tui demo: training on {address} (log: {log_path})", file=sys.stderr)
        app = MonitorApp([address], training_process=proc, training_log=str(log_path))
        app.run()
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _headless(address: str, proc: subprocess.Popen, log_path: Path, fmt: str) -> int:
    from rlhf_tui.bridge.monitor.subscriber import Subscriber

    sub = Subscriber(address).start()
    try:
        while True:
            run = sub.store.current_run
            if run is not None and run.ended is not None and _checkpoints_done(run):
                break
            if proc.poll() is not None:
                time.sleep(0.5)  # let the last messages arrive
                break
            time.sleep(0.05)
    finally:
        sub.stop()
    if sub.store.current_run is None:
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        print(
            f"rlhf-tui demo: the training produced no data (exit code {proc.poll()}). Log tail:\n{tail}",
            file=sys.stderr,
        )
        return 2
    from rlhf_tui.analysis.thresholds import Thresholds
    from rlhf_tui.tui.cli import format_report

    sys.stdout.write(format_report(sub.store, Thresholds(), fmt)[0])
    return 0


def _checkpoints_done(run) -> bool:
    return all(c.get("status") != "saved" for c in run.checkpoints)
