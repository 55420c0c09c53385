"""Idle CPU of the monitor: process CPU time over 10 s of an app showing a static source (a recorded JSONL log),
headless under Pilot, and (when tmux is installed) the real console script in a real terminal. Target: < 2 % of
one core.

    .venv/bin/python benchmarks/tui_idle_cpu.py [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

os.environ.setdefault("XDG_CONFIG_HOME", tempfile.mkdtemp(prefix="rlhf-tui-bench-"))


def recorded_log(directory: str) -> str:
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

    cb = RLHFMonitorCallback(address=False, log_dir=directory, analyze_checkpoints=False, run_id="idle-run")
    for step in range(1, 501):
        cb.log_step(
            step,
            {
                "reward": step * 0.01,
                "kl": 0.01,
                "entropy": 2.0 - step * 0.001,
                "loss": 0.1,
                "grad_norm": 1.0,
                "learning_rate": 1e-5,
            },
        )
    cb.log_rewards(500, [0.1, 0.5, 0.9], [{"label": "best", "score": 0.9, "prompt": "p", "completion": "c"}])
    cb.close()
    return cb.log_path


async def headless(path: str, seconds: float) -> float:
    from rlhf_tui.tui.app import MonitorApp

    app = MonitorApp([path])
    async with app.run_test(size=(160, 48)) as pilot:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (app.view.detect_count and app.view.report):
            await pilot.pause(0.05)
        await pilot.pause(1.0)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        return (time.process_time() - cpu0) / (time.perf_counter() - wall0)


def in_tmux(path: str, seconds: float) -> float | None:
    if shutil.which("tmux") is None:
        return None
    import psutil

    exe = os.path.join(os.path.dirname(sys.executable), "rlhf-tui")
    sock = f"rlhf-tui-bench-{uuid.uuid4().hex[:6]}"
    tmux = ["tmux", "-L", sock]
    subprocess.run(
        tmux
        + [
            "new-session",
            "-d",
            "-s",
            "b",
            "-x",
            "160",
            "-y",
            "48",
            f"exec env -u COLUMNS -u LINES TERM=xterm-256color {exe} {path}",
        ],
        check=True,
    )
    try:
        pid = int(
            subprocess.run(
                tmux + ["display-message", "-p", "-t", "b", "#{pane_pid}"], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
        proc = psutil.Process(pid)
        time.sleep(5)  # startup, first draw and the anomaly pass
        t0 = proc.cpu_times()
        time.sleep(seconds)
        t1 = proc.cpu_times()
        return (t1.user + t1.system - t0.user - t0.system) / seconds
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True)


TARGET_PERCENT = 2.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    ns = parser.parse_args()
    path = recorded_log(tempfile.mkdtemp(prefix="rlhf-tui-idle-"))
    rows = [("app under Pilot (headless), static source", asyncio.run(headless(path, ns.seconds)))]
    real = in_tmux(path, ns.seconds)
    if real is not None:
        rows.append(("rlhf-tui in tmux (real terminal), static source", real))
    print(f"idle CPU over {ns.seconds:g} s (process CPU time / wall time)")
    print(f"{'process':<52}{'% of one core':>14}")
    for name, share in rows:
        print(f"{name:<52}{100 * share:>14.2f}")
    worst = max(share for _, share in rows)
    if worst * 100 > TARGET_PERCENT:
        raise SystemExit(f"MISSED: idle CPU {100 * worst:.2f} % of one core (target < {TARGET_PERCENT} %)")


if __name__ == "__main__":
    main()
