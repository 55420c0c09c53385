"""Cost of the callback on the training thread, and the step-time ratio on a real tiny GRPO run.

Run: .venv/bin/python benchmarks/callback_overhead.py [--calls N] [--skip-training]
Prints (1) on_log p50/p99 in µs with no monitor, a live monitor and a stalled monitor, in two regimes (back to
back; one call per 1 ms step) next to the machine's floor, and (2) the step-time table of bench_steptime.py.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GRPO_LOGS = {
    "loss": 0.01,
    "grad_norm": 1.2,
    "learning_rate": 1e-5,
    "num_tokens": 2048.0,
    "completions/mean_length": 12.0,
    "completions/min_length": 3.0,
    "completions/max_length": 16.0,
    "completions/clipped_ratio": 0.2,
    "completions/mean_terminated_length": 9.0,
    "completions/min_terminated_length": 3.0,
    "completions/max_terminated_length": 15.0,
    "rewards/f/mean": 0.3,
    "rewards/f/std": 0.2,
    "reward": 0.3,
    "reward_std": 0.2,
    "frac_reward_zero_std": 0.0,
    "kl": 0.001,
    "entropy": 5.0,
    "clip_ratio/low_mean": 0.0,
    "clip_ratio/high_mean": 0.0,
    "clip_ratio/region_mean": 0.0,
    "clip_ratio/low_min": 0.0,
    "clip_ratio/high_max": 0.0,
    "step_time": 0.03,
    "epoch": 0.1,
}


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


STEP_S = 0.001  # a "training step" between on_log calls: 1 ms (1000 steps/s, far faster than any RLHF step)
SLOW_STEP_S = 0.15  # steps longer than the publisher's batch interval (its thread is idle when on_log comes)
BURST = 200  # back-to-back calls, then 40 ms for the publisher thread to catch up (5 000 calls/s)


def time_on_log(cb, n: int, regime: str = "warm") -> np.ndarray:
    """on_log as the Trainer calls it. `warm`: bursts of back-to-back calls (the call's own cost, caches warm).
    `cold`: one call per 1 ms "step" (a sleep: it releases the GIL as torch ops and CUDA syncs do, and lets
    the caches go cold, as a real step does)."""
    state = SimpleNamespace(global_step=0)
    samples = np.empty(n)
    clock = time.perf_counter_ns
    for i in range(n):
        state.global_step = i
        t0 = clock()
        cb.on_log(None, state, None, logs=GRPO_LOGS)
        samples[i] = clock() - t0
        if regime == "cold":
            time.sleep(STEP_S)
        elif regime == "slow":
            time.sleep(SLOW_STEP_S)
        elif i % BURST == BURST - 1:
            time.sleep(0.04)
    return samples / 1000.0


def floor(n: int, regime: str) -> np.ndarray:
    """The same copy + enqueue in a bare loop (no callback, no thread): what the machine itself costs."""
    from collections import deque

    queue: deque = deque()
    samples = np.empty(n)
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        queue.append(("log", i, time.time(), dict(GRPO_LOGS)))
        samples[i] = clock() - t0
        if i % 20 == 19:
            queue.clear()
        if regime == "cold":
            time.sleep(STEP_S)
        elif regime == "slow":
            time.sleep(SLOW_STEP_S)
        elif i % BURST == BURST - 1:
            time.sleep(0.04)
    return samples / 1000.0


def on_log_table(n: int, regime: str = "warm") -> list[tuple]:
    import zmq

    from rlhf_tui.bridge.monitor.subscriber import Subscriber
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
    from rlhf_tui.bridge.wire.protocol import hello

    us = floor(n, regime)
    rows = [("floor: bare copy+append", float(np.percentile(us, 50)), float(np.percentile(us, 99)), 0)]
    for mode in ("no monitor", "live monitor", "stalled monitor")[: 1 if regime == "slow" else 3]:
        address = free_address()
        cb = RLHFMonitorCallback(address=address, log_dir=tempfile.mkdtemp(), analyze_checkpoints=False)
        cb.log_step(0, {"loss": 1.0})
        sub = stalled = ctx = None
        if mode == "live monitor":
            sub = Subscriber(address).start()
        elif mode == "stalled monitor":  # connects, says hello, never reads; tiny receive buffer
            ctx = zmq.Context()
            stalled = ctx.socket(zmq.DEALER)
            stalled.setsockopt(zmq.RCVBUF, 4096)
            stalled.setsockopt(zmq.RCVHWM, 1)
            stalled.connect(address)
            stalled.send(hello(None, 0, resync=True))
        time.sleep(0.3)
        us = time_on_log(cb, n, regime)
        rows.append((mode, float(np.percentile(us, 50)), float(np.percentile(us, 99)), cb.publisher.stats["dropped"]))
        if sub:
            sub.stop()
        if stalled is not None:
            stalled.close(0)
            ctx.term()
        cb.close()
    return rows


def print_on_log_tables(n: int, slow_calls: int = 200) -> bool:
    """Print the tables; True when every warm p99 with a goal is within it."""
    met = True
    for regime, title, calls in (
        ("warm", f"back to back, bursts of {BURST} (the call's own cost)", n),
        ("cold", f"one call per {STEP_S * 1000:g} ms step (caches cold, as in training)", n),
        ("slow", f"one call per {SLOW_STEP_S * 1000:g} ms step (the CPU idles between calls: all cold)", slow_calls),
    ):
        print(f"  {title}, {calls} calls")
        print(f"  {'mode':<26}{'p50 µs':>9}{'p99 µs':>9}{'goal p99':>10}{'dropped':>9}")
        for mode, p50, p99, dropped in on_log_table(calls, regime):
            goal = "<= 5" if regime == "warm" and not mode.startswith("floor") else ""
            print(f"  {mode:<26}{p50:>9.2f}{p99:>9.2f}{goal:>10}{dropped:>9}")
            met = met and (not goal or p99 <= 5)
    return met


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-training", action="store_true")
    ns = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    print(f"on_log cost on the training thread ({ns.calls} calls, {len(GRPO_LOGS)} keys)")
    met = print_on_log_tables(ns.calls)
    if not met:
        print("GOAL MISSED: a warm on_log p99 is above 5 µs")
    if ns.skip_training:
        return 0 if met else 1
    import bench_steptime

    print()
    rows = bench_steptime.step_time_table(ns.steps, ns.repeats)
    bench_steptime.print_table(rows, ns.steps, ns.repeats)
    return 1 if bench_steptime.goal_missed(rows) or not met else 0


if __name__ == "__main__":
    sys.exit(main())
