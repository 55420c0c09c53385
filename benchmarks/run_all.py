"""Every rlhf-tui benchmark in one run (`make bench`): the tables of docs/performance.md.

1. on_log cost on the training thread (p50/p99 µs): no monitor, a live monitor, a stalled monitor.
2. Step-time overhead on the tiny GRPO run: our callback and TRL's TensorBoard / W&B offline peers.
3. Monitor ingest throughput (decode + validate + store + analyse), late join of 10^5 steps, end-to-end
   latency on loopback.
4. The other scripts, each in its own process: the publisher thread's CPU per step, detection quality on the shared traces, re-evaluation after a
   threshold change, checkpoint read throughput, the monitor app's ingest, memory and idle CPU, the completions
   browser on 64 completions x 10^4 steps.
   (`gpu_check.py` needs an NVIDIA GPU and is run by hand there.)

Exits 1 when any table misses its goal (each script's own exit code for part 4), after printing them all.

Run: .venv/bin/python benchmarks/run_all.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller counts (a smoke run, not for the docs)")
    ns = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")

    import bench_steptime
    import bench_wire
    import callback_overhead
    import numpy as np

    calls, steps, repeats = (2000, 20, 2) if ns.quick else (10_000, 50, 7)
    ingest_n, late_n, latency_n = (5000, 20_000, 20) if ns.quick else (50_000, 100_000, 100)
    t0 = time.time()
    print(
        f"rlhf-tui benchmarks — {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}\n"
    )

    print(f"1. on_log on the training thread ({calls} calls, {len(callback_overhead.GRPO_LOGS)} keys)")
    missed = [] if callback_overhead.print_on_log_tables(calls) else ["1. on_log p99"]

    print()
    rows = bench_steptime.step_time_table(steps, repeats)
    bench_steptime.print_table(rows, steps, repeats)
    if bench_steptime.goal_missed(rows):
        missed.append("2. step time")

    print(
        f"\n3a. monitor ingest: Subscriber.feed (decode + validate + store), then detect() over the run, "
        f"{ingest_n} steps"
    )
    print(f"{'frames':<32}{'stored msg/s':>14}{'+analysed msg/s':>17}{'goal':>10}")
    for label, stored, analysed, _, has_detect in bench_wire.ingest(ingest_n):
        if not label.startswith("live frames, feed() each") and (analysed if has_detect else stored) < 50_000:
            missed.append(f"3a. {label}")
        print(f"{label:<32}{stored:>14,.0f}{analysed if has_detect else float('nan'):>17,.0f}{'50,000':>10}")
    times = bench_wire.late_join(late_n)
    print(f"\n3b. late join: {late_n} steps in the training's history, a fresh monitor, until every row is in")
    print(f"{'runs':<8}{'median s':>10}{'max s':>8}{'goal s':>8}")
    print(f"{len(times):<8}{float(np.median(times)):>10.3f}{max(times):>8.3f}{'< 1':>8}")
    if float(np.median(times)) >= 1:
        missed.append("3b. late join")
    bench_wire.print_latency(latency_n, "3c. ")
    here = os.path.dirname(os.path.abspath(__file__))
    for script in (
        "publisher_cpu.py",
        "detection.py",
        "reevaluate.py",
        "checkpoint_throughput.py",
        "tui_ingest.py",
        "tui_memory.py",
        "tui_idle_cpu.py",
        "completions_browser.py",
    ):
        if ns.quick and script in ("detection.py", "checkpoint_throughput.py"):
            continue
        print(f"\n4. {script}", flush=True)
        done = subprocess.run([sys.executable, os.path.join(here, script)], text=True, capture_output=True)
        print(done.stdout.rstrip() or done.stderr.rstrip()[-2000:], flush=True)
        if done.returncode != 0:
            missed.append(f"4. {script} (exit {done.returncode})")
    print(f"\n(all benchmarks: {time.time() - t0:.0f} s)")
    if missed:
        print("GOALS MISSED: " + "; ".join(missed))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
