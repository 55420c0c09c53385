"""Step-time overhead on the tiny GRPO run (CPU): no monitoring, our callback, and TRL's own report_to
peers (TensorBoard, W&B offline) on the same run. Runs are interleaved; each figure is the median over steps
(after warm-up) and the median over repeats, and ratios are to the unmonitored run of the same benchmark.

Run: .venv/bin/python benchmarks/bench_steptime.py [--steps 50] [--repeats 7]
Peers need `pip install tensorboard wandb` (rows say "not installed" otherwise). BENCH_EXTRA_SITE=DIR[:DIR]
appends package folders (e.g. a `pip install --target DIR`) to sys.path, after the venv's own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

for _extra in os.environ.get("BENCH_EXTRA_SITE", "").split(":"):
    if _extra:
        sys.path.append(_extra)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")

VARIANTS = (
    "no monitoring",
    "no monitoring (again)",
    "RLHFMonitorCallback",
    "RLHFMonitorCallback(detect_anomalies=False)",
    "report_to=tensorboard",
    "report_to=wandb (offline)",
)


def _available(variant: str) -> bool:
    import importlib.util

    if variant.endswith("tensorboard"):
        return (
            importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None
        )
    if "wandb" in variant:
        return importlib.util.find_spec("wandb") is not None
    return True


def _trainer(model: str, steps: int, variant: str, free_address, reward_funcs: list | None = None):
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_tui.bridge.demo.tiny import length_reward, prompt_dataset
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
    from rlhf_tui.bridge.training.rewards import monitor_rewards

    out = tempfile.mkdtemp(prefix="rlhf-tui-bench-")
    os.environ["WANDB_DIR"] = out
    report_to = {"report_to=tensorboard": "tensorboard", "report_to=wandb (offline)": "wandb"}.get(variant, "none")
    tok = AutoTokenizer.from_pretrained(model)
    tok.padding_side = "left"
    args = GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        max_steps=steps,
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=report_to,
        learning_rate=5e-5,
        beta=0.04,
        save_strategy="no",
        disable_dropout=True,
        disable_tqdm=True,
        seed=0,
        temperature=1.0,
        run_name="rlhf-tui-bench",
    )
    callbacks, rewards, cb = [], list(reward_funcs or [length_reward]), None
    if variant.startswith("RLHFMonitorCallback"):
        cb = RLHFMonitorCallback(
            address=free_address(),
            log_dir=os.path.join(out, "logs"),
            analyze_checkpoints=False,
            detect_anomalies="detect_anomalies=False" not in variant,
        )
        callbacks, rewards = [cb], monitor_rewards(rewards, cb)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=args,
        train_dataset=prompt_dataset(max(64, steps * 4)),
        processing_class=tok,
        callbacks=callbacks,
    )
    if cb is not None:
        cb.trainer = trainer
    return trainer, cb


def step_time_table(steps: int = 50, repeats: int = 7, warmup: int = 10) -> list[tuple]:
    """[(variant, median ms/step or None, ratio or None)]: interleaved runs of each variant."""
    import logging
    import warnings

    from callback_overhead import free_address
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging

    from rlhf_tui.bridge.demo.tiny import build_tiny_model

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    logging.getLogger("wandb").setLevel(logging.ERROR)
    model = build_tiny_model(os.path.join(tempfile.gettempdir(), "rlhf-tui-bench-model"))

    class StepTimer(TrainerCallback):
        """Step times, and our publisher thread's CPU time from the end of warm-up to the end of training."""

        def __init__(self, cb=None):
            self.times, self._t, self.cb, self.cpu0 = [], None, cb, None

        def on_step_begin(self, *a, **k):
            self._t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._t)
            if self.cb is not None and len(self.times) == warmup:
                self.cpu0 = self.cb.publisher.stats["cpu_s"]

    results: dict[str, list[float]] = {v: [] for v in VARIANTS if _available(v)}
    ratios: dict[str, list[float]] = {v: [] for v in results}
    cpu_per_step: dict[str, list[float]] = {}
    order = list(results)
    for _ in range(repeats):
        order = order[1:] + order[:1]  # rotate: no variant always runs first or last
        times = {}
        for variant in order:
            trainer, cb = _trainer(
                model, steps, "no monitoring" if variant.startswith("no monitoring") else variant, free_address
            )
            timer = StepTimer(cb)
            trainer.add_callback(timer)
            trainer.train()
            times[variant] = statistics.median(timer.times[warmup:])
            if cb is not None:
                cb.publisher.flush(5)
                time.sleep(0.2)  # one more loop of the publisher thread: its CPU counter is current
                cpu_per_step.setdefault(variant, []).append(
                    (cb.publisher.stats["cpu_s"] - timer.cpu0) / (steps - warmup)
                )
                cb.close()
            if "wandb" in variant:
                import wandb

                wandb.finish()
        base = (times["no monitoring"] + times["no monitoring (again)"]) / 2  # this round's baseline
        for variant, value in times.items():
            results[variant].append(value)
            ratios[variant].append(value / base)
    rows = []
    for variant in VARIANTS:
        if variant in results:
            rows.append((variant, statistics.median(results[variant]) * 1000, statistics.median(ratios[variant])))
        else:
            rows.append((variant, None, None))
    noise = statistics.median(
        abs(a - b) / ((a + b) / 2) for a, b in zip(results["no monitoring"], results["no monitoring (again)"])
    )
    base_ms = statistics.median(results["no monitoring"]) * 1000
    rows.append(("(noise: |unmonitored - again|)", None, noise))
    for variant, values in cpu_per_step.items():
        cpu_ms = statistics.median(values) * 1000
        label = "(its thread's CPU/step" + (", no detect)" if "False" in variant else ")")
        rows.append((label, cpu_ms, cpu_ms / base_ms))
    return rows


def print_table(rows, steps, repeats) -> None:
    print(
        f"2. tiny GRPO step time (CPU): median over steps 10..{steps} of each run; ratio = median over {repeats} "
        "rounds of run / (mean of the round's two unmonitored runs); variants interleaved, order rotated"
    )
    print(f"{'run':<44}{'ms/step':>10}{'ratio':>8}{'goal':>9}")
    for variant, ms, ratio in rows:
        goal = "<= 1.01" if variant == "RLHFMonitorCallback" else ""
        if variant.startswith("(noise"):
            print(f"{variant:<44}{'':>10}{'±'}{ratio:>7.3f}")
        elif ms is None:
            print(f"{variant:<44}{'not installed':>18}")
        else:
            print(f"{variant:<44}{ms:>10.2f}{'+' if variant.startswith('(its') else ' '}{ratio:>7.3f}{goal:>9}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    ns = parser.parse_args()
    rows = step_time_table(ns.steps, ns.repeats)
    print_table(rows, ns.steps, ns.repeats)
    return goal_missed(rows)


def goal_missed(rows) -> int:
    """1 when the monitored run costs more than the goal (ratio <= 1.01 of the unmonitored step time)."""
    ratio = next((r for variant, ms, r in rows if variant == "RLHFMonitorCallback" and ms is not None), None)
    if ratio is None or ratio > 1.01:
        print(f"GOAL MISSED: RLHFMonitorCallback step time ratio {ratio} > 1.01")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
