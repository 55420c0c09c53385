"""One short check on a machine with an NVIDIA GPU: the real NVML and torch.cuda paths that CI (no GPU) only
tests with fakes, and a real tiny TRL GRPO run on the GPU watched by a monitor over loopback ZeroMQ.

    python benchmarks/gpu_check.py [--out DIR] [--steps 30] [--repeats 2] [--checks sampler,live,overhead]

Prints one line per check (PASS/FAIL and the numbers) and writes DIR/gpu_check.json, DIR/report.txt (the
shared text renderer on what the monitor received) and DIR/monitor.svg (the monitor app, headless). Exit 1 when
a check fails, 2 when there is no GPU at all.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS: dict[str, dict] = {}


def check(what: str, ok: bool, **numbers) -> bool:
    RESULTS[what] = {"ok": bool(ok), **numbers}
    shown = ", ".join(f"{k}={v}" for k, v in numbers.items())
    print(f"{'PASS' if ok else 'FAIL'}  {what}: {shown}", flush=True)
    return ok


def sampler_checks() -> None:
    import torch

    from rlhf_tui.bridge.training.system import SystemSampler, memory_metrics

    # Before CUDA is initialised: NVML alone, and the sampler must not initialise CUDA itself.
    s = SystemSampler().sample()
    gpus = s["gpus"]
    check(
        "nvml before CUDA init",
        bool(gpus)
        and all(g.get("total_mb", 0) > 0 and "used_mb" in g for g in gpus)
        and not any("allocated_mb" in g for g in gpus)
        and not torch.cuda.is_initialized(),
        devices=len(gpus),
        name=gpus[0].get("name") if gpus else None,
        used_mb=gpus[0].get("used_mb") if gpus else None,
        total_mb=gpus[0].get("total_mb") if gpus else None,
        util=gpus[0].get("util") if gpus else None,
        cuda_initialised=torch.cuda.is_initialized(),
    )

    sampler = SystemSampler()
    before = sampler.sample()["gpus"][0]
    x = torch.empty(1024 * 1024 * 1024 // 4, dtype=torch.float32, device="cuda")  # 1 GiB
    x.fill_(1.0)
    torch.cuda.synchronize()
    after = sampler.sample()
    g = after["gpus"][0]
    mm = memory_metrics(after)
    grown = g["used_mb"] - before["used_mb"]
    check(
        "torch.cuda after a 1 GiB tensor",
        g.get("allocated_mb", 0) >= 1024
        and g.get("reserved_mb", 0) >= g["allocated_mb"]
        and g.get("peak_mb", 0) >= 1024
        and grown >= 900
        and 0 < g.get("used_frac", 0) < 1
        and abs(mm["memory/gpu_mb"] - g["allocated_mb"]) < 1
        and mm["memory/gpu_frac"] == g["used_frac"],
        allocated_mb=g.get("allocated_mb"),
        reserved_mb=g.get("reserved_mb"),
        peak_mb=g.get("peak_mb"),
        nvml_used_grew_mb=round(grown, 1),
        used_frac=g.get("used_frac"),
        rss_mb=after["rss_mb"],
        memory_metrics=mm,
    )
    del x
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    for _ in range(200):
        sampler.sample()
    check("sample cost", True, us_per_sample=round((time.perf_counter() - t0) / 200 * 1e6, 1))


def grpo_trainer(model: str, out: str, steps: int, callback=None, save_steps: int = 0):
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_tui.bridge.demo.tiny import length_reward, prompt_dataset
    from rlhf_tui.bridge.training.rewards import monitor_rewards

    tok = AutoTokenizer.from_pretrained(model)
    tok.padding_side = "left"
    args = GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        max_steps=steps,
        logging_steps=1,
        use_cpu=False,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        learning_rate=1e-3,
        beta=0.04,
        disable_dropout=True,
        disable_tqdm=True,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        seed=0,
    )
    rewards = monitor_rewards([length_reward], callback) if callback is not None else [length_reward]
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=args,
        processing_class=tok,
        train_dataset=prompt_dataset(max(64, steps * 4)),
        callbacks=[callback] if callback is not None else [],
    )
    if callback is not None:
        callback.trainer = trainer
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # no log dicts on stdout: the check lines stay readable
    return trainer


def wait_for(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def live_run(model: str, out: Path, steps: int) -> None:
    import numpy as np
    from callback_overhead import free_address

    from rlhf_tui.analysis.thresholds import Thresholds
    from rlhf_tui.bridge.monitor.subscriber import Subscriber
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
    from rlhf_tui.tui.cli import format_report

    address = free_address()
    work = tempfile.mkdtemp(prefix="gpu-check-")
    cb = RLHFMonitorCallback(address=address, log_dir=os.path.join(work, "logs"))
    sub = Subscriber(address).start()
    trainer = grpo_trainer(model, os.path.join(work, "out"), steps, cb, save_steps=steps // 2)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    store = sub.store
    got_end = wait_for(lambda: store.current_run is not None and store.current_run.ended is not None, 30)
    wait_for(
        lambda: (
            len(store.current_run.checkpoints) >= 2
            and all(c.get("health_score") is not None for c in store.current_run.checkpoints)
        ),
        60,
    )
    run = store.current_run
    device = str(next(trainer.model.parameters()).device)
    system = run.system.get(0, {})
    gpus = system.get("gpus") or []
    gpu_mb = run.values("memory/gpu_mb") if "memory/gpu_mb" in run.columns else np.array([])
    frac = run.values("memory/gpu_frac") if "memory/gpu_frac" in run.columns else np.array([])
    check(
        "real GRPO run on the GPU, watched live",
        got_end
        and device.startswith("cuda")
        and run.rows == steps
        and system.get("gpu_available") is True
        and bool(gpus)
        and gpus[0].get("allocated_mb", 0) > 0
        and np.isfinite(gpu_mb).any()
        and np.isfinite(frac).any()
        and store.transport["rejected"] == 0
        and store.transport["gaps"] == 0,
        model_device=device,
        steps_received=run.rows,
        train_s=round(train_s, 1),
        gpu=gpus[0] if gpus else None,
        gpu_mb_points=int(np.isfinite(gpu_mb).sum()),
        transport=dict(store.transport),
        publisher=cb.publisher.stats if cb.publisher else None,
    )
    cps = run.checkpoints
    check(
        "checkpoints of GPU-trained weights analysed",
        len(cps) >= 2 and all(isinstance(c.get("health_score"), (int, float)) for c in cps),
        checkpoints=[
            {
                "step": c.get("step"),
                "health": c.get("health_score"),
                "issues": len(c.get("issues") or []),
                "drift": (c.get("drift") or {}).get("overall"),
            }
            for c in cps
        ],
    )
    text, report = format_report(store, Thresholds(), "text", width=120)
    (out / "report.txt").write_text(text)
    check(
        "report shows the device",
        any(g.get("name", "") in text for g in gpus if g.get("name")),
        gpu_lines=[ln for ln in text.splitlines() if "GPU" in ln or "gpu" in ln][:6],
    )
    try:
        svg = monitor_screenshot(store, out)
        check("monitor app headless on the GPU run", svg is not None, screenshot=svg)
    except Exception as exc:  # textual missing on the machine: say so, the other checks stand
        check("monitor app headless on the GPU run", False, error=f"{type(exc).__name__}: {exc}")
    sub.stop()
    cb.close()


def monitor_screenshot(store, out: Path) -> str | None:
    import asyncio

    from rlhf_tui.tui.app import MonitorApp

    async def show() -> str | None:
        app = MonitorApp([], stores=[store], labels=["gpu-run"])
        async with app.run_test(size=(150, 44)) as pilot:
            end = time.monotonic() + 30
            while time.monotonic() < end:
                v = app.view
                if v.detect_count >= 1 and not v.detecting and v.report and not v.busy:
                    break
                await pilot.pause(0.05)
            await pilot.pause(0.3)
            return app.save_screenshot(filename="monitor.svg", path=str(out))

    return asyncio.run(show())


def overhead(model: str, steps: int, repeats: int) -> None:
    """GPU step time with and without the callback (interleaved; median of steps after warm-up)."""
    from callback_overhead import free_address
    from transformers import TrainerCallback

    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

    class Timer(TrainerCallback):
        """Step times; our publisher thread's CPU time from the end of warm-up (step 5) on."""

        def __init__(self, cb=None):
            self.times, self.t, self.cb, self.cpu0 = [], 0.0, cb, 0.0

        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t)
            if self.cb is not None and len(self.times) == 5:
                self.cpu0 = self.cb.publisher.stats["cpu_s"]

    variants = [
        "no monitoring",
        "no monitoring (again)",
        "RLHFMonitorCallback",
        "RLHFMonitorCallback(detect_anomalies=False)",
    ]
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants[2:]}
    for r in range(repeats):
        k = r % len(variants)
        for variant in variants[k:] + variants[:k]:  # rotate: no variant always first
            work = tempfile.mkdtemp(prefix="gpu-bench-")
            cb = None
            if variant.startswith("RLHFMonitorCallback"):
                cb = RLHFMonitorCallback(
                    address=free_address(),
                    log_dir=os.path.join(work, "logs"),
                    analyze_checkpoints=False,
                    detect_anomalies="False" not in variant,
                )
            trainer = grpo_trainer(model, os.path.join(work, "out"), steps, cb)
            timer = Timer(cb)
            trainer.add_callback(timer)
            trainer.train()
            times[variant].append(statistics.median(timer.times[5:]))
            if cb is not None:
                cb.publisher.flush(5)
                time.sleep(0.2)  # one more loop of the publisher thread: its CPU counter is current
                cpu[variant].append((cb.publisher.stats["cpu_s"] - timer.cpu0) / (steps - 5))
                cb.close()
    base = [(a + b) / 2 for a, b in zip(times[variants[0]], times[variants[1]])]
    noise = [abs(a - b) / ((a + b) / 2) for a, b in zip(times[variants[0]], times[variants[1]])]
    out = {
        "ms_per_step_unmonitored": round(statistics.median(times[variants[0]]) * 1e3, 2),
        "noise_median": round(statistics.median(noise), 3),
        "runs": repeats,
        "steps": steps,
    }
    for v in variants[2:]:
        ratios = [m / b for m, b in zip(times[v], base)]
        out[v] = {
            "ms_per_step": round(statistics.median(times[v]) * 1e3, 2),
            "ratio_median": round(statistics.median(ratios), 3),
            "ratios": [round(x, 3) for x in ratios],
            "thread_cpu_ms_per_step": round(statistics.median(cpu[v]) * 1e3, 3),
        }
    check("step time on the GPU", True, **out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-check-out"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per variant for the step time")
    ap.add_argument("--checks", default="sampler,live,overhead", help="comma-separated subset to run")
    ns = ap.parse_args()
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import torch
    except ImportError:
        print("torch is not installed here: pip install -e '.[train]' (README: Install)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to check", file=sys.stderr)
        return 2
    from rlhf_tui.bridge.demo.tiny import build_tiny_model, quiet_libraries

    quiet_libraries()
    # (no torch.cuda call that initialises CUDA before the sampler checks: they test that the sampler never does)
    RESULTS["machine"] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    print(json.dumps(RESULTS["machine"]), flush=True)
    for name, fn in (
        ("sampler", sampler_checks),
        ("live", lambda: live_run(build_tiny_model(tempfile.mkdtemp() + "/tiny"), out, ns.steps)),
        ("overhead", lambda: overhead(build_tiny_model(tempfile.mkdtemp() + "/tiny"), ns.steps, ns.repeats)),
    ):
        if name not in ns.checks.split(","):
            continue
        try:
            fn()
        except Exception as exc:
            traceback.print_exc()
            check(name, False, error=f"{type(exc).__name__}: {exc}")
    (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    failed = [k for k, v in RESULTS.items() if isinstance(v, dict) and v.get("ok") is False]
    print(f"{len(failed)} failed: {failed}" if failed else "all checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    threading.excepthook = lambda args: traceback.print_exception(args.exc_type, args.exc_value, args.exc_traceback)
    sys.exit(main())
