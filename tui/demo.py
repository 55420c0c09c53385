"""`rlhf-tui demo`: a REAL tiny TRL GRPO training in a subprocess, monitored live (or reported headless).

The model and tokenizer are built once and cached under the user cache dir; the training publishes on a
free loopback port; its output goes to a log file so the terminal stays the monitor's.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAINING_MODULES = ("torch", "transformers", "trl")
INSTALL_TRAIN = "pip install -e '.[train]' in the clone, or pip install 'rlhf-tui[train] @ git+<repository URL>'"


class DemoError(Exception):
    """Why the demo cannot run or did not finish: one line for the user (the CLI exits 2)."""


def missing_training_modules() -> list[str]:
    """The training extras that are not installed (found without importing them: torch alone takes seconds)."""
    missing = []
    for name in TRAINING_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def check_can_run(headless: bool) -> None:
    """Refuse, in one line, a demo that cannot work here: no training extras, or the live view without a terminal."""
    missing = missing_training_modules()
    if missing:
        raise DemoError(
            f"rlhf-tui demo trains a real model and needs the training extras ({', '.join(missing)} not "
            f"installed): {INSTALL_TRAIN}"
        )
    if not headless and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise DemoError("rlhf-tui demo: the live view needs a terminal; use `rlhf-tui demo --headless` for a report")


def last_log_line(log_path: Path) -> str:
    """The informative line of a crashed training's log: its last non-empty line (the exception), display-safe."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - 8192))
            tail = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return "no log"
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    if not lines:
        return "empty log"
    line = "".join(c if c.isprintable() else "?" for c in lines[-1])
    return line if len(line) <= 200 else line[:199] + "…"


def _crashed(proc: subprocess.Popen, log_path: Path, when: str) -> DemoError:
    return DemoError(
        f"rlhf-tui demo: the training {when} (exit code {proc.returncode}: {last_log_line(log_path)}); log: {log_path}"
    )


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
    """The demo: 0 when it ran; DemoError (one line) when it cannot run here or its training crashed."""
    check_can_run(headless)
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
        if proc.poll() not in (None, 0):
            raise _crashed(proc, log_path, "crashed")
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
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        raise _crashed(proc, log_path, "sent no data")
    from rlhf_tui.analysis.thresholds import Thresholds
    from rlhf_tui.tui.cli import format_report

    sys.stdout.write(format_report(sub.store, Thresholds(), fmt)[0])
    sys.stdout.flush()
    if proc.poll() not in (None, 0):
        raise _crashed(proc, log_path, "crashed")  # the report above shows what it logged before
    return 0


def _checkpoints_done(run) -> bool:
    return all(c.get("status") != "saved" for c in run.checkpoints)
