"""Cost of the callback on the training thread, and the step-time ratio on a real tiny GRPO run.

Run: .venv/bin/python benchmarks/callback_overhead.py [--steps N]
Prints (1) on_log p50/p99 in µs with no monitor, a live monitor and a stalled monitor, and (2) the tiny GRPO
run's median step time with our callback versus without (same process, runs interleaved).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GRPO_LOGS = {"loss": 0.01, "grad_norm": 1.2, "learning_rate": 1e-5, "num_tokens": 2048.0,
             "completions/mean_length": 12.0, "completions/min_length": 3.0, "completions/max_length": 16.0,
             "completions/clipped_ratio": 0.2, "completions/mean_terminated_length": 9.0,
             "completions/min_terminated_length": 3.0, "completions/max_terminated_length": 15.0,
             "rewards/f/mean": 0.3, "rewards/f/std": 0.2, "reward": 0.3, "reward_std": 0.2,
             "frac_reward_zero_std": 0.0, "kl": 0.001, "entropy": 5.0, "clip_ratio/low_mean": 0.0,
             "clip_ratio/high_mean": 0.0, "clip_ratio/region_mean": 0.0, "clip_ratio/low_min": 0.0,
             "clip_ratio/high_max": 0.0, "step_time": 0.03, "epoch": 0.1}


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def time_on_log(cb, n: int) -> np.ndarray:
    state = SimpleNamespace(global_step=0)
    samples = np.empty(n)
    clock = time.perf_counter_ns
    for i in range(n):
        state.global_step = i
        t0 = clock()
        cb.on_log(None, state, None, logs=GRPO_LOGS)
        samples[i] = clock() - t0
        if i % 200 == 199:
            time.sleep(0.01)  # steps are not back to back; let the publisher thread drain
    return samples / 1000.0


def on_log_table(n: int) -> list[tuple]:
    import zmq

    from rlhf_tui.bridge.callback import RLHFMonitorCallback
    from rlhf_tui.bridge.subscriber import Subscriber

    rows = []
    for mode in ("no monitor", "live monitor", "stalled monitor"):
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
            from rlhf_tui.bridge.protocol import hello
            stalled.send(hello(None, 0, resync=True))
        time.sleep(0.3)
        us = time_on_log(cb, n)
        rows.append((mode, float(np.percentile(us, 50)), float(np.percentile(us, 99)), cb.publisher.stats["dropped"]))
        if sub:
            sub.stop()
        if stalled is not None:
            stalled.close(0)
            ctx.term()
        cb.close()
    return rows


def step_time_table(steps: int, repeats: int) -> list[tuple]:
    from transformers import TrainerCallback

    from rlhf_tui.bridge.callback import RLHFMonitorCallback
    from rlhf_tui.bridge.demo_train import make_grpo_trainer
    from rlhf_tui.bridge.tiny import build_tiny_model

    model = build_tiny_model(os.path.join(tempfile.gettempdir(), "rlhf-tui-bench-model"))

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._t = [], None

        def on_step_begin(self, *a, **k):
            self._t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._t)

    class Null(TrainerCallback):
        pass

    results: dict[str, list[float]] = {"without callback": [], "with RLHFMonitorCallback": []}
    for _ in range(repeats):
        for label in results:
            cb = RLHFMonitorCallback(address=free_address(), log_dir=tempfile.mkdtemp(), analyze_checkpoints=False) \
                if label.startswith("with") else Null()
            trainer = make_grpo_trainer(model, tempfile.mkdtemp(), cb, steps=steps) if label.startswith("with") \
                else _plain_trainer(model, steps)
            timer = StepTimer()
            trainer.add_callback(timer)
            trainer.train()
            results[label].append(statistics.median(timer.times[5:]))
            if hasattr(cb, "close"):
                cb.close()
    base = statistics.median(results["without callback"])
    return [(label, statistics.median(v) * 1000, statistics.median(v) / base) for label, v in results.items()]


def _plain_trainer(model, steps):
    """The same GRPO run without our callback (the reward function is not wrapped either)."""
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_tui.bridge.tiny import length_reward, prompt_dataset

    tok = AutoTokenizer.from_pretrained(model)
    tok.padding_side = "left"
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=16, max_steps=steps, logging_steps=1, use_cpu=True, bf16=False,
                      gradient_checkpointing=False, report_to="none", learning_rate=5e-5, beta=0.04,
                      save_strategy="no", disable_dropout=True, disable_tqdm=True, seed=0, temperature=1.0)
    return GRPOTrainer(model=model, reward_funcs=[length_reward], args=args,
                       train_dataset=prompt_dataset(max(64, steps * 4)), processing_class=tok)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-training", action="store_true")
    ns = parser.parse_args()
    import warnings
    warnings.filterwarnings("ignore")
    print(f"on_log cost on the training thread ({ns.calls} calls, {len(GRPO_LOGS)} keys)")
    print(f"{'mode':<18}{'p50 µs':>10}{'p99 µs':>10}{'dropped':>10}")
    for mode, p50, p99, dropped in on_log_table(ns.calls):
        print(f"{mode:<18}{p50:>10.2f}{p99:>10.2f}{dropped:>10}")
    if ns.skip_training:
        return 0
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    print(f"\ntiny GRPO step time, median over steps 5..{ns.steps}, median of {ns.repeats} interleaved runs")
    print(f"{'run':<28}{'ms/step':>10}{'ratio':>8}")
    for label, ms, ratio in step_time_table(ns.steps, ns.repeats):
        print(f"{label:<28}{ms:>10.2f}{ratio:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
