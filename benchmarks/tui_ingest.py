"""Ingest rate with the monitor running: step messages fed through `Subscriber.feed_many()` (the subscriber
thread's own path, 1000 frames per call like its receive loop) into a Store, alone and while the Textual app runs
headless under Pilot showing that store. Also counts redraws (must stay ≤ ~10 Hz however fast data arrives) and
the worst event-loop stall (how responsive the screen stays).

    .venv/bin/python benchmarks/tui_ingest.py [--messages N] [--metrics M]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import threading
import time

os.environ.setdefault("XDG_CONFIG_HOME", tempfile.mkdtemp(prefix="rlhf-tui-bench-"))

from rlhf_tui.bridge.monitor.subscriber import Subscriber
from rlhf_tui.bridge.wire import protocol

RUN = "bench-run"


def frames(n: int, metrics: int) -> list[bytes]:
    names = [
        "reward",
        "reward_std",
        "kl",
        "entropy",
        "loss",
        "grad_norm",
        "learning_rate",
        "clip_ratio",
        "completion_length",
    ] + [f"extra/m{i:02d}" for i in range(max(0, metrics - 9))]
    names = names[:metrics]
    out = [protocol.encode(protocol.RUN_START, RUN, 0, time.time(), {"run_id": RUN, "trainer": "GRPOTrainer"})]
    for i in range(1, n + 1):
        values = {name: math.sin(i / (7 + j)) + 0.001 * j for j, name in enumerate(names)}
        out.append(protocol.encode(protocol.STEP, RUN, i, 1.7e9 + i, {"step": i, "metrics": values, "wall": 0.0}))
    return out


def feed(sub: Subscriber, data: list[bytes], chunk: int = 1000) -> float:
    started = time.perf_counter()
    for k in range(0, len(data), chunk):
        sub.feed_many(data[k : k + chunk])
    return time.perf_counter() - started


def alone(data: list[bytes]) -> tuple[float, int]:
    sub = Subscriber("tcp://127.0.0.1:9")  # never started: no socket, only the feed path
    return feed(sub, data), sub.store.current_run.rows


async def with_app(data: list[bytes]) -> dict:
    from rlhf_tui.tui.app import MonitorApp

    sub = Subscriber("tcp://127.0.0.1:9")
    app = MonitorApp([], stores=[sub.store], labels=["bench"])
    result: dict = {}
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause(0.5)
        builds = app.view.build_count  # reports drawn before the feed starts
        done = threading.Event()

        def feeder():
            result["seconds"] = feed(sub, data)
            done.set()

        stall, last = 0.0, time.perf_counter()
        started = time.perf_counter()
        thread = threading.Thread(target=feeder, daemon=True)
        thread.start()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            stall, last = max(stall, now - last - 0.01), now
        elapsed = time.perf_counter() - started
        result.update(
            builds=app.view.build_count - builds, elapsed=elapsed, stall=stall, rows=sub.store.current_run.rows
        )
        caught = time.perf_counter()
        while app.view.report.get("last_step") != len(data) - 1 and time.perf_counter() - caught < 10:
            await asyncio.sleep(0.01)
        result["catch_up"] = time.perf_counter() - caught
        result["shown"] = app.view.report.get("last_step")
        result["last"] = sub.store.current_run.last_step
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--metrics", type=int, default=30)
    ns = parser.parse_args()
    data = frames(ns.messages, ns.metrics)
    base_s, rows = alone(data)
    app = asyncio.run(with_app(data))
    n = ns.messages
    print(f"ingest of {n} step messages x {ns.metrics} metrics through Subscriber.feed_many (1000 frames per call)")
    print(f"{'mode':<34}{'seconds':>9}{'msgs/s':>11}{'redraws':>9}{'redraw Hz':>11}{'max stall ms':>14}")
    print(f"{'store only (no app)':<34}{base_s:>9.2f}{n / base_s:>11,.0f}{'-':>9}{'-':>11}{'-':>14}")
    hz = app["builds"] / app["elapsed"] if app["elapsed"] else 0.0
    print(
        f"{'app running headless (Pilot)':<34}{app['seconds']:>9.2f}{n / app['seconds']:>11,.0f}"
        f"{app['builds']:>9}{hz:>11.1f}{1000 * app['stall']:>14.0f}"
    )
    print(
        f"ratio with app / without: {base_s / app['seconds']:.2f} of the rate; rows stored {app['rows']}; "
        f"the screen showed the last step ({app['shown']}) {app['catch_up']:.2f} s after the last message"
    )
    # "≤ ~10 Hz": one redraw per 100 ms, with a tenth of slack for the timer's jitter.
    if hz > 11 or app["shown"] != app["last"]:
        print(f"GOAL MISSED: {hz:.1f} redraws per second (goal ≤ ~10 Hz) or the last step not shown")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
